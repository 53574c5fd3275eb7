"""The list probability as the maths states it: grid, cell masses, log Phi, log H, the recursion, and one
function per estimator. This is the test oracle of the CPU fast path (`lidu_jax.cpu_backend`) and the
program that runs on GPUs and TPUs.

For one user with candidates C, independent scores ``S_i`` and a list ``L = (l_1, ..., l_K)``:

    P(L) = Pr[S_{l_1} > ... > S_{l_K} > max_{j in C \\ L} S_j],        LiDu = -log P(L)

(a reconstruction from the abstract of arXiv 2507.23208; docs/maths-lidu.md). With CDFs ``F_i``,
densities ``f_i`` and ``H(x) = prod_{j in C \\ L} F_j(x)``:

    G_K(x) = f_{l_K}(x) H(x),     G_k(x) = f_{l_k}(x) int_{-inf}^x G_{k+1}(y) dy,     P = int G_1.

Every function takes one batch of users, ``mean, std (B, n)``, ``ranking (B, K)`` int, ``cand (B, n)`` bool,
and returns ``log P`` ``(B,)``. Nothing here validates or rescales: the public API (`lidu_jax.estimators`)
checks the inputs and maps each user's scores to the frame of its grid first (`lidu_jax.standardise`); the
maths holds for any finite inputs of moderate scale. Everything is jittable and vmappable (``grid_size``,
``n_keep``, ``ordered``, ``log_h`` and ``materialise`` are static).

Two arguments choose how, never what, is computed:

- ``log_h``: a function ``ListGrid -> (B, G)`` that replaces `rest_log_h` (the CPU backend passes its loop);
- ``materialise``: keep the log Phi arrays out of the fusions that reduce them
  (`jax.lax.optimization_barrier`). Measured on an H100 (jax 0.11.2): XLA's GPU compiler had not finished a
  reduce fusion whose producer is log Phi of a ``(1024, 256, 990)`` array after minutes, while with the
  producer materialised it compiled in 0.5 s and ran in 1.8 ms. On CPU the fused form is the fast one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = [
    "GRID_HALF_WIDTH",
    "GRID_MIN_MARGIN",
    "PRUNE_Z",
    "ListGrid",
    "exact_log_prob",
    "gaussian_log_prob",
    "grid_bounds",
    "kde_log_prob",
    "list_grid",
    "list_log_masses",
    "log_interval_prob",
    "log_ndtr",
    "log_sub_exp",
    "make_grid",
    "mc_log_prob",
    "ordered_recursion",
    "pairwise_log_prob",
    "per_position_lidu",
    "rest_log_h",
    "rest_mask",
    "select_rest",
    "sequential_log_prob",
    "unordered_log_prob",
]

GRID_HALF_WIDTH = 7.0  # the grid spans mean ± 7 std of every list item (tail mass Phi(-7) ~ 1e-12)
GRID_MIN_MARGIN = 2.0**-20  # ...and at least this far (8 float32 ulps of 1) beyond every list item
PRUNE_Z = 6.0  # a rest item is "far below" a point 6 of its stds above its mean: log F_j > -1e-9 there


def _materialised(x: jax.Array, materialise: bool) -> jax.Array:
    return jax.lax.optimization_barrier(x) if materialise else x


# ------------------------------------------------------------------------------------------------- log Phi


def log_ndtr(z: jax.Array) -> jax.Array:
    """``log Phi(z)``, the standard normal log CDF, with one ``erfc`` and one ``log`` per element. With
    ``t = Phi(-|z|)``:

    - ``z >= 0``: ``log1p(-t)``, as ``-t - t^2/2 - t^3/3 - t^4/4`` for ``t < 1e-2`` (truncation < 2e-11
      relative, so tiny values keep their relative precision) and as ``log(1 - t)`` otherwise;
    - ``-10 <= z < 0``: ``log t``;
    - ``z < -10`` (where ``t`` underflows in float32): the asymptotic series
      ``-z^2/2 - log(-z) - log(2 pi)/2 + log1p(s)``, ``s = -z^-2 + 3 z^-4 - 15 z^-6``, with ``log1p(s)`` as a
      cubic in ``s`` (``|s| < 0.01``).

    The three branches share a single ``log``. Float32 error against `scipy.special.log_ndtr`: relative
    < 1e-6 for ``z < 0`` down to ``-1e5``, absolute < 5e-7 for ``z >= 0`` (tests/test_lidu_reference.py);
    `jax.scipy.special.log_ndtr` loses relative precision for large z."""
    t = 0.5 * jax.lax.erfc(jnp.abs(z) * (1.0 / math.sqrt(2.0)))  # Phi(-|z|)
    neg, deep = z < 0, z < -10.0
    zz = jnp.minimum(z, -10.0)
    log_arg = jnp.log(jnp.where(deep, -zz, jnp.where(neg, t, 1.0 - t)))
    inv2 = 1.0 / (zz * zz)
    s = inv2 * (-1.0 + inv2 * (3.0 - 15.0 * inv2))
    asym = -0.5 * zz * zz - log_arg - 0.5 * math.log(2 * math.pi) + s * (1.0 + s * (-0.5 + s * (1.0 / 3.0)))
    small = -t * (1.0 + t * (0.5 + t * (1.0 / 3.0 + t * 0.25)))
    upper = jnp.where(t < 1e-2, small, log_arg)
    return jnp.where(deep, asym, jnp.where(neg, log_arg, upper))


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and far below (Maechler 2012)."""
    x = jnp.minimum(x, -1e-30)
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_sub_exp(a: jax.Array, b: jax.Array) -> jax.Array:
    """``log(e^a - e^b)`` for ``b <= a``: the mass between two probabilities given in log space."""
    return a + _log1mexp(jnp.minimum(b - a, 0.0))


def log_interval_prob(za: jax.Array, zb: jax.Array) -> jax.Array:
    """``log Pr[za < Z < zb] = log(Phi(zb) - Phi(za))`` elementwise for ``za <= zb``, ``Z ~ N(0, 1)``: the one
    cell-mass function. Above the median it is a difference of survival values ``Phi(-za) - Phi(-zb)``, so
    upper-tail cells keep their relative precision."""
    upper = za > 0
    hi = log_ndtr(jnp.where(upper, -za, zb))
    lo = log_ndtr(jnp.where(upper, -zb, za))
    return log_sub_exp(hi, lo)


# ---------------------------------------------------------------------------------------------------- grid


def rest_mask(ranking: jax.Array, cand: jax.Array) -> jax.Array:
    """``(B, n)`` bool: the rest items ``C \\ L`` (candidates outside the list)."""
    b, n = cand.shape
    in_list = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], ranking].set(True)
    return cand & ~in_list


def highest_rest_mean(mean: jax.Array, ranking: jax.Array, cand: jax.Array) -> jax.Array:
    """``(B,)`` largest mean among the rest items. When one sits above the list (tiny P), the integrand lives
    between the list's upper tail and that item, so the grid must reach it for a good relative error."""
    return jnp.max(jnp.where(rest_mask(ranking, cand), mean, -jnp.inf), axis=1)


def grid_bounds(mean, mu_l, sd_l, ranking, cand, margin: float = GRID_MIN_MARGIN):
    """``(lo, hi)`` each ``(B,)``: ``mean ± max(GRID_HALF_WIDTH std, margin)`` of every list item, ``hi``
    raised to the highest rest mean. The margin only matters for a list item whose ``7 std`` is below
    float32 resolution of the grid: without it the grid's end would round onto the item's mean."""
    half = jnp.maximum(GRID_HALF_WIDTH * sd_l, margin)
    lo = jnp.min(mu_l - half, axis=1)
    hi = jnp.maximum(jnp.max(mu_l + half, axis=1), highest_rest_mean(mean, ranking, cand))
    return lo, hi


def make_grid(lo: jax.Array, hi: jax.Array, grid_size: int) -> tuple[jax.Array, jax.Array]:
    """``(edges (B, G+1), mids (B, G))``: ``G`` equal cells on ``[lo, hi]`` per user."""
    hi = jnp.maximum(hi, lo + 1e-6 * jnp.maximum(1.0, jnp.abs(lo)))
    t = jnp.arange(grid_size + 1, dtype=jnp.float32) / grid_size
    edges = lo[:, None] + (hi - lo)[:, None] * t[None, :]
    return edges, 0.5 * (edges[:, :-1] + edges[:, 1:])


def select_rest(mean, std, ranking, cand, n_keep: int | None = None):
    """The rest items ``(mu, sd, valid)``, each ``(B, n)``, or only the ``n_keep`` with the highest
    ``mean + PRUNE_Z std`` (each ``(B, n_keep)``). Keeping fewer is exact to ``n * 1e-9`` in log P when
    every item left out lies far below the grid (``log F_j > -1e-9`` on it); `lidu_jax.estimators` picks
    ``n_keep`` so."""
    rest = rest_mask(ranking, cand)
    if n_keep is None or n_keep >= mean.shape[1]:
        return mean, std, rest
    reach = jnp.where(rest, mean + PRUNE_Z * std, -jnp.inf)
    _, idx = jax.lax.top_k(reach, n_keep)
    take = lambda x: jnp.take_along_axis(x, idx, axis=1)
    return take(mean), take(std), take(rest)


class ListGrid(NamedTuple):
    """One batch of users' lists on their grids, with the items that compete with each list."""

    mu_l: jax.Array  # (B, K) list items' means, rank 1 first
    sd_l: jax.Array  # (B, K) list items' stds
    edges: jax.Array  # (B, G + 1) cell edges
    mids: jax.Array  # (B, G) cell midpoints
    mu: jax.Array  # (B, n') rest items' means
    sd: jax.Array  # (B, n') rest items' stds
    valid: jax.Array  # (B, n') bool: True for a rest item (False: padding, a list item, a non-candidate)


def list_grid(mean, std, ranking, cand, grid_size: int, n_keep: int | None = None) -> ListGrid:
    """The grid of `grid_bounds` with ``grid_size`` cells, the list items and the rest (`select_rest`)."""
    mu_l = jnp.take_along_axis(mean, ranking, axis=1)
    sd_l = jnp.take_along_axis(std, ranking, axis=1)
    lo, hi = grid_bounds(mean, mu_l, sd_l, ranking, cand)
    edges, mids = make_grid(lo, hi, grid_size)
    return ListGrid(mu_l, sd_l, edges, mids, *select_rest(mean, std, ranking, cand, n_keep))


# ------------------------------------------------------------------------------------ log H and cell masses


def rest_log_h(points, mu, sd, valid, materialise: bool = False) -> jax.Array:
    """``log H(x_p) = sum_j valid_j log Phi((x_p - mu_j) / sd_j)``: ``(B, P)`` at ``points (B, P)`` for the
    items ``mu, sd, valid (B, n)``, one ``(B, P, n)`` array of log Phi terms reduced over its last
    (contiguous) axis."""
    inv = 1.0 / sd
    z = points[:, :, None] * inv[:, None, :] - (mu * inv)[:, None, :]
    return jnp.sum(jnp.where(valid[:, None, :], _materialised(log_ndtr(z), materialise), 0.0), axis=-1)


LogH = Callable[[ListGrid], jax.Array]  # ListGrid -> log H at its midpoints, (B, G)


def _log_h(lg: ListGrid, log_h: LogH | None, materialise: bool) -> jax.Array:
    return rest_log_h(lg.mids, lg.mu, lg.sd, lg.valid, materialise) if log_h is None else log_h(lg)


def list_log_masses(mu_l: jax.Array, sd_l: jax.Array, edges: jax.Array) -> jax.Array:
    """``log m_k[g] = log Pr[e_g < S_{l_k} < e_{g+1}]``: ``(B, K, G)`` from ``mu_l, sd_l (B, K)`` and ``edges
    (B, G+1)``, each cell from its own two edges (`log_interval_prob`)."""

    def one_position(mu_sd):  # (B,) mean and std of one list position -> its (B, G) cell masses
        mu, sd = mu_sd
        inv = 1.0 / sd[:, None]
        return log_interval_prob((edges[:, :-1] - mu[:, None]) * inv, (edges[:, 1:] - mu[:, None]) * inv)

    # One list position at a time: XLA:CPU then compiles each position's masses into a single elementwise
    # loop, where the (B, K, G) form was split into many materialised pieces (1.3x for the whole estimator).
    return jnp.moveaxis(jax.lax.map(one_position, (mu_l.T, sd_l.T)), 0, 1)


# ---------------------------------------------------------------------------------------------- recursion


def _below_matrix(grid_size: int) -> jax.Array:
    """``(G, G)`` float32 ``T`` with ``(v @ T)[g] = sum_{g' < g} v[g'] + v[g] / 2``: strictly lower cells
    count fully, the cell itself by half (two variables in one cell are ordered either way with
    probability 1/2)."""
    return jnp.triu(jnp.ones((grid_size, grid_size), jnp.float32), 1) + 0.5 * jnp.eye(
        grid_size, dtype=jnp.float32
    )


_SUM_BLOCK = 16  # cells per block of `_sum_below`


def _sum_below(v: jax.Array) -> jax.Array:
    """``v @ T`` for ``v (B, G)`` and ``T = _below_matrix(G)``, in blocks of 16 cells when they divide ``G``:
    ``T`` inside each block plus every lower block's total, ``G * 16 + (G/16)^2`` multiply-adds per row
    instead of ``G^2``; full float32 precision (no TF32 on GPUs)."""
    b, g = v.shape
    hi = jax.lax.Precision.HIGHEST
    if g % _SUM_BLOCK or g < 2 * _SUM_BLOCK:
        return jnp.dot(v, _below_matrix(g), precision=hi)
    blocks = v.reshape(b, g // _SUM_BLOCK, _SUM_BLOCK)
    within = jnp.einsum("bnc,cd->bnd", blocks, _below_matrix(_SUM_BLOCK), precision=hi)
    lower = jnp.triu(jnp.ones((g // _SUM_BLOCK, g // _SUM_BLOCK), v.dtype), 1)
    return (within + jnp.dot(blocks.sum(-1), lower, precision=hi)[:, :, None]).reshape(b, g)


def ordered_recursion(log_mass: jax.Array, log_h: jax.Array) -> jax.Array:
    """``log P = log sum_g e^{a_1[g]}`` from list cell masses ``log_mass (B, K, G)`` and ``log_h (B, G)``:

        a_K = log m_K + log H,
        a_k[g] = log m_k[g] + log(sum_{g' < g} e^{a_{k+1}[g']} + e^{a_{k+1}[g]} / 2)

    (``G_k`` of the module docstring on the grid: ``H`` at midpoints, the inner integral over the lower cells
    plus half of the current one). Each level leaves log space only inside the sum: with ``c = max_g
    a_{k+1}``, the sums are ``exp(a_{k+1} - c) @ T`` (`_sum_below`). Terms more than ~87 nats below a level's
    maximum underflow to 0, changing ``P`` by less than ``G e^-87`` relative.
    """
    a = log_mass[:, -1] + log_h

    def level(a_next, log_m):
        c = jnp.max(a_next, axis=-1, keepdims=True)
        c = jnp.where(jnp.isfinite(c), c, 0.0)  # a user with P = 0 stays at -inf, not NaN
        inner = _sum_below(jnp.exp(a_next - c))
        return log_m + jnp.log(inner) + c, None

    a, _ = jax.lax.scan(level, a, jnp.moveaxis(log_mass[:, :-1], 1, 0), reverse=True)  # levels K-1 .. 1
    return logsumexp(a, axis=-1)


def _min_above_rest(log_sf_edges: jax.Array, log_h: jax.Array) -> jax.Array:
    """``log Pr[min_k S_{l_k} > max_rest S]`` from the list items' log survival at the edges ``(B, K, G+1)``:
    the minimum's survival is ``prod_k S_k``, its cell masses survival differences."""
    log_sf_min = jnp.sum(log_sf_edges, axis=1)
    return logsumexp(log_sub_exp(log_sf_min[..., :-1], log_sf_min[..., 1:]) + log_h, axis=-1)


# --------------------------------------------------------------------------------------------- estimators


def exact_log_prob(
    mean, std, ranking, cand, *, grid_size: int, n_keep=None, log_h: LogH | None = None, materialise=False
) -> jax.Array:
    """``log P(L)`` by the grid recursion (`ordered_recursion`): ``(B,)``. Cost per user ``O(n G + K G)``."""
    lg = list_grid(mean, std, ranking, cand, grid_size, n_keep)
    return ordered_recursion(list_log_masses(lg.mu_l, lg.sd_l, lg.edges), _log_h(lg, log_h, materialise))


def sequential_log_prob(
    mean, std, ranking, cand, *, grid_size: int, n_keep=None, log_h: LogH | None = None, materialise=False
) -> jax.Array:
    """``sum_k log Pr[S_{l_k} > max_{j in R_k} S_j]`` with ``R_k = C \\ {l_1..l_k}``: ``(B,)``. Each factor
    is a 1-D integral on the grid, ``sum_g m_k[g] H(m_g) prod_{k' > k} F_{l_k'}(m_g)``; the approximation
    ignores that the factors share the list items' scores (exact for K = 1)."""
    lg = list_grid(mean, std, ranking, cand, grid_size, n_keep)
    z_mid = (lg.mids[:, None, :] - lg.mu_l[:, :, None]) / lg.sd_l[:, :, None]
    log_f_mid = _materialised(log_ndtr(z_mid), materialise)  # (B, K, G)
    below = jnp.cumsum(log_f_mid[:, ::-1], axis=1)[:, ::-1]  # sum_{k' >= k}
    below = jnp.concatenate([below[:, 1:], jnp.zeros_like(below[:, :1])], axis=1)  # sum_{k' > k}
    log_mass = list_log_masses(lg.mu_l, lg.sd_l, lg.edges)
    steps = logsumexp(log_mass + below + _log_h(lg, log_h, materialise)[:, None, :], axis=-1)
    return jnp.sum(steps, axis=-1)


def unordered_log_prob(
    mean, std, ranking, cand, *, grid_size: int, n_keep=None, log_h: LogH | None = None, materialise=False
) -> jax.Array:
    """``log Pr[min_{i in L} S_i > max_{j in C \\ L} S_j]``, the unordered top-K set probability: ``(B,)``."""
    lg = list_grid(mean, std, ranking, cand, grid_size, n_keep)
    z_edges = -(lg.edges[:, None, :] - lg.mu_l[:, :, None]) / lg.sd_l[:, :, None]
    log_sf = _materialised(log_ndtr(z_edges), materialise)  # (B, K, G+1)
    return _min_above_rest(log_sf, _log_h(lg, log_h, materialise))


def pairwise_log_prob(mean, std, ranking, cand, *, ordered: bool = True, materialise=False) -> jax.Array:
    """Adjacent-pair probits, no grid, ``O(n + K)``: ``(B,)``,

        sum_{k<K} log Phi((mu_k - mu_{k+1}) / sqrt(s_k^2 + s_{k+1}^2))
          + sum_{j in C \\ L} log Phi((mu_K - mu_j) / sqrt(s_K^2 + s_j^2)),

    and only the second sum (the last item against the rest) when not ``ordered``."""
    mu_l = jnp.take_along_axis(mean, ranking, axis=1)
    sd_l = jnp.take_along_axis(std, ranking, axis=1)
    valid = rest_mask(ranking, cand)
    z_rest = (mu_l[:, -1:] - mean) / jnp.sqrt(sd_l[:, -1:] ** 2 + std**2)
    rest = jnp.where(valid, _materialised(log_ndtr(z_rest), materialise), 0.0).sum(-1)
    if not ordered:
        return rest
    z_adj = (mu_l[:, :-1] - mu_l[:, 1:]) / jnp.sqrt(sd_l[:, :-1] ** 2 + sd_l[:, 1:] ** 2)
    return _materialised(log_ndtr(z_adj), materialise).sum(-1) + rest


def per_position_lidu(log_p: jax.Array, k: int) -> jax.Array:
    """The per-position LiDu ``-log P / K``: ``(B,)`` from ``log_p (B,)``."""
    return -log_p / k


def gaussian_log_prob(
    mean,
    std,
    ranking,
    cand,
    *,
    method: str,
    ordered: bool = True,
    grid_size: int,
    n_keep: int | None = None,
    log_h: LogH | None = None,
    materialise: bool = False,
) -> jax.Array:
    """The estimator named by ``method`` (``"exact"``, ``"sequential"``, ``"pairwise"``) and ``ordered``:
    `exact_log_prob`, `sequential_log_prob`, `unordered_log_prob` (either grid method with ``ordered=False``)
    or `pairwise_log_prob`. ``(B,)``."""
    if method == "pairwise":
        return pairwise_log_prob(mean, std, ranking, cand, ordered=ordered, materialise=materialise)
    fn = (
        unordered_log_prob
        if not ordered
        else {"exact": exact_log_prob, "sequential": sequential_log_prob}[method]
    )
    return fn(
        mean, std, ranking, cand, grid_size=grid_size, n_keep=n_keep, log_h=log_h, materialise=materialise
    )


# ----------------------------------------------------------------------------------------- from samples


def kde_log_prob(
    samples, bandwidth, ranking, cand, *, grid_size: int, ordered: bool = True, materialise=False
) -> jax.Array:
    """``log P(L)`` with per-item Gaussian kernel densities ``F_i(x) = mean_s Phi((x - x_is) / h_i)``: the
    exact recursion (or the unordered set probability) on a grid over the list items' kernels, ``(B,)``,
    from ``samples (S, B, n)`` and ``bandwidth (B, n)``."""
    log_s = math.log(samples.shape[0])
    xs = jnp.moveaxis(samples, 0, -1)  # (B, n, S)
    xs_l = jnp.take_along_axis(xs, ranking[:, :, None], axis=1)  # (B, K, S)
    h_l = jnp.take_along_axis(bandwidth, ranking, axis=1)  # (B, K)
    half = jnp.maximum(GRID_HALF_WIDTH * h_l, GRID_MIN_MARGIN)  # see grid_bounds
    lo = jnp.min(jnp.min(xs_l, -1) - half, axis=1)
    hi = jnp.max(jnp.max(xs_l, -1) + half, axis=1)
    hi = jnp.maximum(hi, highest_rest_mean(jnp.mean(xs, -1), ranking, cand))
    edges, mids = make_grid(lo, hi, grid_size)
    ze = (edges[:, None, None, :] - xs_l[..., None]) / h_l[:, :, None, None]  # (B, K, S, G+1)
    z = (mids[:, :, None, None] - xs[:, None, :, :]) / bandwidth[:, None, :, None]  # (B, G, n, S)
    log_f_rest = logsumexp(_materialised(log_ndtr(z), materialise), axis=-1) - log_s
    log_h = jnp.sum(jnp.where(rest_mask(ranking, cand)[:, None, :], log_f_rest, 0.0), axis=-1)
    if not ordered:
        log_sf = logsumexp(_materialised(log_ndtr(-ze), materialise), axis=2) - log_s  # (B, K, G+1)
        return _min_above_rest(log_sf, log_h)
    kernel_mass = _materialised(log_interval_prob(ze[..., :-1], ze[..., 1:]), materialise)  # (B, K, S, G)
    return ordered_recursion(logsumexp(kernel_mass, axis=2) - log_s, log_h)


def mc_log_prob(samples, ranking, cand) -> jax.Array:
    """``log((c + 1/2) / (S + 1))`` with ``c`` the number of the ``S`` joint draws ``samples (S, B, n)`` whose
    top-K candidates, in order, equal ``ranking``: ``(B,)`` (add-half smoothing keeps it finite)."""
    k = ranking.shape[-1]
    top = jax.lax.top_k(jnp.where(cand[None], samples, -jnp.inf), k)[1]  # (S, B, K)
    count = jnp.sum(jnp.all(top == ranking[None], axis=-1), axis=0)
    return jnp.log((count + 0.5) / (samples.shape[0] + 1.0))
