"""Tests of `lidu_jax.metrics` and `lidu_jax.evaluation` against brute-force references."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from lidu_jax import evaluation, metrics


def ref_ranking_metrics(scores, relevant, candidates, k):
    nd, rc, ht = [], [], []
    for s, r, c in zip(scores, relevant, candidates, strict=True):
        order = [i for i in np.argsort(-s, kind="stable") if c[i]][:k]
        rel = r & c
        gains = [1.0 / np.log2(p + 2) for p, i in enumerate(order) if rel[i]]
        ideal = sum(1.0 / np.log2(p + 2) for p in range(min(k, rel.sum())))
        nd.append(sum(gains) / ideal if ideal else 0.0)
        rc.append(len(gains) / rel.sum() if rel.sum() else 0.0)
        ht.append(float(len(gains) > 0))
    return np.array(nd), np.array(rc), np.array(ht)


def test_ranking_metrics_match_reference():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 30)).astype(np.float32)
    relevant = rng.random((20, 30)) < 0.15
    cand = rng.random((20, 30)) >= 0.2
    relevant[0] = False  # a user without relevant items gets 0
    nd, rc, ht = ref_ranking_metrics(scores, relevant, cand, 5)
    np.testing.assert_allclose(
        metrics.ndcg_at_k(scores, relevant, 5, candidates=cand), nd, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        metrics.recall_at_k(scores, relevant, 5, candidates=cand), rc, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(metrics.hit_at_k(scores, relevant, 5, candidates=cand), ht)  # 0 or 1
    # A perfect ranking has NDCG 1.
    perfect = metrics.ndcg_at_k(relevant.astype(np.float32), relevant, 5)
    assert np.allclose(np.asarray(perfect)[relevant.any(1)], 1.0)


def brute_c_index(pred, target):
    num = den = 0.0
    for i in range(pred.size):
        for j in range(pred.size):
            if target[i] > target[j]:
                den += 1
                num += 1.0 if pred[i] > pred[j] else 0.5 if pred[i] == pred[j] else 0.0
    return num / den


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=3, max_size=25))
def test_c_index_equals_brute_force_with_ties(pairs):
    pred = np.array([p for p, _ in pairs], float)
    target = np.array([t for _, t in pairs], float)
    if np.unique(target).size < 2:
        assert metrics.c_index(pred, target) == 0.5
        return
    assert abs(metrics.c_index(pred, target) - brute_c_index(pred, target)) < 1e-9


def test_correlations_and_bootstrap():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    assert abs(metrics.kendall_tau(x, y) - stats.kendalltau(x, y).statistic) < 1e-12
    assert abs(metrics.spearman(x, y) - stats.spearmanr(x, y).statistic) < 1e-12
    v, lo, hi = metrics.bootstrap_ci(metrics.kendall_tau, x, y, n_boot=200)
    assert lo < v < hi and lo > 0.2
    with pytest.raises(ValueError, match="equal length"):
        metrics.kendall_tau(x, y[:5])
    with pytest.raises(ValueError, match="finite"):
        metrics.spearman(np.r_[x[:-1], np.nan], y)
    with pytest.raises(ValueError, match="k must"):
        metrics.ndcg_at_k(np.zeros((2, 3)), np.zeros((2, 3), bool), 4)
    with pytest.raises(ValueError, match="relevant"):
        metrics.ndcg_at_k(np.zeros((2, 3)), np.zeros((2, 4), bool), 2)


def test_evaluate_format_json_plot(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    perf = rng.random(150)
    good = -perf + 0.3 * rng.normal(size=150)  # uncertainty anti-correlated with performance
    res = evaluation.evaluate_estimators({"good": good, "noise": rng.normal(size=150)}, perf, n_boot=100)
    g = res["estimators"]["good"]
    assert g["kendall_tau"] > 0.3 and g["ci"][0] > 0 and g["ci"][0] <= g["kendall_tau"] <= g["ci"][1]
    assert abs(g["kendall_tau"] - stats.kendalltau(-good, perf).statistic) < 1e-12
    assert abs(g["c_index"] - brute_c_index(-good, perf)) < 1e-9
    noise = res["estimators"]["noise"]
    assert noise["ci"][0] < 0 < noise["ci"][1]
    res2 = evaluation.evaluate_estimators({"good": good, "noise": -perf}, perf, n_boot=50, reference="good")
    assert res2["estimators"]["noise"]["tau_diff"] > 0
    text = evaluation.format_table(res2, title="t")
    assert "good" in text and "Kendall" in text
    path = evaluation.write_json(res, tmp_path / "r.json", config={"a": 1})
    loaded = json.loads(path.read_text())
    assert set(loaded["estimators"]["good"]) >= {"kendall_tau", "ci", "spearman", "c_index"}
    assert loaded["config"] == {"a": 1}
    # A write that dies half-way (disk full, a kill) leaves the earlier result whole and no temporary file.
    real_write = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2])
        raise OSError("No space left on device")

    before = sorted(tmp_path.iterdir())
    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        evaluation.write_json(res, path, config={"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == loaded and sorted(tmp_path.iterdir()) == before
    png = evaluation.plot_binned({"good": good}, perf, tmp_path / "p.png", n_bins=5)
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="NaN"):
        evaluation.evaluate_estimators({"bad": np.r_[good[:-1], np.nan]}, perf)
    with pytest.raises(ValueError, match="shape"):
        evaluation.evaluate_estimators({"bad": good[:10]}, perf)


def test_a_nan_score_raises_and_is_nan_under_jit():
    """A NaN score has no rank: at HEAD it silently turned a perfect NDCG of 1.0 into 0.631 (the NaN item
    fell out of the top-k). Eagerly a ValueError; under `jax.jit` NaN for that user only; a NaN on an
    non-candidate (training) item is ignored like every other score of a non-candidate."""
    import jax

    scores = np.array([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]], np.float32)
    relevant = np.array([[True, True, False, False]] * 2)
    np.testing.assert_allclose(metrics.ndcg_at_k(scores, relevant, 2), [1.0, 1.0], rtol=0, atol=1e-6)
    bad = scores.copy()
    bad[1, 1] = np.nan
    for fn in (metrics.ndcg_at_k, metrics.recall_at_k, metrics.hit_at_k):
        with pytest.raises(ValueError, match="NaN"):
            fn(bad, relevant, 2)
        jitted = np.asarray(jax.jit(fn, static_argnums=2)(bad, relevant, 2))
        assert np.isnan(jitted[1]) and jitted[0] == 1.0, (fn.__name__, jitted)
    cand = np.ones_like(relevant)
    cand[1, 1] = False
    got = metrics.ndcg_at_k(bad, relevant, 1, candidates=cand)
    np.testing.assert_allclose(got, [1.0, 1.0], rtol=0, atol=1e-6)


def test_float64_scores_far_from_zero_keep_their_order():
    """Float64 scores ``1e7 + x`` used to be cast to float32 (ulp 1 at 1e7), merging the top scores into ties
    broken by item id; each user's top score is now subtracted in float64 first."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 12))
    relevant = rng.random((5, 12)) < 0.3
    want = metrics.ndcg_at_k(scores, relevant, 4)
    got = metrics.ndcg_at_k(scores + 1e7, relevant, 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(metrics.top_k_items(scores + 1e7, 4), metrics.top_k_items(scores, 4))


def test_candidates_is_the_mask_and_exclude_a_deprecated_inverse():
    """One mask convention across lidu_jax: ``candidates`` True = may be recommended (as in the estimators
    and baselines). The metrics' old ``exclude`` (True = left out) still works by keyword, warns, and means
    ``candidates=~exclude``; giving both is an error. The ranking is the estimators' own top-K."""
    from lidu_jax.estimators import top_k_rankings

    rng = np.random.default_rng(4)
    scores = rng.normal(size=(6, 10)).astype(np.float32)
    relevant = rng.random((6, 10)) < 0.3
    cand = rng.random((6, 10)) >= 0.3
    for fn in (metrics.ndcg_at_k, metrics.recall_at_k, metrics.hit_at_k):
        want = np.asarray(fn(scores, relevant, 3, candidates=cand))
        with pytest.warns(DeprecationWarning, match="candidates=~exclude"):
            got = np.asarray(fn(scores, relevant, 3, exclude=~cand))
        np.testing.assert_array_equal(got, want)
        with pytest.raises(ValueError, match="not also the deprecated exclude"):
            fn(scores, relevant, 3, candidates=cand, exclude=~cand)
    top = np.asarray(metrics.top_k_items(scores, 3, candidates=cand))
    np.testing.assert_array_equal(top, np.asarray(top_k_rankings(scores, 3, cand)))
    assert cand[np.arange(6)[:, None], top].all()  # only candidates are ranked
    with pytest.warns(DeprecationWarning):
        np.testing.assert_array_equal(metrics.top_k_items(scores, 3, exclude=~cand), top)
    with pytest.raises(TypeError):  # the mask is keyword-only: a positional old-style exclude cannot slip in
        metrics.top_k_items(scores, 3, ~cand)
