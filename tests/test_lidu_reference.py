"""Tests of `lidu_jax.reference`, the maths every other implementation is tested against, against independent
oracles: brute-force Monte Carlo, closed forms, probability laws, SciPy's log Phi.

Every Gaussian call below uses (32 users, 12 items) padded rows, so jit compilations are shared."""

import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_ndtr as scipy_log_ndtr
from scipy.stats import norm

from lidu_jax import reference

N_MC = 1_000_000
B, N, G = 32, 12, 512


@partial(jax.jit, static_argnames=("method", "ordered", "grid_size"))
def _ref(mu, sd, ranking, cand, method, ordered, grid_size):
    kw = dict(method=method, ordered=ordered, grid_size=grid_size)
    return reference.gaussian_log_prob(mu, sd, ranking, cand, **kw)


def logp(mu, sd, ranking, cand=None, method="exact", ordered=True, grid_size=G):
    """The reference estimator on ``(b, N)`` inputs padded to ``B`` rows: ``(b,)``."""
    mu, sd, ranking = np.atleast_2d(mu), np.atleast_2d(sd), np.atleast_2d(ranking)
    cand = np.ones(mu.shape, bool) if cand is None else np.atleast_2d(cand)
    b = mu.shape[0]
    rows = np.r_[np.arange(b), np.zeros(B - b, int)]
    f32 = lambda x: jnp.asarray(x[rows], jnp.float32)
    out = _ref(
        f32(mu),
        f32(sd),
        jnp.asarray(ranking[rows], jnp.int32),
        jnp.asarray(cand[rows]),
        method,
        ordered,
        grid_size,
    )
    return np.asarray(out)[:b]


def mc_list_prob(mu, sd, ranking, cand=None, n=N_MC, seed=0):
    """Brute-force Pr[S_l1 > ... > S_lK > max rest] with independent Gaussian scores, and its standard
    error."""
    rng = np.random.default_rng(seed)
    idx = np.arange(mu.size) if cand is None else np.flatnonzero(cand)
    s = rng.standard_normal((n, mu.size)) * sd + mu
    lst = s[:, ranking]
    rest = np.setdiff1d(idx, ranking)
    ok = np.all(lst[:, :-1] > lst[:, 1:], axis=1)
    if rest.size:
        ok &= lst[:, -1] > s[:, rest].max(axis=1)
    p = ok.mean()
    return p, math.sqrt(p * (1 - p) / n)


def case(seed, k, n=N):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=n)
    sd = rng.uniform(0.3, 1.0, size=n)
    return mu, sd, np.argsort(-mu)[:k]


@pytest.mark.parametrize(("seed", "k"), [(0, 1), (1, 3), (2, 5)])
def test_exact_matches_monte_carlo(seed, k):
    mu, sd, ranking = case(seed, k)
    p_mc, se = mc_list_prob(mu, sd, ranking, seed=seed)
    p = float(np.exp(logp(mu, sd, ranking)[0]))
    assert abs(p - p_mc) < 3 * se, (p, p_mc, se)


def test_exact_matches_monte_carlo_with_excluded_items():
    mu, sd, _ = case(3, 3)
    cand = np.ones(N, bool)
    cand[np.argsort(-mu)[:2]] = False  # the two best items are "training items"
    ranking = np.argsort(-np.where(cand, mu, -np.inf))[:3]
    p_mc, se = mc_list_prob(mu, sd, ranking, cand, seed=3)
    p = float(np.exp(logp(mu, sd, ranking, cand)[0]))
    assert abs(p - p_mc) < 3 * se, (p, p_mc, se)


def test_all_orderings_of_four_items_sum_to_one():
    # Only items 0..3 are candidates; a full ordering of 4 items is fixed by its first 3 places (K = 3).
    mu, sd, _ = case(4, 3)
    cand = np.zeros(N, bool)
    cand[:4] = True
    perms = np.array(list(itertools.permutations(range(4))))[:, :3]
    total = np.exp(logp(np.tile(mu, (24, 1)), np.tile(sd, (24, 1)), perms, np.tile(cand, (24, 1)))).sum()
    assert abs(total - 1.0) < 1e-3


def test_orderings_of_a_set_sum_to_the_unordered_probability():
    mu, sd, top = case(5, 3)
    perms = np.array([top[list(p)] for p in itertools.permutations(range(3))])
    ordered = np.exp(logp(np.tile(mu, (6, 1)), np.tile(sd, (6, 1)), perms)).sum()
    unordered = np.exp(logp(mu, sd, top, ordered=False)[0])
    # probabilities in (0, 1), sums of 6 float32 terms: 1e-6 absolute holds whatever the summation order
    np.testing.assert_allclose(ordered, unordered, rtol=2e-3, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(m1=st.floats(-3, 3), m2=st.floats(-3, 3), s1=st.floats(0.1, 2.0), s2=st.floats(0.1, 2.0))
def test_two_items_closed_form(m1, m2, s1, s2):
    # Two candidates, K = 1: P = Pr[S1 > S2] = Phi((m1 - m2) / sqrt(s1^2 + s2^2)); "pairwise" is exact too.
    mu, sd = np.zeros(N), np.ones(N)
    mu[:2], sd[:2] = (m1, m2), (s1, s2)
    cand = np.arange(N) < 2
    want = norm.logcdf((m1 - m2) / math.hypot(s1, s2))
    for method, tol in [("exact", 2e-3), ("pairwise", 1e-5)]:
        got = float(logp(mu, sd, np.array([0]), cand, method=method)[0])
        assert abs(got - want) < tol * max(1.0, abs(want)), (method, got, want)


def test_grid_converges():
    mu, sd, ranking = case(10, 5)
    fine = float(logp(mu, sd, ranking, grid_size=2048)[0])
    assert abs(float(logp(mu, sd, ranking)[0]) - fine) < 2e-3


def test_approximations_against_exact_pinned_bounds():
    # Errors |log P_approx - log P_exact| on 32 fixed random users (12 items, K in {1, 5}). Sequential is
    # exact for K = 1; for longer lists both approximations can be off by O(1) nats (pinned below).
    rng = np.random.default_rng(5)
    mus = rng.normal(size=(B, N)).astype(np.float32)
    sds = rng.uniform(0.2, 1.0, size=(B, N)).astype(np.float32)
    errs = {}
    for k in (1, 5):
        rk = np.argsort(-mus, axis=1)[:, :k]
        exact = logp(mus, sds, rk)
        seq = logp(mus, sds, rk, method="sequential")
        pw = logp(mus, sds, rk, method="pairwise")
        errs[k] = (np.abs(seq - exact).max(), np.abs(pw - exact).max())
        if k == 5:  # as uncertainty scores they still order users like the exact one
            assert np.corrcoef(exact, seq)[0, 1] > 0.9
    assert errs[1][0] < 2e-3
    assert errs[1][1] < 2.0, errs
    assert errs[5][0] < 1.5, errs
    assert errs[5][1] < 3.5, errs


def test_log_ndtr_against_scipy():
    """The one log Φ against SciPy's float64 ``log_ndtr``, including far tails (the asymptotic branch below
    -10); and the one cell mass ``log(Φ(b) - Φ(a))`` against SciPy in both tails."""
    z = np.concatenate([np.linspace(-40, 12, 200_001), -np.logspace(1.6, 5, 2_000)]).astype(np.float32)
    ref = scipy_log_ndtr(z.astype(np.float64))
    got = np.asarray(reference.log_ndtr(jnp.asarray(z)), np.float64)
    neg = z < 0
    assert np.max(np.abs(got - ref)[neg] / np.abs(ref[neg])) < 1e-6
    assert np.max(np.abs(got - ref)[~neg]) < 5e-7
    a = np.array([-30.0, -3.0, -0.1, 0.5, 4.0, 9.0], np.float32)
    b = a + np.float32(0.25)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(divide="ignore"):  # np.where evaluates both tails; each is used where it is accurate
        want = np.where(a > 0, np.log(norm.sf(a64) - norm.sf(b64)), np.log(norm.cdf(b64) - norm.cdf(a64)))
    got = np.asarray(reference.log_interval_prob(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_kde_matches_monte_carlo_from_the_kde():
    rng = np.random.default_rng(11)
    n, s, k = N, 6, 3
    samples = (rng.normal(size=n) + 0.5 * rng.standard_normal((s, n))).astype(np.float32)
    h = float(1.06 * samples.std(0, ddof=1).mean() * s**-0.2)
    ranking = np.argsort(-samples.mean(0))[:k]
    kde = jax.jit(partial(reference.kde_log_prob, grid_size=G))
    logp_kde = float(
        kde(samples[:, None], np.full((1, n), h, np.float32), ranking[None], np.ones((1, n), bool))[0]
    )
    # Draw from each item's KDE independently: pick one of its samples, add h * N(0, 1).
    draws = samples[rng.integers(0, s, size=(N_MC, n)), np.arange(n)] + h * rng.standard_normal((N_MC, n))
    lst = draws[:, ranking]
    rest = np.setdiff1d(np.arange(n), ranking)
    ok = np.all(lst[:, :-1] > lst[:, 1:], axis=1) & (lst[:, -1] > draws[:, rest].max(1))
    p_mc = ok.mean()
    se = math.sqrt(p_mc * (1 - p_mc) / N_MC)
    assert abs(math.exp(logp_kde) - p_mc) < 3 * se + 1e-4, (math.exp(logp_kde), p_mc, se)


def test_mc_counts_the_draws_with_the_list_on_top():
    """`mc_log_prob` against a NumPy count of the draws whose top-2 candidates, in order, are the list."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 2, 5)).astype(np.float32)
    cand = np.array([[True] * 5, [True, True, False, True, True]])
    ranking = np.array([[0, 1], [3, 4]])
    want = []
    for u in range(2):
        masked = np.where(cand[u], x[:, u], -np.inf)
        top = np.argsort(-masked, axis=1, kind="stable")[:, :2]
        c = np.sum(np.all(top == ranking[u], axis=1))
        want.append(np.log((c + 0.5) / 51.0))
    got = np.asarray(jax.jit(reference.mc_log_prob)(x, ranking, cand))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
