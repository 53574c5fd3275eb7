"""End-to-end: the real-data study CLI on a tiny interaction file the test writes, JSON schema checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lidu_jax import study


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    # 60 users x 40 items in the "user item1 item2 ..." time-ordered format, with a block structure so a
    # model has something to learn: user u prefers items of group u % 4.
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, 61):
        group = np.arange(40)[np.arange(40) % 4 == u % 4]
        n = rng.integers(6, 12)
        items = np.concatenate([rng.choice(group, n - 2, replace=False), rng.choice(40, 2, replace=False)])
        items = list(dict.fromkeys(int(i) + 1 for i in items))
        lines.append(" ".join(map(str, [u, *items])))
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_study_cli_writes_json_with_synthetic_study_schema(tiny_file, tmp_path):
    out = tmp_path / "cell.json"
    argv = [
        "--data", str(tiny_file), "--model", "bpr", "--source", "ensemble", "--k-core", "2",
        "--n-models", "2", "--epochs", "2", "--k", "5", "--grid-size", "32", "--n-boot", "20",
        "--chunk", "64", "--dynamics", "--dynamics-every", "1", "--sweeps", "--sweep-ks", "1",
        "--sweep-candidates", "10", "--lidu-variants", "exact,correlated,agreement",
        "--out-dir", str(tmp_path), "--json", str(out), "--no-progress",
    ]  # fmt: skip
    assert study.main(argv) == 0
    payload = json.loads(out.read_text())
    est = payload["estimators"]
    # The exact LiDu and our two variants only, to keep compilation short (the grid variants share the
    # exact code path; the estimator tests cover them, and the flag that selects them is checked below).
    ours = {"LiDu correlated (ours)", "LiDu self-agreement (ours)"}
    expected = {"LiDu", *ours}
    expected |= {"mean top-K score", "score margin K/K+1", "softmax entropy", "Plackett-Luce top-K entropy"}
    expected |= {"mean std of top-K", "sampled top-K instability", "user activity", "popularity of top-K"}
    expected |= {"NQC", "WIG", "user clarity", "profile entropy"}
    expected |= {"ensemble RBO disagreement", "ensemble mutual information"}
    assert expected <= set(est)
    assert {n for n in est if n.startswith("LiDu")} == {"LiDu", *ours}
    for block in (est, payload["recall"]["estimators"]):
        for name, row in block.items():
            lo, hi = row["ci"]
            assert -1 <= lo <= row["kendall_tau"] <= hi <= 1, name
            assert -1 <= row["spearman"] <= 1 and 0 <= row["c_index"] <= 1, name
            assert len(row["spearman_ci"]) == 2 and len(row["c_index_ci"]) == 2
    assert payload["dataset"] == "tiny" and payload["model"] == "bpr" and payload["source"] == "ensemble"
    assert payload["n_users"] == 60 and 0 <= payload["mean_ndcg"] <= 1
    assert payload["config"]["n_models"] == 2 and payload["metric"] == "NDCG@5"
    # Dynamics: one log row per epoch. Sweeps: a top-1 list is likelier than the top-5 list, and with 10
    # candidates the list is likelier than against the full catalogue (fewer competitors below it).
    assert [r["epoch"] for r in payload["dynamics"]["log"]] == [1, 2]
    (k1,) = payload["sweeps"]["k"]
    assert k1["k"] == 1 and k1["mean_lidu"] < payload["mean_lidu"]
    (c10,) = payload["sweeps"]["candidates"]
    assert c10["size"] == 10 and c10["mean_lidu"] <= payload["mean_lidu"] + 1e-3
    assert (tmp_path / "tiny_bpr_ensemble.png").is_file() and (tmp_path / "tiny_bpr_ensemble.txt").is_file()
    assert (tmp_path / "tiny_dynamics.png").is_file()


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(model="lightgcn", source="mc_dropout"), "needs a model with dropout"),
        (dict(model="mlp", source="bayesian"), "Bayesian MF"),
        (dict(model="gru"), "--model must be one of"),
        (dict(source="snapshot", n_models=30, epochs=5), "--n-models=30 must be <= --epochs=5"),
        (dict(data="/nonexistent/file.tsv"), "--data must be one of"),
        (dict(lidu_variants="exact,fancy"), "--lidu-variants must be a subset"),
    ],
)
def test_study_rejects_bad_settings_before_training(settings, match):
    # The config checks itself when built, so `run` (and the CLI: see test_lidu_cli.py) never starts.
    with pytest.raises(ValueError, match=match):
        study.RealDataStudyConfig(progress=False, **settings)


def test_the_two_study_configs_have_distinct_names_and_old_imports_warn():
    from lidu_jax import synthetic_study

    assert study.RealDataStudyConfig is not synthetic_study.SyntheticStudyConfig
    assert study.RealDataStudyConfig.__name__ != synthetic_study.SyntheticStudyConfig.__name__
    for module, cls in (
        (study, study.RealDataStudyConfig),
        (synthetic_study, synthetic_study.SyntheticStudyConfig),
    ):
        with pytest.warns(DeprecationWarning, match=cls.__name__):
            assert module.StudyConfig is cls
    with pytest.raises(AttributeError):
        study.NoSuchConfig
