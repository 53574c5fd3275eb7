"""LiDu from sampled score vectors (ensemble members, bootstrap copies, dropout passes, posterior draws).

``samples (n_samples, ..., n_items)``: draw ``s`` holds one score per item for every user. Methods:

- ``"kde"``: each item's density is a Gaussian kernel density on its own samples (bandwidth per item,
  Silverman's rule by default), items independent, then the exact recursion
  (`lidu_jax.reference.kde_log_prob`);
- ``"gaussian"``: per-item ``N(mean, std^2)`` fitted to the samples (ddof=1), then exact Gaussian LiDu
  (`lidu_jax.estimators.lidu`);
- ``"mc"``: the add-half smoothed fraction of the joint draws whose top-K list, in order, is ``L``
  (`lidu_jax.reference.mc_log_prob`); coarse unless there are many draws.

Each user's samples are first mapped to the frame of its list's grid (`lidu_jax.standardise`), so the result
does not change under ``x -> a x + b`` (``a > 0``, per user), a given ``bandwidth`` scaled with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import reference
from lidu_jax.backend import resolve_backend
from lidu_jax.estimators import DEFAULT_GRID_SIZE, lidu, list_log_prob, top_k_rankings
from lidu_jax.standardise import as_float, standardised_samples
from lidu_jax.types import LiduResult
from lidu_jax.validation import (
    check_count,
    check_grid,
    check_k,
    check_method,
    check_min_std,
    check_samples,
    check_shapes,
    check_values,
    is_concrete,
    rows_ok,
)

__all__ = [
    "SAMPLE_METHODS",
    "lidu_from_samples",
    "list_log_prob_from_samples",
    "sample_moments",
    "silverman_bandwidth",
]

SAMPLE_METHODS = ("kde", "gaussian", "mc")


def sample_moments(samples: jax.Array, min_std: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Per-item mean and std (ddof=1, floored at ``min_std``) over the sample axis 0: ``(..., n_items)``
    each."""
    samples = jnp.asarray(samples, jnp.float32)
    return samples.mean(0), jnp.maximum(samples.std(0, ddof=1), min_std)


def silverman_bandwidth(samples: jax.Array, min_std: float = 1e-6) -> jax.Array:
    """Per-item Gaussian-kernel bandwidth ``h = 1.06 * std * S^(-1/5)`` (Silverman's rule) for ``samples (S,
    ..., n_items)``: ``(..., n_items)``."""
    _, sd = sample_moments(samples, min_std)
    return 1.06 * sd * samples.shape[0] ** (-0.2)


_flatten = lambda x, nb: None if x is None else x.reshape((-1, *x.shape[nb:]))

_kde = jax.jit(reference.kde_log_prob, static_argnames=("grid_size", "ordered", "materialise"))
_mc = jax.jit(reference.mc_log_prob)


def _lidu_values(log_p: jax.Array, k: int, per_position: bool) -> jax.Array:
    return reference.per_position_lidu(log_p, k) if per_position else -log_p


def _check_finite(samples) -> None:
    if is_concrete(samples) and not np.all(np.isfinite(np.asarray(samples))):
        raise ValueError("samples contain NaN or inf")


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
    backend: str | None = None,
) -> jax.Array:
    """``log P(L)`` of each user's list from sampled score vectors (module docstring for the methods).

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
      backend: as `lidu_jax.estimators.list_log_prob`.

    Returns:
      ``(...)`` float32 log-probabilities; under `jax.jit`, NaN for users with invalid inputs.
    """
    check_method(method, SAMPLE_METHODS)
    check_grid(grid_size)
    check_min_std(min_std)
    samples, ranking = as_float(samples), jnp.asarray(ranking)
    check_samples(samples)
    candidates = None if candidates is None else jnp.asarray(candidates, bool)
    check_shapes(samples[0], samples[0], ranking, candidates)
    if method == "mc" and not ordered:
        raise ValueError("method='mc' supports ordered lists only")
    backend = resolve_backend(backend, samples, ranking, candidates)
    concrete = is_concrete(samples, ranking, candidates, bandwidth)
    if concrete:
        _check_finite(samples)
    h = None
    if bandwidth is not None:
        h = as_float(bandwidth)
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
    x, h = standardised_samples(flat, r, c, None if h is None else _flatten(h, nb))
    mean, std = sample_moments(x, min_std)
    if concrete:
        check_values(mean, std, r, c)
    if method == "gaussian":
        kw = dict(method="exact", grid_size=grid_size, ordered=ordered, backend=backend)
        out = list_log_prob(mean, std, r, candidates=c, **kw)
    elif method == "mc":
        out = _mc(x, r, c)
    else:
        h = silverman_bandwidth(x, min_std) if h is None else h
        out = _kde(x, h, r, c, grid_size=grid_size, ordered=ordered, materialise=backend != "cpu")
    if not concrete:
        ok = rows_ok(mean, std, r, c) & jnp.all(jnp.isfinite(flat), axis=(0, 2))
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
    backend: str | None = None,
) -> LiduResult:
    """LiDu from score samples: the list is each user's top-k candidates by the sample mean; unchanged by
    ``samples -> a samples + b`` (``a > 0``, per user).

    Args:
      samples: ``(n_samples, ..., n_items)``.
      k: list length.
      chunk_size: users per jitted call on concrete inputs (>= 1; the KDE evaluates ``G * n_items *
        n_samples`` CDFs per user).
      Others: see `list_log_prob_from_samples` and `lidu_jax.estimators.lidu`.

    Returns:
      `LiduResult` ``(values (...), rankings (..., k) int32)``; empty arrays for zero users.
    """
    check_method(method, SAMPLE_METHODS)
    check_grid(grid_size)
    check_count("chunk_size", chunk_size, allow_none=False)
    check_min_std(min_std)
    samples = as_float(samples)
    check_samples(samples)
    check_k(k, samples.shape[-1])
    cand = None if candidates is None else jnp.asarray(candidates, bool)
    batch = samples.shape[1:-1]
    _check_finite(samples)
    rankings = top_k_rankings(samples.mean(0), k, cand)
    if method == "gaussian":
        nb = len(batch)
        flat = samples.reshape((samples.shape[0], -1, samples.shape[-1]))
        c = jnp.ones(flat.shape[1:], bool) if cand is None else _flatten(cand, nb)
        if flat.shape[1] == 0:
            return LiduResult(jnp.zeros(batch, jnp.float32), jnp.zeros((*batch, k), jnp.int32))
        x, _ = standardised_samples(flat, _flatten(rankings, nb), c, None)
        mean, std = sample_moments(x, min_std)
        kw = dict(method="exact", grid_size=grid_size, ordered=ordered, per_position=per_position)
        shape = samples.shape[1:]
        return lidu(mean.reshape(shape), std.reshape(shape), k, candidates=cand, backend=backend, **kw)
    kwargs = dict(
        method=method,
        grid_size=grid_size,
        bandwidth=bandwidth,
        ordered=ordered,
        min_std=min_std,
        backend=backend,
    )
    if not is_concrete(samples, candidates, bandwidth) or len(batch) != 1 or batch[0] <= chunk_size:
        log_p = list_log_prob_from_samples(samples, rankings, candidates=candidates, **kwargs)
        return LiduResult(_lidu_values(log_p, k, per_position), rankings)
    bw = None if bandwidth is None else np.broadcast_to(np.asarray(bandwidth), samples.shape[1:])
    parts = []
    for i in range(0, batch[0], chunk_size):
        sl = slice(i, i + chunk_size)
        kw = dict(kwargs, bandwidth=None if bw is None else bw[sl])
        c = None if cand is None else cand[sl]
        parts.append(list_log_prob_from_samples(samples[:, sl], rankings[sl], candidates=c, **kw))
    return LiduResult(_lidu_values(jnp.concatenate(parts), k, per_position), rankings)
