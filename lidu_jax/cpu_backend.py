"""The CPU fast path: ``log H`` for the grid estimators of `lidu_jax.reference`, computed so that XLA:CPU
vectorises it and skips what cannot matter. Same quantity as `lidu_jax.reference.rest_log_h`, tested
against it (tests/test_lidu_cpu_backend.py); `lidu_jax.backend` plugs `rest_log_h` into the reference
estimators when the arrays live on a CPU.

Three ideas, each measured (docs/results-lidu-synthetic.md, "What changed"):

1. **A loop along the grid** (`rest_log_h_loop`): XLA:CPU compiles the fused ``(B, G, n) -> (B, G)`` log Phi
   reduction into code costing 2-4 ns per (item, cell) pair; a loop over blocks of 8 items whose body adds
   their terms to a ``(B, G)`` accumulator is an elementwise loop XLA vectorises, and the terms' ``w + log
   v`` form (`log_ndtr_parts`, Numerical Recipes' erfc) shares one ``log`` among 8 items.
2. **Only the items that reach a block of cells** (`order_by_reach_block`): each user's items are grouped by
   the highest 32-cell block where they are not far below (``mean + PRUNE_Z std`` above the block's lowest
   midpoint; below that ``log Phi > -1e-9``), with a counting sort (`group_ranks`).
3. **Only the cells that can matter** (`rest_log_h_top_down`): each user's grid is walked one block at a time
   from the top and stops below the first block whose lowest cell has ``log H < LB - WINDOW_MARGIN``, with
   ``LB`` a lower bound of ``log P`` (`log_p_lower_bound`). ``H`` increases along the grid, so every cell
   left out has ``H <= e^-30 P``; a list whose bottom item sits there carries at most that much
   probability, so ``log P`` changes by less than ``1e-13`` relative (the unordered and sequential
   probabilities are at least the ordered one, so the bound holds for them too).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax.reference import PRUNE_Z, ListGrid, log_interval_prob
from lidu_jax.reference import rest_log_h as dense_rest_log_h

__all__ = [
    "WINDOW_MARGIN",
    "WINDOW_STEP",
    "box_thresholds",
    "group_ranks",
    "log_ndtr_parts",
    "log_p_lower_bound",
    "order_by_reach_block",
    "rest_blocks",
    "rest_log_h",
    "rest_log_h_loop",
    "rest_log_h_top_down",
]

WINDOW_MARGIN = 30.0  # nats: cells left out have H <= e^-30 P
WINDOW_STEP = 32  # cells per block of the top-down walk
ITEM_BLOCK = 8  # rest items per step of the log H loop
PRODUCT_GROUP = 8  # log Phi terms whose v factors share one log (8 measured 1.1x faster than 4)
SUB_TILE = 32  # users per group of the top-down walk (32 measured 1.15x faster than 64 on one core)
_BOX_C = (0.0, 1.0, 2.0)  # bottom thresholds mu_K - c sd_K tried by log_p_lower_bound


def whole_blocks(grid_size: int) -> bool:
    """Whether the grid splits into at least two blocks of `WINDOW_STEP` cells (top-down walk possible)."""
    return grid_size % WINDOW_STEP == 0 and grid_size >= 2 * WINDOW_STEP


def rest_log_h(lg: ListGrid, *, trim: bool = True) -> jax.Array:
    """``log H`` at the midpoints of ``lg`` (`lidu_jax.reference.ListGrid`), ``(B, G)``: the CPU replacement
    of `lidu_jax.reference.rest_log_h`.

    With ``trim`` and a grid of whole blocks, the items are grouped by the blocks they reach and each user's
    grid is walked down to ``LB - WINDOW_MARGIN`` (module docstring); the cells below come back as ``-inf``.
    Otherwise every cell, by `rest_log_h_loop`."""
    if not (trim and whole_blocks(lg.mids.shape[1])):
        return rest_log_h_loop(lg.mids, rest_blocks(lg.mu, lg.sd, lg.valid))
    mu, sd, valid, counts = order_by_reach_block(lg.mids, lg.mu, lg.sd, lg.valid)
    thresholds = box_thresholds(lg.mu_l, lg.sd_l)
    # three points per user: the dense form (2.5x faster here than the loop, which vectorises along them)
    lb = log_p_lower_bound(lg.mu_l, lg.sd_l, thresholds, dense_rest_log_h(thresholds[1], mu, sd, valid))
    return rest_log_h_top_down(lg.mids, mu, sd, valid, lb - WINDOW_MARGIN, counts)


# ----------------------------------------------------------------------------------------- the item loop

# NR "erfcc" (Press et al., Numerical Recipes, 6.2): erfc(x) = t exp(-x^2 + P(t)), t = 1 / (1 + x / 2),
# fractional error below 1.2e-7 for every x >= 0. Coefficients of P, constant term first.
_ERFC_P = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)
_X_CLAMP = 1e4  # erfcx's factor is evaluated at min(x, 1e4): relative change of log Phi < 1e-7 beyond


def log_ndtr_parts(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log Phi(z) = w + log v`` elementwise, ``v`` in ``[2.8e-5, 1]``, no logarithm evaluated: ``(v, w)``.

    With ``x = |z| / sqrt(2)``, ``t = 1 / (1 + x / 2)`` and ``e(x) = t exp(P(t)) = erfc(x) exp(x^2)``:

    - ``z < 0``: ``Phi(z) = e(x) exp(-x^2) / 2``, so ``w = -x^2`` and ``v = e(x) / 2``;
    - ``z >= 0``: ``q = Phi(-z) = e(x) exp(-x^2) / 2``; for ``q < 1e-2``, ``w = log1p(-q)`` as
      ``-q - q^2/2 - q^3/3`` (truncation < 3e-9 relative) and ``v = 1``; otherwise ``w = 0``, ``v = 1 - q``.

    A sum of log Phi terms then needs one ``log`` per group of ``v`` factors (``sum w + log prod v``): in
    `rest_log_h_loop` this costs 1.2 ns per term against 2.3 for `lidu_jax.reference.log_ndtr` (one core);
    in a fused reduction it measured no faster. ``v >= 2.8e-5`` (``x`` clamped at 1e4) keeps a product of
    eight above ``3.8e-37``, clear of float32 underflow. Float32 error of ``w + log v`` against
    `scipy.special.log_ndtr`: relative < 1e-6 for ``z < 0`` (down to ``-1e5`` and beyond), absolute
    < 5e-7 for ``z >= 0`` (tests/test_lidu_cpu_backend.py).
    """
    x = jnp.abs(z) * (1.0 / math.sqrt(2.0))
    xc = jnp.minimum(x, _X_CLAMP)
    t = 1.0 / (1.0 + 0.5 * xc)
    p = jnp.full_like(t, _ERFC_P[-1])
    for c in _ERFC_P[-2::-1]:
        p = c + t * p
    neg = z < 0
    half_e = 0.5 * t * jnp.exp(jnp.where(neg, p, p - xc * xc))  # neg: e(x)/2; else Phi(-z)
    small = ~neg & (half_e < 1e-2)
    tail = -half_e * (1.0 + half_e * (0.5 + half_e * (1.0 / 3.0)))
    w = jnp.where(neg, -x * x, jnp.where(small, tail, 0.0))
    v = jnp.where(neg, half_e, jnp.where(small, 1.0, 1.0 - half_e))
    return v, w


def log_ndtr(z: jax.Array) -> jax.Array:
    """``log Phi(z)``, the standard normal log CDF, as ``w + log v`` (`log_ndtr_parts`): one ``exp`` and one
    ``log`` per element. Float32 error against `scipy.special.log_ndtr`: relative < 5e-7 for ``z < 0`` (down
    to ``-1e5`` and beyond), absolute < 4e-7 for ``z >= 0`` (tests/test_lidu_reference.py)."""
    v, w = log_ndtr_parts(z)
    return w + jnp.log(v)


def _rest_rows(mu, sd, valid):
    """``(inv, shift)``, each ``(B, n')`` with ``n'`` the next multiple of `ITEM_BLOCK` and ``z = x * inv -
    shift``; invalid and padding items get ``inv = 0``, ``shift = -1e4`` (``z = 1e4``: ``w = 0``, ``v = 1``
    in `log_ndtr_parts`)."""
    n = mu.shape[1]
    inv = jnp.where(valid, 1.0 / sd, 0.0)
    shift = jnp.where(valid, mu * inv, -1e4)
    pad = (-n) % ITEM_BLOCK
    if pad:
        inv = jnp.pad(inv, ((0, 0), (0, pad)))
        shift = jnp.pad(shift, ((0, 0), (0, pad)), constant_values=-1e4)
    return inv, shift


def _as_blocks(inv, shift):
    """`_rest_rows` ``(B, n')`` arrays as ``(n' / ITEM_BLOCK, ITEM_BLOCK, B)`` each, for `rest_log_h_loop`."""
    b = inv.shape[0]
    return inv.T.reshape(-1, ITEM_BLOCK, b), shift.T.reshape(-1, ITEM_BLOCK, b)


def rest_blocks(mu, sd, valid):
    """Rest items ``mu, sd, valid (B, n)`` laid out for `rest_log_h_loop`."""
    return _as_blocks(*_rest_rows(mu, sd, valid))


def rest_log_h_loop(points: jax.Array, blocks, n_steps: jax.Array | None = None) -> jax.Array:
    """``sum_j log Phi(z_j)`` at ``points (B, P)`` for the items ``blocks`` (`rest_blocks`), ``(B, P)``: a
    loop over item blocks whose body adds their terms ``w + log prod v`` (one ``log`` per `PRODUCT_GROUP`
    items) to a ``(B, P)`` accumulator, so XLA vectorises along the points and never holds a ``(B, P, n)``
    array. ``n_steps`` (a traced int; default all) limits the loop to the first item blocks."""
    inv, shift = blocks

    def step(j, acc):
        inv_blk = jax.lax.dynamic_index_in_dim(inv, j, 0, False)
        shift_blk = jax.lax.dynamic_index_in_dim(shift, j, 0, False)
        for g0 in range(0, ITEM_BLOCK, PRODUCT_GROUP):
            prod = None
            for i in range(g0, min(g0 + PRODUCT_GROUP, ITEM_BLOCK)):
                v, w = log_ndtr_parts(points * inv_blk[i][:, None] - shift_blk[i][:, None])
                acc = acc + w
                prod = v if prod is None else prod * v
            acc = acc + jnp.log(prod)
        return acc

    return jax.lax.fori_loop(0, inv.shape[0] if n_steps is None else n_steps, step, jnp.zeros_like(points))


# ------------------------------------------------------------------------------- items by the blocks reached


def group_ranks(group: jax.Array, n_groups: int) -> tuple[jax.Array, jax.Array]:
    """A stable counting sort's ranks: for ``group (B, n)`` ints in ``[0, n_groups)``, each item's place
    among the earlier items of its group, ``rank_i = #{i' < i : g_i' = g_i}`` ``(B, n)``, and every group's
    size ``(B, n_groups)``.

    From exclusive prefix sums of one-hot indicators, packed ``floor(31 / bits)`` groups per int32 (a field of
    ``bits = bit_length(n)`` bits holds any count up to ``n``), so 9 groups take three prefix sums instead of
    nine; the sums are associative scans because XLA:CPU lowers a cumsum over 1,000 items to a quadratic
    reduce-window (38 us/user measured)."""
    n = group.shape[1]
    bits = max(1, n.bit_length())
    per = 31 // bits
    word, field = group // per, (group % per) * bits
    one = jnp.left_shift(jnp.int32(1), field)
    words = tuple(jnp.where(word == w, one, 0) for w in range(-(-n_groups // per)))
    sums = jax.lax.associative_scan(lambda a, b: jax.tree.map(jnp.add, a, b), words, axis=1)
    mask = (1 << bits) - 1
    mine = sum(jnp.where(word == w, s, 0) for w, s in enumerate(sums)) - one  # exclusive
    rank = jnp.right_shift(mine, field) & mask
    totals = jnp.stack([s[:, -1] for s in sums], axis=1)  # (B, n_words)
    g = np.arange(n_groups)
    sizes = jnp.right_shift(totals[:, g // per], jnp.asarray((g % per) * bits, jnp.int32)) & mask
    return rank, sizes


def order_by_reach_block(mids, mu, sd, valid):
    """The items of ``mu, sd, valid (B, n)`` reordered per user so that, for every block ``k`` of
    `WINDOW_STEP` cells of ``mids (B, G)``, the items reaching it (``mean + PRUNE_Z std`` above its lowest
    midpoint) come first, and how many they are: ``(mu, sd, valid, counts (B, G/W))``.

    Items are grouped by the highest block they reach (a counting sort over ``G / W + 1`` groups,
    `group_ranks`; the order inside a group does not matter); the others have ``log Phi > -1e-9`` at every
    cell of the block."""
    b, n = mu.shape
    bottoms = mids[:, ::WINDOW_STEP]  # (B, nb) lowest midpoint of each block
    nb = bottoms.shape[1]
    reach = jnp.where(valid, mu + PRUNE_Z * sd, -jnp.inf)
    group = jnp.sum(reach[:, :, None] > bottoms[:, None, :], axis=2)  # blocks reached, 0..nb
    rank, count = group_ranks(group, nb + 1)
    at_or_above = jnp.cumsum(count[:, ::-1], axis=1)[:, ::-1]  # (B, nb + 1): items in group >= g
    pos = jnp.take_along_axis(at_or_above - count, group, axis=1) + rank  # higher groups first
    order = jnp.zeros_like(pos).at[jnp.arange(b)[:, None], pos].set(jnp.broadcast_to(jnp.arange(n), (b, n)))
    take = lambda x: jnp.take_along_axis(x, order, axis=1)
    return take(mu), take(sd), take(valid), at_or_above[:, 1:]


# --------------------------------------------------------------------------------------- the top-down walk


def rest_log_h_top_down(mids, mu, sd, valid, floor=None, counts=None, sub_tile: int = SUB_TILE) -> jax.Array:
    """``log H`` on the grid ``mids (B, G)`` for the items ``mu, sd, valid (B, n)``, one block of
    `WINDOW_STEP` cells at a time from the top block down, each user stopping below the first block whose
    lowest cell has ``log H < floor (B,)``; the cells not computed are ``-inf``. With ``floor = None`` (or a
    grid that is not whole blocks) every cell is computed.

    Each block is computed only for the users still going, gathered ``sub_tile`` at a time in the order of
    their total item count; ``counts (B, G/W)`` (`order_by_reach_block`: the items reaching each block come
    first) limits each group's item loop to its users' largest count. Users stop at different blocks and the
    lowest block (every item reaches it) costs most: on the benchmark's first chunk this takes 70k log Phi
    terms per user where walking each 256-user tile down to its lowest user's block took 107k."""
    b, g = mids.shape
    if floor is None or not whole_blocks(g):
        return rest_log_h_loop(mids, rest_blocks(mu, sd, valid))
    nb = g // WINDOW_STEP
    inv, shift = _rest_rows(mu, sd, valid)
    if counts is None:
        counts = jnp.full((b, nb), mu.shape[1], jnp.int32)
    by_block = mids.reshape(b, nb, WINDOW_STEP)
    work = jnp.sum(counts, axis=1)
    sub = min(sub_tile, b)
    slots = -(-b // sub) * sub

    def more(state):
        j, _, going = state
        return (j >= 0) & jnp.any(going)

    def block(state):
        j, log_h, going = state
        # the users still going, by their total item count (similar users share a group: its loop runs to
        # its largest count), then `b` (no user) in the remaining slots
        n_going = jnp.sum(going.astype(jnp.int32))
        by_work = jnp.argsort(jnp.where(going, work, jnp.iinfo(jnp.int32).max)).astype(jnp.int32)
        who = jnp.where(jnp.arange(slots) < n_going, jnp.pad(by_work, (0, slots - b)), b)
        count_j = jax.lax.dynamic_index_in_dim(counts, j, axis=1, keepdims=False)
        mids_j = jax.lax.dynamic_index_in_dim(by_block, j, axis=1, keepdims=False)

        def group(s, log_h):
            users = jax.lax.dynamic_slice(who, (s * sub,), (sub,))
            real = users < b
            rows = jnp.minimum(users, b - 1)
            n_steps = -(-jnp.max(jnp.where(real, count_j[rows], 0)) // ITEM_BLOCK)
            vals = rest_log_h_loop(mids_j[rows], _as_blocks(inv[rows], shift[rows]), n_steps)
            return log_h.at[users, j].set(vals, mode="drop")  # slots without a user (index b) dropped

        log_h = jax.lax.fori_loop(0, -(-n_going // sub), group, log_h)
        return j - 1, log_h, going & (log_h[:, j, 0] >= floor)

    # `going` starts as a value derived from `floor`, so it has floor's type under `jax.shard_map` too
    start = (jnp.asarray(nb - 1), jnp.full_like(by_block, -jnp.inf), ~jnp.zeros_like(floor, dtype=bool))
    _, log_h, _ = jax.lax.while_loop(more, block, start)
    return log_h.reshape(b, g)


# --------------------------------------------------------------------------------------- the lower bound


def box_thresholds(mu_l, sd_l):
    """``(upper (B, K), t_K (B, 3))``: ``upper[:, k] = t_{k-1}`` for list item ``k`` (``t_0 = 1e30``,
    ``t_k = (mu_k + mu_{k+1}) / 2``) and the bottom thresholds ``t_K = min(mu_K - c sd_K, t_{K-1})``,
    ``c = 0, 1, 2``."""
    upper = jnp.concatenate([jnp.full_like(mu_l[:, :1], 1e30), 0.5 * (mu_l[:, :-1] + mu_l[:, 1:])], axis=1)
    t_k = jnp.minimum(mu_l[:, -1:] - jnp.asarray(_BOX_C, mu_l.dtype) * sd_l[:, -1:], upper[:, -1:])
    return upper, t_k


def log_p_lower_bound(mu_l, sd_l, thresholds, log_h_t) -> jax.Array:
    """``(B,)`` lower bound of ``log P`` for lists ordered by mean, from one box of the event:

        P >= prod_k Pr[t_k < S_k < t_{k-1}] * H(t_K)

    with ``thresholds = box_thresholds(mu_l, sd_l)``, best of the bottom thresholds; ``log_h_t (B, 3)`` is
    ``log H`` at them. ``-inf`` where the list is not ordered by mean (no bound: nothing is left out)."""
    upper, t_k = thresholds
    n_c = t_k.shape[1]
    lower = jnp.concatenate(
        [jnp.broadcast_to(upper[:, 1:, None], (*upper[:, 1:].shape, n_c)), t_k[:, None, :]], axis=1
    )  # (B, K, n_c)
    za = (lower - mu_l[..., None]) / sd_l[..., None]
    zb = (upper - mu_l)[..., None] / sd_l[..., None]
    bound = jnp.sum(log_interval_prob(za, zb), axis=1) + log_h_t
    best = jnp.max(jnp.where(jnp.isnan(bound), -jnp.inf, bound), axis=1)
    return jnp.where(jnp.all(mu_l[:, 1:] <= mu_l[:, :-1], axis=1), best, -jnp.inf)
