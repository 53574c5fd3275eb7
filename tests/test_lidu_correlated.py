"""Tests of `lidu_jax.correlated.lidu_correlated` (LiDu under the members' shrunk sample covariance): plain
LiDu at shrinkage 1, agreement with a brute-force NumPy count under the full Gaussian, masking, the per-user
frame, reproducibility, the variance of the designs, validation.

Every call uses M = 4 members and 8 items (fewer candidates via the mask), so compilations are shared."""

import jax
import numpy as np
import pytest

import lidu_jax
from lidu_jax.correlated import lidu_correlated

M, N_ITEMS = 4, 8
BRUTE_DRAWS = 400_000
CHUNK, DRAWS = 32, 16  # every call pads its users to chunks of 32 and uses 16 draws: shared compilations


def _run(x, k, *, key, **kw):
    """`lidu_correlated` with the shared shapes, on the ``"accelerator"`` program unless told otherwise: on
    a CPU it compiles about twice as fast as the CPU fast path, which computes the same numbers (to float32
    rounding; tests/test_lidu_estimators.py) and which `test_shrinkage_one_is_plain_lidu` runs."""
    kw = dict(n_draws=DRAWS, chunk_size=CHUNK, backend="accelerator") | kw
    return lidu_correlated(x, k, key=jax.random.key(key), **kw)


def _user(rng, n_cand: int) -> tuple[np.ndarray, np.ndarray]:
    """``(samples (M, N_ITEMS), cand (N_ITEMS,))``: one user whose members share a common move (so the
    correlations matter); items past ``n_cand`` are masked and given scores far above the rest, so they
    would dominate the list if the mask were ignored."""
    mu = np.sort(rng.normal(size=N_ITEMS))[::-1]
    dev = 0.5 * rng.normal(size=(M, N_ITEMS)) + rng.normal(size=(M, 1)) * rng.normal(size=(1, N_ITEMS))
    x = mu + dev
    cand = np.arange(N_ITEMS) < n_cand
    x[:, ~cand] = 50.0 + 10.0 * rng.normal(size=(M, N_ITEMS - n_cand))
    return x, cand


def _brute_force_prob(x: np.ndarray, cand: np.ndarray, k: int, alpha: float, rng) -> tuple[float, float]:
    """``(P, standard error)`` of ``top-k in order == top-k of the mean`` over the candidates, counted from
    ``BRUTE_DRAWS`` draws of ``N(mu, (1 - alpha) S + alpha diag(S))``, ``S`` the members' sample
    covariance."""
    xc = x[:, cand].astype(np.float64)
    mu = xc.mean(0)
    s = np.cov(xc, rowvar=False, ddof=1)
    cov = (1 - alpha) * s + alpha * np.diag(np.diag(s))
    draws = mu + rng.standard_normal((BRUTE_DRAWS, mu.size)) @ np.linalg.cholesky(cov).T
    order = np.argsort(-mu, kind="stable")
    top, rest = draws[:, order[:k]], draws[:, order[k:]]
    hits = np.all(top[:, :-1] > top[:, 1:], axis=1) & (top[:, -1] > rest.max(axis=1))
    p = hits.mean()
    return p, np.sqrt(p * (1 - p) / BRUTE_DRAWS)


# (candidates, K, alpha): n = 6..8 competing items.
CASES = [(6, 2, 0.3), (7, 2, 0.7), (8, 2, 0.3), (6, 3, 0.7), (7, 3, 0.3), (8, 3, 0.7)]


def test_against_brute_force():
    """The estimator (averaged over 16 or 32 replicate users, each with its own draws) agrees with a
    brute-force count under the full Gaussian within 4 combined standard errors + 1% (grid), masked items
    included; the independent model (shrinkage 1) fails the same criterion in some cases (the test has
    power)."""
    rng = np.random.default_rng(11)
    rejected = 0
    for k, alpha in [(2, 0.3), (2, 0.7), (3, 0.3), (3, 0.7)]:
        cases = [c for c, kk, a in CASES if kk == k and a == alpha]
        reps = CHUNK // len(cases)  # one chunk of 32 users per call: one compilation per K
        users = [_user(rng, n_cand) for n_cand in cases]
        x = np.stack([np.repeat(u[0][:, None], reps, axis=1) for u in users], axis=1)  # (M, cases, reps, n)
        cand = np.stack([np.repeat(u[1][None], reps, axis=0) for u in users])
        got = _run(x, k, key=3, candidates=cand, shrinkage=alpha)
        plain = _run(x, k, key=3, candidates=cand, shrinkage=1.0).values
        p_hat = np.exp(-np.asarray(got.values, np.float64))
        for i, (xi, ci) in enumerate(users):
            want_list = np.argsort(-np.where(ci, xi.mean(0), -np.inf), kind="stable")[:k]
            assert (np.asarray(got.rankings)[i] == want_list).all()
            p_bf, se_bf = _brute_force_prob(xi, ci, k, alpha, rng)
            est, se_est = p_hat[i].mean(), p_hat[i].std(ddof=1) / np.sqrt(reps)
            tol = 4 * np.hypot(se_bf, se_est) + 0.01 * p_bf
            assert abs(est - p_bf) <= tol, (cases[i], alpha, est, p_bf, tol)
            rejected += abs(np.exp(-float(plain[i, 0])) - p_bf) > tol
    assert rejected >= 2, "the cases cannot tell the correlated model from the independent one"


@pytest.fixture(scope="module")
def users():
    """40 users (two chunks, the second padded) with 6..8 candidates each."""
    rng = np.random.default_rng(1)
    made = [_user(rng, n_cand) for n_cand in rng.integers(6, 9, size=40)]
    return np.stack([u[0] for u in made], axis=1), np.stack([u[1] for u in made])


def test_shrinkage_one_is_plain_lidu(users):
    x, cand = users
    x = x.astype(np.float32)
    got, got_r = _run(x, 3, key=0, candidates=cand, shrinkage=1.0, backend="cpu")
    mean, std = lidu_jax.sample_moments(x)
    kw = dict(candidates=cand, grid_size=256, chunk_size=CHUNK, backend="accelerator")
    want, want_r = lidu_jax.lidu(mean, std, 3, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_r, want_r)


def test_reproducible(users):
    x, cand = users
    first = np.asarray(_run(x, 3, key=5, candidates=cand).values)
    np.testing.assert_array_equal(_run(x, 3, key=5, candidates=cand).values, first)
    assert np.all(_run(x, 3, key=6, candidates=cand).values != first)


def test_affine_invariance_per_user(users):
    """Same key, each user's scores through its own ``a x + b`` (float64 in, as wide as 1e-2 to 1e3 in
    scale and 1e4 in offset): the same values."""
    x, cand = users
    rng = np.random.default_rng(2)
    a = 10.0 ** rng.uniform(-2, 3, size=(1, x.shape[1], 1))
    b = rng.choice([0.0, -7.0, 1e4, 3.0], size=(1, x.shape[1], 1))
    moved = _run(a * x + b, 3, key=2, candidates=cand).values
    np.testing.assert_allclose(moved, _run(x, 3, key=2, candidates=cand).values, rtol=1e-4, atol=1e-4)


def test_masked_items_never_compete(users):
    """Masked items (scored far above the candidates by `_user`) moved far below: nothing changes, and they
    are never listed."""
    x, cand = users
    values, rankings = _run(x, 3, key=4, candidates=cand)
    values2, _ = _run(np.where(cand[None], x, -x - 1e3), 3, key=4, candidates=cand)
    np.testing.assert_allclose(values2, values, rtol=1e-5, atol=1e-5)
    assert np.take_along_axis(cand, np.asarray(rankings), axis=1).all()


def test_designs_reduce_variance():
    """Over 128 replicate estimates of a user whose members move the list against the rest (the list's
    probability responds about linearly to the members' common move), antithetic pairs beat plain Monte
    Carlo and the orthogonal design beats both (measured variance ratios 0.25 and 0.14 of plain MC)."""
    mu = np.array([2.0, 1.4, 0.9, 0.2, 0.0, -0.3, -0.8, -1.2])
    direction = np.where(np.arange(N_ITEMS) < 3, 1.0, -1.0)
    t = np.array([-1.5, -0.5, 0.5, 1.5])
    x = mu + 0.4 * t[:, None] * direction + 0.3 * np.random.default_rng(7).normal(size=(M, N_ITEMS))
    xs = np.repeat(x[:, None], 128, axis=1)
    var = {}
    for design in ("mc", "antithetic", "orthogonal"):
        v = _run(xs, 3, key=9, shrinkage=0.5, design=design).values
        var[design] = np.exp(-np.asarray(v, np.float64)).var()
    assert var["antithetic"] < 0.6 * var["mc"], var
    assert var["orthogonal"] < var["antithetic"], var


def test_jit_matches_eager_and_chunking_changes_nothing(users):
    """Under `jax.jit` all 40 users go through one traced computation (no chunks, no pruning, no value
    checks); eagerly they go in a full and a padded chunk of 32. User u draws from ``fold_in(key, u)``
    either way, so the values agree."""
    x, cand = users
    x = x.astype(np.float32)
    f = lambda s: _run(s, 3, key=1, candidates=cand).values
    np.testing.assert_allclose(jax.jit(f)(x), f(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(samples=np.zeros((1, 2, N_ITEMS))), "at least 2 draws"),
        (dict(shrinkage=0.0), "shrinkage"),
        (dict(shrinkage=1.5), "shrinkage"),
        (dict(shrinkage=float("nan")), "shrinkage"),
        (dict(n_draws=0), "n_draws"),
        (dict(design="sobol"), "design"),
        (dict(key=0), "key"),
        (dict(k=0), "k must be"),
        (dict(k=5), "K=5 is larger than the number of candidates"),
        (dict(candidates=np.ones((3, N_ITEMS), bool)), "candidates must have the shape"),
        (dict(grid_size=4), "grid_size"),
    ],
)
def test_validation(change, match):
    x = np.random.default_rng(0).normal(size=(M, 2, N_ITEMS))
    cand = np.ones((2, N_ITEMS), bool)
    cand[1, 4:] = False
    kw = dict(samples=x, k=3, key=jax.random.key(0), candidates=cand) | change
    with pytest.raises(ValueError, match=match):
        lidu_correlated(kw.pop("samples"), kw.pop("k"), **kw)


def test_nan_samples_rejected():
    x = np.random.default_rng(0).normal(size=(M, 2, N_ITEMS))
    x[2, 1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lidu_correlated(x, 3, key=jax.random.key(0))
