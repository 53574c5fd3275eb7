"""Each user's scores mapped to the frame of its list's grid, before any float32 maths.

``P(L)`` is the probability of an ordering of one user's scores, so it does not change when they go through
``x -> a x + b`` (``a > 0``: ``mean -> a mean + b``, ``std -> a std``, samples and KDE bandwidths alike).
Every estimator therefore first subtracts the top of the user's grid and divides by a power of two within
a factor 2 of its width: the grid then spans ``[-w, 0]`` with ``w`` in ``[1/2, 1)``, absolute constants in
the grid code (the grid's minimum margin, the sentinels and the erfc clamp of the CPU loop) and
float32 range see O(1) numbers at any input scale, and the offset is removed in the input's own precision
(a concrete float64 input in NumPy float64, before anything is float32). The scaling by a power of two is
exact; only the subtraction rounds.

Degenerate inputs get a defined answer, never NaN: a standardised std below `STD_FLOOR` (below float32
resolution of the grid, so the item is a point mass either way) is raised to it, larger than `STD_CEIL` is
lowered (its mean scaled to keep ``(x - mu) / std``), means below `MEAN_FLOOR` are raised to it (the item's
log CDF is 0 on the whole grid either way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax.reference import grid_bounds
from lidu_jax.validation import is_concrete

STD_FLOOR = 2.0**-40
STD_CEIL = 2.0**40
MEAN_FLOOR = -(2.0**80)
_DEGENERATE_WIDTH = 2.0**-100  # a grid narrower than this (relative) has only tied, point-mass list items


def host_float64(*xs) -> bool:
    """Whether the inputs are concrete float64 (standardised in NumPy float64 before the float32 kernels)."""
    return is_concrete(*xs) and any(getattr(x, "dtype", None) == np.float64 for x in xs if x is not None)


def as_float(x):
    """A concrete float64 array as float64 NumPy, a traced float64 one (x64 mode) as it is, else float32."""
    if is_concrete(x) and getattr(x, "dtype", None) == np.float64:
        return np.asarray(x, np.float64)
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def _pow2(n: jax.Array, dtype) -> jax.Array:
    """Exactly ``2**n`` for an int array ``n`` inside the normal exponent range of ``dtype``."""
    if dtype == jnp.float64:
        return jax.lax.bitcast_convert_type((n.astype(jnp.int64) + 1023) << 52, jnp.float64)
    return jax.lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)


def times_pow2(xp, x, e):
    """``x * 2**-e`` without rounding (unless the result is subnormal): a power of two in two factors, each
    inside the normal range (``e`` spans the whole exponent range of the dtype)."""
    if xp is np:
        return np.ldexp(x, -e)
    h = e // 2
    return x * _pow2(-h, x.dtype) * _pow2(h - e, x.dtype)


def locate(xp, mean, std, cand):
    """Stage 1, in the input's precision: per user, ``m1 = (mean - max_C mean) / 2^e`` and ``s1 = std / 2^e``
    with ``2^e`` the power of two at or above ``max_C max(|mean|, std)`` over the candidates ``C``.
    Candidates end up in ``[-2, 0] x [0, 1]`` (nothing overflows later), non-candidates at ``(-1, 1)``.
    Applying it to its own float32 output only multiplies by a power of two (exactly)."""
    big = xp.max(xp.where(cand, xp.maximum(xp.abs(mean), std), 0.0), axis=-1, keepdims=True)
    _, e = xp.frexp(big)
    m, s = times_pow2(xp, mean, e), times_pow2(xp, std, e)
    top = xp.max(xp.where(cand, m, -xp.inf), axis=-1, keepdims=True)
    m = m - xp.where(xp.isfinite(top), top, 0.0)
    return xp.where(cand, m, -1.0), xp.where(cand, s, 1.0)


def host_locate(mean, std, cand):
    """`locate` in NumPy float64 for concrete float64 inputs, returned as float32."""
    cand = np.ones(np.shape(mean), bool) if cand is None else np.asarray(cand, bool)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        m, s = locate(np, np.asarray(mean, np.float64), np.asarray(std, np.float64), cand)
    return m.astype(np.float32), s.astype(np.float32)


def _frame(m, s, ranking, cand):
    """``(top (B,), e (B,))``: the grid of user ``b`` spans ``[top - w, top]`` with ``2^(e-1) <= w < 2^e``
    (`lidu_jax.reference.grid_bounds`). A grid of zero width (every list item a point mass, all tied) falls
    back to the spread of the candidates' means, then to 1."""
    mu_l = jnp.take_along_axis(m, ranking, axis=1)
    sd_l = jnp.take_along_axis(s, ranking, axis=1)
    lo, hi = grid_bounds(m, mu_l, sd_l, ranking, cand, margin=0.0)
    spread = jnp.max(jnp.where(cand, m, -jnp.inf), axis=1) - jnp.min(jnp.where(cand, m, jnp.inf), axis=1)
    width = hi - lo
    width = jnp.where(width > _DEGENERATE_WIDTH, width, jnp.where(spread > _DEGENERATE_WIDTH, spread, 1.0))
    return hi, jnp.frexp(width)[1]


@jax.jit
def standardise(mean, std, ranking, cand):
    """Per user, the float32 scores in the frame of its list's grid: ``m' = (mean - a) / c``, ``s' = std / c``
    with ``a`` the top of the grid and ``c`` a power of two at most twice the grid's width; ``(B, n)`` each.
    Stds are then kept within ``[STD_FLOOR, STD_CEIL]`` and means above ``MEAN_FLOOR``: this leaves every
    finite log CDF value the float32 kernels can resolve unchanged and keeps every intermediate finite."""
    m, s = locate(jnp, mean, std, cand)
    m, s = m.astype(jnp.float32), s.astype(jnp.float32)
    top, e = _frame(m, s, ranking, cand)
    m = times_pow2(jnp, m - top[:, None], e[:, None])
    s = times_pow2(jnp, s, e[:, None])
    m = jnp.where(s > STD_CEIL, m * (STD_CEIL / s), m)  # keeps (x - m) / s for x in the grid, to 2^-40
    s = jnp.clip(s, STD_FLOOR, STD_CEIL)
    m = jnp.maximum(m, MEAN_FLOOR)
    return jnp.where(cand, m, -1.0), jnp.where(cand, s, 1.0)


def standardised(mean, std, ranking, cand):
    """`standardise` for ``(B, n)`` inputs of any float dtype: a concrete float64 input is located in NumPy
    float64 first (`host_locate`), so an offset far above the spread is removed before float32."""
    if host_float64(mean, std):
        mean, std = host_locate(mean, std, cand)
    return standardise(mean, std, ranking, cand)


@jax.jit
def _standardise_samples(samples, ranking, cand):
    """Samples ``(S, B, n)`` in the frame of each user's list grid, as `standardise` does for means and
    stds, the grid taken from the per-item sample mean and std (ddof=1, no floor). Returns ``(x' (S, B, n)
    float32, (e1, e2) (B,) int)`` with ``x' = (x - a) 2^-(e1 + e2)`` (two exponents, so ``2^-e1`` and
    ``2^-e2`` each stay in range when a bandwidth is scaled). Values are kept within ``±2^80``;
    non-candidates are set to -1."""
    c = cand[None]
    big = jnp.max(jnp.where(c, jnp.abs(samples), 0.0), axis=(0, 2))
    e1 = jnp.frexp(big)[1]
    x = times_pow2(jnp, samples, e1[None, :, None])
    top = jnp.max(jnp.where(cand, x.mean(0), -jnp.inf), axis=1)
    x = (x - jnp.where(jnp.isfinite(top), top, 0.0)[None, :, None]).astype(jnp.float32)
    hi, e2 = _frame(x.mean(0), x.std(0, ddof=1), ranking, cand)
    x = times_pow2(jnp, x - hi[None, :, None], e2[None, :, None])
    x = jnp.clip(x, MEAN_FLOOR, -MEAN_FLOOR)
    return jnp.where(c, x, -1.0), (e1, e2)


def standardised_samples(samples, ranking, cand, bandwidth):
    """Samples ``(S, B, n)`` of any float dtype in the frame of each user's grid (a concrete float64 input
    located in NumPy float64 first), and ``bandwidth`` (None or ``(B, n)`` in score units) in the same
    frame, kept within ``[STD_FLOOR, STD_CEIL]``: ``(x' (S, B, n), h' (B, n) or None)``."""
    if host_float64(samples):
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
    h = times_pow2(jnp, times_pow2(jnp, jnp.asarray(bandwidth, jnp.float32), e1[:, None]), e2[:, None])
    return x, jnp.clip(h, STD_FLOOR, STD_CEIL)
