"""Label-free per-user uncertainty estimators to compare LiDu against (our selection; formulas in
``docs/maths-lidu.md``, results in ``docs/results-lidu-synthetic.md``).

Every function returns one value per user, ``(U,)`` float32, with the convention **higher = more uncertain**
(so a confidence-like quantity is negated). Inputs: ``mean`` / ``std`` ``(U, n_items)`` score moments,
``samples`` ``(S, U, n_items)`` score draws, ``candidates`` ``(U, n_items)`` bool (True = the item may be
recommended, False = left out, e.g. training items: the convention of every `lidu_jax` module), ``rankings``
``(U, K)`` the recommended lists (item ids in ``[0, n_items)``).

Concrete inputs are checked (NaN/inf scores or stds, item ids out of range: ``ValueError``), since a bad input
would otherwise give a plausible number (an out-of-range id is silently clamped by a gather). Under
`jax.jit` the users concerned get NaN instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax.validation import is_concrete

__all__ = [
    "all_baselines",
    "list_instability",
    "mean_top_k_score",
    "plackett_luce_entropy",
    "recommended_popularity",
    "score_margin",
    "softmax_entropy",
    "top_k_std",
    "user_activity",
]


def _finite_rows(name: str, x: jax.Array, axes) -> jax.Array:
    """``(U,)`` bool: the users whose ``x`` is finite; raises ``ValueError`` on concrete inputs."""
    ok = jnp.all(jnp.isfinite(x), axis=axes)
    if is_concrete(x) and not bool(jnp.all(ok)):
        raise ValueError(f"{name} contains NaN or inf for {int(jnp.sum(~ok))} user(s)")
    return ok


def _check_rankings(rankings: jax.Array, n_items: int) -> jax.Array:
    """``(U,)`` bool: the users whose list holds only item ids in ``[0, n_items)``; a concrete list with
    another id raises ``ValueError`` (a gather would clamp it to a real item)."""
    if not jnp.issubdtype(rankings.dtype, jnp.integer):
        raise ValueError(f"rankings must be integer item ids, got dtype {rankings.dtype}")
    ok = jnp.all((rankings >= 0) & (rankings < n_items), axis=-1)
    if is_concrete(rankings) and not bool(jnp.all(ok)):
        raise ValueError(f"rankings hold item ids outside [0, {n_items}) for {int(jnp.sum(~ok))} user(s)")
    return ok


def _masked(mean: jax.Array, candidates: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(scores (U, n), ok (U,))``: candidates' means, ``-inf`` elsewhere; ok = finite means."""
    mean = jnp.asarray(mean, jnp.float32)
    if mean.ndim != 2:
        raise ValueError(f"mean must be (n_users, n_items), got {mean.shape}")
    if candidates is None:
        return mean, _finite_rows("mean", mean, 1)
    candidates = jnp.asarray(candidates, bool)
    if candidates.shape != mean.shape:
        raise ValueError(f"candidates must have shape {mean.shape}, got {candidates.shape}")
    # a training item's score is never ranked, so only candidates must be finite
    return jnp.where(candidates, mean, -jnp.inf), _finite_rows("mean", jnp.where(candidates, mean, 0.0), 1)


def _nan_unless(ok: jax.Array, value: jax.Array) -> jax.Array:
    return jnp.where(ok, value, jnp.nan)


def _check_k(k: int, n: int, extra: int = 0) -> None:
    if not 1 <= k <= n - extra:
        raise ValueError(f"k must be in [1, {n - extra}], got {k}")


def mean_top_k_score(mean: jax.Array, k: int, candidates: jax.Array | None = None) -> jax.Array:
    """``-(1/K) sum_{r<=K} s_(r)``: the negated mean of the K highest candidate scores."""
    m, ok = _masked(mean, candidates)
    _check_k(k, m.shape[1])
    return _nan_unless(ok, -jnp.mean(jax.lax.top_k(m, k)[0], axis=1))


def score_margin(mean: jax.Array, k: int, candidates: jax.Array | None = None) -> jax.Array:
    """``-(s_(K) - s_(K+1))``: a small gap between the last recommended and the first left-out item =
    uncertain."""
    m, ok = _masked(mean, candidates)
    _check_k(k, m.shape[1], extra=1)
    top = jax.lax.top_k(m, k + 1)[0]
    return _nan_unless(ok, -(top[:, k - 1] - top[:, k]))


def softmax_entropy(
    mean: jax.Array, candidates: jax.Array | None = None, temperature: float = 1.0
) -> jax.Array:
    """Shannon entropy ``-sum_i p_i log p_i`` of ``p = softmax(s / temperature)`` over the candidates."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m, ok = _masked(mean, candidates)
    m = m / temperature
    logp = jax.nn.log_softmax(m, axis=1)
    return _nan_unless(ok, -jnp.sum(jnp.where(jnp.isfinite(m), jnp.exp(logp) * logp, 0.0), axis=1))


def top_k_std(std: jax.Array, rankings: jax.Array) -> jax.Array:
    """``(1/K) sum_k sigma_{l_k}``: mean predictive std of the recommended items."""
    std = jnp.asarray(std, jnp.float32)
    rankings = jnp.asarray(rankings)
    if std.ndim != 2 or rankings.ndim != 2 or rankings.shape[0] != std.shape[0]:
        raise ValueError(f"std (U, n) and rankings (U, K) must agree, got {std.shape} and {rankings.shape}")
    ok = _check_rankings(rankings, std.shape[1])
    picked = jnp.take_along_axis(std, jnp.clip(rankings, 0, std.shape[1] - 1), axis=1)
    ok = ok & _finite_rows("std", picked, 1)
    return _nan_unless(ok, jnp.mean(picked, axis=1))


def plackett_luce_entropy(
    mean: jax.Array,
    k: int,
    key: jax.Array,
    candidates: jax.Array | None = None,
    n_samples: int = 64,
    temperature: float = 1.0,
) -> jax.Array:
    """Entropy of the top-K list under a Plackett-Luce model with weights ``exp(s / temperature)``.

    ``H = -E_L[log P_PL(L)]``, ``log P_PL(L) = sum_k [s_{l_k} - logsumexp(s over candidates not in
    l_1..l_{k-1})]``,
    estimated with ``n_samples`` lists drawn by the Gumbel top-K trick.
    """
    if n_samples < 1 or temperature <= 0:
        raise ValueError(f"need n_samples >= 1 and temperature > 0, got {n_samples}, {temperature}")
    m, ok = _masked(mean, candidates)
    m = m / temperature
    _check_k(k, m.shape[1])
    g = jax.random.gumbel(key, (n_samples, *m.shape))
    lists = jax.lax.top_k(m[None] + g, k)[1]  # (S, U, K)

    def one(lst):
        chosen = jnp.take_along_axis(m, lst, axis=1)  # (U, K)
        # logsumexp over the items still available at step k = all minus the ones already placed.
        total = jax.nn.logsumexp(m, axis=1, keepdims=True)
        placed = jnp.concatenate([jnp.full_like(chosen[:, :1], -jnp.inf), chosen[:, :-1]], axis=1)
        cum_placed = jax.lax.cumlogsumexp(placed, axis=1)
        rest = total + jnp.log1p(-jnp.minimum(jnp.exp(cum_placed - total), 1.0 - 1e-7))
        return jnp.sum(chosen - rest, axis=1)

    return _nan_unless(ok, -jnp.mean(jax.vmap(one)(lists), axis=0))


def list_instability(
    samples: jax.Array, rankings: jax.Array, candidates: jax.Array | None = None
) -> jax.Array:
    """``1 - mean_s |top-K(draw s) ∩ L| / K``: how often sampled score vectors disagree with the list."""
    samples = jnp.asarray(samples, jnp.float32)
    rankings = jnp.asarray(rankings)
    if samples.ndim != 3 or rankings.ndim != 2 or rankings.shape[0] != samples.shape[1]:
        raise ValueError(
            f"samples (S, U, n) and rankings (U, K) must agree, got {samples.shape}, {rankings.shape}"
        )
    ok = _check_rankings(rankings, samples.shape[2])
    if candidates is not None:
        cand = jnp.asarray(candidates, bool)[None]
        ok = ok & _finite_rows("samples", jnp.where(cand, samples, 0.0), (0, 2))
        samples = jnp.where(cand, samples, -jnp.inf)
    else:
        ok = ok & _finite_rows("samples", samples, (0, 2))
    k = rankings.shape[1]
    tops = jax.lax.top_k(samples, k)[1]  # (S, U, K)
    overlap = jnp.sum(tops[..., :, None] == rankings[None, :, None, :], axis=(-1, -2))
    return _nan_unless(ok, 1.0 - jnp.mean(overlap, axis=0) / k)


def user_activity(n_interactions: np.ndarray) -> np.ndarray:
    """``-log(1 + n_u)``: users with a longer training history are presumed better served."""
    a = np.asarray(n_interactions, np.float64)
    if a.ndim != 1 or not np.all(a >= 0) or not np.all(np.isfinite(a)):
        raise ValueError("n_interactions must be a 1-D array of finite non-negative counts")
    return (-np.log1p(a)).astype(np.float32)


def recommended_popularity(rankings: jax.Array, item_popularity: jax.Array) -> jax.Array:
    """``-(1/K) sum_k log(1 + pop_{l_k})``: lists of popular items are presumed safer bets."""
    pop = jnp.asarray(item_popularity, jnp.float32)
    rankings = jnp.asarray(rankings)
    if pop.ndim != 1 or rankings.ndim != 2:
        raise ValueError(
            f"item_popularity (n,) and rankings (U, K) expected, got {pop.shape}, {rankings.shape}"
        )
    if is_concrete(pop) and not bool(jnp.all(jnp.isfinite(pop) & (pop >= 0))):
        raise ValueError("item_popularity must be finite and >= 0")
    ok = _check_rankings(rankings, pop.shape[0])
    picked = pop[jnp.clip(rankings, 0, pop.shape[0] - 1)]
    return _nan_unless(ok, -jnp.mean(jnp.log1p(picked), axis=1))


def all_baselines(
    mean: jax.Array,
    std: jax.Array,
    samples: jax.Array | None,
    rankings: jax.Array,
    *,
    candidates: jax.Array | None = None,
    activity: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    key: jax.Array | None = None,
) -> dict[str, np.ndarray]:
    """Every baseline that the given inputs allow, as name -> ``(U,)`` NumPy array (higher = more
    uncertain)."""
    k = int(np.asarray(rankings).shape[1])
    key = jax.random.key(0) if key is None else key
    out = {
        "mean top-K score": mean_top_k_score(mean, k, candidates),
        "score margin K/K+1": score_margin(mean, k, candidates),
        "softmax entropy": softmax_entropy(mean, candidates),
        "Plackett-Luce top-K entropy": plackett_luce_entropy(mean, k, key, candidates),
        "mean std of top-K": top_k_std(std, rankings),
    }
    if samples is not None:
        out["sampled top-K instability"] = list_instability(samples, rankings, candidates)
    if activity is not None:
        out["user activity"] = user_activity(activity)
    if item_popularity is not None:
        out["popularity of top-K"] = recommended_popularity(rankings, item_popularity)
    return {name: np.asarray(v, np.float64) for name, v in out.items()}
