"""Tests of the synthetic generator and a tiny end-to-end run of the study CLI (`python -m lidu_jax`)."""

import json

import numpy as np
import pytest

from lidu_jax import synthetic, synthetic_study


def test_generator_properties():
    cfg = synthetic.SyntheticConfig(
        n_users=80, n_items=60, min_activity=5, max_activity=30, true_top=10, seed=1
    )
    d = synthetic.generate(cfg)
    s = d.split
    act = s.user_activity() + np.bincount(s.test_users, minlength=s.n_users)
    np.testing.assert_array_equal(act, d.activity)
    assert d.activity.min() >= 5 and d.activity.max() <= 30
    assert np.all(np.bincount(s.test_users, minlength=s.n_users) >= 1)
    assert not np.any(s.train_matrix() & s.test_matrix())
    # Duplicates are impossible (drawn without replacement).
    assert s.train_matrix().sum() == s.train_users.size
    # True relevance: exactly true_top candidates per user, the highest true scores outside training.
    rel = d.true_relevant
    np.testing.assert_array_equal(rel.sum(1), 10)
    for u in range(5):
        cand = np.flatnonzero(~s.train_matrix()[u])
        best = cand[np.argsort(-d.true_scores[u, cand])[:10]]
        assert set(best) == set(np.flatnonzero(rel[u]))
    # Interactions follow the true preference: observed items score higher than the average item.
    assert d.true_scores[s.train_users, s.train_items].mean() > d.true_scores.mean() + 0.5
    # Same seed, same data.
    np.testing.assert_array_equal(synthetic.generate(cfg).split.train_items, s.train_items)
    with pytest.raises(ValueError, match="max_activity"):
        synthetic.generate(synthetic.SyntheticConfig(n_items=20, max_activity=30))


def test_cli_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "r.json"
    plot = tmp_path / "p.png"
    argv = [
        "--n-users", "60", "--n-items", "40", "--activity-median", "8", "--max-activity", "20",
        "--true-top", "5", "--epochs", "3", "--n-models", "2", "--model-dim", "4", "--batch-size", "128",
        "--sources", "ensemble", "--k", "3", "--grid-size", "64", "--kde-grid-size", "0",
        "--n-boot", "20", "--plot", str(plot), "--json", str(out), "--no-progress", "--prng", "rbg",
    ]  # fmt: skip
    assert synthetic_study.main(argv) == 0
    text = capsys.readouterr().out
    assert "LiDu" in text and "user activity" in text and "summary" in text
    loaded = json.loads(out.read_text())
    lt = loaded["estimators"]["LiDu"]
    assert set(lt) >= {"kendall_tau", "ci", "spearman", "c_index"} and len(lt["ci"]) == 2
    assert len(loaded["estimators"]) >= 12  # 4 LiDu variants (KDE skipped) + 8 baselines
    assert set(loaded["sources"]) == {"ensemble"}
    assert loaded["config"]["n_users"] == 60
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert loaded["primary_source"] == "ensemble"
    with pytest.raises(ValueError, match="--sources"):
        synthetic_study.SyntheticStudyConfig(sources="magic")
