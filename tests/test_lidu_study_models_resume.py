"""An interrupted ``--protocol models`` run resumes from its per-run checkpoints
(`lidu_jax.study_models_checkpoint`): same numbers as an uninterrupted run, only the missing runs trained,
and a checkpoint of other settings (or a forgotten ``--resume``) refused before any training."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lidu_tiny import study_argv

from lidu_jax import study, study_models, study_models_checkpoint, study_models_population, training

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
        calls.append(args[2])
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
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: trained.append(a[2]) or real(*a, **k))
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


def test_a_family_setting_is_compared_for_that_family_runs_only(
    interrupted, lidu_tiny_file, monkeypatch, capsys
):
    # --sasrec-pack changes SASRec training alone: saved bpr runs were computed identically under it.
    ckpt = interrupted / "models_tiny.ckpt"
    assert (
        study.main(
            study_argv(lidu_tiny_file, interrupted, *FLAGS, "--resume", "--sasrec-pack", "--keep-checkpoint")
        )
        == 0
    )
    assert (interrupted / "models_tiny.json").is_file()
    # Had the saved runs been SASRec runs, the same flag would differ from how they were trained.
    for r in (0, 1):
        path = ckpt / f"run_{r}.json"
        payload = json.loads(path.read_text())
        payload["header"]["run"]["family"] = "sasrec"
        path.write_text(json.dumps(payload))
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    (interrupted / "models_tiny.json").unlink()
    assert study.main(study_argv(lidu_tiny_file, interrupted, *FLAGS, "--resume", "--sasrec-pack")) == 2
    assert "was run with --sasrec-pack=False, this run has True" in capsys.readouterr().err


def test_resume_may_add_families_after_the_saved_ones(interrupted, lidu_tiny_file, monkeypatch):
    # The saved bpr runs 0 and 1 are runs 0 and 1 of the bpr,mlp population too (same table entries, keys
    # and rows before them), so they are restored and training starts at run 2; stopped there, since the
    # resumed numbers equal the uninterrupted ones by the test above.
    trained = []

    def train(*args, **kwargs):
        trained.append(args[2])
        raise _Killed

    monkeypatch.setattr(study_models, "_train", train)
    more = (*FLAGS[:5], "bpr,mlp", *FLAGS[6:])
    with pytest.raises(_Killed):
        study.main(study_argv(lidu_tiny_file, interrupted, *more, "--resume"))
    assert [(r.family, r.dim, r.regularisation) for r in trained] == [("bpr", 8, "strong")]


def test_keep_checkpoint_keeps_every_run_for_a_later_resume(interrupted, lidu_tiny_file):
    argv = study_argv(lidu_tiny_file, interrupted, *FLAGS, "--resume", "--keep-checkpoint")
    assert study.main(argv) == 0
    assert (interrupted / "models_tiny.json").is_file()
    names = sorted(p.name for p in (interrupted / "models_tiny.ckpt").iterdir())
    assert names == [f"run_{r}.{ext}" for r in range(3) for ext in ("json", "npz")]


def test_resume_refuses_families_that_do_not_extend_the_saved_ones(
    interrupted, lidu_tiny_file, monkeypatch, capsys
):
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    other = (*FLAGS[:5], "mlp,bpr", *FLAGS[6:])
    assert study.main(study_argv(lidu_tiny_file, interrupted, *other, "--resume")) == 2
    assert "was run with --population-families='bpr', this run has 'mlp,bpr'" in capsys.readouterr().err


# ------------------------------------------------- an unfinished training run, continued from its state


@pytest.fixture(scope="module")
def killed_mid_run_once(lidu_tiny_file, tmp_path_factory):
    """An out dir whose process died inside the third training run, after its state was saved at epoch 1
    (of 2): runs 0 and 1 are whole, run 2 has only ``run_2.partial.npz``."""
    out = tmp_path_factory.mktemp("killed_mid_run")
    real = study_models_checkpoint.RunCheckpoints.save_partial

    def save_then_die(self, r, *args, **kwargs):
        real(self, r, *args, **kwargs)
        if r == 2:
            raise _Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_models_population, "CHECKPOINT_SECONDS", 0.0)  # save after every epoch
        mp.setattr(study_models_checkpoint.RunCheckpoints, "save_partial", save_then_die)
        with pytest.raises(_Killed):
            study.main(study_argv(lidu_tiny_file, out, *FLAGS))
    names = sorted(p.name for p in (out / "models_tiny.ckpt").iterdir())
    assert names == ["run_0.json", "run_0.npz", "run_1.json", "run_1.npz", "run_2.partial.npz"]
    return out


@pytest.fixture
def killed_mid_run(killed_mid_run_once, tmp_path):
    shutil.copytree(killed_mid_run_once, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_an_unfinished_run_continues_from_its_saved_epoch_and_ends_as_the_uninterrupted_one(
    killed_mid_run, uninterrupted, lidu_tiny_file, monkeypatch
):
    real_fit, starts = study_models_population.fit, []

    def fit(*args, **kwargs):
        start = kwargs.get("resume_from")
        starts.append(None if start is None else start.epoch)
        return real_fit(*args, **kwargs)

    real_save, listings = study_models_checkpoint.RunCheckpoints.save, []

    def save(self, r, *args, **kwargs):
        real_save(self, r, *args, **kwargs)
        listings.append(sorted(p.name for p in self.path.iterdir()))

    monkeypatch.setattr(study_models_population, "fit", fit)
    monkeypatch.setattr(study_models_checkpoint.RunCheckpoints, "save", save)
    assert study.main(study_argv(lidu_tiny_file, killed_mid_run, *FLAGS, "--resume")) == 0
    assert starts == [1]  # only run 2 trained, from after epoch 1, not from scratch
    # once run 2 is whole its partial state is gone; the directory goes with the result JSON
    assert listings == [[f"run_{r}.{ext}" for r in range(3) for ext in ("json", "npz")]]
    resumed = json.loads((killed_mid_run / "models_tiny.json").read_text())
    assert not (killed_mid_run / "models_tiny.ckpt").exists()
    for new, old in zip(resumed["models"], uninterrupted["models"], strict=True):
        assert new["name"] == old["name"]
        assert new["mean_ndcg"] == pytest.approx(old["mean_ndcg"], abs=1e-6), new["name"]
        assert new["diagnostics"]["train_loss"] == pytest.approx(
            old["diagnostics"]["train_loss"], rel=1e-5, abs=1e-6
        ), new["name"]
        for name in old["means"]:
            assert new["means"][name] == pytest.approx(old["means"][name], rel=1e-5, abs=1e-5), name


def test_a_damaged_partial_state_is_named(killed_mid_run, lidu_tiny_file, monkeypatch, capsys):
    (killed_mid_run / "models_tiny.ckpt" / "run_2.partial.npz").write_bytes(b"PK\x03\x04 cut off")
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    assert study.main(study_argv(lidu_tiny_file, killed_mid_run, *FLAGS, "--resume")) == 2
    err = capsys.readouterr().err
    assert "run_2.partial.npz is damaged" in err and "delete it to train run 2 from the start" in err


def test_a_partial_state_of_other_settings_is_refused(killed_mid_run, lidu_tiny_file, monkeypatch, capsys):
    ckpt = killed_mid_run / "models_tiny.ckpt"
    for r in (0, 1):  # only the unfinished run is left, so its own header is what is checked
        for ext in ("json", "npz"):
            (ckpt / f"run_{r}.{ext}").unlink()
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    argv = study_argv(lidu_tiny_file, killed_mid_run, *FLAGS, "--grid-size", "64", "--resume")
    assert study.main(argv) == 2  # run 2's saved state was taken with --grid-size 32
    assert "was run with --grid-size=32, this run has 64" in capsys.readouterr().err


def _tiny_bpr():
    from lidu_jax.models.mf import MFConfig, make_bpr_mf
    from lidu_jax.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(n_users=30, n_items=40, min_activity=4, max_activity=20, activity_median=8.0)
    split = generate(cfg).split
    return make_bpr_mf(split, MFConfig(dim=4, batch_size=64)), int(split.train_users.shape[0])


def test_fit_continued_from_a_saved_state_equals_one_uninterrupted_fit():
    model, n_train = _tiny_bpr()
    keys, weights = jax.random.split(jax.random.key(3), 2), jnp.ones((2, n_train))
    whole, whole_snaps = training.fit(model, keys, weights, 4, snapshot_epochs=(2, 4), progress=False)
    saved = []
    training.fit(
        model, keys, weights, 4, snapshot_epochs=(2, 4), progress=False,
        checkpoint=saved.append, checkpoint_seconds=0.0,
    )  # fmt: skip
    assert [s.epoch for s in saved] == [1, 2, 3]  # never after the last epoch
    state = saved[1]  # after epoch 2, with the epoch-2 snapshot in it
    assert sorted(state.snapshots) == [2]
    final, snaps = training.fit(
        model, keys, weights, 4, snapshot_epochs=(2, 4), progress=False, resume_from=state
    )
    for a, b in zip(jax.tree.leaves((whole, whole_snaps)), jax.tree.leaves((final, snaps)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_fit_refuses_a_state_that_does_not_fit_before_training():
    model, n_train = _tiny_bpr()
    keys, weights = jax.random.split(jax.random.key(3), 2), jnp.ones((2, n_train))
    saved = []
    training.fit(model, keys, weights, 2, progress=False, checkpoint=saved.append, checkpoint_seconds=0.0)
    (state,) = saved
    three = jax.random.split(jax.random.key(3), 3)
    with pytest.raises(ValueError, match=r"resume_from.state\S* has shape \(2,.*x3 needs \(3,"):
        training.fit(model, three, jnp.ones((3, n_train)), 2, progress=False, resume_from=state)
    with pytest.raises(ValueError, match=r"must hold the snapshots of epochs \[1\], got \[\]"):
        training.fit(model, keys, weights, 2, snapshot_epochs=(1,), progress=False, resume_from=state)
    with pytest.raises(ValueError, match=r"resume_from.epoch must lie in \[1, epochs=2\], got 0"):
        training.fit(model, keys, weights, 2, progress=False, resume_from=dataclasses.replace(state, epoch=0))
