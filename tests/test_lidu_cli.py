"""The lidu command lines (``python -m lidu_jax``, ``python -m lidu_jax.study``) as a user meets them.

Every flag is documented in ``--help``; an impossible value, a malformed flag or a malformed data file is one
``prog: error: ...`` line on stderr and exit status 2 (never a traceback, never a started run); a diverged
training run is reported as a training failure (status 3) before any estimator sees its scores. The last test
keeps the float comparisons of the lidu test files independent of the BLAS kernel.

Most checks call ``main(argv)`` in this process (no JAX start-up per case); two run real processes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _lidu_tiny import study_argv

from lidu_jax import study, study_cells, synthetic_study

REPO = Path(__file__).resolve().parents[1]
CLIS = {"study": (study, "python -m lidu_jax.study"), "synthetic": (synthetic_study, "python -m lidu_jax")}
CONFIGS = {"study": study.RealDataStudyConfig, "synthetic": synthetic_study.SyntheticStudyConfig}

# A tiny synthetic study: one ensemble source, a few seconds end to end.
SYNTH_TINY = [
    "--n-users", "60", "--n-items", "40", "--activity-median", "8", "--max-activity", "20", "--true-top", "5",
    "--epochs", "3", "--n-models", "2", "--model-dim", "4", "--batch-size", "128", "--sources", "ensemble",
    "--k", "3", "--grid-size", "64", "--kde-grid-size", "0", "--n-boot", "20", "--plot", "", "--no-progress",
    "--prng", "rbg",
]  # fmt: skip


def _study_tiny(data: Path, out: Path) -> list[str]:
    return study_argv(data, out, "--epochs", "2")


def _one_error_line(err: str, prog: str) -> str:
    assert err.startswith(f"{prog}: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line:\n{err}"
    assert "Traceback" not in err
    return err


def _must_not_run(*args, **kwargs):
    raise AssertionError("the value was accepted: the study started")


# ------------------------------------------------------------------------------------------ item 12


@pytest.mark.parametrize("name", sorted(CLIS))
def test_help_describes_every_flag(name, capsys):
    module, _ = CLIS[name]
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    # argparse re-wraps the text (and may break after a hyphen): compare without any whitespace.
    out = "".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(CONFIGS[name]):
        text = f.metadata.get("help") or ""
        assert len(text.split()) >= 3, f"--{f.name.replace('_', '-')} has no real help text: {text!r}"
        assert "--" + f.name.replace("_", "-") in out
        assert "".join(text.replace("%%", "%").split()) in out, f.name


STUDY_BAD = [
    (["--lr", "-1"], "--lr must be finite and > 0"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--lr", "inf"], "--lr must be finite"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--n-models", "1"], "--n-models must be an integer >= 2"),
    (["--n-samples", "1"], "--n-samples"),
    (["--k", "0"], "--k must be an integer >= 1"),
    (["--grid-size", "4"], "--grid-size"),
    (["--chunk", "0"], "--chunk"),
    (["--n-boot", "0"], "--n-boot"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--dropout", "1.5"], "--dropout"),
    (["--k-core", "-1"], "--k-core"),
    (["--dim", "-3"], "--dim"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--max-eval-users", "-5"], "--max-eval-users"),
    (["--dynamics-every", "0"], "--dynamics-every"),
    (["--min-rating", "nan"], "--min-rating"),
    (["--split", "temporal"], "--split must be one of"),
    (["--model", "gru"], "--model must be one of"),
    (["--source", "magic"], "--source must be one of"),
    (["--source", "bayesian", "--model", "mlp"], "--source bayesian"),
    (["--data", "/nonexistent/file.tsv"], "--data must be one of"),
    (["--lidu-variants", "exact,fancy"], "--lidu-variants"),
    (["--sweeps", "--sweep-candidates", "5"], "--sweep-candidates"),
    (["--sweeps", "--sweep-ks", "0"], "--sweep-ks"),
    (["--sweep-ks", "one,two"], "--sweep-ks"),
    (["--dynamics", "--source", "snapshot", "--n-models", "2"], "--dynamics"),
]
SYNTH_BAD = [
    (["--lr", "-1"], "--lr must be finite and > 0"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--l2", "-1"], "--l2"),
    (["--epochs", "0"], "--epochs"),
    (["--n-models", "1"], "--n-models"),
    (["--k", "0"], "--k"),
    (["--k", "400"], "--k must be in [1, --n-items - 1"),
    (["--n-users", "1"], "--n-users"),
    (["--model-dim", "0"], "--model-dim"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seed", "-1"], "--seed"),
    (["--data-seed", "-1"], "--data-seed"),
    (["--dropout", "1"], "--dropout"),
    (["--sources", "ensemble,dropout", "--dropout", "0"], "--dropout"),
    (["--sources", "magic"], "--sources"),
    (["--sources", ""], "--sources"),
    (["--prng", "philox"], "--prng"),
    (["--max-activity", "5"], "--min-activity"),
    (["--true-top", "0"], "--true-top"),
    (["--true-top", "300"], "--max-activity + --true-top"),
    (["--grid-size", "4"], "--grid-size"),
    (["--kde-grid-size", "4"], "--kde-grid-size"),
    (["--activity-median", "0"], "--activity-median"),
    (["--activity-sigma", "-1"], "--activity-sigma"),
    (["--n-boot", "0"], "--n-boot"),
    (["--sources", "snapshot", "--n-models", "9", "--epochs", "5"], "--n-models=9 must be <= --epochs=5"),
]


@pytest.mark.parametrize(
    "name, argv, flag",
    [("study", a, f) for a, f in STUDY_BAD] + [("synthetic", a, f) for a, f in SYNTH_BAD],
    ids=[f"study{a}" for a, _ in STUDY_BAD] + [f"synthetic{a}" for a, _ in SYNTH_BAD],
)
def test_impossible_value_is_one_error_line_and_status_2(name, argv, flag, monkeypatch, capsys):
    module, prog = CLIS[name]
    monkeypatch.setattr(module, "run", _must_not_run)
    monkeypatch.setattr(module, "run_all", _must_not_run, raising=False)
    assert module.main([*argv, "--no-progress"]) == 2
    assert flag in _one_error_line(capsys.readouterr().err, prog)


def test_impossible_paths_are_rejected_before_running(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ("study", ["--out-dir", str(a_file)], "--out-dir"),
        ("study", ["--json", str(tmp_path)], "--json"),
        ("synthetic", ["--plot", str(tmp_path)], "--plot"),
        ("synthetic", ["--json", str(tmp_path)], "--json"),
    ]
    for name, argv, flag in cases:
        module, prog = CLIS[name]
        monkeypatch.setattr(module, "run", _must_not_run)
        assert module.main(argv) == 2, argv
        assert flag in _one_error_line(capsys.readouterr().err, prog)


@pytest.mark.parametrize("name", sorted(CLIS))
@pytest.mark.parametrize("argv", [["--epochs", "x"], ["--epochs", "1.5"], ["--no-such-flag"]])
def test_malformed_flag_is_one_error_line_and_status_2(name, argv, monkeypatch, capsys):
    module, prog = CLIS[name]
    monkeypatch.setattr(module, "run", _must_not_run)
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, prog)


@pytest.mark.parametrize(
    "content, where",
    [
        (b"1 2 3 4\n2 3\xff 4 5\n", ":2: not UTF-8"),  # a Latin-1 byte
        (b"1 2 3\x00\x00 4\n", ":1: NUL byte"),  # a binary file
        (b"1 2 3 4\n12345678901234567890123 5 6 7\n", ":2: user id '12345678901234567890123' does not fit"),
        (b"nan\t1\n1\t2\n", ":1: user id 'nan' is not an integer"),
    ],
    ids=["latin1", "binary", "23-digit-id", "nan-id"],
)
def test_malformed_data_file_is_one_error_line_and_status_2(content, where, tmp_path, capsys):
    # Items 11 and 12 together: the reader's error reaches the user as one line naming file and line.
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    assert study.main(_study_tiny(path, tmp_path)) == 2
    assert f"{path}{where}" in _one_error_line(capsys.readouterr().err, "python -m lidu_jax.study")


# ------------------------------------------------------------------------------------------ item 13


def _estimator_called(*args, **kwargs):
    raise AssertionError("an estimator was given the diverged model's scores")


def test_study_divergence_is_a_training_failure_not_an_estimator_error(
    lidu_tiny_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(study_cells, "lidu", _estimator_called)  # the estimator of a cell
    assert study.main([*_study_tiny(lidu_tiny_file, tmp_path), "--lr", "1e30"]) == 3
    err = _one_error_line(capsys.readouterr().err, "python -m lidu_jax.study")
    assert "training failed" in err and "BPR-MF" in err and "NaN/inf" in err, err
    assert "--seed 0" in err and "--lr 1e+30" in err and "learning rate" in err, err
    assert "mean contains" not in err


def test_synthetic_divergence_is_a_training_failure_not_an_estimator_error(monkeypatch, capsys):
    monkeypatch.setattr(synthetic_study, "lidu", _estimator_called)
    assert synthetic_study.main([*SYNTH_TINY, "--lr", "1e30"]) == 3
    err = _one_error_line(capsys.readouterr().err, "python -m lidu_jax")
    assert "training failed" in err and "BPR-MF" in err and "source ensemble" in err, err
    assert "--seed 0" in err and "learning rate" in err and "samples contain" not in err, err


# ------------------------------------------------------------------------------------- real processes


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=240, env=env, cwd=REPO
    )


def test_processes_exit_with_status_and_one_stderr_line(lidu_tiny_file, tmp_path):
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"1\t2\t5\t100\n\xff\xfe\t3\t4\t101\n")
    r = _run("lidu_jax.study", *_study_tiny(binary, tmp_path))
    assert r.returncode == 2, r.stderr
    assert f"{binary}:2: not UTF-8" in _one_error_line(r.stderr, "python -m lidu_jax.study")
    r = _run("lidu_jax", *SYNTH_TINY, "--lr", "-1")  # (status 3 of a diverged run: tested in-process above)
    assert r.returncode == 2, r.stderr
    assert "--lr must be finite and > 0" in _one_error_line(r.stderr, "python -m lidu_jax")
