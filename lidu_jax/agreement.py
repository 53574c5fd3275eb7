"""Self-agreement of a list under its score distribution (our addition, not the paper's).

Exact LiDu asks for the probability that the score distribution reproduces the *whole* list in order,
``P(L) = Pr[S_l1 > ... > S_lK > max_rest S]``. That joint event is dominated by its least certain parts: one
near-tie anywhere in the list, or at the boundary with the rest, drives ``-log P`` up whatever the other
K-1 items do. The per-user analysis of issue 16 (`benchmarks/lidu_signal.py`, `docs/results-lidu.md`
section 3) found that on the three selection data sets (ML-100K, Last.fm, Beauty) the within-list order
carries the least signal about NDCG@10 and the list-versus-rest boundary the most. The expected agreement
of the list with itself keeps only what the recommender delivers, the set of items shown, and averages it
over the list's items instead of multiplying:

    A(L) = E_S[ |top-K(S) ∩ L| ] / K = (1/K) sum_{i in L} Pr[i in top-K(S)],      uncertainty = 1 - A(L)

with ``S_i ~ N(mean_i, std_i^2)`` independently over the candidates (the same distribution exact LiDu
uses) and ``L`` the top-K candidates by mean. ``1 - A`` is in ``[0, 1]``; 0 = every draw reproduces the
list's items. It is invariant to a per-user affine map of the scores (``a S + b``, ``a > 0``), like LiDu.

Estimated by Monte Carlo with ``n_draws`` score vectors per user; user ``u`` (its index in the input) draws
from ``fold_in(key, u)``, so a value does not depend on the chunking. The standard error of ``A`` is at most
``0.5 / sqrt(n_draws)`` (``sqrt(A (1 - A) / n_draws)`` if the K indicators were perfectly correlated; less
otherwise), 0.044 at the default 128 draws. Chosen on the three selection data sets only; the data sets held
out from this project judge it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax.estimators import top_k_rankings
from lidu_jax.types import LiduResult
from lidu_jax.validation import check_count, check_k, check_shapes, check_values, is_concrete

__all__ = ["list_self_agreement"]


@functools.partial(jax.jit, static_argnames=("k", "n_draws"))
def _agreement(mean, std, cand, ranking, key, offset, *, k: int, n_draws: int) -> jax.Array:
    """``(B,)`` mean fraction of the list's items in the top-k of each draw."""
    users = offset + jnp.arange(mean.shape[0])
    # scale each user's scores to O(1) before adding noise: float32 draws of 1e7 + N(0, 1) would merge
    loc = jnp.max(jnp.where(cand, mean, -jnp.inf), axis=1, keepdims=True)
    scale = jnp.max(jnp.where(cand, std, 0.0), axis=1, keepdims=True)
    m, s = (mean - loc) / scale, std / scale

    def one_user(m_u, s_u, c_u, r_u, u):
        def one_draw(i):
            z = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, u), i), m_u.shape)
            top = jax.lax.top_k(jnp.where(c_u, m_u + s_u * z, -jnp.inf), k)[1]
            return jnp.sum(top[:, None] == r_u[None, :]) / k

        return jnp.mean(jax.lax.map(one_draw, jnp.arange(n_draws)))

    return jax.vmap(one_user)(m, s, cand, ranking, users)


def list_self_agreement(
    mean: jax.Array,
    std: jax.Array,
    k: int,
    *,
    key: jax.Array,
    candidates: jax.Array | None = None,
    n_draws: int = 128,
    chunk_size: int = 256,
) -> LiduResult:
    """``1 - E|top-K(S) ∩ L| / K`` per user, ``S ~ N(mean, std^2)`` independently, ``L`` = top-K by mean.

    Args:
      mean, std: ``(U, n_items)`` score means and stds (std > 0 on candidates).
      k: list length K.
      key: a `jax.random` key; user ``u`` draws from ``fold_in(key, u)``.
      candidates: optional ``(U, n_items)`` bool (False = never recommended, e.g. training items).
      n_draws: Monte Carlo score vectors per user (>= 1).
      chunk_size: users per jitted call (>= 1); bounds memory to ``chunk_size * n_items`` per draw.

    Returns:
      `LiduResult` ``(values (U,) float32 in [0, 1], rankings (U, k) int32)``; higher = more uncertain.

    Raises:
      ValueError: bad shapes, NaN/inf means, stds not > 0, ``k`` out of range, a user with fewer than
        ``k`` candidates, bad ``n_draws`` / ``chunk_size``; checked before any draw.
    """
    check_count("n_draws", n_draws, allow_none=False)
    check_count("chunk_size", chunk_size, allow_none=False)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    cand = jnp.ones(mean.shape, bool) if candidates is None else jnp.asarray(candidates, bool)
    if mean.ndim != 2:
        raise ValueError(f"mean must be (n_users, n_items), got shape {mean.shape}")
    check_shapes(mean, std, None, cand)
    check_k(k, mean.shape[-1])
    if is_concrete(mean, std, cand):
        check_values(mean, std, None, cand, k=k)
    rankings = top_k_rankings(mean, k, cand)
    n_users, size = mean.shape[0], max(1, min(chunk_size, mean.shape[0]))
    out = []
    for start in range(0, n_users, size):
        # the last chunk is padded to the same shape, so every call reuses one compilation
        idx = np.minimum(np.arange(start, start + size), n_users - 1)
        v = _agreement(mean[idx], std[idx], cand[idx], rankings[idx], key, start, k=k, n_draws=n_draws)
        out.append(v[: min(size, n_users - start)])
    values = jnp.concatenate(out) if out else jnp.zeros((0,), jnp.float32)
    return LiduResult(np.float32(1.0) - values, rankings)
