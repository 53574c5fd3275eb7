"""N:M masks: which entries of a weight matrix survive, and how masks change over training.

A N:M mask keeps the ``n`` largest scores in every group of ``m`` consecutive entries along the contraction
axis of a kernel. For a Flax ``nn.Dense`` kernel of shape ``(in, out)`` that axis is 0: each output column is
cut into ``in // m`` groups of ``m`` input rows, and ``n`` rows survive in each group. This is the layout
sparse tensor cores consume (2:4 by default).

Everything here is a pure, jittable function on arrays (or pytrees of arrays).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "check_nm",
    "flip_count",
    "mask_density",
    "nm_mask",
    "tree_flip_count",
    "tree_size",
    "validate_nm",
    "wanda_scores",
]


def validate_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``0 < n < m`` (``n == m`` would be a dense 'mask')."""
    if not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"n and m must be Python ints, got n={n!r}, m={m!r}")
    if m < 2:
        raise ValueError(f"m must be >= 2, got m={m}")
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m for an n:m mask, got n={n}, m={m}")


def _group_view(x: jax.Array, m: int, axis: int) -> jax.Array:
    """``x`` with ``axis`` moved to the front and split into groups: shape ``(K // m, m, rest...)``."""
    x = jnp.moveaxis(x, axis, 0)
    return x.reshape((x.shape[0] // m, m, *x.shape[1:]))


def _ungroup(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`_group_view`."""
    x = x.reshape((x.shape[0] * x.shape[1], *x.shape[2:]))
    return jnp.moveaxis(x, 0, axis)


def nm_mask(
    w: jax.Array,
    n: int = 2,
    m: int = 4,
    *,
    axis: int = 0,
    scores: jax.Array | None = None,
) -> jax.Array:
    """Boolean N:M mask keeping the ``n`` largest ``|w|`` (or ``scores``) of every ``m`` consecutive entries.

    Shapes: ``w`` of any rank >= 1 whose ``w.shape[axis]`` is a multiple of ``m``; ``scores`` (optional) has
    the shape of ``w``. Returns a ``bool`` array with the shape of ``w``.

    Within a group ``G`` of ``m`` entries with scores ``s``, entry ``i`` is kept iff

        rank(i) = #{ j in G : s_j > s_i  or  (s_j == s_i and j < i) }  <  n,

    i.e. ties are broken deterministically in favour of the lower index. The rank is computed by ``m``
    vectorised comparisons over all groups at once (no sort, no loop over groups), which is what makes this
    fast on a 4096x4096 matrix. NaN scores are ranked below every finite score, so a NaN never displaces a
    real weight (the optimizer is responsible for never producing NaN weights).
    """
    validate_nm(n, m)
    w = jnp.asarray(w)
    if w.ndim < 1:
        raise ValueError(f"w must have at least one dimension, got shape {w.shape}")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis={axis} out of range for w of shape {w.shape}")
    axis = axis % w.ndim
    if w.shape[axis] % m:
        raise ValueError(
            f"w.shape[{axis}]={w.shape[axis]} (shape {w.shape}) is not a multiple of m={m}; "
            "N:M groups run along the contraction axis and must tile it exactly"
        )
    s = jnp.abs(w) if scores is None else jnp.asarray(scores)
    if s.shape != w.shape:
        raise ValueError(f"scores shape {s.shape} must equal w shape {w.shape}")
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.float32)
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    g = _group_view(s, m, axis)  # (K/m, m, rest...)
    # rank[i] counts the group members that beat member i; a Python loop over the m members of a group
    # (m is 4 or 8) unrolls into m broadcast comparisons over the whole matrix.
    idx = jnp.arange(m).reshape((1, m) + (1,) * (g.ndim - 2))
    rank = jnp.zeros(g.shape, jnp.int32)
    for j in range(m):
        sj = g[:, j : j + 1]
        beats = (sj > g) | ((sj == g) & (j < idx))
        rank = rank + beats.astype(jnp.int32)
    return _ungroup(rank < n, axis)


def wanda_scores(w: jax.Array, input_norms: jax.Array) -> jax.Array:
    """Wanda importance ``S[j, o] = |W[j, o]| * ||X_j||_2`` for a Flax kernel ``w`` of shape ``(in, out)``.

    ``input_norms`` has shape ``(in,)``: the L2 norm of input feature ``j`` over all calibration tokens
    (see :func:`ast_jax.sparsify.collect_input_norms`). Returns an array of shape ``(in, out)``; feed it to
    ``nm_mask(w, n, m, scores=...)`` to get per-output groups along the input dimension.
    """
    w = jnp.asarray(w)
    input_norms = jnp.asarray(input_norms)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D kernel (in, out), got shape {w.shape}")
    if input_norms.shape != (w.shape[0],):
        raise ValueError(
            f"input_norms must have shape ({w.shape[0]},) to match w {w.shape}, got {input_norms.shape}"
        )
    return jnp.abs(w) * input_norms[:, None].astype(w.dtype)


def check_nm(mask_or_w: jax.Array, n: int = 2, m: int = 4, *, axis: int = 0) -> jax.Array:
    """True iff every group of ``m`` consecutive entries along ``axis`` has at most ``n`` non-zeros.

    Works on a mask or on (already masked) weights. Returns a scalar ``bool`` array (jittable).
    """
    validate_nm(n, m)
    x = jnp.asarray(mask_or_w)
    if x.shape[axis] % m:
        return jnp.asarray(False)
    nz = _group_view(x != 0, m, axis % x.ndim).sum(axis=1)
    return jnp.all(nz <= n)


def flip_count(old: jax.Array, new: jax.Array) -> jax.Array:
    """Number of positions where two masks of the same shape differ (int32 scalar)."""
    return jnp.sum(old != new, dtype=jnp.int32)


def mask_density(mask: jax.Array) -> jax.Array:
    """Fraction of kept entries of a mask (float32 scalar)."""
    return jnp.mean(jnp.asarray(mask, jnp.float32))


def _mask_leaves(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree_util.tree_leaves(tree) if x is not None]


def tree_flip_count(old: Any, new: Any) -> jax.Array:
    """Total flips between two mask pytrees of the same structure (``None`` leaves are skipped)."""
    total = jnp.zeros((), jnp.int32)
    for a, b in zip(_mask_leaves(old), _mask_leaves(new), strict=True):
        total = total + flip_count(a, b)
    return total


def tree_size(tree: Any) -> int:
    """Total number of entries of the (non-``None``) leaves of a mask pytree (a Python int)."""
    return int(sum(x.size for x in _mask_leaves(tree)))
