"""Tests of the query-performance-prediction baselines of `lidu_jax.baselines` (NQC, WIG, user clarity,
profile entropy, ensemble RBO disagreement and mutual information) against per-user NumPy loops in float64,
hand-worked cases, their invariances, input checks and `jax.jit`."""

import math

import jax
import numpy as np
import pytest

from lidu_jax import baselines

U, N, K, M = 6, 11, 3, 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    mean = rng.normal(size=(U, N)).astype(np.float32)
    cand = rng.random((U, N)) > 0.3
    cand[:, :5] = True  # at least K + 2 candidates everywhere
    cand[0, 5:] = False  # one user with exactly 5
    samples = (mean + 0.8 * rng.standard_normal((M, U, N))).astype(np.float32)
    pop = rng.integers(1, 30, size=N).astype(np.float64)
    pop[-2:] = 0.0  # never-consumed items: in no profile
    profile = rng.random((U, N)) > 0.5
    profile[:, 0] = True
    profile[:, -2:] = False
    return mean, cand, samples, pop, profile


# ---- NumPy references, one user at a time ----


def ref_nqc_wig(mean, k, cand):
    nqc, wig = [], []
    for u in range(mean.shape[0]):
        s = mean[u, cand[u]].astype(np.float64)
        top = np.sort(s)[::-1][:k]
        sd = s.std()
        nqc.append(-top.std() / sd)
        wig.append(-(top - s.mean()).mean() / sd)
    return np.array(nqc), np.array(wig)


def ref_profile(profile, pop, lam):
    clarity, entropy = [], []
    pc = pop / pop.sum()
    for u in range(profile.shape[0]):
        items = np.flatnonzero(profile[u])
        p = lam * pc.copy()
        p[items] += (1 - lam) / len(items)
        c = h = 0.0
        for i in range(len(p)):
            if p[i] > 0:
                c += p[i] * math.log(p[i] / pc[i])
                h -= p[i] * math.log(p[i])
        clarity.append(-c)
        entropy.append(h)
    return np.array(clarity), np.array(entropy)


def rbo(a, b, p):
    k = len(a)
    total = sum(p ** (d - 1) * len(set(a[:d]) & set(b[:d])) / d for d in range(1, k + 1))
    return total / k if p == 1 else (1 - p) / (1 - p**k) * total  # p -> 1: the average overlap


def ref_rank_disagreement(samples, k, cand, p):
    out = []
    for u in range(samples.shape[1]):
        lists = []
        for s in samples[:, u]:
            items = np.flatnonzero(cand[u])
            order = items[np.argsort(-s[items].astype(np.float64), kind="stable")]
            lists.append(list(order[:k]))
        pairs = [(a, b) for a in range(len(lists)) for b in range(a + 1, len(lists))]
        out.append(np.mean([1 - rbo(lists[a], lists[b], p) for a, b in pairs]))
    return np.array(out)


def entropy(p):
    p = p[p > 0]
    return -(p * np.log(p)).sum()


def ref_mutual_information(samples, cand, t):
    out = []
    for u in range(samples.shape[1]):
        probs = []
        for s in samples[:, u]:
            x = s[cand[u]].astype(np.float64) / t
            e = np.exp(x - x.max())
            probs.append(e / e.sum())
        probs = np.array(probs)
        out.append(entropy(probs.mean(0)) - np.mean([entropy(q) for q in probs]))
    return np.array(out)


# ---- agreement with the references ----


@pytest.mark.parametrize("k", [1, K, 5])
def test_nqc_wig_match_numpy(data, k):
    mean, cand, *_ = data
    want_nqc, want_wig = ref_nqc_wig(mean, k, cand)
    np.testing.assert_allclose(baselines.nqc(mean, k, cand), want_nqc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(baselines.wig(mean, k, cand), want_wig, rtol=1e-5, atol=1e-6)
    full = np.ones_like(cand)
    want_nqc, want_wig = ref_nqc_wig(mean, k, full)
    np.testing.assert_allclose(baselines.nqc(mean, k), want_nqc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(baselines.wig(mean, k), want_wig, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_clarity_and_entropy_match_numpy(data, lam):
    *_, pop, profile = data
    want_c, want_h = ref_profile(profile, pop, lam)
    np.testing.assert_allclose(baselines.user_clarity(profile, pop, lam), want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(baselines.profile_entropy(profile, pop, lam), want_h, rtol=1e-5, atol=1e-6)
    if lam == 0.0:  # unsmoothed: the entropy is log |profile|
        np.testing.assert_allclose(want_h, np.log(profile.sum(1)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("k", "p"), [(K, 0.9), (1, 0.6), (5, 1.0)])
def test_rank_disagreement_matches_numpy(data, k, p):
    _, cand, samples, *_ = data
    np.testing.assert_allclose(
        baselines.ensemble_rank_disagreement(samples, k, cand, p=p),
        ref_rank_disagreement(samples, k, cand, p),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        baselines.ensemble_rank_disagreement(samples[:2], k, p=p),
        ref_rank_disagreement(samples[:2], k, np.ones((U, N), bool), p),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("t", [1.0, 0.5, 3.0])
def test_mutual_information_matches_numpy(data, t):
    _, cand, samples, *_ = data
    np.testing.assert_allclose(
        baselines.ensemble_mutual_information(samples, cand, temperature=t),
        ref_mutual_information(samples, cand, t),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        baselines.ensemble_mutual_information(samples[:3], temperature=t),
        ref_mutual_information(samples[:3], np.ones((U, N), bool), t),
        rtol=1e-5,
        atol=1e-6,
    )


# ---- hand-checkable cases and invariances ----


def test_identical_members_agree_completely(data):
    mean, cand, *_ = data
    same = np.broadcast_to(mean, (3, U, N))
    np.testing.assert_allclose(baselines.ensemble_rank_disagreement(same, K, cand), 0.0, atol=1e-6)
    np.testing.assert_allclose(baselines.ensemble_mutual_information(same, cand), 0.0, atol=1e-6)


def test_rank_disagreement_and_mi_by_hand():
    # Two members, two candidates, opposite orders: A = [0, 1], B = [1, 0]. Depth 1 overlaps 0, depth 2
    # overlaps 2/2, so RBO = (1 - p) / (1 - p^2) * p = p / (1 + p).
    s = np.array([[[2.0, 0.0, -5.0]], [[0.0, 2.0, -5.0]]], np.float32)  # (M=2, U=1, n=3)
    cand = np.array([[True, True, False]])
    for p in (0.9, 0.5):
        got = baselines.ensemble_rank_disagreement(s, 2, cand, p=p)
        np.testing.assert_allclose(got, [1 - p / (1 + p)], rtol=1e-6, atol=1e-6)
    # disjoint top-1 lists: RBO 0
    np.testing.assert_allclose(baselines.ensemble_rank_disagreement(s, 1, cand), [1.0], rtol=1e-6, atol=1e-6)
    # softmaxes (q, 1 - q) and (1 - q, q), q = sigmoid(2): the mean is uniform, MI = log 2 - H(q)
    q = 1 / (1 + math.exp(-2.0))
    want = math.log(2) + q * math.log(q) + (1 - q) * math.log(1 - q)
    np.testing.assert_allclose(baselines.ensemble_mutual_information(s, cand), [want], rtol=1e-5, atol=1e-6)


def test_clarity_is_zero_when_the_profile_is_the_catalogue():
    n = 8
    # uniform catalogue, the user has everything: p(i|u) = p_c for any smoothing
    full = np.ones((1, n), bool)
    for lam in (0.0, 0.5):
        np.testing.assert_allclose(baselines.user_clarity(full, np.ones(n), lam), [0.0], atol=1e-6)
        np.testing.assert_allclose(
            baselines.profile_entropy(full, np.ones(n), lam), [math.log(n)], rtol=1e-6, atol=1e-6
        )
    # the catalogue is uniform over the user's 3 items and 0 elsewhere: the same distributions
    pop = np.array([0, 4, 0, 4, 4, 0, 0, 0], np.float64)
    prof = (pop > 0)[None]
    np.testing.assert_allclose(baselines.user_clarity(prof, pop), [0.0], atol=1e-6)
    np.testing.assert_allclose(baselines.profile_entropy(prof, pop), [math.log(3)], rtol=1e-6, atol=1e-6)
    # one item of a uniform catalogue, unsmoothed: KL = log n; a niche user is clearer than a broad one
    one = np.zeros((2, n), bool)
    one[0, 2] = True
    one[1, :6] = True
    got = np.asarray(baselines.user_clarity(one, np.ones(n), 0.0))
    np.testing.assert_allclose(got, [-math.log(n), -math.log(n / 6)], rtol=1e-6, atol=1e-6)


def test_nqc_wig_affine_invariance_and_direction(data):
    mean, cand, *_ = data
    for a, b in [(3.7, -2.5), (0.05, 4.0), (1.0, -10.0)]:
        moved = (a * mean.astype(np.float64) + b).astype(np.float32)
        for fn in (baselines.nqc, baselines.wig):
            np.testing.assert_allclose(fn(moved, K, cand), fn(mean, K, cand), rtol=1e-4, atol=1e-5)
    # scores all equal: no commitment, no gain (0, the least confident value of -NQC)
    flat = np.full((2, N), 1.5, np.float32)
    np.testing.assert_array_equal(baselines.nqc(flat, K), 0.0)
    np.testing.assert_array_equal(baselines.wig(flat, K), 0.0)
    # A: a head of exactly k tied items above a flat rest; B: evenly spaced scores 10, 9, ..., 0.
    # WIG: A's head stands sqrt(8/3) sigma above the mean, B's 4/sqrt(10), so A is the more confident.
    # NQC: A's head has no spread (0, the least confident), B's std(10, 9, 8) / sqrt(10).
    two = np.zeros((2, N), np.float32)
    two[0, :K] = 1.0
    two[1] = np.arange(N)[::-1]
    np.testing.assert_allclose(
        baselines.wig(two, K), [-math.sqrt(8 / 3), -4 / math.sqrt(10)], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        baselines.nqc(two, K), [0.0, -math.sqrt(2 / 3) / math.sqrt(10)], rtol=1e-6, atol=1e-7
    )


# ---- input checks, jit, all_baselines ----


def test_bad_inputs_name_what_is_wrong(data):
    mean, cand, samples, pop, profile = data
    bad = mean.copy()
    bad[2, np.flatnonzero(cand[2])[1]] = np.nan
    for fn in (baselines.nqc, baselines.wig):
        with pytest.raises(ValueError, match="mean contains NaN"):
            fn(bad, K, cand)
        with pytest.raises(ValueError, match="k must"):
            fn(mean, 0, cand)
        with pytest.raises(ValueError, match="k must"):
            fn(mean, N + 1, cand)
        with pytest.raises(ValueError, match="fewer than 6 candidate"):
            fn(mean, 6, cand)  # user 0 has 5
    # a NaN on an excluded item is never ranked nor counted
    ok = mean.copy()
    ok[~cand] = np.nan
    assert np.all(np.isfinite(np.asarray(baselines.nqc(ok, K, cand))))
    bad_s = samples.copy()
    bad_s[1, 3, np.flatnonzero(cand[3])[0]] = np.inf
    with pytest.raises(ValueError, match="samples contains NaN"):
        baselines.ensemble_rank_disagreement(bad_s, K, cand)
    with pytest.raises(ValueError, match="samples contains NaN"):
        baselines.ensemble_mutual_information(bad_s, cand)
    with pytest.raises(ValueError, match="M >= 2"):
        baselines.ensemble_rank_disagreement(samples[:1], K, cand)
    with pytest.raises(ValueError, match="M >= 2"):
        baselines.ensemble_mutual_information(samples[:1], cand)
    with pytest.raises(ValueError, match=r"samples must be \(M"):
        baselines.ensemble_mutual_information(samples[0], cand)
    with pytest.raises(ValueError, match="k must"):
        baselines.ensemble_rank_disagreement(samples, N + 1)
    with pytest.raises(ValueError, match="fewer than 6 candidate"):
        baselines.ensemble_rank_disagreement(samples, 6, cand)
    with pytest.raises(ValueError, match="p must"):
        baselines.ensemble_rank_disagreement(samples, K, cand, p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        baselines.ensemble_mutual_information(samples, cand, temperature=0.0)
    with pytest.raises(ValueError, match="candidates must have shape"):
        baselines.ensemble_mutual_information(samples, cand[:, :4])
    empty = profile.copy()
    empty[4] = False
    for fn in (baselines.user_clarity, baselines.profile_entropy):
        with pytest.raises(ValueError, match="profile is empty for 1 user"):
            fn(empty, pop)
        with pytest.raises(ValueError, match="smoothing"):
            fn(profile, pop, 1.5)
        with pytest.raises(ValueError, match="item_popularity"):
            fn(profile, pop[:4])
        with pytest.raises(ValueError, match="item_popularity must be finite"):
            fn(profile, -pop)
    zero_pop = profile.copy()
    zero_pop[1, -1] = True  # an item nobody consumed: infinite KL
    with pytest.raises(ValueError, match="popularity 0"):
        baselines.user_clarity(zero_pop, pop)
    assert np.isfinite(np.asarray(baselines.profile_entropy(zero_pop, pop))).all()


def test_jit_matches_eager_and_gives_nan_for_bad_users(data):
    mean, cand, samples, pop, profile = data
    calls = {
        "nqc": (lambda m, c: baselines.nqc(m, K, c), (mean, cand)),
        "wig": (lambda m, c: baselines.wig(m, K, c), (mean, cand)),
        "rbo": (lambda s, c: baselines.ensemble_rank_disagreement(s, K, c), (samples, cand)),
        "mi": (lambda s, c: baselines.ensemble_mutual_information(s, c), (samples, cand)),
        "clarity": (baselines.user_clarity, (profile, pop)),
        "entropy": (baselines.profile_entropy, (profile, pop)),
    }
    for name, (fn, args) in calls.items():
        jitted = jax.jit(fn)
        np.testing.assert_allclose(jitted(*args), fn(*args), rtol=1e-6, atol=1e-7, err_msg=name)
        bad = [a.copy() for a in args]
        if name in ("clarity", "entropy"):
            bad[0][2] = False  # empty profile
        elif name in ("nqc", "wig"):
            bad[0][2, 0] = np.nan
        else:
            bad[0][1, 2, 0] = np.nan
        got = np.asarray(jitted(*bad))
        assert np.isnan(got[2]), name
        np.testing.assert_allclose(
            np.delete(got, 2), np.delete(fn(*args), 2), rtol=1e-6, atol=1e-6, err_msg=name
        )


def test_all_baselines_adds_the_qpp_family(data, monkeypatch):
    mean, cand, samples, pop, profile = data
    # the wiring is under test here, not the Plackett-Luce estimator (test_lidu_baselines.py), whose eager
    # sampling would take most of this file's time
    monkeypatch.setattr(baselines, "plackett_luce_entropy", lambda mean, k, key, cand: np.zeros(U))
    std = np.ones_like(mean)
    rankings = np.argsort(-np.where(cand, mean, -np.inf), axis=1)[:, :K]
    qpp = {"NQC", "WIG", "user clarity", "profile entropy", "ensemble RBO disagreement"}
    qpp |= {"ensemble mutual information"}
    out = baselines.all_baselines(
        mean,
        std,
        samples,
        rankings,
        candidates=cand,
        activity=np.arange(U),
        item_popularity=pop,
        profile=profile,
    )
    assert qpp <= set(out) and len(out) == 14
    for name, v in out.items():
        assert v.shape == (U,) and v.dtype == np.float64 and np.all(np.isfinite(v)), name
    np.testing.assert_allclose(out["NQC"], baselines.nqc(mean, K, cand), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        out["user clarity"], baselines.user_clarity(profile, pop), rtol=1e-6, atol=1e-6
    )
    # one draw: no ensemble baselines; no profile: no clarity / entropy
    out = baselines.all_baselines(mean, std, samples[:1], rankings, candidates=cand, item_popularity=pop)
    assert {"NQC", "WIG", "sampled top-K instability"} <= set(out)
    assert not (qpp - {"NQC", "WIG"}) & set(out)
    out = baselines.all_baselines(mean, std, None, rankings, profile=profile)
    assert "user clarity" not in out and "NQC" in out
