"""Ranking metrics on full-catalogue rankings and rank-correlation helpers with bootstrap intervals.

Ranking metrics take ``scores (U, n_items)``, a bool ``relevant (U, n_items)`` (held-out items, or the true
top-N for synthetic data) and an optional bool ``candidates (U, n_items)``: True = the item may be
recommended, False = it is left out of the ranking and of the relevant set (e.g. training items). This is the
mask convention of every `lidu_jax` module (estimators, baselines, distributions, studies). They are
jittable and return one value per user. A user with no relevant candidate gets 0 (callers that correlate
per-user metrics drop such users, see `lidu_jax.evaluation`). A NaN score of a candidate has no place in the
ranking: on concrete inputs it raises ``ValueError``, under `jax.jit` that user's metric is NaN (never a
plausible number).

Deprecated: ``exclude=`` (True = left out), the inverse mask these functions took before issue 13, is still
accepted by keyword with a ``DeprecationWarning`` (``exclude=e`` means ``candidates=~e``).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lidu_jax.estimators import top_k_rankings
from lidu_jax.validation import is_concrete

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


def _candidates(candidates, exclude, where: str):
    """The ``candidates`` mask (True = eligible), or ``~exclude`` for a caller of the deprecated keyword."""
    if exclude is None:
        return candidates
    if candidates is not None:
        raise ValueError(f"{where}: give candidates (True = eligible), not also the deprecated exclude")
    warnings.warn(
        f"{where}: exclude= is deprecated; pass candidates=~exclude (True = the item may be recommended)",
        DeprecationWarning,
        stacklevel=3,
    )
    return ~jnp.asarray(exclude, bool)


def _check_rank_inputs(scores, relevant, k, candidates):
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_users, n_items), got shape {scores.shape}")
    if relevant.shape != scores.shape:
        raise ValueError(f"relevant must have the shape of scores {scores.shape}, got {relevant.shape}")
    if candidates is not None and candidates.shape != scores.shape:
        raise ValueError(f"candidates must have the shape of scores {scores.shape}, got {candidates.shape}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an int in [1, n_items={scores.shape[1]}], got {k!r}")
    if is_concrete(scores, candidates):
        nan = np.isnan(np.asarray(scores, np.float64))
        if candidates is not None:
            nan &= np.asarray(candidates, bool)
        if np.any(nan):
            raise ValueError(
                f"scores contain NaN for {int(nan.any(axis=1).sum())} user(s) (a NaN score has no rank)"
            )


def top_k_items(
    scores: jax.Array, k: int, *, candidates: jax.Array | None = None, exclude: jax.Array | None = None
) -> jax.Array:
    """``(U, k)`` int32 item ids of the k highest scores per user, among the candidates (True = eligible).

    The same ranking as `lidu_jax.estimators.top_k_rankings` (it is that function): ties go to the lower
    item id, and a float64 input has each user's offset removed in float64 before the float32 top-k, so
    ``1e7 + N(0, 1)`` scores keep their order. ``exclude`` is the deprecated inverse of ``candidates``.
    """
    candidates = _candidates(candidates, exclude, "top_k_items")
    return top_k_rankings(scores, k, candidates)


def _hits(scores, relevant, k, candidates):
    """``(hits (U, k) bool, n_rel (U,), bad (U,) bool)``: bad = the user has a NaN score on a candidate
    (only possible under tracing; concrete inputs raise)."""
    scores = scores if isinstance(scores, jax.Array | np.ndarray) else np.asarray(scores)
    _check_rank_inputs(scores, relevant, k, candidates)
    top = top_k_rankings(scores, k, candidates)
    rel = jnp.asarray(relevant, bool)
    nan = jnp.isnan(jnp.asarray(scores, jnp.float32))
    if candidates is not None:
        rel = rel & jnp.asarray(candidates, bool)
        nan = nan & jnp.asarray(candidates, bool)
    return jnp.take_along_axis(rel, top, axis=1), jnp.sum(rel, axis=1), jnp.any(nan, axis=1)


def ndcg_at_k(
    scores: jax.Array,
    relevant: jax.Array,
    k: int,
    *,
    candidates: jax.Array | None = None,
    exclude: jax.Array | None = None,
) -> jax.Array:
    """Binary-relevance NDCG@k per user.

    ``DCG = sum_{r=1..k} rel(item at rank r) / log2(r + 1)``,
    ``IDCG = sum_{r=1..min(k, n_rel)} 1 / log2(r + 1)``,
    ``NDCG = DCG / IDCG`` (0 when the user has no relevant candidate).

    Args:
      scores: ``(U, n_items)`` float scores.
      relevant: ``(U, n_items)`` bool ground truth.
      k: list length.
      candidates: optional ``(U, n_items)`` bool, True = the item may be ranked; False items are removed from
        the ranking and from the relevant set (e.g. training items).
      exclude: deprecated inverse of ``candidates`` (``exclude=e`` is ``candidates=~e``).

    Returns:
      ``(U,)`` float32 in [0, 1]; NaN under `jax.jit` for a user with a NaN score (eagerly: ValueError).
    """
    hits, n_rel, bad = _hits(scores, relevant, k, _candidates(candidates, exclude, "ndcg_at_k"))
    disc = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
    dcg = jnp.sum(hits * disc, axis=1)
    idcg = jnp.sum(jnp.where(jnp.arange(k)[None, :] < n_rel[:, None], disc, 0.0), axis=1)
    return jnp.where(bad, jnp.nan, jnp.where(n_rel > 0, dcg / jnp.maximum(idcg, 1e-12), 0.0))


def recall_at_k(
    scores: jax.Array,
    relevant: jax.Array,
    k: int,
    *,
    candidates: jax.Array | None = None,
    exclude: jax.Array | None = None,
) -> jax.Array:
    """Recall@k per user: ``|top-k ∩ relevant| / |relevant|`` (0 when no relevant candidate). ``(U,)``;
    NaN scores as in `ndcg_at_k`."""
    hits, n_rel, bad = _hits(scores, relevant, k, _candidates(candidates, exclude, "recall_at_k"))
    return jnp.where(bad, jnp.nan, jnp.where(n_rel > 0, jnp.sum(hits, axis=1) / jnp.maximum(n_rel, 1), 0.0))


def hit_at_k(
    scores: jax.Array,
    relevant: jax.Array,
    k: int,
    *,
    candidates: jax.Array | None = None,
    exclude: jax.Array | None = None,
) -> jax.Array:
    """Hit@k per user: 1 if any relevant item is in the top-k, else 0. ``(U,)`` float32; NaN scores as in
    `ndcg_at_k`."""
    hits, _, bad = _hits(scores, relevant, k, _candidates(candidates, exclude, "hit_at_k"))
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


def _c_index_from_tau(tau, n0, n1, n2):
    """Harrell's C from Kendall's tau-b and the pair counts, elementwise (NumPy broadcasting).

    ``n0`` pairs in all, ``n1`` tied in pred, ``n2`` tied in target: the comparable pairs are ``n0 - n2``,
    and ``tau_b * sqrt((n0 - n1)(n0 - n2))`` is (concordant - discordant), so
    ``C = (concordant + 0.5 * pred-tied) / comparable``
    ``  = 1/2 + tau_b * sqrt((n0 - n1)(n0 - n2)) / (2 (n0 - n2))``;
    0.5 where no pair is comparable or pred is constant.
    """
    tau, n0, n1, n2 = (np.asarray(a, np.float64) for a in (tau, n0, n1, n2))
    ok = (n0 - n1 > 0) & (n0 - n2 > 0)
    safe = np.where(ok, n0 - n2, 1.0)
    return np.where(ok, 0.5 + 0.5 * tau * np.sqrt(np.maximum(n0 - n1, 0) / safe), 0.5)


def c_index(pred: np.ndarray, target: np.ndarray) -> float:
    """Harrell's concordance index of ``pred`` for ``target``.

    Over pairs with ``target_i != target_j``: ``C = (concordant + 0.5 * pred-tied) / comparable``, computed
    in O(U log U) from Kendall's tau-b (`_c_index_from_tau`). Returns 0.5 when no pair is comparable.
    """
    pred, target = _check_pair(pred, target)
    n = pred.size
    tau = stats.kendalltau(pred, target).statistic
    tau = 0.0 if np.isnan(tau) else tau
    return float(_c_index_from_tau(tau, n * (n - 1) / 2.0, _tied_pairs(pred), _tied_pairs(target)))


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
