"""Tests of `lidu_jax.estimators`: the exact list probability against brute-force Monte Carlo, probability
laws,
batching/jit invariances, pruning, the approximations' pinned errors, and input validation."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

import lidu_jax
from lidu_jax import estimators

N_MC = 1_000_000
B, N = 32, 12  # every grid call below uses (32 users, 12 items) so jit compilations are shared


def logp(mu, sd, ranking, cand=None, **kw):
    """list_log_prob on ``(b, N)`` inputs padded to ``B`` rows (one compilation per K and method)."""
    mu, sd, ranking = np.atleast_2d(mu), np.atleast_2d(sd), np.atleast_2d(ranking)
    cand = np.ones(mu.shape, bool) if cand is None else np.atleast_2d(cand)
    b = mu.shape[0]
    rows = np.r_[np.arange(b), np.zeros(B - b, int)]
    out = lidu_jax.list_log_prob(mu[rows], sd[rows], ranking[rows], candidates=cand[rows], **kw)
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
@given(
    m1=st.floats(-3, 3),
    m2=st.floats(-3, 3),
    s1=st.floats(0.1, 2.0),
    s2=st.floats(0.1, 2.0),
)
def test_two_items_closed_form(m1, m2, s1, s2):
    # Two candidates, K = 1: P = Pr[S1 > S2] = Phi((m1 - m2) / sqrt(s1^2 + s2^2)); "pairwise" is exact too.
    mu, sd = np.zeros(N), np.ones(N)
    mu[:2], sd[:2] = (m1, m2), (s1, s2)
    cand = np.arange(N) < 2
    want = norm.logcdf((m1 - m2) / math.hypot(s1, s2))
    for method, tol in [("exact", 2e-3), ("pairwise", 1e-5)]:
        got = float(logp(mu, sd, np.array([0]), cand, method=method)[0])
        assert abs(got - want) < tol * max(1.0, abs(want)), (method, got, want)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    mu = rng.normal(size=(B, N)).astype(np.float32)
    sd = rng.uniform(0.2, 1.0, size=(B, N)).astype(np.float32)
    cand = rng.random((B, N)) > 0.2
    ranking = np.asarray(estimators.top_k_rankings(mu, 3, cand))
    return mu, sd, ranking, cand


def test_vmap_equals_loop_and_jit_equals_eager(batch):
    mu, sd, ranking, cand = batch
    f = lambda m, s, r, c: lidu_jax.list_log_prob(m, s, r, candidates=c)
    eager = f(mu, sd, ranking, cand)
    loop = np.concatenate([logp(mu[i], sd[i], ranking[i], cand[i]) for i in range(4)])  # one user per call
    vmapped = jax.vmap(f)(mu, sd, ranking, cand)
    jitted = jax.jit(f)(mu, sd, ranking, cand)
    chex.assert_trees_all_close(vmapped, eager, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(loop, eager[:4], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)


def test_lidu_jit_matches_chunked(batch):
    mu, sd, ranking, cand = batch
    want, want_r = lidu_jax.lidu(mu, sd, 3, candidates=cand, chunk_size=B)
    np.testing.assert_array_equal(want_r, ranking)
    got, got_r = jax.jit(lambda m, s, c: lidu_jax.lidu(m, s, 3, candidates=c))(mu, sd, cand)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_r, want_r)
    half, _ = lidu_jax.lidu(mu[:20], sd[:20], 3, candidates=cand[:20], chunk_size=B)  # padded chunk
    chex.assert_trees_all_close(half, want[:20], rtol=1e-5, atol=1e-5)


def test_far_below_candidates_leave_lidu_unchanged_and_pruning_is_exact():
    rng = np.random.default_rng(8)
    mu = rng.normal(size=(B, N)).astype(np.float32)
    sd = rng.uniform(0.2, 0.6, size=(B, N)).astype(np.float32)
    low_mu = rng.normal(-40.0, 1.0, size=(B, 100)).astype(np.float32)
    low_sd = rng.uniform(0.2, 0.6, size=(B, 100)).astype(np.float32)
    base, r0 = lidu_jax.lidu(mu, sd, 3, chunk_size=B)
    wide_mu, wide_sd = np.concatenate([mu, low_mu], 1), np.concatenate([sd, low_sd], 1)
    wide, r1 = lidu_jax.lidu(wide_mu, wide_sd, 3, chunk_size=B)
    np.testing.assert_array_equal(r0, r1)
    np.testing.assert_allclose(wide, base, rtol=1e-5, atol=1e-5)
    # `lidu` kept a budget of 16 of the 109 rest items; the unpruned estimator agrees.
    assert estimators._item_budget(np.full(B, 9), 112) == 16
    full = -lidu_jax.list_log_prob(wide_mu, wide_sd, r1)
    np.testing.assert_allclose(wide, full, rtol=1e-5, atol=1e-5)


def test_log_phi_forms_against_scipy():
    """Both float32 forms of log Φ used by the grid methods (`log_ndtr`; ``w + log v`` of `_log_phi_parts`
    in the CPU log H loop) against SciPy's float64 ``log_ndtr``, including far tails, and the CPU loop's
    products of eight ``v`` factors stay clear of float32 underflow in the worst case."""
    from scipy.special import log_ndtr

    z = np.concatenate([np.linspace(-40, 12, 200_001), -np.logspace(1.6, 5, 2_000)]).astype(np.float32)
    ref = log_ndtr(z.astype(np.float64))
    v, w = estimators._log_phi_parts(jnp.asarray(z))
    parts = np.log(np.asarray(v, np.float64)) + np.asarray(w, np.float64)
    direct = np.asarray(estimators.log_ndtr(jnp.asarray(z)), np.float64)
    neg = z < 0
    assert np.max(np.abs(parts - ref)[neg] / np.abs(ref[neg])) < 1e-6
    assert np.max(np.abs(parts - ref)[~neg]) < 5e-7
    assert np.max(np.abs(direct - ref)[neg] / np.abs(ref[neg])) < 1e-5
    assert np.max(np.abs(direct - ref)[~neg]) < 5e-7
    # eight items of a block at z = -1e6 (beyond the clamp): the product of their v stays a normal float32
    mu, sd = jnp.full((1, 8), 1e6), jnp.ones((1, 8))
    got = estimators._rest_log_h_loop(
        jnp.zeros((1, 4)), estimators._rest_blocks(mu, sd, jnp.ones((1, 8), bool))
    )
    np.testing.assert_allclose(np.asarray(got), 8 * log_ndtr(-1e6), rtol=1e-6, atol=1.0)  # |value| ~ 4e12


def test_per_user_stop_with_excluded_items_and_ragged_tiles():
    """The CPU walk that stops each user at its own floor, on inputs the catalogue-like test does not have:
    excluded (training) items, a user count that fills neither its tiles nor its groups, the exact and
    sequential methods, and lists from the top of a noisy score (not ordered by mean, so some users have no
    bound and are walked to the bottom). Same values as with every cell computed."""
    rng = np.random.default_rng(23)
    b, n, k, g = 37, 203, 6, 128
    mu = (rng.normal(size=(b, 4)) @ rng.normal(size=(4, n))).astype(np.float32)
    sd = (0.3 * np.exp(0.4 * rng.normal(size=(b, n)))).astype(np.float32)
    cand = rng.random((b, n)) > 0.3
    noisy = np.where(cand, mu + rng.normal(scale=0.3, size=(b, n)), -np.inf)
    ranking = np.argsort(-noisy, axis=1)[:, :k]
    for method in ("exact", "sequential"):
        got = estimators._gaussian_core(
            mu, sd, ranking, cand, method=method, grid_size=g, n_keep=None, ordered=True, tile=16
        )
        want = estimators._gaussian_core(
            mu, sd, ranking, cand, method=method, grid_size=g, n_keep=None, ordered=True, tile=16, trim=False
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_left_out_low_cells_hold_no_probability():
    """On CPU the grid methods compute ``log H`` block by block from the top and leave out each user's low
    cells where ``H <= e^-30 P`` (`estimators._gaussian_core_tile`). On catalogue-like scores cells are left
    out, the bound holds in every cell left out (checked on the full grid), the lower bound of log P is one,
    users stop at different blocks, and LiDu is unchanged."""
    rng = np.random.default_rng(11)
    b, n, k, g = 64, 500, 10, 256
    mu = (rng.normal(size=(b, 8)) @ rng.normal(size=(8, n)) / 2).astype(np.float32)
    sd = (0.5 * np.exp(0.3 * rng.normal(size=(b, n)))).astype(np.float32)
    full, r = estimators.lidu_chunked([(mu, sd, None)], k, grid_size=g, trim_cells=False)
    trimmed, _ = estimators.lidu_chunked([(mu, sd, None)], k, grid_size=g)
    np.testing.assert_allclose(trimmed, full, rtol=1e-6, atol=1e-6)
    mu_l, sd_l = np.take_along_axis(mu, r, 1), np.take_along_axis(sd, r, 1)
    cand = np.ones((b, n), bool)
    rest = estimators._rest_mask(r, cand)
    blocks = estimators._rest_blocks(mu, sd, rest)
    thresholds = estimators._box_thresholds(mu_l, sd_l)
    t_k = thresholds[1]
    lb_loop = estimators._log_p_lower_bound(mu_l, sd_l, thresholds, estimators._rest_log_h_loop(t_k, blocks))
    lb = np.asarray(  # the bound as the estimator computes it (dense log H at the three thresholds)
        estimators._log_p_lower_bound(mu_l, sd_l, thresholds, estimators._rest_log_h_dense(t_k, mu, sd, rest))
    )
    np.testing.assert_allclose(lb, np.asarray(lb_loop), rtol=1e-5, atol=1e-4)
    assert np.all(lb <= -full + 0.5)  # 0.5 nat: the grid's own error
    lo, hi = estimators._grid_bounds(mu, mu_l, sd_l, r, cand)
    mids = estimators._Grid(lo, hi, g).mids
    every = np.asarray(estimators._rest_log_h_top_down(mids, mu, sd, rest))
    floor = lb - estimators.WINDOW_MARGIN
    kept = np.asarray(estimators._rest_log_h_top_down(mids, mu, sd, rest, floor, sub_tile=16))
    left_out = np.isneginf(kept)
    assert left_out.sum() >= 32 * b  # at least one block of cells for every user
    assert len(set(left_out.sum(1))) > 1  # users stop at different blocks
    # log H near the top of the grid sums 500 terms close to 0: an absolute part for the summation order
    np.testing.assert_allclose(kept[~left_out], every[~left_out], rtol=1e-6, atol=1e-5)
    assert np.all((every - floor[:, None])[left_out] < 0)  # only cells below the floor are left out...
    assert np.all((every - (-full[:, None] - 29.5))[left_out] <= 0)  # ...and there H <= e^-30 P
    # each user stops at the first block whose lowest cell is below its floor
    low = every[:, :: estimators.WINDOW_STEP] < floor[:, None]  # (B, blocks)
    first = np.array([np.max(np.nonzero(row)[0], initial=-1) for row in low])
    np.testing.assert_array_equal(left_out.sum(1), np.maximum(first, 0) * estimators.WINDOW_STEP)
    # the CPU loop visits, per block of cells, only the items that reach it (grouped per user)
    mu_o, sd_o, valid_o, counts = estimators._order_by_reach_block(mids, mu, sd, rest)
    order = np.argsort(np.asarray(mu_o), axis=1)  # each row is a permutation of the user's items...
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(mu_o), order, 1), np.sort(mu, axis=1))
    reach = np.where(np.asarray(valid_o), np.asarray(mu_o) + estimators.PRUNE_Z * np.asarray(sd_o), -np.inf)
    bottoms = np.asarray(mids)[:, :: estimators.WINDOW_STEP]
    counts = np.asarray(counts)
    after = np.arange(n)[None, :, None] >= counts[:, None, :]  # (B, n, blocks): past user's count of block
    reaches = reach[:, :, None] > bottoms[:, None, :]
    assert not np.any(after & reaches)  # ...every item reaching block k sits before the count...
    np.testing.assert_array_equal(counts, reaches.sum(1))  # ...which is exactly the number reaching it
    assert counts[:, -1].max() < n  # the top block visits fewer items than there are
    for sub in (24, 100):  # users gathered in groups: several with a partial last one; one group
        grouped = estimators._rest_log_h_top_down(
            mids, mu_o, sd_o, valid_o, floor, jnp.asarray(counts), sub_tile=sub
        )
        np.testing.assert_allclose(np.asarray(grouped)[~left_out], every[~left_out], rtol=1e-5, atol=1e-5)
        assert np.array_equal(np.isneginf(np.asarray(grouped)), left_out)
    # a list not ordered by mean has no bound: nothing is left out
    rev_l, rev_s = mu_l[:, ::-1], sd_l[:, ::-1]
    rev_t = estimators._box_thresholds(rev_l, rev_s)
    lb_rev = estimators._log_p_lower_bound(rev_l, rev_s, rev_t, estimators._rest_log_h_loop(t_k, blocks))
    assert np.all(np.isneginf(np.asarray(lb_rev)))


@pytest.mark.parametrize("n, n_groups", [(37, 9), (1100, 17), (5000, 4)])
def test_group_ranks_is_a_stable_counting_sort(n, n_groups):
    """`estimators._group_ranks` (one-hot indicators packed several groups per int32) against a plain
    NumPy count: each item's place among the earlier items of its group, and the group sizes, also when a
    group holds every item (the packed field's largest count) and when fields take 11 or 13 bits."""
    rng = np.random.default_rng(n)
    group = rng.integers(0, n_groups, size=(6, n))
    group[0] = n_groups - 1  # one group holds all n items
    rank, sizes = jax.jit(estimators._group_ranks, static_argnums=1)(jnp.asarray(group, jnp.int32), n_groups)
    want = np.zeros_like(group)
    for u in range(group.shape[0]):
        seen = np.zeros(n_groups, int)
        for i, g in enumerate(group[u]):
            want[u, i] = seen[g]
            seen[g] += 1
    np.testing.assert_array_equal(np.asarray(rank), want)
    np.testing.assert_array_equal(
        np.asarray(sizes), np.stack([np.bincount(r, minlength=n_groups) for r in group])
    )


def test_grid_converges():
    mu, sd, ranking = case(10, 5)
    fine = float(logp(mu, sd, ranking, grid_size=2048)[0])
    default = float(logp(mu, sd, ranking)[0])
    assert abs(default - fine) < 2e-3


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
            assert stats_corr(exact, seq) > 0.9
    assert errs[1][0] < 2e-3
    assert errs[1][1] < 2.0, errs
    assert errs[5][0] < 1.5, errs
    assert errs[5][1] < 3.5, errs


def stats_corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_kde_matches_monte_carlo_from_the_kde():
    rng = np.random.default_rng(11)
    n, s, k = N, 6, 3
    samples = (rng.normal(size=n) + 0.5 * rng.standard_normal((s, n))).astype(np.float32)
    h = float(estimators.silverman_bandwidth(samples).mean())
    mean = samples.mean(0)
    ranking = np.argsort(-mean)[:k]
    logp = float(lidu_jax.list_log_prob_from_samples(samples, ranking, method="kde", bandwidth=h))
    # Draw from each item's KDE independently: pick one of its samples, add h * N(0, 1).
    draws = samples[rng.integers(0, s, size=(N_MC, n)), np.arange(n)] + h * rng.standard_normal((N_MC, n))
    lst = draws[:, ranking]
    rest = np.setdiff1d(np.arange(n), ranking)
    ok = np.all(lst[:, :-1] > lst[:, 1:], axis=1) & (lst[:, -1] > draws[:, rest].max(1))
    p_mc = ok.mean()
    se = math.sqrt(p_mc * (1 - p_mc) / N_MC)
    assert abs(math.exp(logp) - p_mc) < 3 * se + 1e-4, (math.exp(logp), p_mc, se)


def test_sample_methods_agree_with_gaussian_exact_for_many_gaussian_samples():
    rng = np.random.default_rng(12)
    n, k, s = N, 2, 40_000
    mu, sd = rng.normal(size=n), rng.uniform(0.3, 0.8, size=n)
    samples = (mu + sd * rng.standard_normal((s, n))).astype(np.float32)
    ranking = np.argsort(-mu)[:k]
    exact = float(jnp.exp(lidu_jax.list_log_prob(mu, sd, ranking)))
    gauss = float(jnp.exp(lidu_jax.list_log_prob_from_samples(samples, ranking, method="gaussian")))
    mc = float(jnp.exp(lidu_jax.list_log_prob_from_samples(samples, ranking, method="mc")))
    se = math.sqrt(exact * (1 - exact) / s)
    assert abs(gauss - exact) < 0.01
    assert abs(mc - exact) < 3 * se + 1 / s
    kde = float(jnp.exp(lidu_jax.list_log_prob_from_samples(samples[:2000], ranking, method="kde")))
    assert abs(kde - exact) < 0.02  # KDE widens each density by a small bandwidth


def test_lidu_from_samples_shapes_and_chunking():
    # Same (S=6, n=12, K=3, grid) as the KDE Monte-Carlo test, so the one-user chunks reuse its compilation.
    rng = np.random.default_rng(13)
    samples = rng.normal(size=(6, 2, N)).astype(np.float32)
    v, r = lidu_jax.lidu_from_samples(samples, 3, method="kde", bandwidth=0.3)
    v1, r1 = lidu_jax.lidu_from_samples(samples, 3, method="kde", bandwidth=0.3, chunk_size=1)
    chex.assert_shape(v, (2,))
    chex.assert_shape(r, (2, 3))
    np.testing.assert_allclose(v, v1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r, r1)
    np.testing.assert_array_equal(r, estimators.top_k_rankings(samples.mean(0), 3))
    assert np.all(np.asarray(v) > 0)
    vp, _ = lidu_jax.lidu_from_samples(samples, 3, method="kde", bandwidth=0.3, per_position=True)
    np.testing.assert_allclose(vp, np.asarray(v) / 3, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- validation


def good():
    mu = np.array([[0.5, 0.1, -0.3, 0.9]], np.float32)
    sd = np.array([[0.3, 0.4, 0.5, 0.2]], np.float32)
    return mu, sd, np.array([[3, 0]]), np.ones((1, 4), bool)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m, s, r, c: (np.where(m > 0.8, np.nan, m), s, r, c), "mean"),
        (lambda m, s, r, c: (np.where(m > 0.8, np.inf, m), s, r, c), "mean"),
        (lambda m, s, r, c: (m, np.where(s < 0.25, 0.0, s), r, c), "std"),
        (lambda m, s, r, c: (m, -s, r, c), "std"),
        (lambda m, s, r, c: (m, s, np.array([[3, 3]]), c), "duplicate"),
        (lambda m, s, r, c: (m, s, np.array([[3, 7]]), c), "ranking"),
        (lambda m, s, r, c: (m, s, r, np.array([[False, True, True, True]])), "excluded"),
        (lambda m, s, r, c: (m, s, np.array([[3, 0, 1]]), np.array([[True, True, False, False]])), "K=3"),
        (lambda m, s, r, c: (m, s[:, :3], r, c), "std must have the shape"),
        (lambda m, s, r, c: (m, s, r, c[:, :3]), "candidates must have the shape"),
        (lambda m, s, r, c: (m, s, np.array([3, 0]), c), "ranking must have shape"),
        (lambda m, s, r, c: (m, s, r.astype(np.float32), c), "integer"),
    ],
)
def test_list_log_prob_bad_inputs(change, match):
    m, s, r, c = change(*good())
    with pytest.raises(ValueError, match=match):
        lidu_jax.list_log_prob(m, s, r, candidates=c)


def test_bad_method_grid_and_k():
    m, s, r, _c = good()
    with pytest.raises(ValueError, match="method"):
        lidu_jax.list_log_prob(m, s, r, method="magic")
    with pytest.raises(ValueError, match="grid_size"):
        lidu_jax.list_log_prob(m, s, r, grid_size=2)
    with pytest.raises(ValueError, match="k=5"):
        lidu_jax.lidu(m, s, 5)
    with pytest.raises(ValueError, match="K=3"):
        lidu_jax.lidu(m, s, 3, candidates=np.array([[True, True, False, False]]))
    with pytest.raises(ValueError, match="std"):
        lidu_jax.lidu(m, np.zeros_like(s), 2)
    with pytest.raises(ValueError, match="mean"):
        lidu_jax.lidu(np.full_like(m, np.nan), s, 2)
    with pytest.raises(ValueError, match="k must be"):
        lidu_jax.lidu(m, s, 0)


def test_sample_input_validation():
    samples = np.random.default_rng(0).normal(size=(4, 2, 5)).astype(np.float32)
    r = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="at least 2 draws"):
        lidu_jax.list_log_prob_from_samples(samples[:1], r)
    with pytest.raises(ValueError, match="NaN"):
        lidu_jax.list_log_prob_from_samples(np.where(samples > 1, np.nan, samples), r)
    with pytest.raises(ValueError, match="duplicate"):
        lidu_jax.list_log_prob_from_samples(samples, np.array([[0, 0], [2, 3]]))
    with pytest.raises(ValueError, match="method"):
        lidu_jax.list_log_prob_from_samples(samples, r, method="exact")
    with pytest.raises(ValueError, match="bandwidth"):
        lidu_jax.list_log_prob_from_samples(samples, r, bandwidth=0.0)
    with pytest.raises(ValueError, match="k="):
        lidu_jax.lidu_from_samples(samples, 6)


@pytest.mark.parametrize("method", ["exact", "sequential", "pairwise"])
def test_accelerator_layout_gives_the_same_numbers(batch, monkeypatch, method):
    """Off CPU ``log H`` is one materialised log Φ reduction (`estimators.log_ndtr`) instead of the CPU loop
    over rest-item blocks, and users are walked in tiles; forcing that layout on CPU must not change any
    value (only the compiled program)."""
    mu, sd, ranking, cand = batch
    fused = lidu_jax.list_log_prob(mu, sd, ranking, candidates=cand, method=method)
    tiled, _ = estimators.lidu_chunked([(mu, sd, cand)], 3, method=method, tile=5)  # 32 = 6 tiles + pad
    monkeypatch.setattr(estimators, "_accelerator_layout", lambda: True)
    jax.clear_caches()  # retrace: the barrier is chosen at trace time
    try:
        barrier = lidu_jax.list_log_prob(mu, sd, ranking, candidates=cand, method=method)
        samples = mu[None] + sd[None] * np.random.default_rng(0).standard_normal((6, *mu.shape)).astype(
            np.float32
        )
        kde_b = lidu_jax.list_log_prob_from_samples(samples, ranking, candidates=cand, method="kde")
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    kde = lidu_jax.list_log_prob_from_samples(samples, ranking, candidates=cand, method="kde")
    chex.assert_trees_all_close(barrier, fused, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(-tiled, fused, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(kde_b, kde, rtol=1e-6, atol=1e-6)
