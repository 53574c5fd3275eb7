"""Probability of a ranked list under independent item score distributions, and LiDu = -log of it.

For one user with candidate items C (e.g. items outside the training history), independent scores
``S_i ~ p_i`` and an ordered list ``L = (l_1, ..., l_K)`` of candidates,

    P(L) = Pr[S_{l_1} > S_{l_2} > ... > S_{l_K} > max_{j in C \\ L} S_j],      LiDu = -log P(L_top-K).

This is a reconstruction from the abstract of arXiv 2507.23208 (no formula of the paper was available); see
``docs/results-lidu-synthetic.md``. Methods:

``"exact"`` (grid recursion). With CDFs ``F_i`` and ``H(x) = prod_{j in C \\ L} F_j(x)``:
``G_K(x) = f_{l_K}(x) H(x)``, ``G_k(x) = f_{l_k}(x) int_{-inf}^{x} G_{k+1}(y) dy``, ``P = int G_1``.
The score axis is cut into ``grid_size`` equal cells spanning ``mean ± 7 std`` of every list item (tail mass
``Phi(-7) ~ 1e-12``). Each list item's mass per cell is an exact CDF difference, ``H`` is taken at cell
midpoints, and the inner integral over cells below is a cumulative log-sum-exp plus half of the current cell
(two variables in one cell are ordered either way with probability 1/2). Everything is in log space, so
probabilities far below float range stay finite. Cost per user ``O(|C| G + K G)``.

``"sequential"``: ``sum_k log Pr[S_{l_k} > max_{j in R_k} S_j]`` with ``R_k = C \\ {l_1..l_k}``, each
factor a 1-D
integral on the same grid (it ignores that the factors share the list items' scores).

``"pairwise"``: ``sum_{k<K} log Phi((mu_k - mu_{k+1}) / sqrt(s_k^2 + s_{k+1}^2))
+ sum_{j in C \\ L} log Phi((mu_K - mu_j) / sqrt(s_K^2 + s_j^2))``; no grid, ``O(|C| + K)``.

``ordered=False`` gives the unordered top-K set probability ``Pr[min_{i in L} S_i > max_{j in C \\ L} S_j]``.

Scale and offset. ``P(L)`` does not change when one user's scores go through ``x -> a x + b`` (``a > 0``:
``mean -> a mean + b``, ``std -> a std``, samples and KDE bandwidths alike). Every estimator therefore first
maps each user's scores to the frame of its list's grid (`_standardise`): subtract the top of the grid and
divide by a power of two within a factor 2 of its width, the offset removed in the input's own precision
(a concrete float64 input in NumPy float64, before anything is float32). The grid then sees the same O(1)
float32 numbers at any scale (tested over ``a`` in ``1e-12..1e12`` and offsets up to ``1e9``). Degenerate
inputs get a defined answer, never NaN: a standardised std below ``2^-40`` of the grid's width (e.g. std
``1e-20`` with O(1) means; below float32 resolution of the grid, so the item is a point mass either way) is
raised to ``2^-40``, and the grid reaches at least ``2^-20`` beyond every list item, so a point-mass list
ordered by well-separated means gets LiDu 0. A std that is 0, negative, NaN/inf or subnormal (XLA flushes
subnormals to 0) is invalid: ``ValueError`` on concrete inputs, NaN for that user under `jax.jit`
(`checked_lidu` / `checked_list_log_prob` raise the eager messages under `jax.jit`, via
`jax.experimental.checkify`).

Rest items "far below the list" (``F_j >= Phi(6)`` over the whole grid, so ``log F_j > -1e-9``) may be
skipped;
`lidu` and `lidu_chunked` do so per chunk of users, choosing a static item budget that provably keeps every
needed item, so pruning never changes the result beyond ``n_items * 1e-9`` in ``log P``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

__all__ = [
    "DEFAULT_GRID_SIZE",
    "checked_lidu",
    "checked_list_log_prob",
    "lidu",
    "lidu_chunked",
    "lidu_from_samples",
    "list_log_prob",
    "list_log_prob_from_samples",
    "top_k_rankings",
]

DEFAULT_GRID_SIZE = 512
GRID_HALF_WIDTH = 7.0  # grid spans mean ± 7 std of each list item
PRUNE_Z = 6.0  # a rest item is "far below" when the grid's low end lies 6 of its std above its mean
WINDOW_MARGIN = 30.0  # nats: grid cells left out have H <= e^-30 P (see _gaussian_core_tile)
WINDOW_STEP = 32  # CPU log H is computed in blocks of this many cells, top block first
METHODS = ("exact", "sequential", "pairwise")
SAMPLE_METHODS = ("kde", "gaussian", "mc")


# ----------------------------------------------------------------------------------------------- validation


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _check_method(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")


def _check_grid(grid_size: int) -> None:
    if not isinstance(grid_size, int) or grid_size < 8:
        raise ValueError(f"grid_size must be an int >= 8, got {grid_size!r}")


def _check_shapes(mean, std, ranking, candidates) -> None:
    if mean.ndim < 1:
        raise ValueError(f"mean must have shape (..., n_items), got {mean.shape}")
    if std.shape != mean.shape:
        raise ValueError(f"std must have the shape of mean {mean.shape}, got {std.shape}")
    if ranking is not None:
        if ranking.ndim != mean.ndim or ranking.shape[:-1] != mean.shape[:-1]:
            raise ValueError(f"ranking must have shape {(*mean.shape[:-1], 'K')}, got {ranking.shape}")
        if ranking.shape[-1] < 1:
            raise ValueError("ranking must hold at least one item (K >= 1)")
        if not jnp.issubdtype(ranking.dtype, jnp.integer):
            raise ValueError(f"ranking must be integer item ids, got dtype {ranking.dtype}")
    if candidates is not None and candidates.shape != mean.shape:
        raise ValueError(f"candidates must have the shape of mean {mean.shape}, got {candidates.shape}")


_MSG_MEAN = "mean contains NaN or inf"
_MSG_K = "K={} is larger than the number of candidates ({}) for some user"
_MSG_DUPLICATE = "ranking contains a duplicate item for some user"
_MSG_EXCLUDED = "ranking contains an item excluded by candidates"


def _msg_std(dtype) -> str:
    tiny = float(jnp.finfo(dtype).tiny)
    return (
        f"std must be finite and > 0 everywhere (a {np.dtype(dtype).name} std below {tiny:.3g}, a subnormal, "
        "counts as 0: XLA flushes subnormals to zero)"
    )


def _value_checks(xp, mean, std, ranking, candidates, k: int | None = None):
    """The value checks of the Gaussian estimators as ``[(ok, message, args)]``, ``ok`` a per-user bool
    ``(...)``: eager mode raises ``ValueError(message.format(*args))`` for the first failing one,
    `checked_lidu` / `checked_list_log_prob` make them `jax.experimental.checkify` checks, and the traced
    estimators turn the rows where one fails into NaN. ``xp`` is `numpy` (concrete inputs) or `jax.numpy`.

    A std below the smallest normal number of its dtype counts as 0: XLA on CPU flushes subnormals to zero,
    so such an std would reach the computation as 0."""
    n = mean.shape[-1]
    tiny = jnp.finfo(std.dtype).tiny if jnp.issubdtype(std.dtype, jnp.floating) else 0
    checks = [
        (xp.all(xp.isfinite(mean), axis=-1), _MSG_MEAN, ()),
        (xp.all(xp.isfinite(std) & (std >= tiny), axis=-1), _msg_std(std.dtype), ()),
    ]
    cand = None if candidates is None else candidates.astype(bool)
    n_cand = xp.full(mean.shape[:-1], n) if cand is None else xp.sum(cand, axis=-1)
    kk = k if ranking is None else ranking.shape[-1]
    fewest = xp.min(n_cand, initial=n)
    checks.append((n_cand >= kk, _MSG_K, (kk, fewest)))
    if ranking is not None:
        checks.append(
            (xp.all((ranking >= 0) & (ranking < n), axis=-1), f"ranking holds item ids outside [0, {n})", ())
        )
        srt = xp.sort(ranking, axis=-1)
        checks.append((~xp.any(srt[..., 1:] == srt[..., :-1], axis=-1), _MSG_DUPLICATE, ()))
        if cand is not None:
            picked = xp.take_along_axis(cand, xp.clip(ranking, 0, n - 1), axis=-1)
            checks.append((xp.all(picked, axis=-1), _MSG_EXCLUDED, ()))
    return checks


def _check_values(mean, std, ranking, candidates, k: int | None = None) -> None:
    """Value checks on concrete inputs (`_value_checks`; under tracing they become NaN rows instead)."""
    mean, std = np.asarray(mean), np.asarray(std)
    ranking = None if ranking is None else np.asarray(ranking)
    candidates = None if candidates is None else np.asarray(candidates)
    for ok, message, args in _value_checks(np, mean, std, ranking, candidates, k):
        if not np.all(ok):
            raise ValueError(message.format(*(int(a) for a in args)))


def _rows_ok(mean, std, ranking, candidates, k: int | None = None) -> jax.Array:
    """``(...)`` bool: the users whose inputs pass every check of `_value_checks` (traced inputs)."""
    ok = True
    for row_ok, _, _ in _value_checks(jnp, mean, std, ranking, candidates, k):
        ok = ok & row_ok
    return jnp.broadcast_to(ok, mean.shape[:-1])


def _checkify_values(mean, std, ranking, candidates, k: int | None = None) -> None:
    """`_value_checks` as `jax.experimental.checkify` checks, with the messages of eager mode."""
    from jax.experimental import checkify

    for ok, message, args in _value_checks(jnp, mean, std, ranking, candidates, k):
        checkify.check(jnp.all(ok), message, *(jnp.asarray(a) for a in args))


def _raise_checkify_error(err) -> None:
    """Raise the first failed check of a `checkify` error as the ``ValueError`` that eager mode raises."""
    exc = err.get_exception()
    if exc is not None:
        raise ValueError(exc.fmt_string.format(*exc.args, **exc.kwargs)) from None


def _check_k(k: int, n_items: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n_items:
        raise ValueError(f"k={k} is larger than the number of items {n_items}")


# ----------------------------------------------------------------------------------------- log-space helpers


def _accelerator_layout() -> bool:
    """Whether the grid methods use their accelerator layout (every backend but CPU): `log_ndtr` keeps its
    result out of the fusions that consume it and ``log H`` is one materialised ``(B, G, n)`` reduction
    instead of the CPU loop `_rest_log_h_top_down`."""
    return jax.default_backend() != "cpu"


def log_ndtr(z: jax.Array) -> jax.Array:
    """``log Phi(z)`` with one ``erfc`` and one ``log`` per element (this function dominates the cost of the
    grid methods, ``|C| * G`` calls per user). With ``t = Phi(-|z|)``:

    - ``z >= 0``: ``log1p(-t)``, as ``-t - t^2/2 - t^3/3 - t^4/4`` for ``t < 1e-2`` (truncation < 2e-11
      relative, so tiny values keep their relative precision) and as ``log(1 - t)`` otherwise;
    - ``-10 <= z < 0``: ``log t``;
    - ``z < -10`` (where ``t`` underflows in float32): the asymptotic series
      ``-z^2/2 - log(-z) - log(2 pi)/2 + log1p(s)``, ``s = -z^-2 + 3 z^-4 - 15 z^-6``, with ``log1p(s)`` as a
      cubic in ``s`` (``|s| < 0.01``).

    The three branches share a single ``log`` (of ``1 - t``, ``t`` or ``-z``). Float32 relative error below
    ``5e-6`` on [-40, 8] against `scipy.special.log_ndtr` (absolute error < 1e-4 near z = -40, where the
    value is about -800); `jax.scipy.special.log_ndtr` loses relative precision for large z.

    Off CPU the result is kept out of the fusion of whatever consumes it (`jax.lax.optimization_barrier`).
    Measured on an H100 (jax 0.11.2): XLA's GPU compiler had not finished a reduce fusion whose producer is
    log Φ of a ``(1024, 256, 990)`` array after minutes (its "very slow compile" alarm; the same with
    `jax.scipy.special.log_ndtr`), while with the producer materialised it compiled in 0.5 s and ran in
    1.8 ms. On CPU the fused form is kept (it is the fast one there)."""
    t = 0.5 * jax.lax.erfc(jnp.abs(z) * (1.0 / math.sqrt(2.0)))  # Phi(-|z|)
    neg, deep = z < 0, z < -10.0
    zz = jnp.minimum(z, -10.0)
    log_arg = jnp.log(jnp.where(deep, -zz, jnp.where(neg, t, 1.0 - t)))
    inv2 = 1.0 / (zz * zz)
    s = inv2 * (-1.0 + inv2 * (3.0 - 15.0 * inv2))
    asym = -0.5 * zz * zz - log_arg - 0.5 * math.log(2 * math.pi) + s * (1.0 + s * (-0.5 + s * (1.0 / 3.0)))
    small = -t * (1.0 + t * (0.5 + t * (1.0 / 3.0 + t * 0.25)))
    upper = jnp.where(t < 1e-2, small, log_arg)
    out = jnp.where(deep, asym, jnp.where(neg, log_arg, upper))
    return jax.lax.optimization_barrier(out) if _accelerator_layout() else out


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and far below (Maechler 2012)."""
    x = jnp.minimum(x, -1e-30)
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _log_mass_from_log_sf(log_sf_edges: jax.Array) -> jax.Array:
    """Cell masses ``S(e_g) - S(e_{g+1})`` in log space from log survival values at ``G + 1`` edges."""
    a, b = log_sf_edges[..., :-1], log_sf_edges[..., 1:]
    return a + _log1mexp(jnp.minimum(b - a, 0.0))


# ------------------------------------------------------------------------------------------ standardisation

# LiDu is invariant to a common increasing affine map of one user's scores (``P`` is the probability of an
# ordering of them), so every estimator first maps each user's scores to a frame where the list's grid is
# ``[-w, 0]`` with ``w`` in ``[1/2, 1)``. Absolute constants in the grid code (the grid's minimum width, the
# sentinels of the log H loop, the clamp of `_log_phi_parts`) and float32 range then see O(1) numbers at any
# input scale, and an offset is removed in the input's own precision (float64 stays float64 until then).
STD_FLOOR = 2.0**-40  # standardised stds below this (below float32 resolution of the grid) are raised to it
STD_CEIL = 2.0**40  # larger standardised stds are lowered to it, their mean scaled to keep (x - mu) / std
MEAN_FLOOR = -(2.0**80)  # lower standardised means: the item's log CDF is 0 on the whole grid either way
GRID_MIN_MARGIN = 2.0**-20  # the grid reaches at least this far (8 float32 ulps of 1) beyond a list item
_DEGENERATE_WIDTH = 2.0**-100  # a grid narrower than this (relative) has only tied, point-mass list items


def _host_float64(*xs) -> bool:
    """Whether the inputs are concrete float64 (standardised in NumPy float64 before the float32 kernels)."""
    return _is_concrete(*xs) and any(getattr(x, "dtype", None) == np.float64 for x in xs if x is not None)


def _as_float(x):
    """A concrete float64 array as float64 NumPy, a traced float64 one (x64 mode) as it is, else float32."""
    if _is_concrete(x) and getattr(x, "dtype", None) == np.float64:
        return np.asarray(x, np.float64)
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def _pow2(n: jax.Array, dtype) -> jax.Array:
    """Exactly ``2**n`` for an int array ``n`` inside the normal exponent range of ``dtype``."""
    if dtype == jnp.float64:
        return jax.lax.bitcast_convert_type((n.astype(jnp.int64) + 1023) << 52, jnp.float64)
    return jax.lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)


def _times_pow2(xp, x, e):
    """``x * 2**-e`` without rounding (unless the result is subnormal): a power of two in two factors, each
    inside the normal range (``e`` spans the whole exponent range of the dtype)."""
    if xp is np:
        return np.ldexp(x, -e)
    h = e // 2
    return x * _pow2(-h, x.dtype) * _pow2(h - e, x.dtype)


def _locate(xp, mean, std, cand):
    """Stage 1 of the standardisation, in the input's precision: per user, ``m1 = (mean - max_C mean) / 2^e``
    and ``s1 = std / 2^e`` with ``2^e`` the power of two at or above ``max_C max(|mean|, std)`` over the
    candidates ``C``. The scaling is exact, so only the subtraction rounds; candidates end up in
    ``[-2, 0] x [0, 1]`` (nothing overflows later) and non-candidates at ``(-1, 1)``. Applying it to its own
    float32 output only multiplies by a power of two (exactly)."""
    big = xp.max(xp.where(cand, xp.maximum(xp.abs(mean), std), 0.0), axis=-1, keepdims=True)
    _, e = xp.frexp(big)
    m, s = _times_pow2(xp, mean, e), _times_pow2(xp, std, e)
    top = xp.max(xp.where(cand, m, -xp.inf), axis=-1, keepdims=True)
    m = m - xp.where(xp.isfinite(top), top, 0.0)
    return xp.where(cand, m, -1.0), xp.where(cand, s, 1.0)


def _host_locate(mean, std, cand):
    """`_locate` in NumPy float64 for concrete float64 inputs, returned as float32."""
    cand = np.ones(np.shape(mean), bool) if cand is None else np.asarray(cand, bool)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        m, s = _locate(np, np.asarray(mean, np.float64), np.asarray(std, np.float64), cand)
    return m.astype(np.float32), s.astype(np.float32)


def _frame(m, s, ranking, cand):
    """``(top (B,), e (B,))``: the grid of user ``b`` spans ``[top - w, top]`` with ``2^(e-1) <= w < 2^e``
    (`_grid_bounds` on ``m, s (B, n)``). A grid of zero width (every list item a point mass, all tied) falls
    back to the spread of the candidates' means, then to 1."""
    mu_l = jnp.take_along_axis(m, ranking, axis=1)
    sd_l = jnp.take_along_axis(s, ranking, axis=1)
    lo, hi = _grid_bounds(m, mu_l, sd_l, ranking, cand, margin=0.0)
    spread = jnp.max(jnp.where(cand, m, -jnp.inf), axis=1) - jnp.min(jnp.where(cand, m, jnp.inf), axis=1)
    width = hi - lo
    width = jnp.where(width > _DEGENERATE_WIDTH, width, jnp.where(spread > _DEGENERATE_WIDTH, spread, 1.0))
    return hi, jnp.frexp(width)[1]


@jax.jit
def _standardise(mean, std, ranking, cand):
    """Per user, the float32 scores in the frame of its list's grid: ``m' = (mean - a) / c``, ``s' = std / c``
    with ``a`` the top of the grid and ``c`` a power of two at most twice the grid's width (`_locate`,
    `_frame`); ``(B, n)`` each. Then stds are kept within ``[STD_FLOOR, STD_CEIL]`` and means above
    `MEAN_FLOOR` (module constants): this leaves every finite log CDF value the float32 kernels can resolve
    unchanged and keeps every intermediate finite."""
    m, s = _locate(jnp, mean, std, cand)
    m, s = m.astype(jnp.float32), s.astype(jnp.float32)
    top, e = _frame(m, s, ranking, cand)
    m = _times_pow2(jnp, m - top[:, None], e[:, None])
    s = _times_pow2(jnp, s, e[:, None])
    m = jnp.where(s > STD_CEIL, m * (STD_CEIL / s), m)  # keeps (x - m) / s for x in the grid, to 2^-40
    s = jnp.clip(s, STD_FLOOR, STD_CEIL)
    m = jnp.maximum(m, MEAN_FLOOR)
    return jnp.where(cand, m, -1.0), jnp.where(cand, s, 1.0)


def _standardised(mean, std, ranking, cand):
    """`_standardise` for ``(B, n)`` inputs of any float dtype: a concrete float64 input is located in NumPy
    float64 first (`_host_locate`), so an offset far above the spread is removed before float32."""
    if _host_float64(mean, std):
        mean, std = _host_locate(mean, std, cand)
    return _standardise(mean, std, ranking, cand)


# ---------------------------------------------------------------------------------------------- grid pieces


class _Grid:
    """Per-user grid over the list items' support: ``edges (B, G+1)``, ``mids (B, G)``."""

    def __init__(self, lo: jax.Array, hi: jax.Array, grid_size: int):
        hi = jnp.maximum(hi, lo + 1e-6 * jnp.maximum(1.0, jnp.abs(lo)))
        t = jnp.arange(grid_size + 1, dtype=jnp.float32) / grid_size
        self.edges = lo[:, None] + (hi - lo)[:, None] * t[None, :]
        self.mids = 0.5 * (self.edges[:, :-1] + self.edges[:, 1:])


def _gaussian_rest_log_h(mids, mu, sd, valid, mu_l, sd_l, trim: bool):
    """``log H(m_g) = sum_j valid_j log Phi((m_g - mu_j) / sd_j)``: ``(B, G)`` from ``mids (B, G)`` and the
    rest items ``mu, sd, valid (B, n)``; ``mu_l, sd_l (B, K)`` are the list items.

    On CPU, the loop `_rest_log_h_loop`; with ``trim`` and a grid of whole `WINDOW_STEP` blocks, each user's
    items grouped by the blocks they reach (`_order_by_reach_block`) and each user's grid walked from the
    top down to ``floor = LB - WINDOW_MARGIN`` (`_rest_log_h_top_down`, `_log_p_lower_bound`; cells below
    come back as ``-inf``, see `_gaussian_core_tile`). Elsewhere one ``(B, G, n)`` log Φ array reduced over
    its last (contiguous) axis, every cell computed."""
    if _accelerator_layout():
        return _rest_log_h_dense(mids, mu, sd, valid)
    if not (trim and _whole_blocks(mids.shape[1])):
        return _rest_log_h_loop(mids, _rest_blocks(mu, sd, valid))
    mu, sd, valid, counts = _order_by_reach_block(mids, mu, sd, valid)
    thresholds = _box_thresholds(mu_l, sd_l)
    # three points per user: the dense form (2.5x faster here than the loop, which vectorises along them)
    lb = _log_p_lower_bound(mu_l, sd_l, thresholds, _rest_log_h_dense(thresholds[1], mu, sd, valid))
    return _rest_log_h_top_down(mids, mu, sd, valid, lb - WINDOW_MARGIN, counts)


def _rest_log_h_dense(points, mu, sd, valid):
    """``log H`` at ``points (B, P)`` from one ``(B, P, n)`` array of `log_ndtr` terms reduced over its last
    (contiguous) axis."""
    inv = 1.0 / sd
    z = points[:, :, None] * inv[:, None, :] - (mu * inv)[:, None, :]
    return jnp.sum(jnp.where(valid[:, None, :], log_ndtr(z), 0.0), axis=-1)


def _whole_blocks(grid_size: int) -> bool:
    """Whether the grid splits into at least two blocks of `WINDOW_STEP` cells (top-down walk possible)."""
    return grid_size % WINDOW_STEP == 0 and grid_size >= 2 * WINDOW_STEP


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
_PRODUCT_GROUP = 8  # log Phi terms whose linear factors share one log (8 measured 1.1x faster than 4)


def _log_phi_parts(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log Phi(z) = w + log v`` with ``v`` in ``[2.8e-5, 1]`` and no logarithm evaluated.

    With ``x = |z| / sqrt(2)``, ``t = 1 / (1 + x / 2)`` and ``e(x) = t exp(P(t)) = erfc(x) exp(x^2)``
    (`_ERFC_P`):

    - ``z < 0``: ``Phi(z) = e(x) exp(-x^2) / 2``, so ``w = -x^2`` and ``v = e(x) / 2``;
    - ``z >= 0``: ``q = Phi(-z) = e(x) exp(-x^2) / 2``; for ``q < 1e-2``, ``w = log1p(-q)`` as
      ``-q - q^2/2 - q^3/3`` (truncation < 3e-9 relative) and ``v = 1``; otherwise ``w = 0``, ``v = 1 - q``.

    A sum of such terms needs one ``log`` per group of ``v`` factors (``sum w + log prod v``), which is
    what makes the CPU ``log H`` loop cheaper than a `log_ndtr` per term; ``v >= 2.8e-5`` (``x`` clamped
    at `_X_CLAMP`) keeps a product of eight above ``3.8e-37``, clear of float32 underflow (``1.2e-38``).
    Float32 error of ``w + log v`` against `scipy.special.log_ndtr`: relative < 5e-7 for ``z < 0`` (down to
    ``-1e5`` and beyond), absolute < 4e-7 for ``z >= 0``.
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


_ITEM_BLOCK = 8  # rest items per step of the CPU log H loop


def _rest_rows(mu, sd, valid):
    """``(inv, shift)``, each ``(B, n')`` with ``n'`` the next multiple of `_ITEM_BLOCK` and ``z = m * inv -
    shift``; invalid and padding items get ``inv = 0``, ``shift = -1e4`` (``z = 1e4``: ``w = 0``, ``v = 1``
    in `_log_phi_parts`)."""
    n = mu.shape[1]
    inv = jnp.where(valid, 1.0 / sd, 0.0)
    shift = jnp.where(valid, mu * inv, -1e4)
    pad = (-n) % _ITEM_BLOCK
    if pad:
        inv = jnp.pad(inv, ((0, 0), (0, pad)))
        shift = jnp.pad(shift, ((0, 0), (0, pad)), constant_values=-1e4)
    return inv, shift


def _as_blocks(inv, shift):
    """`_rest_rows` ``(B, n')`` arrays laid out for `_rest_log_h_loop`: each ``(n' / _ITEM_BLOCK,
    _ITEM_BLOCK, B)``."""
    b = inv.shape[0]
    return inv.T.reshape(-1, _ITEM_BLOCK, b), shift.T.reshape(-1, _ITEM_BLOCK, b)


def _rest_blocks(mu, sd, valid):
    """Rest items ``(B, n)`` laid out for `_rest_log_h_loop` (`_rest_rows`, `_as_blocks`)."""
    return _as_blocks(*_rest_rows(mu, sd, valid))


def _rest_log_h_loop(points, blocks, n_steps=None):
    """``sum_j log Phi(z_j)`` at ``points (B, P)`` for the rest items ``blocks`` (`_rest_blocks`): a loop over
    item blocks whose body adds their terms to a ``(B, P)`` accumulator, so XLA vectorises along the
    points and never holds a ``(B, P, n)`` array; the terms are `_log_phi_parts`, one ``log`` per
    `_PRODUCT_GROUP` items. ``n_steps`` (a traced int; default all) limits the loop to the first item
    blocks. Same values as the accelerator form to float32 rounding (tests/test_lidu_estimators.py)."""
    inv, shift = blocks

    def step(j, acc):
        inv_blk = jax.lax.dynamic_index_in_dim(inv, j, 0, False)
        shift_blk = jax.lax.dynamic_index_in_dim(shift, j, 0, False)
        for g0 in range(0, _ITEM_BLOCK, _PRODUCT_GROUP):
            prod = None
            for i in range(g0, min(g0 + _PRODUCT_GROUP, _ITEM_BLOCK)):
                v, w = _log_phi_parts(points * inv_blk[i][:, None] - shift_blk[i][:, None])
                acc = acc + w
                prod = v if prod is None else prod * v
            acc = acc + jnp.log(prod)
        return acc

    return jax.lax.fori_loop(0, inv.shape[0] if n_steps is None else n_steps, step, jnp.zeros_like(points))


def _group_ranks(group: jax.Array, n_groups: int) -> tuple[jax.Array, jax.Array]:
    """For ``group (B, n)`` ints in ``[0, n_groups)``: each item's place among the earlier items of its own
    group, ``(B, n)``, and the size of every group, ``(B, n_groups)``.

    ``rank_i = #{i' < i : g_i' = g_i}``, from exclusive prefix sums of one-hot indicators. The indicators
    are packed ``floor(31 / bits)`` groups per int32 (a field of ``bits = bit_length(n)`` bits per group
    holds any count up to ``n``), so ``n_groups = 9`` takes three (B, n) prefix sums instead of nine; the
    sums are associative scans because XLA:CPU lowers a cumsum over 1,000 items to a quadratic
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


def _order_by_reach_block(mids, mu, sd, valid):
    """Rest items reordered per user so that, for every block ``k`` of `WINDOW_STEP` cells, the items that
    are not far below it (``mean + PRUNE_Z std`` above the block's lowest midpoint) come first, and how
    many they are: ``(mu, sd, valid, counts (B, G/W))``.

    Items are grouped by the highest block they reach (a counting sort over ``G / W + 1`` groups,
    `_group_ranks`; the order inside a group does not matter); the other items are ``log Phi > -1e-9`` at
    every cell of the block (the pruning rule of `lidu`)."""
    b, n = mu.shape
    bottoms = mids[:, ::WINDOW_STEP]  # (B, nb) lowest midpoint of each block
    nb = bottoms.shape[1]
    reach = jnp.where(valid, mu + PRUNE_Z * sd, -jnp.inf)
    group = jnp.sum(reach[:, :, None] > bottoms[:, None, :], axis=2)  # blocks reached, 0..nb
    rank, count = _group_ranks(group, nb + 1)
    at_or_above = jnp.cumsum(count[:, ::-1], axis=1)[:, ::-1]  # (B, nb + 1): items in group >= g
    pos = jnp.take_along_axis(at_or_above - count, group, axis=1) + rank  # higher groups first
    order = jnp.zeros_like(pos).at[jnp.arange(b)[:, None], pos].set(jnp.broadcast_to(jnp.arange(n), (b, n)))
    take = lambda x: jnp.take_along_axis(x, order, axis=1)
    return take(mu), take(sd), take(valid), at_or_above[:, 1:]


_SUB_TILE = 32  # users per step of `_rest_log_h_top_down` (32 measured 1.15x faster than 64 on one core)


def _rest_log_h_top_down(mids, mu, sd, valid, floor=None, counts=None, sub_tile=_SUB_TILE):
    """CPU ``log H`` on the grid ``mids (B, G)`` for the rest items ``mu, sd, valid (B, n)``, one block of
    `WINDOW_STEP` cells at a time from the top block down, each user stopping below the first block whose
    lowest cell has ``log H < floor (B,)``; the cells not computed are ``-inf`` (``H`` increases along the
    grid, so they all have ``log H < floor`` too). With ``floor = None`` (or a grid that is not a whole
    number of blocks) every cell is computed.

    Each block is computed only for the users still going, gathered ``sub_tile`` at a time in the order of
    their total item count; ``counts (B, G/W)`` (`_order_by_reach_block`: items reaching each block come
    first) limits each group's item loop to its users' largest count. This matters because users stop at
    different blocks and the lowest block (every item reaches it) costs most: on the benchmark's first
    chunk it takes 70k ``log Phi`` terms per user where walking each 256-user tile down to its lowest
    user's block took 107k."""
    b, g = mids.shape
    if floor is None or not _whole_blocks(g):
        return _rest_log_h_loop(mids, _rest_blocks(mu, sd, valid))
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
            n_steps = -(-jnp.max(jnp.where(real, count_j[rows], 0)) // _ITEM_BLOCK)
            vals = _rest_log_h_loop(mids_j[rows], _as_blocks(inv[rows], shift[rows]), n_steps)
            return log_h.at[users, j].set(vals, mode="drop")  # slots without a user (index b) dropped

        log_h = jax.lax.fori_loop(0, -(-n_going // sub), group, log_h)
        return j - 1, log_h, going & (log_h[:, j, 0] >= floor)

    # `going` starts as a value derived from `floor`, so it has floor's type under `jax.shard_map` too
    start = (jnp.asarray(nb - 1), jnp.full_like(by_block, -jnp.inf), ~jnp.zeros_like(floor, dtype=bool))
    _, log_h, _ = jax.lax.while_loop(more, block, start)
    return log_h.reshape(b, g)


def _select_rest(mean, std, ranking, cand, lo, n_keep):
    """Rest items (candidates outside the list), optionally only the ``n_keep`` reaching highest.

    Returns ``(mu, sd, valid)`` each ``(B, n_keep or n)``.
    """
    _b, n = mean.shape
    rest = _rest_mask(ranking, cand)
    if n_keep is None or n_keep >= n:
        return mean, std, rest
    reach = jnp.where(rest, mean + PRUNE_Z * std, -jnp.inf)
    _, idx = jax.lax.top_k(reach, n_keep)
    mu = jnp.take_along_axis(mean, idx, axis=1)
    sd = jnp.take_along_axis(std, idx, axis=1)
    valid = jnp.take_along_axis(rest, idx, axis=1)
    return mu, sd, valid


def _rest_mask(ranking, cand):
    b, n = cand.shape
    in_list = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], ranking].set(True)
    return cand & ~in_list


def _highest_rest_mean(mean, ranking, cand):
    """``(B,)`` largest mean among rest items. When a rest item sits above the list (tiny P), the integrand
    lives between the list's upper tail and that item, so the grid must reach it for a good relative error."""
    return jnp.max(jnp.where(_rest_mask(ranking, cand), mean, -jnp.inf), axis=1)


def _below_matrix(grid_size: int) -> jax.Array:
    """``(G, G)`` float32 ``T`` with ``(v @ T)[g] = sum_{g' < g} v[g'] + v[g] / 2``: strictly lower cells
    count fully, the cell itself by half."""
    return jnp.triu(jnp.ones((grid_size, grid_size), jnp.float32), 1) + 0.5 * jnp.eye(
        grid_size, dtype=jnp.float32
    )


_SUM_BLOCK = 16  # cells per block of `_sum_below`


def _sum_below(v: jax.Array) -> jax.Array:
    """``v @ T`` for ``v (B, G)`` and ``T = _below_matrix(G)``, in blocks of `_SUM_BLOCK` cells when they
    divide ``G``: ``T`` inside each block, plus every lower block's total (a ``(G/16, G/16)`` strictly
    triangular matmul), i.e. ``G * 16 + (G/16)^2`` multiply-adds per row instead of ``G^2``."""
    b, g = v.shape
    hi = jax.lax.Precision.HIGHEST
    if g % _SUM_BLOCK or g < 2 * _SUM_BLOCK:
        return jnp.dot(v, _below_matrix(g), precision=hi)
    blocks = v.reshape(b, g // _SUM_BLOCK, _SUM_BLOCK)
    within = jnp.einsum("bnc,cd->bnd", blocks, _below_matrix(_SUM_BLOCK), precision=hi)
    lower = jnp.triu(jnp.ones((g // _SUM_BLOCK, g // _SUM_BLOCK), v.dtype), 1)
    return (within + jnp.dot(blocks.sum(-1), lower, precision=hi)[:, :, None]).reshape(b, g)


def _ordered_recursion(log_mass: jax.Array, log_h: jax.Array) -> jax.Array:
    """``log P`` from list cell masses ``(B, K, G)`` and ``log H`` at midpoints ``(B, G)``.

    ``a_K = log m_K + log H``; ``a_k = log m_k + log(sum_{g' < g} e^{a_{k+1}[g']} + e^{a_{k+1}[g]} / 2)``.

    Each level leaves log space only inside the sum: with ``c = max_g a_{k+1}``, the inner sums are
    ``exp(a_{k+1} - c) @ T`` (`_below_matrix`, computed blockwise by `_sum_below` at full float32
    precision: no TF32 on GPUs) and ``a_k = log m_k + log(...) + c``. Terms more than ~87 nats below a
    level's maximum underflow to 0; they change ``P`` by less than ``G e^-87`` relative. Two
    transcendentals per cell and level instead of the ``O(log G)`` log-add-exps of a cumulative
    log-sum-exp scan.
    """
    a = log_mass[:, -1] + log_h

    def level(a_next, log_m):
        c = jnp.max(a_next, axis=-1, keepdims=True)
        c = jnp.where(jnp.isfinite(c), c, 0.0)  # a user with P = 0 stays at -inf, not NaN
        inner = _sum_below(jnp.exp(a_next - c))
        return log_m + jnp.log(inner) + c, None

    a, _ = jax.lax.scan(level, a, jnp.moveaxis(log_mass[:, :-1], 1, 0), reverse=True)  # levels K-1 .. 1
    return logsumexp(a, axis=-1)


def _log_mass_from_edges(lcdf, lsf):
    """``log(F(e_{g+1}) - F(e_g))`` from log CDF and log survival at the edges, ``(..., G+1) -> (..., G)``;
    in the upper tail the survival difference keeps precision."""
    upper = lsf[..., :-1] < lcdf[..., :-1]  # the cell starts above the median
    hi = jnp.where(upper, lsf[..., :-1], lcdf[..., 1:])
    lo = jnp.where(upper, lsf[..., 1:], lcdf[..., :-1])
    return hi + _log1mexp(jnp.minimum(lo - hi, 0.0))


def _log_cell_mass(za: jax.Array, zb: jax.Array) -> jax.Array:
    """``log(Phi(zb) - Phi(za))`` elementwise for standardised cell edges ``za <= zb``: a difference of
    survival values when the cell starts above the median (upper-tail precision), of CDF values otherwise.
    Each cell is computed from its own two edges (no slices of shared edge values)."""
    upper = za > 0
    v_hi, w_hi = _log_phi_parts(jnp.where(upper, -za, zb))
    v_lo, w_lo = _log_phi_parts(jnp.where(upper, -zb, za))
    hi = w_hi + jnp.log(v_hi)
    return hi + _log1mexp(jnp.minimum(w_lo + jnp.log(v_lo) - hi, 0.0))


def _gaussian_list_pieces(mu_l, sd_l, grid: _Grid, method: str, ordered: bool = True):
    """List items' cell masses (B,K,G), log CDF at midpoints (B,K,G; sequential only, else None) and log
    survival at the edges (B,K,G+1; unordered only, else None)."""

    def one_item(mu_sd):  # (B,) mean and std of one list position -> its (B, G) cell masses
        mu, sd = mu_sd
        inv = 1.0 / sd[:, None]
        return _log_cell_mass(
            (grid.edges[:, :-1] - mu[:, None]) * inv, (grid.edges[:, 1:] - mu[:, None]) * inv
        )

    # One list position at a time: XLA:CPU then compiles each position's masses into a single elementwise
    # loop, where the (B, K, G) form was split into many materialised pieces (1.3x for the whole estimator).
    log_mass = jnp.moveaxis(jax.lax.map(one_item, (mu_l.T, sd_l.T)), 0, 1)
    log_f_mid = lsf = None
    if method == "sequential":
        log_f_mid = log_ndtr((grid.mids[:, None, :] - mu_l[:, :, None]) / sd_l[:, :, None])
    if not ordered:
        lsf = log_ndtr(-(grid.edges[:, None, :] - mu_l[:, :, None]) / sd_l[:, :, None])
    return log_mass, log_f_mid, lsf


def _combine(method, ordered, log_mass, log_f_mid, log_sf_edges, log_h):
    """Turn list pieces and ``log H`` into ``log P`` for the grid methods."""
    if not ordered:
        log_min_mass = _log_mass_from_log_sf(jnp.sum(log_sf_edges, axis=1))
        return logsumexp(log_min_mass + log_h, axis=-1)
    if method == "exact":
        return _ordered_recursion(log_mass, log_h)
    # sequential: step k competes with the rest and the list items below it (l_{k+1}..l_K).
    below = jnp.cumsum(log_f_mid[:, ::-1], axis=1)[:, ::-1]  # sum_{k' >= k}
    below = jnp.concatenate([below[:, 1:], jnp.zeros_like(below[:, :1])], axis=1)  # sum_{k' > k}
    steps = logsumexp(log_mass + below + log_h[:, None, :], axis=-1)
    return jnp.sum(steps, axis=-1)


def default_user_tile() -> int:
    """Users per tile inside one jitted call: 256 on CPU, 128 elsewhere.

    On a CPU the ``log H`` loop (`_rest_log_h_loop`) only holds ``(B, G)`` arrays; within a tile each user
    stops at its own floor (`_rest_log_h_top_down`), and tiles of 128 to 1,024 users measured within this
    machine's noise of each other on one core (256 was 5-7% faster than whole 1,024-user chunks when a
    tile stopped at its lowest user's block). On GPUs and TPUs the ``(B, G, n)`` log
    Φ arrays are materialised (see `log_ndtr`), and tiles of 128 users bound that memory to
    ``128 * G * n * 4`` bytes (128 MiB for 256 cells and 1,000 items).
    """
    return 256 if jax.default_backend() == "cpu" else 128


def _map_user_tiles(fn, tile: int, *arrays):
    """``fn`` over the leading (user) axis in tiles of ``tile`` users with `jax.lax.map`; the last tile is
    padded by repeating the last user and the padding is dropped."""
    b = arrays[0].shape[0]
    if not tile or b <= tile:
        return fn(*arrays)
    n_tiles = -(-b // tile)
    pad = n_tiles * tile - b

    def split(x):
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad, *x.shape[1:]))])
        return x.reshape(n_tiles, tile, *x.shape[1:])

    out = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in arrays))
    return out.reshape(n_tiles * tile, *out.shape[2:])[:b]


@partial(jax.jit, static_argnames=("method", "grid_size", "n_keep", "ordered", "tile", "trim"))
def _gaussian_core(mean, std, ranking, cand, *, method, grid_size, n_keep, ordered, tile=0, trim=True):
    """``log P`` for ``(B, n)`` inputs, ``tile`` users at a time (0 = all at once); see the module
    docstring."""
    body = partial(
        _gaussian_core_tile,
        method=method,
        grid_size=grid_size,
        n_keep=n_keep,
        ordered=ordered,
        trim=trim,
    )
    return _map_user_tiles(body, tile, mean, std, ranking, cand)


def _gaussian_core_tile(mean, std, ranking, cand, *, method, grid_size, n_keep, ordered, trim=True):
    """``log P`` for one batch of users ``(B, n)``.

    With ``trim`` (CPU layout only), low grid cells with ``H(m_g) <= e^-30 P`` are left out: with ``LB``
    from `_log_p_lower_bound`, `_rest_log_h_top_down` stops each user below a block of cells where
    ``log H < LB - WINDOW_MARGIN`` and leaves ``log H = -inf`` below. A list whose bottom
    item sits in such a cell contributes at most ``max_{g' <= g} H(m_{g'}) <= e^-30 P`` in all (the list
    masses sum to at most 1), so this changes ``log P`` by less than ``1e-13`` relative (against the
    continuous ``P``; the grid's own error is ~0.2 nats, docs/results-lidu-synthetic.md). The bound also
    holds for the unordered and sequential probabilities, which are at least the ordered one."""
    mu_l = jnp.take_along_axis(mean, ranking, axis=1)
    sd_l = jnp.take_along_axis(std, ranking, axis=1)
    if method == "pairwise":
        mu, sd, valid = _select_rest(mean, std, ranking, cand, None, None)
        last_mu, last_sd = mu_l[:, -1:], sd_l[:, -1:]
        z_rest = (last_mu - mu) / jnp.sqrt(last_sd**2 + sd**2)
        rest = jnp.where(valid, log_ndtr(z_rest), 0.0).sum(-1)
        if not ordered:
            return rest
        z_adj = (mu_l[:, :-1] - mu_l[:, 1:]) / jnp.sqrt(sd_l[:, :-1] ** 2 + sd_l[:, 1:] ** 2)
        adj = log_ndtr(z_adj).sum(-1)
        return adj + rest
    lo, hi = _grid_bounds(mean, mu_l, sd_l, ranking, cand)
    grid = _Grid(lo, hi, grid_size)
    mu, sd, valid = _select_rest(mean, std, ranking, cand, lo, n_keep)
    log_h = _gaussian_rest_log_h(grid.mids, mu, sd, valid, mu_l, sd_l, trim)
    log_mass, log_f_mid, log_sf_edges = _gaussian_list_pieces(mu_l, sd_l, grid, method, ordered)
    return _combine(method, ordered, log_mass, log_f_mid, log_sf_edges, log_h)


def _grid_bounds(mean, mu_l, sd_l, ranking, cand, margin: float = GRID_MIN_MARGIN):
    """``(lo, hi)`` each ``(B,)``: the grid spans ``mean ± max(GRID_HALF_WIDTH std, margin)`` of every list
    item and reaches the highest rest mean (`_highest_rest_mean`). On standardised scores (`_standardise`)
    the margin only matters for a list item whose ``7 std`` is below float32 resolution of the grid: without
    it the grid's end would round onto that item's mean and cut its mass in half."""
    half = jnp.maximum(GRID_HALF_WIDTH * sd_l, margin)
    lo = jnp.min(mu_l - half, axis=1)
    hi = jnp.maximum(jnp.max(mu_l + half, axis=1), _highest_rest_mean(mean, ranking, cand))
    return lo, hi


_BOX_C = (0.0, 1.0, 2.0)  # bottom thresholds mu_K - c sd_K tried by _log_p_lower_bound


def _box_thresholds(mu_l, sd_l):
    """``upper (B, K)`` with ``t_{k-1}`` for item ``k`` (``t_0 = 1e30``, ``t_k = (mu_k + mu_{k+1}) / 2``) and
    the bottom thresholds ``t_K = min(mu_K - c sd_K, t_{K-1})``, ``(B, len(_BOX_C))``."""
    upper = jnp.concatenate([jnp.full_like(mu_l[:, :1], 1e30), 0.5 * (mu_l[:, :-1] + mu_l[:, 1:])], axis=1)
    t_k = jnp.minimum(mu_l[:, -1:] - jnp.asarray(_BOX_C, mu_l.dtype) * sd_l[:, -1:], upper[:, -1:])
    return upper, t_k


def _log_p_lower_bound(mu_l, sd_l, thresholds, log_h_t):
    """``(B,)`` lower bound of ``log P`` for lists ordered by mean, from one box of the event:

        ``P >= prod_k Pr[t_k < S_k < t_{k-1}] * H(t_K)``

    with ``thresholds = _box_thresholds(mu_l, sd_l)``, best of the bottom thresholds; ``log_h_t
    (B, len(_BOX_C))`` is ``log H`` at them. ``-inf`` where the list is not ordered by mean."""
    upper, t_k = thresholds
    n_c = t_k.shape[1]
    lower = jnp.concatenate(
        [jnp.broadcast_to(upper[:, 1:, None], (*upper[:, 1:].shape, n_c)), t_k[:, None, :]], axis=1
    )  # (B, K, n_c)
    za = (lower - mu_l[..., None]) / sd_l[..., None]
    zb = (upper - mu_l)[..., None] / sd_l[..., None]
    bound = jnp.sum(_log_cell_mass(za, zb), axis=1) + log_h_t
    best = jnp.max(jnp.where(jnp.isnan(bound), -jnp.inf, bound), axis=1)
    return jnp.where(jnp.all(mu_l[:, 1:] <= mu_l[:, :-1], axis=1), best, -jnp.inf)


@jax.jit
def _needed_rest_items(mean, std, ranking, cand):
    """Per user, the number of rest items NOT far below the grid's low end (they must be kept)."""
    mu_l = jnp.take_along_axis(mean, ranking, axis=1)
    sd_l = jnp.take_along_axis(std, ranking, axis=1)
    lo, _ = _grid_bounds(mean, mu_l, sd_l, ranking, cand)
    return jnp.sum(_rest_mask(ranking, cand) & (mean + PRUNE_Z * std > lo[:, None]), axis=1)


def _item_budget(needed: np.ndarray, n_items: int) -> int | None:
    """Static item budget for a chunk: the next power of two >= the largest need (None = keep all)."""
    m = int(np.max(needed)) if needed.size else 0
    budget = max(16, 1 << max(0, (m - 1).bit_length()))
    return None if budget >= n_items else budget


# -------------------------------------------------------------------------------------------- public: (mean


def _flatten(x, n_batch_dims):
    return None if x is None else x.reshape((-1, *x.shape[n_batch_dims:]))


def _check_count(name: str, value, *, allow_none: bool = True) -> None:
    """``value`` must be an int >= 1 (or None where allowed); the ValueError names the argument."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def list_log_prob(
    mean: jax.Array,
    std: jax.Array,
    ranking: jax.Array,
    *,
    candidates: jax.Array | None = None,
    method: str = "exact",
    grid_size: int = DEFAULT_GRID_SIZE,
    ordered: bool = True,
    max_items: int | None = None,
) -> jax.Array:
    """``log P(L)`` of each user's ranked list under independent Gaussian item scores ``N(mean, std^2)``.

    ``log P(L) = log Pr[S_{l_1} > ... > S_{l_K} > max_{j in C \\ L} S_j]`` (module docstring). It does not
    change under ``mean -> a mean + b``, ``std -> a std`` for ``a > 0`` (per user): each user's scores are
    first mapped to the frame of its list's grid (`_standardise`; in float64 where the input is a concrete
    float64 array), so the same float32 numbers reach the grid at any scale and offset.

    Jittable and vmappable (``method``, ``grid_size``, ``ordered``, ``max_items`` are static). On concrete
    inputs bad values raise ``ValueError`` before any computation; under `jax.jit` the users whose inputs
    fail a check (NaN/inf mean, std not > 0, bad or duplicate ids, ...) get NaN. `checked_list_log_prob`
    raises eager mode's ``ValueError`` under `jax.jit` instead.

    Args:
      mean: ``(..., n_items)`` finite score means; leading dims are batch (users).
      std: ``(..., n_items)`` score stds, > 0 (a subnormal std counts as 0).
      ranking: ``(..., K)`` int item ids, the list from rank 1 to rank K (distinct candidates).
      candidates: optional ``(..., n_items)`` bool; False items (e.g. training items) are ignored.
      method: ``"exact"``, ``"sequential"`` or ``"pairwise"`` (module docstring).
      grid_size: number of grid cells ``G`` for the grid methods.
      ordered: False gives the unordered set probability ``Pr[min_L S > max_rest S]``.
      max_items: if set (>= 1), only the ``max_items`` rest items with the highest ``mean + 6 std`` enter
        ``H``. Exact (to ``n_items * 1e-9`` in log P) when every other rest item lies far below the list;
        `lidu` picks it safely per chunk.

    Returns:
      ``(...)`` float32 log-probabilities (<= 0); ``(0,)`` for zero users.
    """
    _check_method(method, METHODS)
    _check_grid(grid_size)
    _check_count("max_items", max_items)
    mean, std, ranking = _as_float(mean), _as_float(std), jnp.asarray(ranking)
    candidates = None if candidates is None else jnp.asarray(candidates)
    _check_shapes(mean, std, ranking, candidates)
    concrete = _is_concrete(mean, std, ranking, candidates)
    if concrete:
        _check_values(mean, std, ranking, candidates)
    batch = mean.shape[:-1]
    nb = len(batch)
    m, s = _flatten(mean, nb), _flatten(std, nb)
    r = _flatten(ranking.astype(jnp.int32), nb)
    c = jnp.ones(m.shape, bool) if candidates is None else _flatten(candidates.astype(bool), nb)
    if m.shape[0] == 0:
        return jnp.zeros(batch, jnp.float32)
    out = _gaussian_core(
        *_standardised(m, s, r, c),
        r,
        c,
        method=method,
        grid_size=grid_size,
        n_keep=max_items,
        ordered=ordered,
        tile=default_user_tile(),
    )
    if not concrete:
        out = jnp.where(_rows_ok(m, s, r, c), out, jnp.nan)
    return out.reshape(batch)


def top_k_rankings(mean: jax.Array, k: int, candidates: jax.Array | None = None) -> jax.Array:
    """``(..., k)`` int32: each user's top-k candidates by ``mean`` (ties to the lower id).

    A float64 ``mean`` is ranked after its per-user offset is removed in float64 (`_locate`), so an offset
    far above the spread of the means (``1e7 + N(0, 1)``) does not merge them in float32."""
    mean = _as_float(mean)
    cand = None if candidates is None else jnp.asarray(candidates, bool)
    if isinstance(mean, np.ndarray):
        mean = jnp.asarray(
            _host_locate(mean, np.zeros_like(mean), None if cand is None else np.asarray(cand))[0]
        )
    elif mean.dtype == jnp.float64:
        c = jnp.ones(mean.shape, bool) if cand is None else cand
        mean = _locate(jnp, mean, jnp.zeros_like(mean), c)[0].astype(jnp.float32)
    if cand is not None:
        mean = jnp.where(cand, mean, -jnp.inf)
    return jax.lax.top_k(mean, k)[1].astype(jnp.int32)


def _finish(log_p, k, per_position):
    lidu_values = -log_p
    return lidu_values / k if per_position else lidu_values


def lidu(
    mean: jax.Array,
    std: jax.Array,
    k: int,
    *,
    candidates: jax.Array | None = None,
    method: str = "exact",
    grid_size: int = DEFAULT_GRID_SIZE,
    ordered: bool = True,
    per_position: bool = False,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """LiDu of each user's own top-k list: ``LiDu_u = -log P_u(L_u)`` with ``L_u`` the top-k candidates by
    mean; unchanged by ``mean -> a mean + b``, ``std -> a std`` (``a > 0``, per user; `list_log_prob`).

    On concrete inputs the users are processed ``chunk_size`` at a time (bounded memory) and, for the grid
    methods, rest items far below the list are pruned per chunk without changing the result (module
    docstring). Under `jax.jit` / `jax.vmap` everything runs as one traced computation without pruning, and
    users with invalid inputs get NaN (`checked_lidu` raises eager mode's ``ValueError`` instead).

    Args:
      mean, std: ``(..., n_items)``; see `list_log_prob`.
      k: list length K.
      candidates: optional ``(..., n_items)`` bool.
      method, grid_size, ordered: see `list_log_prob`.
      per_position: divide by k (``-log P / K``).
      chunk_size: users per jitted call (>= 1).

    Returns:
      ``(lidu (...), rankings (..., k) int32)``; higher LiDu = more uncertain. Zero users give empty arrays.
    """
    _check_method(method, METHODS)
    _check_grid(grid_size)
    _check_count("chunk_size", chunk_size, allow_none=False)
    mean, std = _as_float(mean), _as_float(std)
    candidates = None if candidates is None else jnp.asarray(candidates, bool)
    _check_shapes(mean, std, None, candidates)
    _check_k(k, mean.shape[-1])
    if not _is_concrete(mean, std, candidates):
        rankings = top_k_rankings(mean, k, candidates)
        log_p = list_log_prob(
            mean, std, rankings, candidates=candidates, method=method, grid_size=grid_size, ordered=ordered
        )
        return _finish(log_p, k, per_position), rankings
    _check_values(mean, std, None, candidates, k=k)
    batch, n = mean.shape[:-1], mean.shape[-1]
    nb = len(batch)
    m, s = _flatten(mean, nb), _flatten(std, nb)
    c = None if candidates is None else _flatten(candidates, nb)
    values, ranks = lidu_chunked(
        (
            (m[i : i + chunk_size], s[i : i + chunk_size], None if c is None else c[i : i + chunk_size])
            for i in range(0, m.shape[0], chunk_size)
        ),
        k,
        method=method,
        grid_size=grid_size,
        ordered=ordered,
        per_position=per_position,
        pad_to=max(1, min(chunk_size, m.shape[0])),
        n_items=n,
    )
    return jnp.asarray(values).reshape(batch), jnp.asarray(ranks).reshape((*batch, k))


def _lidu_validated(
    mean, std, k: int, cand, *, method: str, grid_size: int, ordered: bool, per_position: bool
):
    """Traced `lidu` on ``(B, n)`` float32 inputs already validated on the host (`lidu_jax.sharding`): the
    same computation without the per-user validity flags (`_rows_ok`), which could only be all True."""
    rankings = top_k_rankings(mean, k, cand)
    log_p = _gaussian_core(
        *_standardise(mean, std, rankings, cand),
        rankings,
        cand,
        method=method,
        grid_size=grid_size,
        n_keep=None,
        ordered=ordered,
        tile=default_user_tile(),
    )
    return _finish(log_p, k, per_position), rankings


@functools.lru_cache(maxsize=64)
def _checked_fn(kind: str, statics: tuple):
    """A jitted `jax.experimental.checkify` function: the value checks of `_value_checks`, then the
    estimator."""
    from jax.experimental import checkify

    if kind == "lidu":
        k, method, grid_size, ordered, per_position = statics

        def fn(mean, std, cand):
            _checkify_values(mean, std, None, cand, k)
            kw = dict(method=method, grid_size=grid_size, ordered=ordered, per_position=per_position)
            return lidu(mean, std, k, candidates=cand, **kw)

    else:
        method, grid_size, ordered, max_items = statics

        def fn(mean, std, ranking, cand):
            _checkify_values(mean, std, ranking, cand)
            kw = dict(method=method, grid_size=grid_size, ordered=ordered, max_items=max_items)
            return list_log_prob(mean, std, ranking, candidates=cand, **kw)

    return jax.jit(checkify.checkify(fn))


def _checked_inputs(mean, std, ranking, candidates, k):
    """Inputs of a checked estimator: shapes checked; a concrete float64 input is checked eagerly (same
    messages) and located in float64 (`_host_locate`) before it enters the float32 jit."""
    mean, std = _as_float(mean), _as_float(std)
    candidates = None if candidates is None else jnp.asarray(candidates, bool)
    _check_shapes(mean, std, ranking, candidates)
    if _host_float64(mean, std):
        _check_values(mean, std, ranking, candidates, k)
        mean, std = _host_locate(mean, std, candidates)
    return jnp.asarray(mean), jnp.asarray(std), candidates


def checked_lidu(
    mean: jax.Array,
    std: jax.Array,
    k: int,
    *,
    candidates: jax.Array | None = None,
    method: str = "exact",
    grid_size: int = DEFAULT_GRID_SIZE,
    ordered: bool = True,
    per_position: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`lidu` as one `jax.jit` computation whose value checks are `jax.experimental.checkify` checks: bad
    values raise the ``ValueError`` (same message) that eager `lidu` raises, where plain `lidu` under
    `jax.jit` can only return NaN for the users concerned.

    Args and returns: as `lidu` (``mean, std (..., n_items)``; ``(lidu (...), rankings (..., k))``).
    """
    _check_method(method, METHODS)
    _check_grid(grid_size)
    mean, std, cand = _checked_inputs(mean, std, None, candidates, k)
    _check_k(k, mean.shape[-1])
    err, out = _checked_fn("lidu", (int(k), method, grid_size, bool(ordered), bool(per_position)))(
        mean, std, cand
    )
    _raise_checkify_error(err)
    return out


def checked_list_log_prob(
    mean: jax.Array,
    std: jax.Array,
    ranking: jax.Array,
    *,
    candidates: jax.Array | None = None,
    method: str = "exact",
    grid_size: int = DEFAULT_GRID_SIZE,
    ordered: bool = True,
    max_items: int | None = None,
) -> jax.Array:
    """`list_log_prob` as one `jax.jit` computation with `jax.experimental.checkify` value checks: bad values
    raise eager mode's ``ValueError`` (same message). Args and returns: as `list_log_prob`."""
    _check_method(method, METHODS)
    _check_grid(grid_size)
    _check_count("max_items", max_items)
    ranking = jnp.asarray(ranking)
    mean, std, cand = _checked_inputs(mean, std, ranking, candidates, None)
    err, out = _checked_fn("list", (method, grid_size, bool(ordered), max_items))(mean, std, ranking, cand)
    _raise_checkify_error(err)
    return out


def lidu_chunked(
    chunks: Iterable[tuple[jax.Array, jax.Array, jax.Array | None]],
    k: int,
    *,
    method: str = "exact",
    grid_size: int = DEFAULT_GRID_SIZE,
    ordered: bool = True,
    per_position: bool = False,
    pad_to: int | None = None,
    n_items: int | None = None,
    tile: int | None = None,
    trim_cells: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """LiDu over a stream of user chunks ``(mean (B, n), std (B, n), candidates (B, n) or None)``.

    Only one chunk is alive at a time, so peak memory does not grow with the number of users when the chunks
    are produced lazily (e.g. scored from a model chunk by chunk). Each chunk is validated, standardised per
    user (`_standardise`; a float64 chunk is located in float64 first), padded to ``pad_to`` users (one
    compilation for all full chunks) and pruned to a power-of-two item budget that keeps every rest item not
    far below its user's list. On CPU, ``trim_cells`` leaves out each user's low grid cells where
    ``H <= e^-30 P`` (`_gaussian_core_tile`). Neither changes ``log P`` beyond float32 rounding. Inside a
    chunk the users are walked ``tile`` at a time (default `default_user_tile`: 256 on CPU, 128 elsewhere; a
    tile at least the chunk's size walks the whole chunk at once).

    Args:
      chunks: iterable of ``(mean, std, candidates)``; chunks of zero users are skipped.
      k, method, grid_size, ordered, per_position: as `lidu`.
      pad_to, n_items, tile: None or an int >= 1 (users per padded chunk, items per chunk, users per tile).
      trim_cells: see above (CPU only).

    Returns:
      ``(lidu (U,), rankings (U, k))`` as NumPy arrays (``(0,)``, ``(0, k)`` when there are no users).
    """
    _check_method(method, METHODS)
    _check_grid(grid_size)
    for name, value in (("pad_to", pad_to), ("n_items", n_items), ("tile", tile)):
        _check_count(name, value)
    _check_k(k, k if n_items is None else n_items)
    values, ranks = [], []
    for mean, std, cand in chunks:
        mean, std = _as_float(mean), _as_float(std)
        cand = jnp.ones(mean.shape, bool) if cand is None else jnp.asarray(cand, bool)
        if mean.ndim != 2:
            raise ValueError(f"each chunk's mean must be (B, n_items), got {mean.shape}")
        _check_shapes(mean, std, None, cand)
        if n_items is not None and mean.shape[1] != n_items:
            raise ValueError(f"chunk has {mean.shape[1]} items, expected {n_items}")
        _check_k(k, mean.shape[1])
        _check_values(mean, std, None, cand, k=k)
        b = mean.shape[0]
        if b == 0:
            continue
        if _host_float64(mean, std):
            mean, std = _host_locate(mean, std, cand)
        mean, std = jnp.asarray(mean), jnp.asarray(std)
        if pad_to is not None and b < pad_to:
            reps = pad_to - b
            mean = jnp.concatenate([mean, jnp.broadcast_to(mean[-1:], (reps, mean.shape[1]))])
            std = jnp.concatenate([std, jnp.broadcast_to(std[-1:], (reps, std.shape[1]))])
            cand = jnp.concatenate([cand, jnp.broadcast_to(cand[-1:], (reps, cand.shape[1]))])
        rankings = top_k_rankings(mean, k, cand)
        mean, std = _standardise(mean, std, rankings, cand)
        n_keep = None
        if method != "pairwise":
            n_keep = _item_budget(np.asarray(_needed_rest_items(mean, std, rankings, cand)), mean.shape[1])
        log_p = _gaussian_core(
            mean,
            std,
            rankings,
            cand,
            method=method,
            grid_size=grid_size,
            n_keep=n_keep,
            ordered=ordered,
            tile=default_user_tile() if tile is None else tile,
            trim=trim_cells,
        )
        values.append(np.asarray(_finish(log_p, k, per_position))[:b])
        ranks.append(np.asarray(rankings)[:b])
    if not values:
        return np.zeros(0, np.float32), np.zeros((0, k), np.int32)
    return np.concatenate(values), np.concatenate(ranks)


# ------------------------------------------------------------------------------------------------ from samp


def _check_samples(samples) -> None:
    if samples.ndim < 2:
        raise ValueError(f"samples must have shape (n_samples, ..., n_items), got {samples.shape}")
    if samples.shape[0] < 2:
        raise ValueError(f"samples needs at least 2 draws along axis 0, got {samples.shape[0]}")


def _check_min_std(min_std) -> None:
    if not (isinstance(min_std, int | float | np.floating) and math.isfinite(min_std) and min_std > 0):
        raise ValueError(f"min_std must be a finite float > 0, got {min_std!r}")


def sample_moments(samples: jax.Array, min_std: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Per-item mean and std (ddof=1, floored at ``min_std``) over the sample axis 0: ``(..., n_items)``
    each."""
    samples = jnp.asarray(samples, jnp.float32)
    return samples.mean(0), jnp.maximum(samples.std(0, ddof=1), min_std)


def silverman_bandwidth(samples: jax.Array, min_std: float = 1e-6) -> jax.Array:
    """Per-item Gaussian-kernel bandwidth ``h = 1.06 * std * S^(-1/5)`` (Silverman's rule): ``(...,
    n_items)``."""
    _, sd = sample_moments(samples, min_std)
    return 1.06 * sd * samples.shape[0] ** (-0.2)


@jax.jit
def _standardise_samples(samples, ranking, cand):
    """Samples ``(S, B, n)`` in the frame of each user's list grid, as `_standardise` does for means and
    stds: ``x' = (x - a) 2^-e`` with ``a`` the grid's top and ``2^(e-1) <= w < 2^e`` for its width ``w``,
    the grid taken from the per-item sample mean and std (ddof=1, no floor). Returns ``(x' (S, B, n)
    float32, (e1, e2) (B,) int)`` with ``e = e1 + e2`` (two parts, so ``2^-e1`` and ``2^-e2`` each stay in
    range when a bandwidth is scaled). Values are kept within ``±2^80``; non-candidates are set to -1."""
    c = cand[None]
    big = jnp.max(jnp.where(c, jnp.abs(samples), 0.0), axis=(0, 2))
    e1 = jnp.frexp(big)[1]
    x = _times_pow2(jnp, samples, e1[None, :, None])
    top = jnp.max(jnp.where(cand, x.mean(0), -jnp.inf), axis=1)
    x = (x - jnp.where(jnp.isfinite(top), top, 0.0)[None, :, None]).astype(jnp.float32)
    hi, e2 = _frame(x.mean(0), x.std(0, ddof=1), ranking, cand)
    x = _times_pow2(jnp, x - hi[None, :, None], e2[None, :, None])
    x = jnp.clip(x, MEAN_FLOOR, -MEAN_FLOOR)
    return jnp.where(c, x, -1.0), (e1, e2)


def _standardised_samples(samples, ranking, cand, bandwidth):
    """`_standardise_samples` for ``(S, B, n)`` samples of any float dtype (a concrete float64 one is
    located in NumPy float64 first), and ``bandwidth`` (None or ``(B, n)`` in score units) in the same frame,
    kept within ``[STD_FLOOR, STD_CEIL]``."""
    if _host_float64(samples):
        x = np.asarray(samples, np.float64)
        c = np.asarray(cand, bool)[None]
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            e0 = np.frexp(np.max(np.where(c, np.abs(x), 0.0), axis=(0, 2)))[1]
            x = np.ldexp(x, -e0[None, :, None])
            top = np.max(np.where(c[0], x.mean(0), -np.inf), axis=1)
            x = x - np.where(np.isfinite(top), top, 0.0)[None, :, None]
            if bandwidth is not None:
                bandwidth = np.ldexp(np.asarray(bandwidth, np.float64), -e0[:, None]).astype(np.float32)
        samples = x.astype(np.float32)
    x, (e1, e2) = _standardise_samples(jnp.asarray(samples), ranking, cand)
    if bandwidth is None:
        return x, None
    h = _times_pow2(jnp, _times_pow2(jnp, jnp.asarray(bandwidth, jnp.float32), e1[:, None]), e2[:, None])
    return x, jnp.clip(h, STD_FLOOR, STD_CEIL)


@partial(jax.jit, static_argnames=("method", "grid_size", "ordered"))
def _kde_core(samples, bandwidth, ranking, cand, *, method, grid_size, ordered):
    """``log P`` with per-item Gaussian KDEs ``F_i(x) = mean_s Phi((x - x_is) / h_i)``; samples ``(S, B,
    n)``."""
    s_count = samples.shape[0]
    log_s = math.log(s_count)
    xs = jnp.moveaxis(samples, 0, -1)  # (B, n, S)
    xs_l = jnp.take_along_axis(xs, ranking[:, :, None], axis=1)  # (B, K, S)
    h_l = jnp.take_along_axis(bandwidth, ranking, axis=1)  # (B, K)
    half = jnp.maximum(GRID_HALF_WIDTH * h_l, GRID_MIN_MARGIN)  # see _grid_bounds
    lo = jnp.min(jnp.min(xs_l, -1) - half, axis=1)
    hi = jnp.max(jnp.max(xs_l, -1) + half, axis=1)
    hi = jnp.maximum(hi, _highest_rest_mean(jnp.mean(xs, -1), ranking, cand))
    grid = _Grid(lo, hi, grid_size)
    ze = (grid.edges[:, None, None, :] - xs_l[..., None]) / h_l[:, :, None, None]  # (B, K, S, G+1)
    lcdf, lsf = log_ndtr(ze), log_ndtr(-ze)
    log_mass = logsumexp(_log_mass_from_edges(lcdf, lsf), axis=2) - log_s
    log_f_mid = None
    if method == "sequential":
        zm = (grid.mids[:, None, None, :] - xs_l[..., None]) / h_l[:, :, None, None]
        log_f_mid = logsumexp(log_ndtr(zm), axis=2) - log_s
    log_sf_edges = logsumexp(lsf, axis=2) - log_s
    rest = _rest_mask(ranking, cand)
    z = (grid.mids[:, :, None, None] - xs[:, None, :, :]) / bandwidth[:, None, :, None]  # (B, G, n, S)
    log_f_rest = logsumexp(log_ndtr(z), axis=-1) - log_s
    log_h = jnp.sum(jnp.where(rest[:, None, :], log_f_rest, 0.0), axis=-1)
    return _combine(method, ordered, log_mass, log_f_mid, log_sf_edges, log_h)


@jax.jit
def _mc_core(samples, ranking, cand):
    """Smoothed fraction of joint draws whose top-K candidates, in order, equal ``ranking``."""
    k = ranking.shape[-1]
    masked = jnp.where(cand[None], samples, -jnp.inf)
    top = jax.lax.top_k(masked, k)[1]  # (S, B, K)
    hit = jnp.all(top == ranking[None], axis=-1)
    count = jnp.sum(hit, axis=0)
    return jnp.log((count + 0.5) / (samples.shape[0] + 1.0))


def list_log_prob_from_samples(
    samples: jax.Array,
    ranking: jax.Array,
    *,
    candidates: jax.Array | None = None,
    method: str = "kde",
    grid_size: int = DEFAULT_GRID_SIZE,
    bandwidth: jax.Array | float | None = None,
    ordered: bool = True,
    min_std: float = 1e-6,
) -> jax.Array:
    """``log P(L)`` from sampled score vectors (ensemble members, bootstrap copies, dropout passes, ...).

    Each user's samples are first mapped to the frame of its list's grid (``x -> (x - a) / c``, ``c`` a
    power of two within a factor 2 of the grid's width; `_standardise_samples`), so the result does not
    change under ``x -> a x + b`` (``a > 0``, per user), ``bandwidth`` scaled with them.

    Methods:
      ``"kde"``: each item's density is a Gaussian kernel density on its samples (bandwidth per item,
        Silverman's rule by default), items independent; then the exact grid recursion.
      ``"gaussian"``: per-item ``N(mean, std^2)`` fitted to the samples (ddof=1), then ``"exact"``.
      ``"mc"``: ``log((c + 1/2) / (S + 1))`` with c the number of the S joint draws whose top-K candidates, in
        order, equal the list (add-half smoothing keeps it finite; coarse unless S is large).

    Args:
      samples: ``(n_samples, ..., n_items)`` float scores, ``n_samples >= 2``.
      ranking: ``(..., K)`` int item ids.
      candidates: optional ``(..., n_items)`` bool.
      method: ``"kde"``, ``"gaussian"`` or ``"mc"``.
      grid_size: grid cells for ``"kde"`` / ``"gaussian"``.
      bandwidth: optional KDE bandwidth in score units, scalar or ``(..., n_items)``, finite and > 0.
      ordered: False = unordered set probability (not for ``"mc"``).
      min_std: floor on the per-item std (items identical across draws), in units of the user's frame (the
        grid's width to within a factor 2), so it scales with the scores.

    Returns:
      ``(...)`` float32 log-probabilities; under `jax.jit`, NaN for users with invalid inputs.
    """
    _check_method(method, SAMPLE_METHODS)
    _check_grid(grid_size)
    _check_min_std(min_std)
    samples, ranking = _as_float(samples), jnp.asarray(ranking)
    _check_samples(samples)
    candidates = None if candidates is None else jnp.asarray(candidates, bool)
    _check_shapes(samples[0], samples[0], ranking, candidates)
    if method == "mc" and not ordered:
        raise ValueError("method='mc' supports ordered lists only")
    concrete = _is_concrete(samples, ranking, candidates, bandwidth)
    if concrete and not np.all(np.isfinite(np.asarray(samples))):
        raise ValueError("samples contain NaN or inf")
    h = None
    if bandwidth is not None:
        h = _as_float(bandwidth)
        h = (np.broadcast_to if isinstance(h, np.ndarray) else jnp.broadcast_to)(h, samples.shape[1:])
        if concrete and not np.all(np.isfinite(np.asarray(h)) & (np.asarray(h) > 0)):
            raise ValueError("bandwidth must be finite and > 0")
    batch = samples.shape[1:-1]
    nb = len(batch)
    flat = samples.reshape((samples.shape[0], -1, samples.shape[-1]))
    r = _flatten(ranking.astype(jnp.int32), nb)
    c = jnp.ones(flat.shape[1:], bool) if candidates is None else _flatten(candidates, nb)
    if flat.shape[1] == 0:
        return jnp.zeros(batch, jnp.float32)
    x, h = _standardised_samples(flat, r, c, None if h is None else _flatten(h, nb))
    mean, std = sample_moments(x, min_std)
    if concrete:
        _check_values(mean, std, r, c)
    if method == "gaussian":
        out = list_log_prob(mean, std, r, candidates=c, method="exact", grid_size=grid_size, ordered=ordered)
    elif method == "mc":
        out = _mc_core(x, r, c)
    else:
        h = silverman_bandwidth(x, min_std) if h is None else h
        out = _kde_core(x, h, r, c, method="exact", grid_size=grid_size, ordered=ordered)
    if not concrete:
        ok = _rows_ok(mean, std, r, c) & jnp.all(jnp.isfinite(flat), axis=(0, 2))
        if bandwidth is not None:
            raw_h = _flatten(jnp.broadcast_to(jnp.asarray(bandwidth), samples.shape[1:]), nb)
            ok = ok & jnp.all(jnp.isfinite(raw_h) & (raw_h > 0), axis=-1)
        out = jnp.where(ok, out, jnp.nan)
    return out.reshape(batch)


def lidu_from_samples(
    samples: jax.Array,
    k: int,
    *,
    candidates: jax.Array | None = None,
    method: str = "kde",
    grid_size: int = DEFAULT_GRID_SIZE,
    bandwidth: jax.Array | float | None = None,
    ordered: bool = True,
    per_position: bool = False,
    min_std: float = 1e-6,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """LiDu from score samples: the list is each user's top-k candidates by the sample mean; unchanged by
    ``samples -> a samples + b`` (``a > 0``, per user; `list_log_prob_from_samples`).

    Args:
      samples: ``(n_samples, ..., n_items)``.
      k: list length.
      chunk_size: users per call on concrete inputs (>= 1; the KDE evaluates ``G * n_items * n_samples``
        CDFs per user).
      Others: see `list_log_prob_from_samples` and `lidu`.

    Returns:
      ``(lidu (...), rankings (..., k) int32)``; empty arrays for zero users.
    """
    _check_method(method, SAMPLE_METHODS)
    _check_grid(grid_size)
    _check_count("chunk_size", chunk_size, allow_none=False)
    _check_min_std(min_std)
    samples = _as_float(samples)
    _check_samples(samples)
    _check_k(k, samples.shape[-1])
    cand = None if candidates is None else jnp.asarray(candidates, bool)
    batch = samples.shape[1:-1]
    if _is_concrete(samples) and not np.all(np.isfinite(np.asarray(samples))):
        raise ValueError("samples contain NaN or inf")
    rankings = top_k_rankings(samples.mean(0), k, cand)
    if method == "gaussian":
        nb = len(batch)
        flat = samples.reshape((samples.shape[0], -1, samples.shape[-1]))
        c = jnp.ones(flat.shape[1:], bool) if cand is None else _flatten(cand, nb)
        if flat.shape[1] == 0:
            return jnp.zeros(batch, jnp.float32), jnp.zeros((*batch, k), jnp.int32)
        x, _ = _standardised_samples(flat, _flatten(rankings, nb), c, None)
        mean, std = sample_moments(x, min_std)
        kw = dict(method="exact", grid_size=grid_size, ordered=ordered, per_position=per_position)
        values, ranks = lidu(
            mean.reshape(samples.shape[1:]), std.reshape(samples.shape[1:]), k, candidates=cand, **kw
        )
        return values, ranks
    kwargs = dict(method=method, grid_size=grid_size, bandwidth=bandwidth, ordered=ordered, min_std=min_std)
    if not _is_concrete(samples, candidates, bandwidth) or len(batch) != 1 or batch[0] <= chunk_size:
        log_p = list_log_prob_from_samples(samples, rankings, candidates=candidates, **kwargs)
        return _finish(log_p, k, per_position), rankings
    bw = None if bandwidth is None else np.broadcast_to(np.asarray(bandwidth), samples.shape[1:])
    parts = []
    for i in range(0, batch[0], chunk_size):
        sl = slice(i, i + chunk_size)
        kw = dict(kwargs, bandwidth=None if bw is None else bw[sl])
        parts.append(
            list_log_prob_from_samples(
                samples[:, sl], rankings[sl], candidates=None if cand is None else cand[sl], **kw
            )
        )
    return _finish(jnp.concatenate(parts), k, per_position), rankings
