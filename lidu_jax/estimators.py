"""LiDu from per-item Gaussian score distributions: the functions users call.

For one user with candidate items C, independent scores ``S_i ~ N(mean_i, std_i^2)`` and a ranked list
``L = (l_1, ..., l_K)`` of candidates,

    P(L) = Pr[S_{l_1} > S_{l_2} > ... > S_{l_K} > max_{j in C \\ L} S_j],      LiDu = -log P(L_top-K)

(a reconstruction from the abstract of arXiv 2507.23208; docs/maths-lidu.md). Methods:
``"exact"`` (grid recursion), ``"sequential"``, ``"pairwise"``; ``ordered=False`` for the unordered top-K
set, ``per_position=True`` for ``-log P / K``. The maths, one function per estimator, is
`lidu_jax.reference`; samples instead of Gaussians: `lidu_jax.samples`; users over devices:
`lidu_jax.sharding`.

What this module adds around the maths, in order: the checks (`lidu_jax.validation`: ``ValueError`` on
concrete inputs, NaN rows under `jax.jit`, eager messages under `jax.jit` from the ``checked_*`` variants),
each user's scores in the frame of its grid (`lidu_jax.standardise`: LiDu is invariant to ``a x + b``, so
any scale or offset reaches the float32 grid as the same O(1) numbers), users in chunks (bounded memory,
one compilation per chunk shape) with rest items far below the list pruned per chunk, and the backend
(`lidu_jax.backend`: from where the arrays live, or ``backend=``).

Pruning: a rest item whose CDF is ``>= Phi(6)`` over the whole grid has ``log F_j > -1e-9``; `lidu` and
`lidu_chunked` keep a static power-of-two item budget per chunk that holds every other item, so pruning
changes ``log P`` by at most ``n_items * 1e-9``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import reference
from lidu_jax.backend import default_tile_size, gaussian_log_prob, resolve_backend
from lidu_jax.standardise import as_float, host_float64, host_locate, locate, standardise, standardised
from lidu_jax.types import LiduResult
from lidu_jax.validation import (
    check_count,
    check_grid,
    check_k,
    check_method,
    check_shapes,
    check_values,
    checkify_values,
    is_concrete,
    raise_checkify_error,
    renamed,
    rows_ok,
)

__all__ = [
    "DEFAULT_GRID_SIZE",
    "METHODS",
    "LiduResult",
    "checked_lidu",
    "checked_list_log_prob",
    "lidu",
    "lidu_chunked",
    "list_log_prob",
    "top_k_rankings",
]

DEFAULT_GRID_SIZE = 512
METHODS = ("exact", "sequential", "pairwise")


def _flatten(x, n_batch_dims):
    return None if x is None else x.reshape((-1, *x.shape[n_batch_dims:]))


def _lidu_values(log_p: jax.Array, k: int, per_position: bool) -> jax.Array:
    return reference.per_position_lidu(log_p, k) if per_position else -log_p


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
    backend: str | None = None,
) -> jax.Array:
    """``log P(L) = log Pr[S_{l_1} > ... > S_{l_K} > max_{j in C \\ L} S_j]`` of each user's ranked list
    under independent Gaussian item scores ``N(mean, std^2)``; unchanged by ``mean -> a mean + b``, ``std ->
    a std`` (``a > 0``, per user).

    Jittable and vmappable (``method``, ``grid_size``, ``ordered``, ``max_items``, ``backend`` are static).
    On concrete inputs bad values raise ``ValueError`` before any computation; under `jax.jit` the users whose
    inputs fail a check (NaN/inf mean, std not > 0, bad or duplicate ids, ...) get NaN
    (`checked_list_log_prob` raises eager mode's ``ValueError`` instead).

    Args:
      mean: ``(..., n_items)`` finite score means; leading dims are batch (users).
      std: ``(..., n_items)`` score stds, > 0 (a subnormal std counts as 0).
      ranking: ``(..., K)`` int item ids, the list from rank 1 to rank K (distinct candidates).
      candidates: optional ``(..., n_items)`` bool; False items (e.g. training items) are ignored.
      method: ``"exact"``, ``"sequential"`` or ``"pairwise"`` (`lidu_jax.reference`).
      grid_size: number of grid cells ``G`` for the grid methods.
      ordered: False gives the unordered set probability ``Pr[min_L S > max_rest S]``.
      max_items: if set (>= 1), only the ``max_items`` rest items with the highest ``mean + 6 std`` enter
        ``H``: exact (to ``n_items * 1e-9`` in log P) when every other rest item lies far below the list.
      backend: ``"cpu"``, ``"accelerator"`` or None (from where the arrays live; `lidu_jax.backend`).

    Returns:
      ``(...)`` float32 log-probabilities (<= 0); ``(0,)`` for zero users.
    """
    check_method(method, METHODS)
    check_grid(grid_size)
    check_count("max_items", max_items)
    mean, std, ranking = as_float(mean), as_float(std), jnp.asarray(ranking)
    candidates = None if candidates is None else jnp.asarray(candidates)
    check_shapes(mean, std, ranking, candidates)
    backend = resolve_backend(backend, mean, std, ranking, candidates)
    concrete = is_concrete(mean, std, ranking, candidates)
    if concrete:
        check_values(mean, std, ranking, candidates)
    batch = mean.shape[:-1]
    nb = len(batch)
    m, s = _flatten(mean, nb), _flatten(std, nb)
    r = _flatten(ranking.astype(jnp.int32), nb)
    c = jnp.ones(m.shape, bool) if candidates is None else _flatten(candidates.astype(bool), nb)
    if m.shape[0] == 0:
        return jnp.zeros(batch, jnp.float32)
    out = gaussian_log_prob(
        *standardised(m, s, r, c),
        r,
        c,
        method=method,
        ordered=ordered,
        grid_size=grid_size,
        n_keep=max_items,
        backend=backend,
        tile_size=default_tile_size(backend),
    )
    if not concrete:
        out = jnp.where(rows_ok(m, s, r, c), out, jnp.nan)
    return out.reshape(batch)


def top_k_rankings(mean: jax.Array, k: int, candidates: jax.Array | None = None) -> jax.Array:
    """``(..., k)`` int32: each user's top-k candidates by ``mean`` (ties to the lower id).

    A float64 ``mean`` is ranked after its per-user offset is removed in float64
    (`lidu_jax.standardise.locate`), so an offset far above the spread of the means (``1e7 + N(0, 1)``)
    does not merge them in float32."""
    mean = as_float(mean)
    cand = None if candidates is None else jnp.asarray(candidates, bool)
    if isinstance(mean, np.ndarray):
        mean = jnp.asarray(
            host_locate(mean, np.zeros_like(mean), None if cand is None else np.asarray(cand))[0]
        )
    elif mean.dtype == jnp.float64:
        c = jnp.ones(mean.shape, bool) if cand is None else cand
        mean = locate(jnp, mean, jnp.zeros_like(mean), c)[0].astype(jnp.float32)
    if cand is not None:
        mean = jnp.where(cand, mean, -jnp.inf)
    return jax.lax.top_k(mean, k)[1].astype(jnp.int32)


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
    backend: str | None = None,
) -> LiduResult:
    """LiDu of each user's own top-k list: ``LiDu_u = -log P_u(L_u)`` with ``L_u`` the top-k candidates by
    mean (`list_log_prob`); unchanged by ``mean -> a mean + b``, ``std -> a std`` (``a > 0``, per user).

    On concrete inputs the users go through `lidu_chunked` ``chunk_size`` at a time (bounded memory; rest
    items far below the list pruned per chunk without changing the result). Under `jax.jit` / `jax.vmap`
    everything runs as one traced computation without pruning, and users with invalid inputs get NaN
    (`checked_lidu` raises eager mode's ``ValueError`` instead).

    Args:
      mean, std: ``(..., n_items)``; see `list_log_prob`.
      k: list length K.
      candidates: optional ``(..., n_items)`` bool.
      method, grid_size, ordered, backend: see `list_log_prob`.
      per_position: ``-log P / K`` instead of ``-log P``.
      chunk_size: users per jitted call (>= 1).

    Returns:
      `LiduResult` ``(values (...), rankings (..., k) int32)``; higher LiDu = more uncertain. Zero users give
      empty arrays.
    """
    check_method(method, METHODS)
    check_grid(grid_size)
    check_count("chunk_size", chunk_size, allow_none=False)
    mean, std = as_float(mean), as_float(std)
    candidates = None if candidates is None else jnp.asarray(candidates, bool)
    check_shapes(mean, std, None, candidates)
    check_k(k, mean.shape[-1])
    backend = resolve_backend(backend, mean, std, candidates)
    kw = dict(method=method, grid_size=grid_size, ordered=ordered, backend=backend)
    if not is_concrete(mean, std, candidates):
        rankings = top_k_rankings(mean, k, candidates)
        log_p = list_log_prob(mean, std, rankings, candidates=candidates, **kw)
        return LiduResult(_lidu_values(log_p, k, per_position), rankings)
    check_values(mean, std, None, candidates, k=k)
    batch, n = mean.shape[:-1], mean.shape[-1]
    nb = len(batch)
    m, s = _flatten(mean, nb), _flatten(std, nb)
    c = None if candidates is None else _flatten(candidates, nb)
    chunks = (
        (m[i : i + chunk_size], s[i : i + chunk_size], None if c is None else c[i : i + chunk_size])
        for i in range(0, m.shape[0], chunk_size)
    )
    size = max(1, min(chunk_size, m.shape[0]))
    values, ranks = lidu_chunked(chunks, k, per_position=per_position, chunk_size=size, n_items=n, **kw)
    return LiduResult(values.reshape(batch), ranks.reshape((*batch, k)))


@jax.jit
def _needed_rest_items(mean, std, ranking, cand):
    """Per user, the number of rest items NOT far below the grid's low end (they must be kept)."""
    mu_l = jnp.take_along_axis(mean, ranking, axis=1)
    sd_l = jnp.take_along_axis(std, ranking, axis=1)
    lo, _ = reference.grid_bounds(mean, mu_l, sd_l, ranking, cand)
    rest = reference.rest_mask(ranking, cand)
    return jnp.sum(rest & (mean + reference.PRUNE_Z * std > lo[:, None]), axis=1)


def _item_budget(needed: np.ndarray, n_items: int) -> int | None:
    """Static item budget for a chunk: the next power of two >= the largest need (None = keep all)."""
    m = int(np.max(needed)) if needed.size else 0
    budget = max(16, 1 << max(0, (m - 1).bit_length()))
    return None if budget >= n_items else budget


_OLD_NAMES = {"pad_to": "chunk_size", "tile": "tile_size"}  # lidu_chunked's deprecated keyword names


def lidu_chunked(
    chunks: Iterable[tuple[jax.Array, jax.Array, jax.Array | None]],
    k: int,
    *,
    method: str = "exact",
    grid_size: int = DEFAULT_GRID_SIZE,
    ordered: bool = True,
    per_position: bool = False,
    chunk_size: int | None = None,
    n_items: int | None = None,
    tile_size: int | None = None,
    trim_cells: bool = True,
    backend: str | None = None,
    **deprecated: Any,
) -> LiduResult:
    """LiDu over a stream of user chunks ``(mean (B, n), std (B, n), candidates (B, n) or None)``.

    Only one chunk is alive at a time, so peak memory does not grow with the number of users when the chunks
    are produced lazily (e.g. scored from a model chunk by chunk). Each chunk is validated, standardised per
    user (a float64 chunk located in float64 first), padded to ``chunk_size`` users (one compilation for all
    chunks) and pruned to a power-of-two item budget that keeps every rest item not far below its user's
    list; on the CPU backend ``trim_cells`` leaves out each user's low grid cells where ``H <= e^-30 P``
    (`lidu_jax.cpu_backend`). Neither changes ``log P`` beyond float32 rounding.

    Args:
      chunks: iterable of ``(mean, std, candidates)``; chunks of zero users are skipped.
      k, method, grid_size, ordered, per_position, backend: as `lidu` (the backend is resolved per chunk).
      chunk_size: users per jitted call: smaller chunks are padded to it (None: each chunk as it comes).
      n_items: if set, every chunk must have this many items.
      tile_size: users per step inside one call (default `lidu_jax.backend.default_tile_size`; one at least
        the chunk's size walks the whole chunk at once).
      trim_cells: see above (CPU only).
      **deprecated: ``pad_to`` (now ``chunk_size``) and ``tile`` (now ``tile_size``), with a warning.

    Returns:
      `LiduResult` ``(values (U,), rankings (U, k) int32)`` (``(0,)``, ``(0, k)`` when there are no users).
    """
    sizes = renamed("lidu_chunked", deprecated, _OLD_NAMES, chunk_size=chunk_size, tile_size=tile_size)
    chunk_size, tile_size = sizes["chunk_size"], sizes["tile_size"]
    check_method(method, METHODS)
    check_grid(grid_size)
    for name, value in (("chunk_size", chunk_size), ("n_items", n_items), ("tile_size", tile_size)):
        check_count(name, value)
    check_k(k, k if n_items is None else n_items)
    values, ranks = [], []
    for mean, std, cand in chunks:
        mean, std = as_float(mean), as_float(std)
        cand = jnp.ones(mean.shape, bool) if cand is None else jnp.asarray(cand, bool)
        if mean.ndim != 2:
            raise ValueError(f"each chunk's mean must be (B, n_items), got {mean.shape}")
        check_shapes(mean, std, None, cand)
        if n_items is not None and mean.shape[1] != n_items:
            raise ValueError(f"chunk has {mean.shape[1]} items, expected {n_items}")
        check_k(k, mean.shape[1])
        check_values(mean, std, None, cand, k=k)
        b = mean.shape[0]
        if b == 0:
            continue
        if host_float64(mean, std):
            mean, std = host_locate(mean, std, cand)
        mean, std = jnp.asarray(mean), jnp.asarray(std)
        if chunk_size is not None and b < chunk_size:
            reps = chunk_size - b
            mean = jnp.concatenate([mean, jnp.broadcast_to(mean[-1:], (reps, mean.shape[1]))])
            std = jnp.concatenate([std, jnp.broadcast_to(std[-1:], (reps, std.shape[1]))])
            cand = jnp.concatenate([cand, jnp.broadcast_to(cand[-1:], (reps, cand.shape[1]))])
        chunk_backend = resolve_backend(backend, mean)
        rankings = top_k_rankings(mean, k, cand)
        mean, std = standardise(mean, std, rankings, cand)
        n_keep = None
        if method != "pairwise":
            n_keep = _item_budget(np.asarray(_needed_rest_items(mean, std, rankings, cand)), mean.shape[1])
        log_p = gaussian_log_prob(
            mean,
            std,
            rankings,
            cand,
            method=method,
            ordered=ordered,
            grid_size=grid_size,
            n_keep=n_keep,
            backend=chunk_backend,
            tile_size=default_tile_size(chunk_backend) if tile_size is None else tile_size,
            trim=trim_cells,
        )
        values.append(np.asarray(_lidu_values(log_p, k, per_position))[:b])
        ranks.append(np.asarray(rankings)[:b])
    if not values:
        return LiduResult(jnp.zeros(0, jnp.float32), jnp.zeros((0, k), jnp.int32))
    return LiduResult(jnp.asarray(np.concatenate(values)), jnp.asarray(np.concatenate(ranks)))


# ----------------------------------------------------------------------------------------- checkify variants


@functools.lru_cache(maxsize=64)
def _checked_fn(kind: str, statics: tuple):
    """A jitted `jax.experimental.checkify` function: the value checks, then the estimator."""
    from jax.experimental import checkify

    if kind == "lidu":
        k, method, grid_size, ordered, per_position, backend = statics

        def fn(mean, std, cand):
            checkify_values(mean, std, None, cand, k)
            kw = dict(method=method, grid_size=grid_size, ordered=ordered, per_position=per_position)
            return lidu(mean, std, k, candidates=cand, backend=backend, **kw)

    else:
        method, grid_size, ordered, max_items, backend = statics

        def fn(mean, std, ranking, cand):
            checkify_values(mean, std, ranking, cand)
            kw = dict(method=method, grid_size=grid_size, ordered=ordered, max_items=max_items)
            return list_log_prob(mean, std, ranking, candidates=cand, backend=backend, **kw)

    return jax.jit(checkify.checkify(fn))


def _checked_inputs(mean, std, ranking, candidates, k):
    """Inputs of a checked estimator: shapes checked; a concrete float64 input is checked eagerly (same
    messages) and located in float64 before it enters the float32 jit."""
    mean, std = as_float(mean), as_float(std)
    candidates = None if candidates is None else jnp.asarray(candidates, bool)
    check_shapes(mean, std, ranking, candidates)
    if host_float64(mean, std):
        check_values(mean, std, ranking, candidates, k)
        mean, std = host_locate(mean, std, candidates)
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
    backend: str | None = None,
) -> LiduResult:
    """`lidu` as one `jax.jit` computation whose value checks are `jax.experimental.checkify` checks: bad
    values raise the ``ValueError`` (same message) that eager `lidu` raises, where plain `lidu` under
    `jax.jit` can only return NaN for the users concerned.

    Args and returns: as `lidu` (``mean, std (..., n_items)``; `LiduResult` ``(values (...), rankings (...,
    k))``).
    """
    check_method(method, METHODS)
    check_grid(grid_size)
    mean, std, cand = _checked_inputs(mean, std, None, candidates, k)
    check_k(k, mean.shape[-1])
    backend = resolve_backend(backend, mean, std, cand)
    statics = (int(k), method, grid_size, bool(ordered), bool(per_position), backend)
    err, out = _checked_fn("lidu", statics)(mean, std, cand)
    raise_checkify_error(err)
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
    backend: str | None = None,
) -> jax.Array:
    """`list_log_prob` as one `jax.jit` computation with `jax.experimental.checkify` value checks: bad values
    raise eager mode's ``ValueError`` (same message). Args and returns: as `list_log_prob` (``(...)``)."""
    check_method(method, METHODS)
    check_grid(grid_size)
    check_count("max_items", max_items)
    ranking = jnp.asarray(ranking)
    mean, std, cand = _checked_inputs(mean, std, ranking, candidates, None)
    backend = resolve_backend(backend, mean, std, ranking, cand)
    statics = (method, grid_size, bool(ordered), max_items, backend)
    err, out = _checked_fn("list", statics)(mean, std, ranking, cand)
    raise_checkify_error(err)
    return out


# The estimators from score samples live in `lidu_jax.samples` (which uses `lidu` for its "gaussian" method,
# hence not imported here); their old names here still work, with a warning.
_MOVED_TO_SAMPLES = (
    "SAMPLE_METHODS",
    "lidu_from_samples",
    "list_log_prob_from_samples",
    "sample_moments",
    "silverman_bandwidth",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_SAMPLES:
        import warnings

        from lidu_jax import samples

        warnings.warn(
            f"lidu_jax.estimators.{name} moved to lidu_jax.samples.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(samples, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
