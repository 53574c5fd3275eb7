"""LiDu with correlated item scores (our addition: neither the paper nor docs/maths-lidu.md has it).

## Correlated LiDu (`lidu_jax.correlated.lidu_correlated`)

*This variant is our own addition, not part of the LiDu paper (arXiv 2507.23208), whose definition we only
reconstruct from its abstract.*

**Why.** Exact LiDu (docs/maths-lidu.md, section 2) treats the item scores as independent:
`N(μ_i, σ_i²)` per item. The members of an ensemble (bootstrap copies, dropout passes, posterior draws) do
not move items independently: a member that scores one item high tends to move many items with it (a
shifted user vector moves every item along the same direction). The probability of an ordering depends
on those joint moves.

**Model.** From the member scores `x_{m,i}`, `m = 1..M` (`M ≥ 2`), per user: the mean `μ = (1/M) Σ_m x_m`,
the deviations `D = [x_1 − μ, …, x_M − μ]` (`n × M`), the sample covariance `S = D Dᵀ / (M − 1)` and the
per-item stds `σ_i = √S_ii` (`ddof = 1`, floored at `min_std` as in section 4.1). The scores are modelled as

    s ~ N( μ, Σ_α ),        Σ_α = (1 − α) · S + α · diag(S),        α = shrinkage ∈ (0, 1]

Every item keeps its marginal `N(μ_i, σ_i²)` (the one plain LiDu uses) for every `α`; only the correlations
are shrunk, `corr_α(i, j) = (1 − α) · corr_S(i, j)`. `α = 1` is the independent model, i.e. plain LiDu
from the sample moments; `α → 0` is the sample covariance itself, singular (rank `M − 1`), which says that
only the `M − 1` directions spanned by the members can move and that is why `α = 0` is excluded. `α` is
the weight put on the independent model: with few members the off-diagonal sample correlations are noisy
(each is estimated from `M` points), and `α` shrinks them towards 0, as covariance shrinkage to a diagonal
target does (Ledoit–Wolf, Schäfer–Strimmer); `α` here is a user's choice, not estimated from the data.

**The list.** `L` is the top-K candidates by `μ`, the list plain LiDu scores (`estimators.top_k_rankings`);
`LiDu_corr = −log P_α(L)` with `P_α(L) = Pr_{s ~ N(μ, Σ_α)}[ s_{l_1} > … > s_{l_K} > max_{j ∈ R} s_j ]`.

**Reduction to the exact independent estimator.** With `F = D / √(M − 1)` (so `S = F Fᵀ`),

    s = μ + √(1 − α) · F ε + √α · σ ⊙ η,        ε ~ N(0, I_M),  η ~ N(0, I_n)  independent

has covariance `(1 − α) F Fᵀ + α diag(σ²) = Σ_α`. Conditional on `ε` the items are independent Gaussians,
`s_i | ε ~ N( μ_i + √(1 − α) (F ε)_i , α σ_i² )`, so

    P_α(L) = E_ε[ P_ind(L | ε) ]

where `P_ind(L | ε)` is exactly the list probability of section 2 for those conditional means and stds
(the grid recursion, `backend.gaussian_log_prob` with `method="exact"`). Since the columns of `D` sum to 0,
`F ε = F B ζ` with `B` the `M × (M − 1)` Helmert basis of the vectors orthogonal to `(1, …, 1)` and
`ζ ~ N(0, I_{M−1})`: the outer expectation is `(M − 1)`-dimensional.

**Estimator.** With `N = n_draws` points `ζ_1..ζ_N`, each marginally `N(0, I_{M−1})`,

    log P̂_α(L) = logsumexp_r( log P_ind(L | ζ_r) ) − log N,        LiDu_corr = −log P̂_α(L)

`P̂` is unbiased for `P_α`; `log P̂` is biased low by about `Var(P̂) / (2 P²)` (Jensen), which falls as
`1/N`. The average is taken in log space because `P_ind(L | ζ)` ranges over many orders of magnitude.

**Variance reduction** (`design`):

- `"mc"`: independent `ζ_r` (the baseline);
- `"antithetic"`: pairs `(ζ, −ζ)`: the part of `P_ind(L | ζ)` that is odd in `ζ` (to first order, the
  linear response of the list's probability to the members' common moves) cancels within each pair;
- `"orthogonal"` (default): antithetic pairs along orthogonal directions. Per block of `2(M − 1)` points,
  a Haar-random rotation `Q` (QR of a Gaussian matrix, signs fixed) and independent radii
  `r_j ~ χ_{M−1}`; the points are `±r_j q_j`, `j = 1..M−1`. Each point is marginally `N(0, I)` (uniform
  direction, independent χ radius), so any number of points gives an unbiased `P̂`. Beyond the antithetic
  cancellation of odd parts, a block's directions are spread evenly: for a quadratic part `ζᵀAζ` a block
  gives `(1/(M−1)) Σ_j r_j² q_jᵀAq_j`, whose variance comes from the radii only, not from where random
  directions happen to fall (orthogonal Monte Carlo / the spherical–radial idea).

Measured variance of `P̂` relative to `"mc"` at `N = 16`, `M = 4`, `n = 8`, `K = 3` over 64–128 replicate
estimates: antithetic 0.09–0.91, orthogonal 0.05–0.62 on eight random users (`α ∈ {0.3, 0.7}`), 0.25 and
0.14 on the test's user whose members move the list against the rest; on one user where `P` comes from
rare `ζ` all three designs had the same variance (within noise). Orthogonal was never measurably worse,
hence the default.

A control variate at `ζ = 0` (`P_ind(L | 0)`) was considered and not used: it is a single value, not a
variate with a known mean, and no surrogate of `P_ind(L | ζ)` with a closed-form expectation under the
correlated model is at hand (the pairwise probit approximation would need the full multivariate normal
orthant probability, the quantity being estimated).

Draws are per user: user `u` (its index in the flattened batch) uses `fold_in(key, u)`, so a result does not
depend on the chunking or on the other users, and the same `key` reproduces it.

**Frame.** The samples are first mapped to the frame of the user's plain-LiDu grid
(`standardise.standardised_samples`), then every conditional `(mean, std)` row to the frame of its own grid
(`standardise.standardise`). Under `x ↦ a x + b` (`a > 0`, per user) `μ`, `F` and `σ` map to `a μ + b`,
`a F`, `a σ`, the conditional problem for a given `ζ` maps the same way, so with the same `key` the result
is unchanged (to float32 rounding).

**Cost.** `N` exact grid evaluations per user, each `O(|C|·G + K·G)` (`G = grid_size`), plus forming the
conditional means, `O(N·n·M)`: about `N` times plain LiDu at the same `G` (default `G = 256`, half of plain
LiDu's 512: each draw's grid adapts to its own list, whose items have the narrower std `√α σ`). Rest items
far below a draw's grid are pruned as in `estimators.lidu_chunked` (a power-of-two item budget per chunk of
users, the largest need over all the chunk's draws). Memory per chunk: a few `N × chunk_size × n` float
arrays (conditional means and stds; the default chunk keeps one near `2^24` floats). Measured on a shared
2-core CPU (load about 6.5, so only the ratio means much), 1,000 users × 1,700 items, `M = 5`, `K = 10`,
no item pruned: plain `lidu` at `G = 256` 0.6 s, `lidu_correlated` with `N = 8` 9.6 s and `N = 32` 44 s
(after compilation), i.e. about `2 N` × plain.

**What `α` means in practice.** `α = 1` reproduces plain LiDu; lowering it lets the members' joint moves
count. When the members move the list and the rest apart together (a common shift of the user vector), the
conditional problems are each sharper but disagree, and `P` can go up or down relative to the independent
model; in the test cases the independent model was off by up to 26% relative in `P`. `α` is not estimated
here; a data-driven choice (e.g. the Schäfer–Strimmer estimate of the optimal shrinkage intensity of the
correlations) would be a natural next step.

**Check against brute force** (tests/test_lidu_correlated.py): for six small users (`n = 6..8` competing
candidates, plus masked items scored far above them, `K = 2..3`, `M = 4`, `α ∈ {0.3, 0.7}`) the test draws
400,000 score vectors from `N(μ, Σ_α)` with NumPy (a Cholesky factor of `Σ_α`, independent of this module),
counts the draws whose top-K in order is `L`, and requires the estimate (`N = 16`, averaged as `P` over 16
or 32 replicate users with their own draws) to agree within 4 combined standard errors (binomial and the
estimator's replicate spread) plus 1% for the grid; the independent model must fail that criterion in at
least two of the six cases, so the check can tell the models apart. Observed: |z| ≤ 2.6 for the correlated
estimate; on one user with 4·10⁶ brute-force draws (`P = 0.0404 ± 0.0001`) 4,096 replicates gave 0.0405,
0.0403 and 0.0403 (± 0.0002) for the three designs, and `G = 1024` changed nothing.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from lidu_jax.backend import default_tile_size, gaussian_log_prob, resolve_backend

# estimators' own pruning rule and budget, so its exactness argument (to n * 1e-9 in log P) carries over.
from lidu_jax.estimators import _item_budget, _needed_rest_items, top_k_rankings
from lidu_jax.samples import sample_moments
from lidu_jax.standardise import as_float, standardise, standardised_samples
from lidu_jax.types import LiduResult
from lidu_jax.validation import (
    check_count,
    check_grid,
    check_k,
    check_min_std,
    check_samples,
    check_shapes,
    check_values,
    is_concrete,
)

__all__ = ["DEFAULT_GRID_SIZE", "DESIGNS", "correlated_log_prob", "lidu_correlated"]

DEFAULT_GRID_SIZE = 256
DESIGNS = ("orthogonal", "antithetic", "mc")
_CHUNK_FLOATS = 1 << 24  # default chunk: conditional means of n_draws x chunk x n floats at most ~64 MiB


def helmert_basis(m: int) -> np.ndarray:
    """``(m, m - 1)`` orthonormal columns orthogonal to the all-ones vector (the Helmert contrasts).

    Member deviations sum to zero over members, so only these ``m - 1`` directions of ``eps`` move the
    scores; drawing in them keeps the orthogonal design's blocks at the true dimension."""
    b = np.zeros((m, m - 1), np.float32)
    for j in range(1, m):
        b[:j, j - 1] = 1.0 / math.sqrt(j * (j + 1))
        b[j, j - 1] = -j / math.sqrt(j * (j + 1))
    return b


def _user_draws(key: jax.Array, n_draws: int, dim: int, design: str) -> jax.Array:
    """``(n_draws, dim)`` points, each marginally ``N(0, I_dim)``, for one user (module docstring)."""
    if design == "mc":
        return jax.random.normal(key, (n_draws, dim))
    if design == "antithetic":
        z = jax.random.normal(key, ((n_draws + 1) // 2, dim))
        return jnp.stack([z, -z], axis=1).reshape(-1, dim)[:n_draws]
    n_blocks = -(-n_draws // (2 * dim))
    k_rot, k_rad = jax.random.split(key)
    q, r = jnp.linalg.qr(jax.random.normal(k_rot, (n_blocks, dim, dim)))
    # QR of a Gaussian matrix is Haar only once R's diagonal is made positive.
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    radius = jnp.linalg.norm(jax.random.normal(k_rad, (n_blocks, dim, dim)), axis=-1)  # chi_dim each
    rows = jnp.swapaxes(q, 1, 2) * radius[..., None]  # (blocks, dim, dim): row j is r_j q_j
    # Pairs stay adjacent, so truncating to n_draws keeps whole antithetic pairs.
    return jnp.stack([rows, -rows], axis=2).reshape(-1, dim)[:n_draws]


@partial(jax.jit, static_argnames=("n_draws", "dim", "design"))
def _draws(key: jax.Array, user_ids: jax.Array, *, n_draws: int, dim: int, design: str) -> jax.Array:
    """``(B, n_draws, dim)``: user ``u`` draws from ``fold_in(key, u)``, independent of the chunking."""
    keys = jax.vmap(lambda u: jax.random.fold_in(key, u))(user_ids)
    return jax.vmap(lambda kk: _user_draws(kk, n_draws, dim, design))(keys)


def _conditional(x, zeta, ranking, cand, shrinkage, min_std):
    """The conditional independent problems, flattened to ``(N * B, ...)`` rows (draw-major) and each in the
    frame of its own grid: ``(mean, std, ranking, cand)``."""
    m_members, b = x.shape[:2]
    n_draws = zeta.shape[1]
    mu, sd = sample_moments(x, min_std)
    basis = jnp.asarray(helmert_basis(m_members))
    hi = jax.lax.Precision.HIGHEST  # TF32 on GPUs would perturb the shifts at 1e-3
    factor = jnp.einsum("mbn,md->bnd", x - mu, basis, precision=hi) / math.sqrt(m_members - 1)
    shift = jnp.einsum("bnd,brd->rbn", factor, zeta, precision=hi)  # (N, B, n)
    mean = mu[None] + jnp.sqrt(1.0 - shrinkage) * shift
    std = jnp.broadcast_to(jnp.sqrt(shrinkage) * sd, mean.shape)
    flat = lambda a: a.reshape(n_draws * b, a.shape[-1])
    r = flat(jnp.broadcast_to(ranking, (n_draws, *ranking.shape)))
    c = flat(jnp.broadcast_to(cand, mean.shape))
    m, s = standardise(flat(mean), flat(std), r, c)
    return m, s, r, c


@partial(jax.jit, static_argnames=("min_std",))
def _needed_items(x, zeta, ranking, cand, shrinkage, *, min_std):
    """Per conditional row, the rest items not far below its grid (`estimators.lidu_chunked`'s rule)."""
    return _needed_rest_items(*_conditional(x, zeta, ranking, cand, shrinkage, min_std))


@partial(jax.jit, static_argnames=("min_std", "grid_size", "n_keep", "backend", "tile_size"))
def correlated_log_prob(
    x: jax.Array,
    zeta: jax.Array,
    ranking: jax.Array,
    cand: jax.Array,
    shrinkage: jax.Array | float,
    *,
    min_std: float = 1e-6,
    grid_size: int = DEFAULT_GRID_SIZE,
    n_keep: int | None = None,
    backend: str = "cpu",
    tile_size: int = 256,
) -> jax.Array:
    """The jitted core: ``log P̂_α(L) = logsumexp_r log P_ind(L | ζ_r) − log N`` per user, ``(B,)``.

    Args:
      x: ``(M, B, n)`` member scores, each user in the frame of its grid
        (`lidu_jax.standardise.standardised_samples`); non-candidates may hold anything finite.
      zeta: ``(B, N, M - 1)`` outer draws (`_draws`), coordinates in the Helmert basis.
      ranking: ``(B, K)`` int32 lists; cand: ``(B, n)`` bool.
      shrinkage: ``α`` in ``(0, 1]`` (traced: changing it does not recompile).
      min_std, grid_size: as `lidu_correlated`; n_keep: the rest-item budget (None: all);
      backend, tile_size: as `lidu_jax.backend.gaussian_log_prob` (tiles count conditional rows).
    """
    n_draws, b = zeta.shape[1], x.shape[1]
    m, s, r, c = _conditional(x, zeta, ranking, cand, shrinkage, min_std)
    log_p = gaussian_log_prob(
        m,
        s,
        r,
        c,
        method="exact",
        ordered=True,
        grid_size=grid_size,
        n_keep=n_keep,
        backend=backend,
        tile_size=tile_size,
    )
    return logsumexp(log_p.reshape(n_draws, b), axis=0) - math.log(n_draws)


def _check_shrinkage(shrinkage) -> None:
    ok = isinstance(shrinkage, int | float | np.floating) and not isinstance(shrinkage, bool)
    if not (ok and math.isfinite(shrinkage) and 0.0 < shrinkage <= 1.0):
        raise ValueError(f"shrinkage must be a float in (0, 1], got {shrinkage!r}")


def _check_key(key) -> jax.Array:
    key = jnp.asarray(key) if isinstance(key, np.ndarray) else key
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not ((typed and key.shape == ()) or raw):
        raise ValueError(f"key must be one PRNG key (jax.random.key or jax.random.PRNGKey), got {key!r}")
    return key


def _pad(a, reps: int, axis: int):
    """``a`` with its last entry along ``axis`` repeated ``reps`` times (NumPy or JAX, as given)."""
    xp = np if isinstance(a, np.ndarray) else jnp
    last = xp.take(a, xp.asarray([a.shape[axis] - 1]), axis=axis)
    return xp.concatenate([a, xp.repeat(last, reps, axis=axis)], axis=axis)


def lidu_correlated(
    samples: jax.Array,
    k: int,
    *,
    key: jax.Array,
    candidates: jax.Array | None = None,
    shrinkage: float = 0.5,
    n_draws: int = 32,
    design: str = "orthogonal",
    grid_size: int = DEFAULT_GRID_SIZE,
    min_std: float = 1e-6,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> LiduResult:
    """LiDu of each user's top-k list (by the member mean) when the members move items together:
    ``-log P_α(L)`` under ``s ~ N(μ, (1 − α) S + α diag(S))``, ``S`` the members' sample covariance
    (module docstring). Our addition, not the paper's.

        P_α(L) = E_{ζ ~ N(0, I_{M−1})}[ P_ind(L | μ + √(1 − α) F B ζ, √α σ) ]

    estimated with ``n_draws`` points of ``design`` and combined as ``logsumexp − log N``. ``shrinkage=1``
    is plain LiDu from the sample moments (`lidu_jax.samples.lidu_from_samples` with ``method="gaussian"``).
    Unchanged, for a given ``key``, by ``samples -> a samples + b`` (``a > 0``, per user).

    On concrete inputs the users go ``chunk_size`` at a time (rest items far below every draw's grid pruned
    per chunk); under `jax.jit` everything is one traced computation without pruning and without the value
    checks.

    Args:
      samples: ``(M, ..., n_items)`` member scores, ``M >= 2``, finite; leading dims after the first are
        users.
      k: list length K.
      key: one PRNG key; user ``u`` (flattened index) uses ``fold_in(key, u)``.
      candidates: optional ``(..., n_items)`` bool; False items take no part (neither listed nor competing).
      shrinkage: ``α`` in ``(0, 1]``: the weight of the independent model (1 = plain LiDu).
      n_draws: outer points ``N`` per user (>= 1; even for whole antithetic pairs).
      design: ``"orthogonal"`` (antithetic pairs along random orthogonal directions), ``"antithetic"`` or
        ``"mc"``.
      grid_size: cells ``G`` of each conditional grid (>= 8).
      min_std: floor on the per-item std in the user's frame (as `lidu_jax.samples`).
      chunk_size: users per jitted call (None: about ``2^24 / (n_draws * n_items)``).
      backend: ``"cpu"``, ``"accelerator"`` or None (`lidu_jax.backend`).

    Returns:
      `LiduResult` ``(values (...) float32, rankings (..., k) int32)``; higher = more uncertain.
    """
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    _check_shrinkage(shrinkage)
    check_grid(grid_size)
    check_count("n_draws", n_draws, allow_none=False)
    check_count("chunk_size", chunk_size)
    check_min_std(min_std)
    key = _check_key(key)
    samples = as_float(samples)
    check_samples(samples)
    check_k(k, samples.shape[-1])
    cand = None if candidates is None else jnp.asarray(candidates, bool)
    check_shapes(samples[0], samples[0], None, cand)
    backend = resolve_backend(backend, samples, cand)
    m_members, batch, n = samples.shape[0], samples.shape[1:-1], samples.shape[-1]
    flat = samples.reshape((m_members, -1, n))
    u = flat.shape[1]
    c = jnp.ones((u, n), bool) if cand is None else cand.reshape(u, n)
    concrete = is_concrete(samples, cand)
    if concrete:
        host = np.asarray(flat)
        if not np.all(np.isfinite(host)):
            raise ValueError("samples contain NaN or inf")
        check_values(host.mean(0), np.ones((u, n), np.float32), None, np.asarray(c), k=k)
    if u == 0:
        return LiduResult(jnp.zeros(batch, jnp.float32), jnp.zeros((*batch, k), jnp.int32))
    rankings = top_k_rankings(flat.mean(0), k, c)
    opts = dict(n_draws=n_draws, dim=m_members - 1, design=design)
    alpha = jnp.float32(shrinkage)
    core = dict(
        min_std=float(min_std), grid_size=grid_size, backend=backend, tile_size=default_tile_size(backend)
    )
    if not concrete:
        x, _ = standardised_samples(flat, rankings, c, None)
        zeta = _draws(key, jnp.arange(u), **opts)
        log_p = correlated_log_prob(x, zeta, rankings, c, alpha, **core)
        return LiduResult((-log_p).reshape(batch), rankings.reshape((*batch, k)))
    size = chunk_size or max(1, _CHUNK_FLOATS // (n_draws * n))
    size = min(size, u)
    values = []
    for start in range(0, u, size):
        stop = min(start + size, u)
        xs, r, cc, ids = flat[:, start:stop], rankings[start:stop], c[start:stop], jnp.arange(start, stop)
        if stop - start < size:  # one compilation for every chunk; the padding is dropped below
            reps = size - (stop - start)
            xs, r, cc, ids = _pad(xs, reps, 1), _pad(r, reps, 0), _pad(cc, reps, 0), _pad(ids, reps, 0)
        x, _ = standardised_samples(xs, r, cc, None)
        zeta = _draws(key, ids, **opts)
        needed = np.asarray(_needed_items(x, zeta, r, cc, alpha, min_std=float(min_std)))
        log_p = correlated_log_prob(x, zeta, r, cc, alpha, n_keep=_item_budget(needed, n), **core)
        values.append(np.asarray(-log_p)[: stop - start])
    return LiduResult(jnp.asarray(np.concatenate(values)).reshape(batch), rankings.reshape((*batch, k)))
