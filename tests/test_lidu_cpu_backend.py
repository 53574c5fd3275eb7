"""Tests of `lidu_jax.cpu_backend`, the CPU fast path, against `lidu_jax.reference` (the maths written
plainly) and NumPy: its log H loop, the top-down walk that leaves out low cells, the lower bound that
decides where, the counting sort of the items by the blocks they reach, and the whole estimator."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr as scipy_log_ndtr

import lidu_jax
from lidu_jax import backend, cpu_backend, reference


def catalogue(seed, b, n, k):
    """Catalogue-like scores (a low-rank mean, log-normal stds) and each user's top-k by mean."""
    rng = np.random.default_rng(seed)
    mu = (rng.normal(size=(b, 8)) @ rng.normal(size=(8, n)) / 2).astype(np.float32)
    sd = (0.5 * np.exp(0.3 * rng.normal(size=(b, n)))).astype(np.float32)
    return mu, sd, np.argsort(-mu, axis=1)[:, :k].astype(np.int32)


def test_erfc_parts_against_scipy_and_the_reference():
    """The loop's log Φ terms ``w + log v`` (`log_ndtr_parts`, Numerical Recipes' erfc) against SciPy's
    float64 ``log_ndtr`` and `reference.log_ndtr`, far tails included; ``v`` never below 2.7e-5, so a
    product of eight stays a normal float32."""
    z = np.concatenate([np.linspace(-40, 12, 200_001), -np.logspace(1.6, 5, 2_000)]).astype(np.float32)
    ref = scipy_log_ndtr(z.astype(np.float64))
    v, w = cpu_backend.log_ndtr_parts(jnp.asarray(z))
    parts = np.log(np.asarray(v, np.float64)) + np.asarray(w, np.float64)
    neg = z < 0
    assert np.max(np.abs(parts - ref)[neg] / np.abs(ref[neg])) < 1e-6
    assert np.max(np.abs(parts - ref)[~neg]) < 5e-7
    assert np.min(np.asarray(v)) > 2.7e-5
    np.testing.assert_allclose(parts, np.asarray(reference.log_ndtr(jnp.asarray(z))), rtol=1e-6, atol=1e-6)


def test_loop_equals_the_dense_log_h_and_keeps_far_tails():
    """`rest_log_h_loop` (blocks of 8 items, one log per 8 terms) against `reference.rest_log_h` at points
    spread over and beyond the items (z from about -60 to +60), with invalid and padding items; and eight
    items at z = -1e6 (beyond the erfc clamp), whose product of v factors must not underflow."""
    rng = np.random.default_rng(1)
    b, n, p = 5, 27, 40  # 27 items: the last block is padded
    mu = rng.normal(size=(b, n)).astype(np.float32)
    sd = rng.uniform(0.05, 2.0, size=(b, n)).astype(np.float32)
    valid = rng.random((b, n)) > 0.2
    points = np.sort(rng.uniform(-4, 4, size=(b, p)), axis=1).astype(np.float32)
    loop = cpu_backend.rest_log_h_loop(jnp.asarray(points), cpu_backend.rest_blocks(mu, sd, valid))
    dense = reference.rest_log_h(jnp.asarray(points), mu, sd, valid)
    # sums of 27 log Phi terms in another order and grouping: float32 rounding of values up to ~1e3
    np.testing.assert_allclose(np.asarray(loop), np.asarray(dense), rtol=2e-6, atol=1e-5)
    far = cpu_backend.rest_log_h_loop(
        jnp.zeros((1, 4)),
        cpu_backend.rest_blocks(jnp.full((1, 8), 1e6), jnp.ones((1, 8)), jnp.ones((1, 8), bool)),
    )
    np.testing.assert_allclose(np.asarray(far), 8 * scipy_log_ndtr(-1e6), rtol=1e-6, atol=1.0)  # ~ -4e12


@pytest.mark.parametrize("method", ["exact", "sequential", "unordered"])
def test_estimator_equals_the_reference_with_per_user_stops(method):
    """The whole CPU estimator (`lidu_jax.backend.gaussian_log_prob` on ``"cpu"``: items grouped by reach,
    the walk stopping at each user's floor) against the reference estimator with every cell computed, on
    inputs with excluded (training) items, 37 users (neither tiles of 16 nor groups of 32 fill up) and lists
    from the top of a noisy score (not ordered by mean, so some users have no bound and go to the bottom)."""
    rng = np.random.default_rng(23)
    b, n, k, g = 37, 203, 6, 128
    mu = (rng.normal(size=(b, 4)) @ rng.normal(size=(4, n))).astype(np.float32)
    sd = (0.3 * np.exp(0.4 * rng.normal(size=(b, n)))).astype(np.float32)
    cand = rng.random((b, n)) > 0.3
    noisy = np.where(cand, mu + rng.normal(scale=0.3, size=(b, n)), -np.inf)
    ranking = np.argsort(-noisy, axis=1)[:, :k].astype(np.int32)
    m, o = ("exact", False) if method == "unordered" else (method, True)
    kw = dict(method=m, ordered=o, grid_size=g, n_keep=None)
    got = backend.gaussian_log_prob(mu, sd, ranking, cand, backend="cpu", tile_size=16, **kw)
    want = jax.jit(partial(reference.gaussian_log_prob, **kw))(mu, sd, ranking, cand)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def walk():
    """One catalogue-like batch on its grids: the reference's log H on every cell and exact log P, the
    lower bound as the CPU backend computes it, and the items ordered by the blocks they reach."""
    b, n, k, g = 64, 500, 10, 256
    mu, sd, r = catalogue(11, b, n, k)
    cand = np.ones((b, n), bool)
    lg = reference.list_grid(jnp.asarray(mu), jnp.asarray(sd), jnp.asarray(r), jnp.asarray(cand), g)
    every = np.asarray(jax.jit(reference.rest_log_h)(lg.mids, lg.mu, lg.sd, lg.valid))
    log_p = np.asarray(jax.jit(partial(reference.exact_log_prob, grid_size=g))(mu, sd, r, cand))
    thresholds = cpu_backend.box_thresholds(lg.mu_l, lg.sd_l)
    lb = cpu_backend.log_p_lower_bound(
        lg.mu_l, lg.sd_l, thresholds, reference.rest_log_h(thresholds[1], lg.mu, lg.sd, lg.valid)
    )
    ordered = jax.jit(cpu_backend.order_by_reach_block)(lg.mids, lg.mu, lg.sd, lg.valid)
    return dict(lg=lg, every=every, log_p=log_p, lb=np.asarray(lb), thresholds=thresholds, ordered=ordered)


def test_lower_bound_is_below_the_reference_log_p(walk):
    """``LB <= log P`` (0.5 nat: the grid's own error) for lists ordered by mean; ``-inf`` (no bound,
    nothing left out) for a list that is not."""
    lg, lb = walk["lg"], walk["lb"]
    assert np.all(np.isfinite(lb)) and np.all(lb <= walk["log_p"] + 0.5)
    rev_l, rev_s = lg.mu_l[:, ::-1], lg.sd_l[:, ::-1]
    rev = cpu_backend.log_p_lower_bound(
        rev_l, rev_s, cpu_backend.box_thresholds(rev_l, rev_s), jnp.zeros_like(walk["thresholds"][1])
    )
    assert np.all(np.isneginf(np.asarray(rev)))


def test_walk_leaves_out_only_cells_without_probability(walk):
    """`rest_log_h_top_down` against the reference's log H on every cell: the cells it computes equal it,
    the cells it leaves out hold ``H <= e^-30 P`` (P from the reference), at least one block per user is left
    out, users stop at different blocks, each at its own first block below its floor; the same for groups
    of 16, 24 and 100 users (several; several with a partial last one; one) and for the items in the order
    of `order_by_reach_block` with its counts."""
    lg, every, log_p = walk["lg"], walk["every"], walk["log_p"]
    floor = walk["lb"] - cpu_backend.WINDOW_MARGIN
    mu_o, sd_o, valid_o, counts = walk["ordered"]
    runs = {16: (lg.mu, lg.sd, lg.valid, None)}
    runs.update({sub: (mu_o, sd_o, valid_o, counts) for sub in (24, 100)})
    for sub, (mu, sd, valid, cnt) in runs.items():
        kept = np.asarray(cpu_backend.rest_log_h_top_down(lg.mids, mu, sd, valid, floor, cnt, sub_tile=sub))
        left_out = np.isneginf(kept)
        # log H near the top of the grid sums 500 terms close to 0: an absolute part for the summation order
        np.testing.assert_allclose(kept[~left_out], every[~left_out], rtol=1e-5, atol=1e-5)
        assert left_out.sum() >= cpu_backend.WINDOW_STEP * lg.mids.shape[0]
        assert len(set(left_out.sum(1))) > 1  # users stop at different blocks
        assert np.all((every - floor[:, None])[left_out] < 0)  # only cells below the floor...
        assert np.all((every - (log_p[:, None] - 29.5))[left_out] <= 0)  # ...and there H <= e^-30 P
        low = every[:, :: cpu_backend.WINDOW_STEP] < floor[:, None]  # (B, blocks)
        first = np.array([np.max(np.nonzero(row)[0], initial=-1) for row in low])
        np.testing.assert_array_equal(left_out.sum(1), np.maximum(first, 0) * cpu_backend.WINDOW_STEP)


def test_items_ordered_by_the_blocks_they_reach(walk):
    """`order_by_reach_block`: each row is a permutation of the user's items, every item reaching block k
    sits before that block's count, and the count is exactly the number reaching it (NumPy recount)."""
    lg = walk["lg"]
    mu_o, sd_o, valid_o, counts = (np.asarray(x) for x in walk["ordered"])
    mu = np.asarray(lg.mu)
    n = mu.shape[1]
    np.testing.assert_array_equal(np.sort(mu_o, axis=1), np.sort(mu, axis=1))
    reach = np.where(valid_o, mu_o + reference.PRUNE_Z * sd_o, -np.inf)
    bottoms = np.asarray(lg.mids)[:, :: cpu_backend.WINDOW_STEP]
    reaches = reach[:, :, None] > bottoms[:, None, :]  # (B, n, blocks)
    after = np.arange(n)[None, :, None] >= counts[:, None, :]
    assert not np.any(after & reaches)
    np.testing.assert_array_equal(counts, reaches.sum(1))
    assert counts[:, -1].max() < n  # the top block visits fewer items than there are


def test_trimmed_lidu_equals_untrimmed_and_the_reference():
    """End to end through the public API on catalogue-like scores: trimmed = untrimmed = the reference."""
    b, n, k, g = 64, 500, 10, 256
    mu, sd, r = catalogue(11, b, n, k)
    trimmed, rk = lidu_jax.lidu_chunked([(mu, sd, None)], k, grid_size=g, backend="cpu")
    full, _ = lidu_jax.lidu_chunked([(mu, sd, None)], k, grid_size=g, backend="cpu", trim_cells=False)
    np.testing.assert_array_equal(np.asarray(rk), r)
    np.testing.assert_allclose(np.asarray(trimmed), np.asarray(full), rtol=1e-6, atol=1e-6)
    want = -jax.jit(partial(reference.exact_log_prob, grid_size=g))(mu, sd, r, np.ones((b, n), bool))
    np.testing.assert_allclose(np.asarray(trimmed), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, n_groups", [(37, 9), (1100, 17), (5000, 4)])
def test_group_ranks_is_a_stable_counting_sort(n, n_groups):
    """`group_ranks` (one-hot indicators packed several groups per int32) against a plain NumPy count:
    each item's place among the earlier items of its group, and the group sizes, also when a group holds
    every item (the packed field's largest count) and when fields take 11 or 13 bits."""
    rng = np.random.default_rng(n)
    group = rng.integers(0, n_groups, size=(6, n))
    group[0] = n_groups - 1  # one group holds all n items
    rank, sizes = jax.jit(cpu_backend.group_ranks, static_argnums=1)(jnp.asarray(group, jnp.int32), n_groups)
    want = np.zeros_like(group)
    for u in range(group.shape[0]):
        seen = np.zeros(n_groups, int)
        for i, gr in enumerate(group[u]):
            want[u, i] = seen[gr]
            seen[gr] += 1
    np.testing.assert_array_equal(np.asarray(rank), want)
    np.testing.assert_array_equal(
        np.asarray(sizes), np.stack([np.bincount(r, minlength=n_groups) for r in group])
    )
