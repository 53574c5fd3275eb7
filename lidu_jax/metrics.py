"""Ranking metrics on full-catalogue rankings and rank-correlation helpers with bootstrap intervals.

Ranking metrics take ``scores (U, n_items)``, a bool ``relevant (U, n_items)`` (held-out items, or the true
top-N for synthetic data) and an optional bool ``exclude (U, n_items)`` (training items, never recommended).
They are jittable and return one value per user. A user with no relevant item gets 0 (callers that correlate
per-user metrics drop such users, see `lidu_jax.evaluation`). A NaN score of a ranked (not excluded) item has
no place in the ranking: on concrete inputs it raises ``ValueError``, under `jax.jit` that user's metric is
NaN (never a plausible number).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

__all__ = [
    "bootstrap_ci",
    "c_index",
    "hit_at_k",
    "kendall_tau",
    "ndcg_at_k",
    "recall_at_k",
    "spearman",
    "top_k_items",
]


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _check_rank_inputs(scores, relevant, k, exclude):
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_users, n_items), got shape {scores.shape}")
    if relevant.shape != scores.shape:
        raise ValueError(f"relevant must have the shape of scores {scores.shape}, got {relevant.shape}")
    if exclude is not None and exclude.shape != scores.shape:
        raise ValueError(f"exclude must have the shape of scores {scores.shape}, got {exclude.shape}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an int in [1, n_items={scores.shape[1]}], got {k!r}")
    if _is_concrete(scores, exclude):
        nan = np.isnan(np.asarray(scores, np.float64))
        if exclude is not None:
            nan &= ~np.asarray(exclude, bool)
        if np.any(nan):
            raise ValueError(
                f"scores contain NaN for {int(nan.any(axis=1).sum())} user(s) (a NaN score has no rank)"
            )


def _scores32(scores, exclude):
    """Float32 scores ranked like the input: a concrete float64 input has each user's top score subtracted
    in float64 first, so an offset far above the spread (``1e7 + N(0, 1)``) does not merge scores."""
    if _is_concrete(scores) and np.asarray(scores).dtype == np.float64:
        s = np.asarray(scores, np.float64)
        ranked = s if exclude is None else np.where(np.asarray(exclude, bool), -np.inf, s)
        top = np.max(ranked, axis=1, keepdims=True, initial=-np.inf)
        with np.errstate(invalid="ignore"):
            s = s - np.where(np.isfinite(top), top, 0.0)
        return jnp.asarray(s.astype(np.float32))
    return jnp.asarray(scores, jnp.float32)


def top_k_items(scores: jax.Array, k: int, exclude: jax.Array | None = None) -> jax.Array:
    """``(U, k)`` int32 item ids of the k highest scores per user, excluded items never chosen.

    Ties are broken by the lower item id (`jax.lax.top_k`).
    """
    scores = _scores32(scores, exclude)
    if exclude is not None:
        scores = jnp.where(jnp.asarray(exclude, bool), -jnp.inf, scores)
    return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


def _hits(scores, relevant, k, exclude):
    """``(hits (U, k) bool, n_rel (U,), bad (U,) bool)``: bad = the user has a NaN score on a ranked item
    (only possible under tracing; concrete inputs raise)."""
    scores = scores if isinstance(scores, jax.Array | np.ndarray) else np.asarray(scores)
    _check_rank_inputs(scores, relevant, k, exclude)
    top = top_k_items(scores, k, exclude)
    rel = jnp.asarray(relevant, bool)
    nan = jnp.isnan(jnp.asarray(scores, jnp.float32))
    if exclude is not None:
        rel = rel & ~jnp.asarray(exclude, bool)
        nan = nan & ~jnp.asarray(exclude, bool)
    return jnp.take_along_axis(rel, top, axis=1), jnp.sum(rel, axis=1), jnp.any(nan, axis=1)


def ndcg_at_k(
    scores: jax.Array, relevant: jax.Array, k: int, *, exclude: jax.Array | None = None
) -> jax.Array:
    """Binary-relevance NDCG@k per user.

    ``DCG = sum_{r=1..k} rel(item at rank r) / log2(r + 1)``,
    ``IDCG = sum_{r=1..min(k, n_rel)} 1 / log2(r + 1)``,
    ``NDCG = DCG / IDCG`` (0 when the user has no relevant candidate).

    Args:
      scores: ``(U, n_items)`` float scores.
      relevant: ``(U, n_items)`` bool ground truth.
      k: list length.
      exclude: optional ``(U, n_items)`` bool, items removed from the ranking (and from the relevant set).

    Returns:
      ``(U,)`` float32 in [0, 1]; NaN under `jax.jit` for a user with a NaN score (eagerly: ValueError).
    """
    hits, n_rel, bad = _hits(scores, relevant, k, exclude)
    disc = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
    dcg = jnp.sum(hits * disc, axis=1)
    idcg = jnp.sum(jnp.where(jnp.arange(k)[None, :] < n_rel[:, None], disc, 0.0), axis=1)
    return jnp.where(bad, jnp.nan, jnp.where(n_rel > 0, dcg / jnp.maximum(idcg, 1e-12), 0.0))


def recall_at_k(
    scores: jax.Array, relevant: jax.Array, k: int, *, exclude: jax.Array | None = None
) -> jax.Array:
    """Recall@k per user: ``|top-k ∩ relevant| / |relevant|`` (0 when no relevant candidate). ``(U,)``;
    NaN scores as in `ndcg_at_k`."""
    hits, n_rel, bad = _hits(scores, relevant, k, exclude)
    return jnp.where(bad, jnp.nan, jnp.where(n_rel > 0, jnp.sum(hits, axis=1) / jnp.maximum(n_rel, 1), 0.0))


def hit_at_k(
    scores: jax.Array, relevant: jax.Array, k: int, *, exclude: jax.Array | None = None
) -> jax.Array:
    """Hit@k per user: 1 if any relevant item is in the top-k, else 0. ``(U,)`` float32; NaN scores as in
    `ndcg_at_k`."""
    hits, _, bad = _hits(scores, relevant, k, exclude)
    return jnp.where(bad, jnp.nan, jnp.any(hits, axis=1).astype(jnp.float32))


def _check_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError("need at least 2 users to correlate")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    return x, y


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b between ``(U,)`` arrays (scipy); 0 when either is constant."""
    x, y = _check_pair(x, y)
    t = stats.kendalltau(x, y).statistic
    return 0.0 if np.isnan(t) else float(t)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho between ``(U,)`` arrays (scipy); 0 when either is constant."""
    x, y = _check_pair(x, y)
    r = stats.spearmanr(x, y).statistic
    return 0.0 if np.isnan(r) else float(r)


def _tied_pairs(v: np.ndarray) -> float:
    _, counts = np.unique(v, return_counts=True)
    return float(np.sum(counts * (counts - 1) / 2.0))


def c_index(pred: np.ndarray, target: np.ndarray) -> float:
    """Harrell's concordance index of ``pred`` for ``target``.

    Over pairs with ``target_i != target_j``: ``C = (concordant + 0.5 * pred-tied) / comparable``. Computed
    in O(U log U) from Kendall's tau-b: with ``n0 = U(U-1)/2`` pairs, ``n1`` pairs tied in pred and ``n2``
    tied in target, ``C = 1/2 + tau_b * sqrt((n0 - n1)(n0 - n2)) / (2 (n0 - n2))``.
    Returns 0.5 when no pair is comparable.
    """
    pred, target = _check_pair(pred, target)
    n = pred.size
    n0 = n * (n - 1) / 2.0
    n1, n2 = _tied_pairs(pred), _tied_pairs(target)
    if n0 - n2 <= 0 or n0 - n1 <= 0:
        return 0.5
    tau = stats.kendalltau(pred, target).statistic
    if np.isnan(tau):
        return 0.5
    return float(0.5 + tau * np.sqrt((n0 - n1) * (n0 - n2)) / (2.0 * (n0 - n2)))


def bootstrap_ci(
    stat, x: np.ndarray, y: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Statistic on ``(x, y)`` and its percentile bootstrap interval over users.

    Args:
      stat: ``stat(x, y) -> float`` (e.g. `kendall_tau`).
      x, y: ``(U,)`` arrays, paired per user.
      n_boot: bootstrap resamples of the users (with replacement).
      seed: seed of the resampling (same seed = same resamples, so estimators can be compared pairwise).
      level: coverage of the interval.

    Returns:
      ``(value, lo, hi)``.
    """
    x, y = _check_pair(x, y)
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    boots = np.array([stat(x[i], y[i]) for i in idx])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return stat(x, y), float(lo), float(hi)
