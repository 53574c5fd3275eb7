"""Tests of `lidu_jax.baselines` against plain NumPy re-implementations and exact enumeration."""

import itertools
import math

import jax
import numpy as np
import pytest

from lidu_jax import baselines

U, N, K = 6, 9, 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(U, N)).astype(np.float32)
    std = rng.uniform(0.1, 1.0, size=(U, N)).astype(np.float32)
    cand = rng.random((U, N)) > 0.25
    cand[:, :5] = True  # at least K + 1 candidates everywhere
    samples = (mean + std * rng.standard_normal((7, U, N))).astype(np.float32)
    rankings = np.argsort(-np.where(cand, mean, -np.inf), axis=1)[:, :K]
    return mean, std, cand, samples, rankings


def test_score_baselines_match_numpy(data):
    mean, std, cand, _, rankings = data
    masked = np.where(cand, mean, -np.inf)
    srt = -np.sort(-masked, axis=1)
    # float32 means and differences of O(1) scores that may cancel: an absolute part besides rtol
    np.testing.assert_allclose(
        baselines.mean_top_k_score(mean, K, cand), -srt[:, :K].mean(1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        baselines.score_margin(mean, K, cand), -(srt[:, K - 1] - srt[:, K]), rtol=1e-5, atol=1e-6
    )
    ent = []
    for u in range(U):
        s = mean[u, cand[u]].astype(np.float64)
        p = np.exp(s - s.max())
        p /= p.sum()
        ent.append(-(p * np.log(p)).sum())
    np.testing.assert_allclose(baselines.softmax_entropy(mean, cand), ent, rtol=1e-4, atol=1e-5)
    want_std = np.array([std[u, rankings[u]].mean() for u in range(U)])
    np.testing.assert_allclose(baselines.top_k_std(std, rankings), want_std, rtol=1e-5, atol=1e-6)


def test_plackett_luce_entropy_matches_enumeration(data):
    mean, _, cand, _, _ = data
    k = 2
    want = []
    for u in range(U):
        items = np.flatnonzero(cand[u])
        w = np.exp(mean[u, items].astype(np.float64))
        h = 0.0
        for lst in itertools.permutations(range(items.size), k):
            p, left = 1.0, w.sum()
            for i in lst:
                p *= w[i] / left
                left -= w[i]
            h -= p * math.log(p)
        want.append(h)
    got = baselines.plackett_luce_entropy(mean, k, jax.random.key(1), cand, n_samples=20_000)
    np.testing.assert_allclose(got, want, atol=0.03)


def test_instability_activity_popularity(data):
    _mean, _, cand, samples, rankings = data
    want = []
    for u in range(U):
        ov = [len(set(np.argsort(-np.where(cand[u], s[u], -np.inf))[:K]) & set(rankings[u])) for s in samples]
        want.append(1 - np.mean(ov) / K)
    np.testing.assert_allclose(
        baselines.list_instability(samples, rankings, cand), want, rtol=1e-6, atol=1e-6
    )
    act = np.array([3, 0, 10, 5, 5, 1])
    np.testing.assert_allclose(baselines.user_activity(act), -np.log1p(act), rtol=1e-6, atol=1e-7)
    pop = np.arange(N) * 2.0
    np.testing.assert_allclose(
        baselines.recommended_popularity(rankings, pop),
        -np.log1p(pop[rankings]).mean(1),
        rtol=1e-6,
        atol=1e-6,
    )


def test_all_baselines_names_and_direction(data):
    mean, std, cand, samples, rankings = data
    out = baselines.all_baselines(
        mean, std, samples, rankings, candidates=cand, activity=np.arange(U), item_popularity=np.ones(N)
    )
    assert len(out) >= 8
    for name, v in out.items():
        assert v.shape == (U,) and np.all(np.isfinite(v)), name
    # Higher = more uncertain: sharper scores (x10) give lower softmax entropy and larger negated margins.
    assert np.all(baselines.softmax_entropy(10 * mean, cand) < baselines.softmax_entropy(mean, cand))


def test_bad_inputs(data):
    mean, _std, cand, samples, rankings = data
    with pytest.raises(ValueError, match="k must"):
        baselines.score_margin(mean, N, None)
    with pytest.raises(ValueError, match="candidates"):
        baselines.mean_top_k_score(mean, K, cand[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        baselines.softmax_entropy(mean, cand, temperature=0.0)
    with pytest.raises(ValueError, match="samples"):
        baselines.list_instability(samples[0], rankings)
    with pytest.raises(ValueError, match="n_interactions"):
        baselines.user_activity(np.array([-1, 2]))
    with pytest.raises(ValueError, match="mean must"):
        baselines.mean_top_k_score(mean[0], K)


@pytest.mark.parametrize("bad_id", [N, -1, 10 * N])
def test_out_of_range_item_ids_raise_and_are_nan_under_jit(data, bad_id):
    """At HEAD an item id outside [0, n_items) was clamped by the gather to a real item and gave a plausible
    number; now eagerly a ValueError naming rankings, under `jax.jit` NaN for that user only."""
    mean, std, cand, samples, rankings = data
    bad = rankings.copy()
    bad[2, 1] = bad_id
    pop = np.arange(N, dtype=np.float64)
    calls = {
        "top_k_std": lambda r: baselines.top_k_std(std, r),
        "recommended_popularity": lambda r: baselines.recommended_popularity(r, pop),
        "list_instability": lambda r: baselines.list_instability(samples, r, cand),
        "all_baselines": lambda r: baselines.all_baselines(mean, std, samples, r, candidates=cand),
    }
    for name, fn in calls.items():
        with pytest.raises(ValueError, match="rankings hold item ids outside"):
            fn(bad)
        if name != "all_baselines":
            got = np.asarray(jax.jit(fn)(bad))
            want = np.asarray(fn(rankings))
            assert np.isnan(got[2]), name
            np.testing.assert_allclose(np.delete(got, 2), np.delete(want, 2), rtol=1e-6, atol=1e-6)


def test_nan_scores_raise(data):
    mean, std, cand, samples, rankings = data
    bad = mean.copy()
    bad[1, np.flatnonzero(cand[1])[0]] = np.nan
    for fn in (baselines.mean_top_k_score, baselines.score_margin):
        with pytest.raises(ValueError, match="mean contains NaN"):
            fn(bad, K, cand)
    with pytest.raises(ValueError, match="mean contains NaN"):
        baselines.softmax_entropy(bad, cand)
    bad_std = std.copy()
    bad_std[0, rankings[0, 0]] = np.nan
    with pytest.raises(ValueError, match="std contains NaN"):
        baselines.top_k_std(bad_std, rankings)
    bad_samples = samples.copy()
    bad_samples[0, 3, np.flatnonzero(cand[3])[0]] = np.inf
    with pytest.raises(ValueError, match="samples contains NaN"):
        baselines.list_instability(bad_samples, rankings, cand)
    # a NaN score of an excluded (training) item is never ranked: no error
    ok = mean.copy()
    ok[~cand] = np.nan
    assert np.all(np.isfinite(np.asarray(baselines.mean_top_k_score(ok, K, cand))))
