"""An interrupted ``--protocol models`` run resumes from its per-run checkpoints
(`lidu_jax.study_models_checkpoint`): same numbers as an uninterrupted run, only the missing runs trained,
and a checkpoint of other settings (or a forgotten ``--resume``) refused before any training."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from _lidu_tiny import study_argv

from lidu_jax import study, study_models

FLAGS = ("--protocol", "models", "--population", "small", "--population-families", "bpr", "--chunk", "64")


class _Killed(Exception):
    """Stands for the process being killed in the middle of the third training run."""


@pytest.fixture(scope="module")
def uninterrupted(lidu_tiny_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert study.main(study_argv(lidu_tiny_file, out, *FLAGS)) == 0
    return json.loads((out / "models_tiny.json").read_text())


@pytest.fixture(scope="module")
def interrupted_once(lidu_tiny_file, tmp_path_factory):
    """An out dir whose run stopped in its third training run (of three): runs 0 and 1 are saved."""
    out = tmp_path_factory.mktemp("interrupted")
    real, calls = study_models._train, []

    def train(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise _Killed
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_models, "_train", train)
        with pytest.raises(_Killed):
            study.main(study_argv(lidu_tiny_file, out, *FLAGS))
    ckpt = out / "models_tiny.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["run_0.json", "run_0.npz", "run_1.json", "run_1.npz"]
    assert not (out / "models_tiny.json").exists()
    return out


@pytest.fixture
def interrupted(interrupted_once, tmp_path):
    """A copy of the interrupted run's out dir for one test (tests may resume or damage it)."""
    shutil.copytree(interrupted_once, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_resume_trains_only_the_missing_run_and_gives_the_uninterrupted_numbers(
    interrupted, uninterrupted, lidu_tiny_file, monkeypatch
):
    real, trained = study_models._train, []
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: trained.append(a[1]) or real(*a, **k))
    assert study.main(study_argv(lidu_tiny_file, interrupted, *FLAGS, "--resume")) == 0
    assert [(r.dim, r.regularisation) for r in trained] == [(8, "strong")]  # the third run of the table
    resumed = json.loads((interrupted / "models_tiny.json").read_text())
    assert not (interrupted / "models_tiny.ckpt").exists()  # removed once the result is written
    assert [m["name"] for m in resumed["models"]] == [m["name"] for m in uninterrupted["models"]]
    for new, old in zip(resumed["models"], uninterrupted["models"], strict=True):
        assert new["mean_ndcg"] == pytest.approx(old["mean_ndcg"], abs=1e-6), new["name"]
        for name in old["means"]:  # the scale-free row needs the restored parameters, not only the rows
            assert new["means"][name] == pytest.approx(old["means"][name], rel=1e-5, abs=1e-5), name
    for name, row in uninterrupted["selection"].items():
        assert resumed["selection"][name]["regret"] == pytest.approx(row["regret"], abs=1e-6), name
    np.testing.assert_allclose(
        resumed["scale_free"]["target_spread_ratio"], uninterrupted["scale_free"]["target_spread_ratio"],
        rtol=1e-5, atol=1e-7,
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--k", "4"), r"was run with --k=5, this run has 4"),
        (("--grid-size", "64"), r"was run with --grid-size=32, this run has 64"),
        (("--seed", "1"), r"was run with --seed=0, this run has 1"),
    ],
)
def test_resume_refuses_a_checkpoint_of_other_settings(
    interrupted, lidu_tiny_file, monkeypatch, capsys, extra, match
):
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    assert study.main(study_argv(lidu_tiny_file, interrupted, *FLAGS, *extra, "--resume")) == 2
    assert re.search(match, capsys.readouterr().err)
    assert len(list((interrupted / "models_tiny.ckpt").iterdir())) == 4  # nothing deleted


def test_a_forgotten_resume_is_refused_and_the_checkpoint_kept(
    interrupted, lidu_tiny_file, monkeypatch, capsys
):
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    assert study.main(study_argv(lidu_tiny_file, interrupted, *FLAGS)) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert len(list((interrupted / "models_tiny.ckpt").iterdir())) == 4


def test_resume_without_a_checkpoint_is_refused(lidu_tiny_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    assert study.main(study_argv(lidu_tiny_file, tmp_path, *FLAGS, "--resume")) == 2
    assert "--resume: no checkpoint of an interrupted run" in capsys.readouterr().err


def test_a_damaged_run_file_is_named(interrupted, lidu_tiny_file, monkeypatch, capsys):
    (interrupted / "models_tiny.ckpt" / "run_1.json").write_text('{"header": ')  # cut off mid-write
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    assert study.main(study_argv(lidu_tiny_file, interrupted, *FLAGS, "--resume")) == 2
    assert "run_1.json is damaged" in capsys.readouterr().err


def _edit_settings(ckpt, edit) -> None:
    for r in (0, 1):
        path = ckpt / f"run_{r}.json"
        payload = json.loads(path.read_text())
        edit(payload["header"]["settings"])
        path.write_text(json.dumps(payload))


def test_an_option_added_after_the_checkpoint_counts_as_its_default(interrupted, lidu_tiny_file, capsys):
    # A checkpoint written before --dynamics-every existed lacks it; that run behaved as its default (2).
    ckpt = interrupted / "models_tiny.ckpt"
    _edit_settings(ckpt, lambda s: s.pop("dynamics_every"))
    assert study.main(study_argv(lidu_tiny_file, interrupted, *FLAGS, "--resume")) == 0
    assert (interrupted / "models_tiny.json").is_file()


def test_a_recorded_non_default_is_still_compared(interrupted, lidu_tiny_file, monkeypatch, capsys):
    _edit_settings(interrupted / "models_tiny.ckpt", lambda s: s.update(dynamics_every=5))
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    assert study.main(study_argv(lidu_tiny_file, interrupted, *FLAGS, "--resume")) == 2
    assert "was run with --dynamics-every=5, this run has 2" in capsys.readouterr().err
