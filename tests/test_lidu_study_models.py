"""The model-selection protocol (``python -m lidu_jax.study --protocol models``): the selection statistics on
hand-computed arrays, the option checks, and the command line end to end on a tiny population."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _lidu_tiny import study_argv
from scipy import stats

from lidu_jax import study, study_config, study_models
from lidu_jax.study_config import RealDataStudyConfig

# 4 models, NDCG rising with the index; uncertainties rank them 1 < 2 < 3 but put model 2 (not 3) lowest.
NDCG = np.array([0.1, 0.2, 0.3, 0.4])
UNC = np.array([4.0, 3.0, 1.0, 2.0])


def test_kendall_tau_hand_computed():
    # Pairs (i<j), all with NDCG_j > NDCG_i: concordant when UNC_i > UNC_j. (0,1) (0,2) (0,3) (1,2) (1,3)
    # are, (2,3) is not: tau = (5 - 1) / 6.
    assert study_models.kendall_tau(UNC, NDCG) == pytest.approx(2 / 3)
    assert study_models.kendall_tau(-NDCG, NDCG) == pytest.approx(1.0)
    assert study_models.kendall_tau(NDCG, NDCG) == pytest.approx(-1.0)
    assert math.isnan(study_models.kendall_tau(np.ones(4), NDCG))  # a constant estimator has no tau
    with pytest.raises(ValueError, match="equal-length"):
        study_models.kendall_tau(UNC[:3], NDCG)


def test_selection_regret_hand_computed():
    regret, frac, chosen = study_models.selection_regret(UNC, NDCG)
    assert chosen == [2] and regret == pytest.approx(0.1) and frac == pytest.approx(0.25)
    # A tie for the lowest uncertainty: the expected regret of picking one of them at random.
    regret, frac, chosen = study_models.selection_regret(np.array([1.0, 1.0, 3.0, 4.0]), NDCG)
    assert chosen == [0, 1] and regret == pytest.approx(0.4 - 0.15) and frac == pytest.approx(0.625)
    assert study_models.selection_regret(-NDCG, NDCG)[:2] == (0.0, 0.0)
    assert study_models.random_choice_regret(NDCG) == pytest.approx((0.15, 0.375))


def test_bootstrap_tau_resamples_models():
    # A perfect (or perfectly wrong) estimator keeps tau = +-1 on every resample.
    assert study_models.bootstrap_tau(-NDCG, NDCG, n_boot=50, seed=1) == [1.0, 1.0]
    assert study_models.bootstrap_tau(NDCG, NDCG, n_boot=50, seed=1) == [-1.0, -1.0]
    # Otherwise: the percentile interval of tau-b over resamples of models drawn with replacement.
    idx = np.random.default_rng(3).integers(0, 4, size=(200, 4))
    taus = [stats.kendalltau(-UNC[i], NDCG[i]).statistic for i in idx]
    taus = np.array([t for t in taus if np.isfinite(t)])
    lo, hi = study_models.bootstrap_tau(UNC, NDCG, n_boot=200, seed=3)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(taus, [0.025, 0.975])))
    assert lo <= 2 / 3 <= hi


def test_selection_table_has_reference_rows():
    table = study_models.selection_table(
        {"good": UNC, "flat": np.ones(4)}, NDCG, NDCG, ["a", "b", "c", "d"], n_boot=20
    )
    assert table["good"]["chosen"] == ["c"] and table["good"]["regret"] == pytest.approx(0.1)
    assert table["good"]["kendall_tau_recall"] == pytest.approx(2 / 3)
    assert math.isnan(table["flat"]["kendall_tau"]) and table["flat"]["regret"] == pytest.approx(0.15)
    assert table["random choice"]["regret"] == pytest.approx(0.15)
    assert table["oracle"]["regret"] == 0.0 and table["oracle"]["chosen"] == ["d"]


def test_population_tables():
    # The table names the config accepts are the tables defined, each over every family.
    assert set(study_models.POPULATIONS) == set(study_config.POPULATIONS)
    assert all(set(p) == set(study_config.MODELS) for p in study_models.POPULATIONS.values())
    runs, models = study_models.population("full", ["bpr", "lightgcn", "mlp", "sasrec"])
    assert len(runs) == 12 and len(models) == 24
    assert {m.training for m in models} == {"under", "normal", "over"}
    assert {m.regularisation for m in models} == {"default", "strong"}
    assert len({m.name for m in models}) == 24
    for f in ("bpr", "lightgcn", "mlp", "sasrec"):
        fam = [m for m in models if m.family == f]
        assert len(fam) == 6 and len({m.dim for m in fam}) == 2
    # Every strong regulariser is a field of its family's config.
    for run in runs:
        assert all(hasattr(study_models.FAMILY_BASE[run.family], n) for n, _ in run.overrides)
    assert len(study_models.population("small", ["bpr"])[1]) == 6


def test_sasrec_pack_reaches_every_sasrec_and_nothing_else():
    from lidu_jax.study_cells import make_model
    from lidu_jax.study_models_population import _make
    from lidu_jax.types import InteractionSplit

    seqs = (np.array([0, 1, 2]), np.array([2, 1]), np.array([1, 0, 2]))
    users = np.concatenate([np.full(len(q), u) for u, q in enumerate(seqs)]).astype(np.int32)
    split = InteractionSplit(3, 3, users, np.concatenate(seqs).astype(np.int32), users[:1], users[:1], seqs)
    runs, _ = study_models.population("small", ["bpr", "sasrec"])
    for pack in (False, True):
        config = RealDataStudyConfig(protocol="models", population="small", sasrec_pack=pack)
        epochs = {run.family: _make(split, run, config).train_epoch.__name__ for run in runs}
        assert epochs["sasrec"] == ("train_epoch_packed" if pack else "train_epoch_padded")
        assert epochs["bpr"] != "train_epoch_packed"
        # The users and dynamics protocols build their SASRec through study_cells.make_model.
        cell = make_model(split, RealDataStudyConfig(model="sasrec", sasrec_pack=pack))
        assert cell.train_epoch.__name__ == epochs["sasrec"]


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(source="bootstrap"), "--source must be ensemble"),
        (dict(dim=16), "--dim is set per model"),
        (dict(lr=0.01), "--lr is set per model"),
        (dict(sweeps=True), "--sweeps is a user-protocol option"),
        (dict(population="huge"), "--population must be one of"),
        (dict(population_families="bpr,gru"), "--population-families must be a subset"),
        (dict(population_families=""), "--population-families must be distinct"),
        (dict(population_families="bpr,bpr"), "--population-families must be distinct"),
        (dict(json="x.json"), "use --out-dir"),
        (dict(n_models=1), "--n-models must be an integer >= 2"),
    ],
)
def test_models_protocol_rejects_bad_options_before_training(settings, match):
    with pytest.raises(ValueError, match=match):
        RealDataStudyConfig(protocol="models", progress=False, **settings)


def test_population_smaller_than_three_models_is_rejected(monkeypatch):
    one = study_models.PopulationModel("m", "bpr", 4, 1, "default", "normal", 0)
    monkeypatch.setattr(study_models, "population", lambda name, families: ([], [one]))
    with pytest.raises(ValueError, match=">= 3 models for a Kendall tau"):
        RealDataStudyConfig(protocol="models", population="small", population_families="bpr")


def test_sasrec_is_skipped_on_unordered_data_with_the_reason(tmp_path, monkeypatch):
    # A table without timestamps has no time order: sasrec alone leaves no model, which is an error
    # naming the reason, raised before any training.
    path = tmp_path / "table.tsv"
    path.write_text("".join(f"{u}\t{i}\n" for u in range(1, 21) for i in range(1, 11) if (u + i) % 3))
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    config = RealDataStudyConfig(
        protocol="models", population="small", population_families="sasrec", data=str(path), k_core=2,
        k=3, split="random", out_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="sasrec needs time-ordered data"):
        study_models.run_models_protocol(config)


def test_protocol_defaults():
    users = RealDataStudyConfig(progress=False)
    models = RealDataStudyConfig(protocol="models", progress=False)
    assert (users.n_models, models.n_models) == (5, 3)
    assert users.lidu_variants == "exact,unordered,top3,sequential,pairwise"
    assert models.lidu_variants == "exact,pairwise"
    assert RealDataStudyConfig(protocol="models", n_models=4, progress=False).n_models == 4
    with pytest.raises(ValueError, match="--protocol must be one of"):
        RealDataStudyConfig(protocol="items")


def test_dynamics_protocol_dispatches_to_its_module(monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("lidu_jax.study_dynamics")
    fake.run_dynamics_protocol = lambda config: seen.append(config.protocol) or {}
    monkeypatch.setitem(sys.modules, "lidu_jax.study_dynamics", fake)
    assert study.main(["--protocol", "dynamics", "--no-progress"]) == 0
    assert seen == ["dynamics"]


def test_models_cli_end_to_end(lidu_tiny_file, tmp_path):
    argv = study_argv(
        lidu_tiny_file, tmp_path,
        "--protocol", "models", "--population", "small", "--population-families", "bpr", "--chunk", "64",
    )  # fmt: skip
    assert study.main(argv) == 0
    payload = json.loads((tmp_path / "models_tiny.json").read_text())
    keys = {"protocol", "dataset", "n_users", "n_items", "k", "n_models", "population", "skipped_families"}
    keys |= {"models", "selection", "within_family", "diagnostics_tau", "scale_free", "files", "config"}
    assert keys <= set(payload)
    assert payload["protocol"] == "models" and payload["n_models"] == 2 and payload["n_users"] == 60
    assert len(payload["models"]) == 6 and payload["skipped_families"] == {}
    row = payload["models"][0]
    fields = {"name", "family", "dim", "epochs", "regularisation", "training", "mean_ndcg", "mean_recall"}
    assert fields <= set(row)
    # Only the exact LiDu, to keep compilation short (the default variants: test_protocol_defaults).
    assert {"LiDu", "user activity", study_models.SCALE_FREE} <= set(row["means"])
    assert not any(n.startswith("LiDu ") for n in set(row["means"]) - {study_models.SCALE_FREE})
    assert set(study_models.DIAGNOSTICS) <= set(row["diagnostics"])
    assert row["diagnostics"]["spread_ratio"] == pytest.approx(
        row["diagnostics"]["ensemble_spread"] / row["diagnostics"]["item_spread"]
    )
    # The scale-free row: each model's stds times one factor that brings its spread ratio to the common
    # one; a larger spread (factor > 1) makes the consensus list less probable, a smaller one more.
    target = payload["scale_free"]["target_spread_ratio"]
    for r in payload["models"]:
        d = r["diagnostics"]
        assert d["spread_ratio"] * d["temperature_factor"] == pytest.approx(target)
        change = r["means"][study_models.SCALE_FREE] - r["means"]["LiDu"]
        assert change * (d["temperature_factor"] - 1) >= -1e-3, r["name"]
    sel = payload["selection"]
    assert {"LiDu", study_models.SCALE_FREE, "random choice", "oracle"} <= set(sel)
    ndcg = [r["mean_ndcg"] for r in payload["models"]]
    for name, r in sel.items():
        assert 0.0 <= r["regret"] <= max(ndcg) - min(ndcg) + 1e-12, name
        if r["ci"] and r["ci"][0] is not None:
            assert -1 <= r["ci"][0] <= r["ci"][1] <= 1, name
    assert set(payload["within_family"]) == {"bpr"}
    assert payload["within_family"]["bpr"]["LiDu"]["regret"] == pytest.approx(sel["LiDu"]["regret"])
    assert (tmp_path / "models_tiny.md").read_text().startswith("# Model selection")
    assert (tmp_path / "models_tiny.png").is_file()


def test_models_cli_bad_option_is_status_2_before_training(monkeypatch, capsys):
    monkeypatch.setattr(study_models, "_train", lambda *a, **k: pytest.fail("training started"))
    assert study.main(["--protocol", "models", "--source", "snapshot", "--no-progress"]) == 2
    assert "--source must be ensemble" in capsys.readouterr().err
