"""Fault tolerance: integrity-checked orbax checkpoints, SIGKILL/resume bitwise, SIGTERM save, NaN stop."""

from __future__ import annotations

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _subproc import TINY_SAVE_EVERY, TINY_STEPS, jax_env, start, wait_for_line

from ast_jax.checkpoint import INTEGRITY_FILE, CheckpointStore, abstract_like
from ast_jax.optim import sparse_adamw
from ast_jax.train import TrainingDivergedError, main, parse_args, run

STEPS, SAVE_EVERY = TINY_STEPS, TINY_SAVE_EVERY


# ---------------------------------------------------------------------------------------------------------
# CheckpointStore on its own


def _state(seed: int):
    return _state_jit(seed)


@jax.jit
def _state_jit(seed):
    k = jax.random.key(seed)
    params = {
        "block_0": {"fc": {"kernel": jax.random.normal(k, (8, 4)), "bias": jnp.zeros(4)}},
        "wte": {"embedding": jax.random.normal(jax.random.fold_in(k, 1), (5, 8))},
    }
    tx = sparse_adamw(1e-2, max_decay=1e-2, ramp_steps=4, mask_every=1)
    opt_state = tx.init(params)
    # one real update so the moments and masks are non-trivial
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key_data(k),
        "pos": jnp.int32(seed) + 0,
    }


def _assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


def test_save_restore_bitwise_and_keep_last_n(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    states = {s: _state(s) for s in (1, 2, 3)}
    for s, st in states.items():
        store.save(s, st, {"data_position": s * 10})
    assert store.all_steps() == [2, 3]
    assert (tmp_path / "3" / INTEGRITY_FILE).is_file()
    found = store.restore_latest(abstract_like(states[3]))
    assert found.step == 3 and found.meta["data_position"] == 30 and found.skipped == []
    _assert_bitwise(found.state, states[3])
    # masks (bool, inside the optimizer state) come back as masks
    assert jax.tree.structure(found.state) == jax.tree.structure(states[3])


def _data_file(step_dir):
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and "/d/" in p.as_posix())
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "no_manifest", "unreadable"])
def test_damaged_latest_checkpoint_is_reported_and_skipped(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path, keep=3)
    states = {s: _state(s) for s in (1, 2)}
    for s, st in states.items():
        store.save(s, st)
    if damage == "bitflip":
        f = _data_file(tmp_path / "2")
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        f.write_bytes(bytes(raw))
        expected = "SHA-256"
    elif damage == "truncate":
        f = _data_file(tmp_path / "2")
        f.write_bytes(f.read_bytes()[:7])
        expected = "truncated"
    elif damage == "no_manifest":
        (tmp_path / "2" / INTEGRITY_FILE).unlink()
        expected = "did not complete"
    else:
        # consistent manifest but data orbax cannot parse: rewrite both so only the restore can catch it
        for p in (tmp_path / "2").rglob("*"):
            if p.is_file() and p.name == "_METADATA":
                p.write_text("{not json")
        from ast_jax.checkpoint import _tree_files

        (tmp_path / "2" / INTEGRITY_FILE).write_text(json.dumps({"files": _tree_files(tmp_path / "2")}))
        expected = "orbax could not"
    reopened = CheckpointStore(tmp_path, keep=3)
    with caplog.at_level("WARNING", logger="ast_jax.checkpoint"):
        found = reopened.restore_latest(abstract_like(states[1]))
    assert found.step == 1
    assert len(found.skipped) == 1 and expected in found.skipped[0]
    assert expected in caplog.text
    _assert_bitwise(found.state, states[1])
    # the bad step is moved aside, so the run can write step 2 again
    assert reopened.all_steps() == [1] and any((tmp_path / "_corrupted").iterdir())
    reopened.save(2, states[2])
    assert reopened.verify(2) is None


def test_empty_directory_returns_none_and_a_damaged_only_checkpoint_is_refused(tmp_path):
    from ast_jax.checkpoint import NoUsableCheckpointError

    store = CheckpointStore(tmp_path)
    assert store.restore_latest(abstract_like(_state(0))) is None
    store.save(5, _state(0))
    (tmp_path / "5" / INTEGRITY_FILE).unlink()
    # A damaged checkpoint is never a silent fresh start: refused unless the caller asks to restart.
    with pytest.raises(NoUsableCheckpointError, match=r"step 5: no integrity\.json"):
        CheckpointStore(tmp_path).restore_latest(abstract_like(_state(0)))
    assert CheckpointStore(tmp_path).all_steps() == [5]
    assert CheckpointStore(tmp_path).restore_latest(abstract_like(_state(0)), restart=True) is None
    assert CheckpointStore(tmp_path).all_steps() == []
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


# ---------------------------------------------------------------------------------------------------------
# Whole training runs. Runs that get killed are child processes (one virtual CPU device each); uninterrupted
# and resumed runs happen in this process on its first device through ``ast_jax.train.run``, which reuses its
# compiled step across calls. XLA compiles the same program for both, so the results are comparable bitwise.


def _final_state(ckdir):
    store = CheckpointStore(ckdir)
    step = store.latest_step()
    assert store.verify(step) is None
    state, meta = store.restore(step)
    return step, jax.device_get(state), meta


def _run_here(args):
    """``python -m ast_jax.train ARGS`` in this process, on its first device."""
    return run(parse_args(args), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def reference(tiny_reference, jax_subprocess_cache):
    """The uninterrupted run, with single-device CLI arguments and a child-process environment."""
    step, state, meta = _final_state(tiny_reference["dir"])
    assert step == STEPS and meta["data_position"] == STEPS
    assert tiny_reference["result"].step == STEPS and tiny_reference["result"].resumed_from is None
    return {
        "args": [*tiny_reference["args"], "--mesh", "data=1"],
        "env": jax_env(1, jax_subprocess_cache),
        "dir": tiny_reference["dir"],
        "state": state,
    }


def test_sigkill_at_random_steps_then_resume_is_bitwise_identical(reference, tmp_path):
    rng = np.random.default_rng(20240607)
    kill_steps = sorted(rng.choice(np.arange(2, STEPS), size=3, replace=False).tolist())
    for trial, k in enumerate(kill_steps):
        ckdir = tmp_path / f"trial{trial}"
        proc = start([*reference["args"], "--checkpoint-dir", str(ckdir)], reference["env"], tmp_path / "err")
        try:
            wait_for_line(proc, f"step {k}/")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        complete = sorted(int(d.name) for d in ckdir.iterdir() if (d / INTEGRITY_FILE).is_file())
        resumed = _run_here([*reference["args"], "--checkpoint-dir", str(ckdir)])
        assert resumed.resumed_from == (complete[-1] if complete else None), (k, complete)
        step, state, _ = _final_state(ckdir)
        assert step == STEPS
        _assert_bitwise(
            state, reference["state"]
        )  # params, optimizer state + masks, step, RNG, data position


def test_corrupted_latest_checkpoint_falls_back_and_recomputes(reference, tmp_path, capsys):
    import shutil

    ckdir = tmp_path / "run"
    shutil.copytree(reference["dir"], ckdir)
    f = _data_file(ckdir / str(STEPS))
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    resumed = _run_here([*reference["args"], "--checkpoint-dir", str(ckdir)])
    out = capsys.readouterr().out
    assert f"skipped bad checkpoint: step {STEPS}" in out
    assert resumed.resumed_from == STEPS - SAVE_EVERY and len(resumed.summary["skipped_checkpoints"]) == 1
    step, state, _ = _final_state(ckdir)
    assert step == STEPS
    _assert_bitwise(state, reference["state"])


def test_sigterm_saves_then_stops_and_resumes_exactly(reference, tmp_path):
    ckdir = tmp_path / "run"
    args = [*reference["args"], "--checkpoint-dir", str(ckdir)]
    proc = start(args, reference["env"], tmp_path / "err")
    try:
        wait_for_line(proc, "step 2/")
        # Freeze the run, queue SIGTERM, let it go: the signal lands mid-run whatever the machine's speed.
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        rest = proc.stdout.read()
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (tmp_path / "err").read_text()[-2000:]
    line = next(x for x in rest.splitlines() if x.startswith("received SIGTERM"))
    saved = int(line.split("step ")[1].split(",")[0])
    assert 2 <= saved < STEPS
    step, _, meta = _final_state(ckdir)
    assert step == saved and meta["data_position"] == saved
    resumed = _run_here(args)
    assert resumed.resumed_from == saved
    _assert_bitwise(_final_state(ckdir)[1], reference["state"])


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(reference, tmp_path):
    import shutil

    # Poison the newest checkpoint with one inf weight (the compiled step is the reference's, so this costs
    # no compilation): the next loss is non-finite, and the run must stop without writing anything newer.
    ckdir = tmp_path / "run"
    shutil.copytree(reference["dir"], ckdir)
    shutil.rmtree(ckdir / str(STEPS))
    good = STEPS - SAVE_EVERY
    store = CheckpointStore(ckdir)
    state, meta = store.restore(good)
    state = jax.tree.map(np.array, state)  # writable host copies
    state["params"]["model"]["block_0"]["mlp"]["fc"]["kernel"][0, 0] = np.inf
    shutil.rmtree(ckdir / str(good))
    CheckpointStore(ckdir).save(good, state, meta)
    with pytest.raises(TrainingDivergedError, match="non-finite loss") as info:
        _run_here([*reference["args"], "--checkpoint-dir", str(ckdir)])
    assert f"Last good checkpoint: step {good}" in str(info.value)
    assert CheckpointStore(ckdir).all_steps() == [good]  # nothing written after the divergence


def test_cli_exit_statuses(monkeypatch, capsys):
    import ast_jax.train as train

    def diverge(cfg):
        raise TrainingDivergedError("non-finite loss (nan) at step 3")

    monkeypatch.setattr(train, "run", diverge)
    assert main(["--steps", "5"]) == 3
    assert "error: non-finite loss" in capsys.readouterr().err
    assert main(["--steps", "0"]) == 2  # bad settings: ValueError before any work
    assert capsys.readouterr().err == "python -m ast_jax.train: error: --steps must be >= 1, got 0\n"
