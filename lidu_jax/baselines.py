"""Label-free per-user uncertainty estimators to compare LiDu against (our selection; formulas in
``docs/maths-lidu.md``, results in ``docs/results-lidu-synthetic.md``).

Every function returns one value per user, ``(U,)`` float32, with the convention **higher = more uncertain**
(so a confidence-like quantity is negated). Inputs: ``mean`` / ``std`` ``(U, n_items)`` score moments,
``samples`` ``(S, U, n_items)`` score draws or ensemble members' scores, ``candidates`` ``(U, n_items)`` bool
(True = the item may be recommended, False = left out, e.g. training items: the convention of every
`lidu_jax` module), ``rankings`` ``(U, K)`` the recommended lists (item ids in ``[0, n_items)``),
``profile`` ``(U, n_items)`` bool (True = a training item of the user), ``item_popularity`` ``(n_items,)``.

Besides the score-, list- and activity-based ones, the query-performance-prediction family: NQC and WIG
(spread and height of the top-K scores, normalised per user), user clarity and profile entropy (how far the
user's history is from the catalogue), and two ensemble ones (rank-biased-overlap disagreement of the
members' lists, mutual information of their item softmaxes).

Concrete inputs are checked (NaN/inf scores or stds, item ids out of range, too few candidates, empty
profiles: ``ValueError``), since a bad input would otherwise give a plausible number (an out-of-range id is
silently clamped by a gather). Under `jax.jit` the users concerned get NaN instead.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax.validation import is_concrete

__all__ = [
    "all_baselines",
    "ensemble_mutual_information",
    "ensemble_rank_disagreement",
    "list_instability",
    "mean_top_k_score",
    "nqc",
    "plackett_luce_entropy",
    "profile_entropy",
    "recommended_popularity",
    "score_margin",
    "softmax_entropy",
    "top_k_std",
    "user_activity",
    "user_clarity",
    "wig",
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


# The baselines below run their arithmetic in one jitted core per function (validity flags included) and
# only the shape checks and the raising in Python: op-by-op eager execution would compile every small
# primitive for every input shape.


def _raise_unless(concrete: bool, ok: jax.Array, message: str) -> None:
    """On concrete input, ``ValueError(message.format(number of failing users))`` unless all ``ok``."""
    if concrete:
        ok = np.asarray(ok)
        if not ok.all():
            raise ValueError(message.format(int((~ok).sum())))


def _scores_and_mask(mean: jax.Array, candidates: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    mean = jnp.asarray(mean, jnp.float32)
    if mean.ndim != 2:
        raise ValueError(f"mean must be (n_users, n_items), got {mean.shape}")
    if candidates is None:
        return mean, jnp.ones(mean.shape, bool)
    cand = jnp.asarray(candidates, bool)
    if cand.shape != mean.shape:
        raise ValueError(f"candidates must have shape {mean.shape}, got {cand.shape}")
    return mean, cand


_FEW_CANDIDATES = "candidates: {} user(s) have fewer than %d candidate items"


@partial(jax.jit, static_argnames="k")
def _nqc_wig_core(mean: jax.Array, cand: jax.Array, k: int) -> tuple[jax.Array, ...]:
    """``(-NQC, -WIG, finite, enough)``, each ``(U,)``, from the top-k candidate scores standardised by the
    mean and population std of all the user's candidate scores (z = 0 where that std is 0)."""
    finite = jnp.all(jnp.isfinite(jnp.where(cand, mean, 0.0)), axis=1)
    n_c = jnp.sum(cand, axis=1, keepdims=True)
    enough = n_c[:, 0] >= k
    s = jnp.where(cand, mean, 0.0)
    mu = jnp.sum(s, axis=1, keepdims=True) / jnp.maximum(n_c, 1)
    # two passes (mean, then squared deviations): one pass E[s^2] - E[s]^2 cancels in float32 for
    # scores with a large common offset, which would break the affine invariance
    sigma = jnp.sqrt(
        jnp.sum(jnp.where(cand, (s - mu) ** 2, 0.0), axis=1, keepdims=True) / jnp.maximum(n_c, 1)
    )
    top = jax.lax.top_k(jnp.where(cand, mean, -jnp.inf), k)[0]
    z = jnp.where(sigma > 0, (top - mu) / jnp.where(sigma > 0, sigma, 1.0), 0.0)
    ok = finite & enough
    return _nan_unless(ok, -jnp.std(z, axis=1)), _nan_unless(ok, -jnp.mean(z, axis=1)), finite, enough


def _nqc_wig(mean: jax.Array, k: int, candidates: jax.Array | None, which: int) -> jax.Array:
    mean, cand = _scores_and_mask(mean, candidates)
    _check_k(k, mean.shape[1])
    out = _nqc_wig_core(mean, cand, k)
    concrete = is_concrete(mean, cand)
    _raise_unless(concrete, out[2], "mean contains NaN or inf for {} user(s)")
    _raise_unless(concrete, out[3], _FEW_CANDIDATES % k)
    return out[which]


def nqc(mean: jax.Array, k: int, candidates: jax.Array | None = None) -> jax.Array:
    """Negated Normalized Query Commitment (Shtok et al. 2012) of the candidate scores.

    ``mean (U, n)``, ``candidates (U, n)`` bool or None -> ``(U,)``:

        NQC_u = sqrt( (1/k) sum_{r<=k} (s_(r) - mu_k)^2 ) / sigma_C,   returned as -NQC_u,

    ``s_(r)`` the r-th highest candidate score, ``mu_k`` the mean of the top k, ``sigma_C`` the population
    std of all the user's candidate scores. Retrieval NQC divides by the corpus score ``|score(D)|``, which
    presumes positive retrieval scores; a recommender's scores are arbitrary logits whose mean may be ~0 or
    negative, so the ratio would explode or flip sign. Dividing by ``sigma_C`` instead measures the top-k
    spread in units of the user's own score spread, so NQC is invariant to ``a*s + b`` (``a > 0``) per user.
    High commitment (a spread-out head) = confident, hence the sign. ``k = 1`` gives 0 for everyone; a user
    whose candidates all score the same gets 0 (the least committed). Fewer than ``k`` candidates or a
    NaN/inf candidate score: ``ValueError`` on concrete input, NaN under `jax.jit`.
    """
    return _nqc_wig(mean, k, candidates, 0)


def wig(mean: jax.Array, k: int, candidates: jax.Array | None = None) -> jax.Array:
    """Negated Weighted Information Gain (Zhou & Croft 2007) of the candidate scores.

    ``mean (U, n)``, ``candidates (U, n)`` bool or None -> ``(U,)``:

        WIG_u = (1/k) sum_{r<=k} (s_(r) - mu_C) / sigma_C,   returned as -WIG_u,

    ``mu_C`` / ``sigma_C`` the mean / population std of all the user's candidate scores (``mu_C`` plays the
    corpus score). Retrieval WIG divides by ``sqrt(|q|)`` to compare queries of different lengths; here the
    users' score scales differ instead (and are arbitrary for logits), so the gap is measured in units of
    ``sigma_C``: the mean z-score of the top k, invariant to ``a*s + b`` (``a > 0``) per user. A head far
    above the rest = confident, hence the sign; 0 when every candidate scores the same. Checks as `nqc`.
    """
    return _nqc_wig(mean, k, candidates, 1)


@jax.jit
def _profile_core(profile: jax.Array, pop: jax.Array, smoothing: jax.Array) -> tuple[jax.Array, ...]:
    """``(-clarity, entropy, non-empty, clarity finite)``, each ``(U,)``."""
    size = jnp.sum(profile, axis=1, keepdims=True)
    nonempty = size[:, 0] > 0
    p_c = pop / jnp.sum(pop)
    p_u = (1.0 - smoothing) * profile / jnp.maximum(size, 1) + smoothing * p_c[None]
    pos = p_u > 0
    log_pu = jnp.log(jnp.where(pos, p_u, 1.0))
    kl = jnp.where(pos, p_u * (log_pu - jnp.log(jnp.where(pos, p_c, 1.0))), 0.0)
    # a profile item nobody else consumed has p_c = 0 < p(i|u) unless smoothing = 1: infinite KL
    finite = (smoothing >= 1.0) | ~jnp.any(profile & (p_c[None] <= 0), axis=1)
    clarity = _nan_unless(nonempty & finite, -jnp.sum(kl, axis=1))
    entropy = _nan_unless(nonempty, -jnp.sum(jnp.where(pos, p_u * log_pu, 0.0), axis=1))
    return clarity, entropy, nonempty, finite


def _profile(profile: jax.Array, item_popularity: jax.Array, smoothing: float, which: int) -> jax.Array:
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    profile = jnp.asarray(profile, bool)
    pop = jnp.asarray(item_popularity, jnp.float32)
    if profile.ndim != 2 or pop.ndim != 1 or pop.shape[0] != profile.shape[1]:
        raise ValueError(
            f"profile (U, n) and item_popularity (n,) expected, got {profile.shape}, {pop.shape}"
        )
    if is_concrete(pop):
        p = np.asarray(pop)
        if not (np.all(np.isfinite(p) & (p >= 0)) and p.sum() > 0):
            raise ValueError("item_popularity must be finite, >= 0 and not all 0")
    out = _profile_core(profile, pop, jnp.float32(smoothing))
    concrete = is_concrete(profile, pop)
    _raise_unless(concrete, out[2], "profile is empty for {} user(s)")
    if which == 0:
        _raise_unless(
            concrete, out[3], "profile holds items of popularity 0 for {} user(s) (clarity would be infinite)"
        )
    return out[which]


def user_clarity(profile: jax.Array, item_popularity: jax.Array, smoothing: float = 0.5) -> jax.Array:
    """Negated user clarity (Bellogín et al. 2011): the KL divergence of the user's item distribution from the
    catalogue's.

    ``profile (U, n)`` bool (the user's training items), ``item_popularity (n,)`` -> ``(U,)``:

        p_c(i)   = pop_i / sum_j pop_j
        p(i|u)   = (1 - lambda) [i in P_u] / |P_u| + lambda p_c(i)      (Jelinek-Mercer, lambda = smoothing)
        clarity  = sum_i p(i|u) log( p(i|u) / p_c(i) ),                  returned as -clarity,

    with ``0 log 0 = 0``. A user whose taste stands out from the crowd has a clear profile = confident, hence
    the sign. An empty profile, or (for ``smoothing < 1``) a profile item of popularity 0 (infinite KL):
    ``ValueError`` on concrete input, NaN under `jax.jit`.
    """
    return _profile(profile, item_popularity, smoothing, 0)


def profile_entropy(profile: jax.Array, item_popularity: jax.Array, smoothing: float = 0.5) -> jax.Array:
    """Shannon entropy of the user's smoothed item distribution (the ``p(i|u)`` of `user_clarity`).

    ``profile (U, n)`` bool, ``item_popularity (n,)`` -> ``(U,)``: ``H_u = -sum_i p(i|u) log p(i|u)``
    (``0 log 0 = 0``), higher = a more diffuse history = more uncertain. Without smoothing it would be just
    ``log |P_u|``, a function of the user's activity alone; the catalogue part makes it depend on which items
    were consumed (popular ones merge with the background). An empty profile: ``ValueError`` / NaN.
    """
    return _profile(profile, item_popularity, smoothing, 1)


def _members(samples: jax.Array, candidates: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(samples (M, U, n) float32, candidates mask (U, n))`` with the shape checks of the ensemble
    baselines."""
    samples = jnp.asarray(samples, jnp.float32)
    if samples.ndim != 3:
        raise ValueError(f"samples must be (M, n_users, n_items), got {samples.shape}")
    if samples.shape[0] < 2:
        raise ValueError(f"samples must hold M >= 2 members to disagree, got M={samples.shape[0]}")
    if candidates is None:
        return samples, jnp.ones(samples.shape[1:], bool)
    cand = jnp.asarray(candidates, bool)
    if cand.shape != samples.shape[1:]:
        raise ValueError(f"candidates must have shape {samples.shape[1:]}, got {cand.shape}")
    return samples, cand


def _member_flags(samples: jax.Array, cand: jax.Array, need: int) -> tuple[jax.Array, jax.Array]:
    finite = jnp.all(jnp.isfinite(jnp.where(cand[None], samples, 0.0)), axis=(0, 2))
    return finite, jnp.sum(cand, axis=1) >= need


def _raise_member_flags(samples, cand, finite, enough, need: int) -> None:
    concrete = is_concrete(samples, cand)
    _raise_unless(concrete, finite, "samples contains NaN or inf for {} user(s)")
    _raise_unless(concrete, enough, _FEW_CANDIDATES % need)


@partial(jax.jit, static_argnames="k")
def _rank_disagreement_core(samples, cand, c, k: int) -> tuple[jax.Array, ...]:
    finite, enough = _member_flags(samples, cand, k)
    s = jnp.where(cand[None], samples, -jnp.inf)
    n_m, n_u, _ = s.shape
    top = jax.lax.top_k(s, k)[1]  # (M, U, k)
    rank = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), top.shape)
    pos = (
        jnp.full(s.shape, k, jnp.int32)
        .at[jnp.arange(n_m)[:, None, None], jnp.arange(n_u)[None, :, None], top]
        .set(rank)
    )

    def against_all(args):
        a, top_a = args
        q = jnp.take_along_axis(pos, jnp.broadcast_to(top_a[None], (n_m, n_u, k)), axis=2)
        rbo = jnp.sum(c[jnp.maximum(jnp.arange(k), q)], axis=-1)  # (M, U)
        return jnp.sum(jnp.where(jnp.arange(n_m)[:, None] != a, rbo, 0.0), axis=0)

    # a sequential map keeps the memory at one member's gathers instead of all M^2 pairs at once
    total = jnp.sum(jax.lax.map(against_all, (jnp.arange(n_m), top)), axis=0)
    return _nan_unless(finite & enough, 1.0 - total / (n_m * (n_m - 1))), finite, enough


def ensemble_rank_disagreement(
    samples: jax.Array, k: int, candidates: jax.Array | None = None, p: float = 0.9
) -> jax.Array:
    """Mean rank-biased-overlap disagreement of the ensemble members' top-k lists.

    ``samples (M, U, n)`` the members' (or draws') scores, M >= 2, ``candidates (U, n)`` bool or None ->
    ``(U,)``. With ``A, B`` two members' top-k lists over the candidates and ``X_d`` a list's first d items,

        RBO(A, B) = (1 - p) / (1 - p^k) sum_{d=1}^{k} p^(d-1) |A_d ∩ B_d| / d
        value_u   = mean over member pairs a < b of (1 - RBO(A_a, A_b)),

    RBO truncated at depth k and normalised so that identical lists give 1 (``p = 1``: the average overlap).
    0 = every member recommends the same list; higher = more uncertain. NaN/inf candidate scores or fewer
    than ``k`` candidates: ``ValueError`` on concrete input, NaN under `jax.jit`.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    samples, cand = _members(samples, candidates)
    _check_k(k, samples.shape[2])
    w = p ** np.arange(k, dtype=np.float64)
    w /= w.sum()
    # RBO = sum_j c[max(j, q_j)], q_j the rank in B of A's j-th item (k if absent), since A's j-th item counts
    # at every depth d > max(j, q_j): c[t] = sum_{d>t} w_d / d, c[k] = 0. This needs an (M, U, k) gather per
    # member rather than a (k, k) item comparison per pair.
    tail = (w / np.arange(1, k + 1))[::-1].cumsum()[::-1]
    c = jnp.asarray(np.append(tail, 0.0), jnp.float32)
    value, finite, enough = _rank_disagreement_core(samples, cand, c, k)
    _raise_member_flags(samples, cand, finite, enough, k)
    return value


@jax.jit
def _mutual_information_core(samples, cand, temperature) -> tuple[jax.Array, ...]:
    finite, enough = _member_flags(samples, cand, 1)
    s = jnp.where(cand[None], samples, -jnp.inf)
    logp = jax.nn.log_softmax(s / temperature, axis=-1)  # (M, U, n), -inf off the candidates
    log_bar = jax.nn.logsumexp(logp, axis=0) - jnp.log(s.shape[0])
    mask = cand[None]
    kl = jnp.where(mask, jnp.exp(logp) * (logp - jnp.where(mask, log_bar, 0.0)), 0.0)
    mi = jnp.maximum(jnp.mean(jnp.sum(kl, axis=-1), axis=0), 0.0)
    return _nan_unless(finite & enough, mi), finite, enough


def ensemble_mutual_information(
    samples: jax.Array, candidates: jax.Array | None = None, temperature: float = 1.0
) -> jax.Array:
    """Mutual information between the recommended item and the ensemble member (the epistemic part of the
    item softmax's entropy).

    ``samples (M, U, n)`` the members' (or draws') scores, M >= 2, ``candidates (U, n)`` bool or None ->
    ``(U,)``. With ``p_m = softmax(s_m / temperature)`` over the candidates and ``p_bar = mean_m p_m``,

        MI_u = H(p_bar) - (1/M) sum_m H(p_m) = (1/M) sum_m KL(p_m || p_bar) >= 0.

    Computed in the KL form (from log-probabilities, with ``log p_bar`` by logsumexp), which has no
    cancellation of two large entropies when the members agree; clipped at 0 against rounding. 0 = the
    members agree; higher = more uncertain. NaN/inf candidate scores or no candidate: ``ValueError`` on
    concrete input, NaN under `jax.jit`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    samples, cand = _members(samples, candidates)
    value, finite, enough = _mutual_information_core(samples, cand, jnp.float32(temperature))
    _raise_member_flags(samples, cand, finite, enough, 1)
    return value


def all_baselines(
    mean: jax.Array,
    std: jax.Array,
    samples: jax.Array | None,
    rankings: jax.Array,
    *,
    candidates: jax.Array | None = None,
    activity: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    profile: jax.Array | None = None,
    key: jax.Array | None = None,
) -> dict[str, np.ndarray]:
    """Every baseline that the given inputs allow, as name -> ``(U,)`` NumPy array (higher = more
    uncertain).

    Always the score- and list-based ones, NQC and WIG (``k`` = the list length); the sample-based ones when
    ``samples`` ``(S, U, n)`` is given (the ensemble RBO disagreement and mutual information need S >= 2);
    user activity with ``activity``; popularity of top-K with ``item_popularity``; user clarity and profile
    entropy with both ``profile`` ``(U, n)`` bool (the users' training items) and ``item_popularity``.
    """
    k = int(np.asarray(rankings).shape[1])
    key = jax.random.key(0) if key is None else key
    out = {
        "mean top-K score": mean_top_k_score(mean, k, candidates),
        "score margin K/K+1": score_margin(mean, k, candidates),
        "softmax entropy": softmax_entropy(mean, candidates),
        "Plackett-Luce top-K entropy": plackett_luce_entropy(mean, k, key, candidates),
        "mean std of top-K": top_k_std(std, rankings),
        "NQC": nqc(mean, k, candidates),
        "WIG": wig(mean, k, candidates),
    }
    if samples is not None:
        out["sampled top-K instability"] = list_instability(samples, rankings, candidates)
        if np.shape(samples)[0] >= 2:
            out["ensemble RBO disagreement"] = ensemble_rank_disagreement(samples, k, candidates)
            out["ensemble mutual information"] = ensemble_mutual_information(samples, candidates)
    if activity is not None:
        out["user activity"] = user_activity(activity)
    if item_popularity is not None:
        out["popularity of top-K"] = recommended_popularity(rankings, item_popularity)
        if profile is not None:
            out["user clarity"] = user_clarity(profile, item_popularity)
            out["profile entropy"] = profile_entropy(profile, item_popularity)
    return {name: np.asarray(v, np.float64) for name, v in out.items()}
