"""Two local processes with ``jax.distributed`` (2 CPU devices each) train like one process with 4 devices."""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
from _subproc import REPO, TINY_ARGS, free_port, jax_env, train_cmd

from ast_jax.checkpoint import CheckpointStore
from ast_jax.train import checkpoint_tree, parse_args, run

STEPS = 3


def test_two_processes_agree_with_single_process(tmp_path, tiny_text_file, jax_subprocess_cache):
    common = [*TINY_ARGS, "--text", str(tiny_text_file), "--mesh", "data=2,fsdp=2", "--min-shard-size", "64",
              "--batch-size", "8", "--steps", str(STEPS), "--save-every", str(STEPS)]  # fmt: skip
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

    # The same run in this process on 4 of its 8 virtual devices.
    ref = run(parse_args([*common, "--checkpoint-dir", str(tmp_path / "single")]), devices=jax.devices()[:4])
    assert ref.step == STEPS
    multi_losses = np.array([loss for _, loss in summary["losses"]])
    np.testing.assert_allclose(multi_losses, [loss for _, loss in ref.losses], rtol=1e-5)

    # Final params written jointly by both processes (each saves its own shards) match the reference.
    store = CheckpointStore(tmp_path / "multi")
    assert store.latest_step() == STEPS and store.verify(STEPS) is None
    dev0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev0),
        jax.eval_shape(checkpoint_tree, ref.state),
    )
    state, meta = store.restore(STEPS, target)
    assert meta["data_position"] == STEPS
    ref_params = jax.device_get(ref.state.params)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
