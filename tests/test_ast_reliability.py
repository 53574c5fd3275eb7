"""Reliability of AST training (tracker issue 12): resuming with other settings, damaged checkpoint
directories, divergence, hyper-parameter validation, unusable output paths and the ``ast_jax`` command lines.

Each test names the issue item it pins. The error classes added for these items are subclasses of the ones
the contract promises (a settings mismatch is a ``ValueError``) and are looked up on their modules inside the
tests. Training runs happen in this process on its first device and reuse the
session's tiny reference run (``tiny_reference`` in conftest.py) and its compiled programs wherever they can;
refused runs stop before anything is compiled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _subproc import REPO, TINY_SAVE_EVERY, TINY_STEPS

import ast_jax.checkpoint as ckpt_mod
import ast_jax.train as train_mod
from ast_jax.checkpoint import CheckpointStore, abstract_like
from ast_jax.loop import LossWatch
from ast_jax.optim import sparse_adamw
from ast_jax.train import TrainConfig, TrainingDivergedError, parse_args, run
from ast_jax.train import main as train_main

STEPS, SAVE_EVERY = TINY_STEPS, TINY_SAVE_EVERY


def _run_here(args: list[str]):
    return run(parse_args(args), devices=jax.devices()[:1])


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with its SHA-256: equal snapshots mean nothing was moved or changed."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _flip_a_byte(step_dir: Path) -> None:
    data = max((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in p.as_posix()), key=os.path.getsize)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def _one_line_error(err: str, prog: str, *needles: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def run_dir(tiny_reference, tmp_path):
    """A copy of the reference run's checkpoint directory (steps 9 and 12, plus the teacher folder)."""
    ckdir = tmp_path / "run"
    shutil.copytree(tiny_reference["dir"], ckdir)
    return ckdir


@pytest.fixture
def ref_args(tiny_reference):
    return [*tiny_reference["args"], "--mesh", "data=1"]


# ---------------------------------------------------------------------------------------------------------
# Item 1: settings that change array shapes are refused before restoring; nothing on disk moves


def test_item1_shape_changing_resume_is_refused_before_restoring(run_dir, ref_args, capsys):
    before = _snapshot(run_dir)
    with pytest.raises(ValueError) as info:  # a SettingsMismatchError
        _run_here([*ref_args, "--checkpoint-dir", str(run_dir), "--d-model", "16", "--n-layer", "2"])
    msg = str(info.value)
    assert "--d-model 32 (now 16, changes array shapes)" in msg and "--n-layer 1 (now 2" in msg
    assert f"checkpoint step {STEPS}" in msg and "Nothing was changed on disk" in msg
    assert _snapshot(run_dir) == before and not (run_dir / "_corrupted").exists()
    assert "step 1/" not in capsys.readouterr().out  # refused before any training

    # the command line: exit status 2, one line naming the setting, still nothing touched
    argv = [*ref_args[:-2], "--checkpoint-dir", str(run_dir), "--d-model", "64"]
    assert train_main(argv) == 2
    _one_line_error(capsys.readouterr().err, "python -m ast_jax.train", "--d-model 32 (now 64")
    assert _snapshot(run_dir) == before


def test_item1_other_settings_are_named_and_the_store_refuses_other_shapes(run_dir, ref_args, tmp_path):
    with pytest.raises(ValueError) as info:
        _run_here([*ref_args, "--checkpoint-dir", str(run_dir), "--w-kl", "0.5", "--lr", "1e-3"])
    assert "--w-kl 0.67 (now 0.5)" in str(info.value)
    assert "--lr 0.003 (now 0.001, may change with --allow-optimizer-change)" in str(info.value)

    # The store compares the saved arrays' shapes with the target before reading them, whatever the caller.
    tree = {"params": {"block_0": {"kernel": jnp.ones((8, 4))}}, "step": jnp.int32(3)}
    store = CheckpointStore(tmp_path / "s")
    store.save(3, tree)
    before = _snapshot(tmp_path / "s")
    wider = {"params": {"block_0": {"kernel": jnp.ones((8, 6))}}, "step": jnp.int32(3)}
    with pytest.raises(ValueError, match=re.escape("params/block_0/kernel: checkpoint float32[8, 4]")):
        CheckpointStore(tmp_path / "s").restore_latest(abstract_like(wider))
    assert _snapshot(tmp_path / "s") == before


def test_item1_a_setting_the_checkpoint_does_not_record_is_named(run_dir, ref_args):
    """A checkpoint written before a setting existed does not record it: refused, the flag named."""
    store = CheckpointStore(run_dir)
    state, meta = store.restore(STEPS)
    del meta["config"]["b2"]
    shutil.rmtree(run_dir / str(STEPS))
    CheckpointStore(run_dir).save(STEPS, state, meta)
    want = "--b2 not recorded (now 0.99, may change with --allow-optimizer-change)"
    with pytest.raises(ValueError, match=re.escape(want)):
        _run_here([*ref_args, "--checkpoint-dir", str(run_dir)])


# ---------------------------------------------------------------------------------------------------------
# Item 2: a directory of damaged checkpoints stops the run (non-zero, listing why) unless --restart


def test_item2_all_checkpoints_damaged_stops_unless_restart(run_dir, ref_args, tiny_reference, capsys):
    for step in (STEPS - SAVE_EVERY, STEPS):
        _flip_a_byte(run_dir / str(step))
    before = _snapshot(run_dir)
    args = [*ref_args, "--checkpoint-dir", str(run_dir)]
    assert train_main([*ref_args[:-2], "--checkpoint-dir", str(run_dir)]) == 4
    _one_line_error(capsys.readouterr().err, "python -m ast_jax.train", "no usable checkpoint", "--restart")
    assert _snapshot(run_dir) == before

    with pytest.raises(ckpt_mod.NoUsableCheckpointError) as info:
        _run_here(args)
    msg = str(info.value)
    for step in (STEPS, STEPS - SAVE_EVERY):
        assert re.search(rf"step {step}: file \S+ fails its SHA-256 check", msg), msg
    assert "--restart" in msg and _snapshot(run_dir) == before

    # --restart: the damaged steps are moved aside and the run starts over (same compiled programs)
    result = _run_here([*args, "--restart"])
    assert result.resumed_from is None and result.step == STEPS
    assert len(list((run_dir / "_corrupted").iterdir())) == 2
    store = CheckpointStore(run_dir)
    state, _ = store.restore(store.latest_step())
    np.testing.assert_array_equal(  # deterministic: the same run from step 0 gives the reference's weights
        np.asarray(state["params"]["model"]["wte"]["embedding"]),
        np.asarray(tiny_reference["state"]["params"]["model"]["wte"]["embedding"]),
    )


# ---------------------------------------------------------------------------------------------------------
# Item 3: a diverged state is never saved; the advice (lower --lr, --allow-optimizer-change) works


def _max_abs_params_and_finite(ckdir: Path, step: int) -> tuple[float, bool]:
    state, _ = CheckpointStore(ckdir).restore(step)
    floats = [
        np.asarray(x) for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.floating)
    ]
    biggest = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(state["params"]))
    return biggest, all(bool(np.all(np.isfinite(x))) for x in floats)


def test_item3_exploding_update_is_never_saved_and_the_advice_works(ref_args, tmp_path):
    ckdir, summary = tmp_path / "run", tmp_path / "run.json"
    args = [*ref_args, "--checkpoint-dir", str(ckdir)]
    with pytest.raises(TrainingDivergedError) as info:
        _run_here([*args, "--lr", "1e30", "--save-every", "1"])
    saved = CheckpointStore(ckdir).all_steps()
    assert saved, "the warm-up step (learning rate 0) is a good state and is saved"
    for step in saved:
        biggest, finite = _max_abs_params_and_finite(ckdir, step)
        assert finite and biggest < 100.0, (step, biggest)
    msg = str(info.value)
    assert f"Last good checkpoint: step {saved[-1]}" in msg and "--allow-optimizer-change" in msg
    assert info.value.exit_code == 3

    # following the advice without the flag is refused (the learning rate differs) ...
    with pytest.raises(ValueError, match="--allow-optimizer-change"):
        _run_here(args)
    # ... and with it the run resumes from the last good step and records the change
    result = _run_here([*args, "--allow-optimizer-change", "--json", str(summary)])
    assert result.resumed_from == saved[-1] and result.step == STEPS
    change = {"resumed_from": saved[-1], "changes": {"lr": {"checkpoint": 1e30, "now": 0.003}}}
    assert json.loads(summary.read_text())["optimizer_changes"] == [change]
    assert CheckpointStore(ckdir).read_meta(STEPS)["optimizer_changes"] == [change]


def _first_moment(opt_state):
    """The Adam first moments (``mu``) wherever the optimizer keeps them in its (restored) state."""
    if isinstance(opt_state, dict):
        if "mu" in opt_state:
            return opt_state["mu"]
        children = opt_state.values()
    else:
        children = opt_state if isinstance(opt_state, list | tuple) else ()
    for child in children:
        found = _first_moment(child)
        if found is not None:
            return found
    return None


def test_item3_nan_optimizer_state_is_never_saved(run_dir, ref_args):
    good = STEPS - SAVE_EVERY
    shutil.rmtree(run_dir / str(STEPS))
    store = CheckpointStore(run_dir)
    state, meta = store.restore(good)
    state = jax.tree.map(np.array, state)  # writable host copies
    # NaN in a first moment (what a NaN decay or learning rate leaves behind): the loss of the next step is
    # still finite, its update is not.
    _first_moment(state["opt_state"])["model"]["block_0"]["mlp"]["fc"]["kernel"][0, 0] = np.nan
    shutil.rmtree(run_dir / str(good))
    CheckpointStore(run_dir).save(good, state, meta)
    with pytest.raises(TrainingDivergedError, match=r"params or optimizer state hold NaN/inf") as info:
        _run_here([*ref_args, "--checkpoint-dir", str(run_dir), "--save-every", "1"])
    assert f"training diverged at step {good + 1}" in str(info.value)
    assert CheckpointStore(run_dir).all_steps() == [good]


def test_item3_loss_spike_rule():
    watch = LossWatch(10.0)
    assert watch.problem(1e6) is None  # no history yet: only NaN/inf count
    for loss in (2.0, 1.9, 2.1):
        watch.accept(loss)
    assert watch.problem(19.0) is None
    assert "loss spike" in watch.problem(25.0)
    assert "non-finite" in watch.problem(math.inf) and "non-finite" in watch.problem(math.nan)
    tiny = LossWatch(10.0)
    tiny.accept(0.01)
    assert tiny.problem(0.5) is None  # a tiny loss's noise is no spike: the bar is at least 10 nats
    assert LossWatch(0.0, prior=1.0).problem(1e9) is None  # 0 = off


# ---------------------------------------------------------------------------------------------------------
# Item 4: hyper-parameters are validated when the config / optimizer is built


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("lr", math.nan, "--lr"),
        ("lr", math.inf, "--lr"),
        ("lr", -1.0, "--lr"),
        ("teacher_lr", -3e-3, "--teacher-lr"),
        ("max_decay", math.nan, "--max-decay"),
        ("max_decay", -0.1, "--max-decay"),
        ("max_decay", math.inf, "--max-decay"),
        ("weight_decay", math.nan, "--weight-decay"),
        ("weight_decay", -0.1, "--weight-decay"),
        ("warmup_steps", -1, "--warmup-steps"),
        ("ramp_steps", -1, "--ramp-steps"),
        ("steps", 0, "--steps"),
        ("steps", -5, "--steps"),
        ("teacher_steps", -1, "--teacher-steps"),
        ("mask_every", 0, "--mask-every"),
        ("temperature", 0.0, "--temperature"),
        ("w_kl", math.nan, "--w-kl"),
        ("loss_spike", 0.5, "--loss-spike"),
        ("seed", -1, "--seed"),
        ("d_model", 30, "--d-model"),
    ],
)
def test_item4_train_config_names_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        TrainConfig.from_flags(**{field: value})


@pytest.mark.parametrize(
    ("lr", "kwargs", "match"),
    [
        (-1e-3, {}, "learning_rate"),
        (math.nan, {}, "learning_rate"),
        (math.inf, {}, "learning_rate"),
        (1e-3, {"max_decay": math.nan}, "max_decay"),
        (1e-3, {"weight_decay": math.nan}, "weight_decay"),
        (1e-3, {"weight_decay": -1.0}, "weight_decay"),
        (1e-3, {"eps": math.nan}, "eps"),
    ],
)
def test_item4_sparse_adamw_rejects_bad_numbers(lr, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparse_adamw(lr, **kwargs)


def test_item4_sparse_adamw_rejects_masks_that_are_not_nm():
    two_of_four = np.zeros((8, 3), bool)
    two_of_four[0::2] = True
    sparse_adamw(0.0, initial_masks={"block_0": {"kernel": two_of_four}})  # valid; lr 0 is allowed
    three = two_of_four.copy()
    three[1, 2] = True  # rows 0..3 of column 2 keep 3
    for masks, match in (
        (np.ones((8, 3), bool), "not 2:4"),
        (three, r"not 2:4: 1 group\(s\).*column 2 keep 3"),
        (np.ones((6, 3), bool), "multiple of m=4"),
    ):
        with pytest.raises(ValueError, match=match):
            sparse_adamw(1e-3, initial_masks={"block_0": {"kernel": masks}})


# ---------------------------------------------------------------------------------------------------------
# Item 5: unusable output paths are reported before the first training step


def test_item5_checkpoint_dir_that_is_a_file_is_reported_before_any_step(ref_args, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for target, words in ((blocker, "is a file"), (blocker / "sub", "lies under the file")):
        with pytest.raises(ValueError, match=words):
            _run_here([*ref_args, "--checkpoint-dir", str(target), "--teacher-steps", "50"])
        assert "step 1/" not in capsys.readouterr().out
    assert train_main([*ref_args[:-2], "--checkpoint-dir", str(blocker)]) == 2
    _one_line_error(capsys.readouterr().err, "python -m ast_jax.train", "--checkpoint-dir", "is a file")
    assert blocker.read_text() == "not a directory"
    # --json and --export-dir are written at the end of a run: checked at its start too
    with pytest.raises(ValueError, match="--json"):
        _run_here([*ref_args, "--json", str(blocker / "summary.json")])
    with pytest.raises(ValueError, match="--export-dir"):
        _run_here([*ref_args, "--export-dir", str(blocker)])
    assert "step 1/" not in capsys.readouterr().out


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root may write into a mode-0500 directory; the file cases above test the check"
)
def test_item5_unwritable_checkpoint_dir_is_reported_before_any_step(ref_args, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"cannot (write|create)"):
            _run_here([*ref_args, "--checkpoint-dir", str(locked / "ck")])
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------
# Item 12: every ast_jax command line documents every flag and reports user errors in one line, exit 2


def _clis():
    import ast_jax.__main__ as main_mod
    import ast_jax.experiments as exp_mod

    return {
        "python -m ast_jax": main_mod,
        "python -m ast_jax.train": train_mod,
        "python -m ast_jax.experiments": exp_mod,
    }


@pytest.mark.parametrize(
    "prog", ["python -m ast_jax", "python -m ast_jax.train", "python -m ast_jax.experiments"]
)
def test_item12_every_flag_has_help(prog, capsys):
    module = _clis()[prog]
    parser = module._parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 20
    for action in flags:
        assert action.help and re.search("[a-z]{3}", action.help), action.option_strings
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for action in flags:
        assert action.option_strings[0] in text
    if prog.endswith("train"):
        assert all(f in text for f in ("--restart", "--allow-optimizer-change", "--loss-spike"))


_TINY_MAIN = [
    "--max-bytes", "30000", "--n-layer", "1", "--d-model", "16", "--n-head", "2", "--seq-len", "16",
    "--batch-size", "4", "--teacher-steps", "20", "--teacher-eval-every", "10", "--steps", "10",
    "--slorb-k", "4", "--eval-windows", "8", "--no-progress", "--no-plots", "--fast-compile",
]  # fmt: skip


@pytest.mark.parametrize(
    ("prog", "argv", "needle"),
    [
        ("python -m ast_jax", ["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
        ("python -m ast_jax", ["--slorb-k", "0"], "--slorb-k must be >= 1"),
        ("python -m ast_jax", ["--max-decay", "nan"], "--max-decay"),
        ("python -m ast_jax", ["--steps", "many"], "--steps: expected int, got 'many'"),
        ("python -m ast_jax.train", ["--lr", "-1"], "--lr must be a finite number > 0"),
        ("python -m ast_jax.train", ["--loss-spike", "0.5"], "--loss-spike"),
        ("python -m ast_jax.experiments", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        ("python -m ast_jax.experiments", ["--b2", "1.5"], "--b2 must be in [0, 1)"),
        ("python -m ast_jax.experiments", ["--w-hidden", "-1"], "--w-hidden"),
    ],
)
def test_item12_impossible_values_are_one_line_errors(prog, argv, needle, tmp_path, capsys):
    extra = {
        "python -m ast_jax": _TINY_MAIN,
        "python -m ast_jax.train": ["--steps", "1", "--teacher-steps", "0"],
        "python -m ast_jax.experiments": ["--model", str(tmp_path / "missing.gguf")],
    }[prog]
    code = None
    try:
        code = _clis()[prog].main([*extra, *argv])
    except SystemExit as e:  # argparse's own errors exit from inside the parser
        code = e.code
    assert code == 2
    _one_line_error(capsys.readouterr().err, prog, needle)


def test_item12_user_errors_while_running_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing.txt")
    assert _clis()["python -m ast_jax"].main([*_TINY_MAIN, "--text", missing]) == 2
    _one_line_error(capsys.readouterr().err, "python -m ast_jax", "is not a file")
    exp = _clis()["python -m ast_jax.experiments"]
    assert exp.main(["--data-dir", str(tmp_path)]) == 2
    _one_line_error(capsys.readouterr().err, "python -m ast_jax.experiments", "data file", "not found")
    assert train_main(["--text", missing, "--steps", "1"]) == 2
    _one_line_error(capsys.readouterr().err, "python -m ast_jax.train", "is not a file")


def test_item12_a_real_process_prints_one_line_and_exits_2():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "ast_jax", *_TINY_MAIN, "--lr", "-1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == "python -m ast_jax: error: --lr must be a finite number > 0, got -1.0\n"
    assert proc.stdout == ""
