"""Two local processes with ``jax.distributed`` (2 CPU devices each) train like one process on one device."""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
from _subproc import REPO, TINY_STEPS, free_port, jax_env, train_cmd

from ast_jax.checkpoint import CheckpointStore
from ast_jax.train import checkpoint_tree


def test_two_processes_agree_with_single_process(tmp_path, tiny_reference, jax_subprocess_cache):
    common = [*tiny_reference["args"], "--mesh", "data=2,fsdp=2", "--log-every", "4"]
    port = free_port()
    env = jax_env(2, jax_subprocess_cache)
    procs = []
    for pid in range(2):
        dist = [
            "--coordinator-address",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(pid),
        ]
        args = [
            *common,
            *dist,
            "--checkpoint-dir",
            str(tmp_path / "multi"),
            "--json",
            str(tmp_path / f"o{pid}.json"),
        ]
        procs.append(
            subprocess.Popen(
                train_cmd(*args),
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es), mesh {'data': 2, 'fsdp': 2} on 4 cpu device(s)" in outputs[0]
    summary = json.loads((tmp_path / "o0.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4

    # Against the same run in one process on one device (tiny_reference): same losses and final params.
    ref = tiny_reference["result"]
    multi_losses = [loss for _, loss in summary["losses"]]
    np.testing.assert_allclose(multi_losses, [loss for _, loss in ref.losses], rtol=1e-5, atol=1e-6)

    # Final params written jointly by both processes (each saves its own shards).
    store = CheckpointStore(tmp_path / "multi")
    assert store.latest_step() == TINY_STEPS and store.verify(TINY_STEPS) is None
    dev0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev0),
        jax.eval_shape(checkpoint_tree, ref.state),
    )
    state, meta = store.restore(TINY_STEPS, target)
    assert meta["data_position"] == TINY_STEPS
    for a, b in zip(
        jax.tree.leaves(state["params"]), jax.tree.leaves(jax.device_get(ref.state.params)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
