"""Tests of the public LiDu API (`lidu_jax.estimators`, `lidu_jax.samples`): equal to the reference maths
(`lidu_jax.reference`, itself checked against Monte Carlo in tests/test_lidu_reference.py) on both backends,
batching/jit/vmap invariances, pruning, chunking, the backend rule, one return type, the deprecated names,
and input validation."""

import math
import warnings
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lidu_jax
from lidu_jax import backend, reference

B, N = 32, 12  # every grid call below uses (32 users, 12 items) so jit compilations are shared


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    mu = rng.normal(size=(B, N)).astype(np.float32)
    sd = rng.uniform(0.2, 1.0, size=(B, N)).astype(np.float32)
    cand = rng.random((B, N)) > 0.2
    ranking = np.asarray(lidu_jax.top_k_rankings(mu, 3, cand))
    return mu, sd, ranking, cand


VARIANTS = [("exact", True), ("sequential", True), ("pairwise", True), ("exact", False), ("pairwise", False)]


@pytest.mark.parametrize("be", ["cpu", "accelerator"])
@pytest.mark.parametrize(("method", "ordered"), VARIANTS)
def test_api_equals_the_reference(batch, method, ordered, be):
    """`list_log_prob` (validation, per-user standardisation, tiles, the backend's program: the CPU fast log H
    or the materialised reference) against the reference estimator on the raw scores: equal to float32
    rounding. Forcing ``"accelerator"`` on CPU runs the program GPUs and TPUs get."""
    mu, sd, ranking, cand = batch
    got = lidu_jax.list_log_prob(mu, sd, ranking, candidates=cand, method=method, ordered=ordered, backend=be)
    kw = dict(method=method, ordered=ordered, grid_size=lidu_jax.estimators.DEFAULT_GRID_SIZE)
    want = jax.jit(partial(reference.gaussian_log_prob, **kw))(mu, sd, ranking, cand)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_vmap_equals_loop_and_jit_equals_eager(batch):
    mu, sd, ranking, cand = batch
    f = lambda m, s, r, c: lidu_jax.list_log_prob(m, s, r, candidates=c)
    eager = f(mu, sd, ranking, cand)
    loop = np.concatenate(
        [f(mu[i : i + 1], sd[i : i + 1], ranking[i : i + 1], cand[i : i + 1]) for i in range(4)]
    )
    vmapped = jax.vmap(f)(mu, sd, ranking, cand)
    jitted = jax.jit(f)(mu, sd, ranking, cand)
    chex.assert_trees_all_close(vmapped, eager, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(loop, eager[:4], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)


def test_lidu_jit_matches_chunked_and_ragged_tiles(batch):
    mu, sd, ranking, cand = batch
    want, want_r = lidu_jax.lidu(mu, sd, 3, candidates=cand, chunk_size=B)
    np.testing.assert_array_equal(want_r, ranking)
    got, got_r = jax.jit(lambda m, s, c: lidu_jax.lidu(m, s, 3, candidates=c))(mu, sd, cand)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_r, want_r)
    half, _ = lidu_jax.lidu(mu[:20], sd[:20], 3, candidates=cand[:20], chunk_size=B)  # padded chunk
    chex.assert_trees_all_close(half, want[:20], rtol=1e-5, atol=1e-5)
    tiled, _ = lidu_jax.lidu_chunked([(mu, sd, cand)], 3, tile_size=5)  # 32 users = 6 tiles + padding
    chex.assert_trees_all_close(tiled, want, rtol=1e-5, atol=1e-5)


def test_far_below_candidates_leave_lidu_unchanged_and_pruning_is_exact():
    rng = np.random.default_rng(8)
    mu = rng.normal(size=(B, N)).astype(np.float32)
    sd = rng.uniform(0.2, 0.6, size=(B, N)).astype(np.float32)
    low_mu = rng.normal(-40.0, 1.0, size=(B, 100)).astype(np.float32)
    low_sd = rng.uniform(0.2, 0.6, size=(B, 100)).astype(np.float32)
    base, r0 = lidu_jax.lidu(mu, sd, 3, chunk_size=B)
    wide_mu, wide_sd = np.concatenate([mu, low_mu], 1), np.concatenate([sd, low_sd], 1)
    wide, r1 = lidu_jax.lidu(wide_mu, wide_sd, 3, chunk_size=B)  # prunes to a budget of 16 rest items
    np.testing.assert_array_equal(r0, r1)
    np.testing.assert_allclose(wide, base, rtol=1e-5, atol=1e-5)
    full = -lidu_jax.list_log_prob(wide_mu, wide_sd, r1)  # every rest item
    kept = -lidu_jax.list_log_prob(wide_mu, wide_sd, r1, max_items=9)  # only the 9 of the first 12 items
    np.testing.assert_allclose(wide, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept, full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ the backend rule


def test_backend_follows_the_arrays_not_the_default_backend(monkeypatch):
    """An explicit ``backend=`` wins; else the platform of the first concrete `jax.Array`'s devices; else
    (NumPy, or tracers under `jax.jit`) the default device's. `jax.default_backend` is not consulted."""
    x = jnp.ones((2, 3))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # must not matter
    assert backend.resolve_backend(None, x) == "cpu"
    assert backend.resolve_backend(None, None, np.ones(3), x) == "cpu"
    assert backend.resolve_backend("accelerator", x) == "accelerator"
    assert backend.resolve_backend(None, np.ones(3)) == "cpu"  # the default device is a CPU here
    with jax.default_device(jax.devices("cpu")[1]):
        assert backend.resolve_backend(None, np.ones(3)) == "cpu"
    seen = []
    jax.jit(lambda y: seen.append(backend.resolve_backend(None, y)) or y)(x)
    assert seen == ["cpu"]
    # a default device on an accelerator: host and traced inputs follow it, arrays on a CPU do not
    monkeypatch.setattr(backend, "default_device", lambda: type("Dev", (), {"platform": "gpu"})())
    assert backend.resolve_backend(None, np.ones(3)) == "accelerator"
    assert backend.resolve_backend(None, np.ones(3), x) == "cpu"
    with pytest.raises(ValueError, match="backend"):
        backend.resolve_backend("gpu", x)
    with pytest.raises(ValueError, match="backend"):
        lidu_jax.lidu(x, x, 1, backend="tpu")


def test_one_return_type(batch):
    """`lidu`, `lidu_chunked`, `lidu_sharded`, `lidu_from_samples` and `checked_lidu` all return a
    `LiduResult` of `jax.Array` (values float32, rankings int32), also for zero users."""
    mu, sd, _, cand = batch
    x = np.stack([mu, mu + sd])
    results = {
        "lidu": lidu_jax.lidu(mu, sd, 3, candidates=cand, grid_size=64),
        "lidu_chunked": lidu_jax.lidu_chunked([(mu, sd, cand)], 3, grid_size=64),
        "lidu_sharded": lidu_jax.lidu_sharded(mu, sd, 3, candidates=cand, grid_size=64, chunk_size=4),
        "lidu_from_samples": lidu_jax.lidu_from_samples(x, 3, candidates=cand, grid_size=64, method="mc"),
        "checked_lidu": lidu_jax.checked_lidu(mu, sd, 3, candidates=cand, grid_size=64),
        "lidu_chunked, 0 users": lidu_jax.lidu_chunked([], 3),
        "lidu_sharded, 0 users": lidu_jax.lidu_sharded(mu[:0], sd[:0], 3),
    }
    for name, res in results.items():
        assert type(res) is lidu_jax.LiduResult, name
        assert isinstance(res.values, jax.Array) and isinstance(res.rankings, jax.Array), name
        assert res.values.dtype == jnp.float32 and res.rankings.dtype == jnp.int32, name
        assert res.rankings.shape == (*res.values.shape, 3), name
    np.testing.assert_allclose(results["lidu_sharded"].values, results["lidu"].values, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(results["lidu_chunked"].rankings, results["lidu"].rankings)


def test_old_names_still_work_with_a_warning(batch):
    """``pad_to`` / ``tile`` (now ``chunk_size`` / ``tile_size``) of `lidu_chunked`, ``users_per_device``
    (now ``chunk_size``) of `lidu_sharded`, and the sample estimators under `lidu_jax.estimators`."""
    mu, sd, _, cand = batch
    want = lidu_jax.lidu_chunked([(mu[:5], sd[:5], cand[:5])], 3, grid_size=64, chunk_size=8, tile_size=4)
    with pytest.warns(DeprecationWarning, match="pad_to"):
        got = lidu_jax.lidu_chunked([(mu[:5], sd[:5], cand[:5])], 3, grid_size=64, pad_to=8, tile_size=4)
    np.testing.assert_array_equal(got.values, want.values)
    with pytest.warns(DeprecationWarning, match="tile"):
        lidu_jax.lidu_chunked([(mu[:5], sd[:5], cand[:5])], 3, grid_size=64, chunk_size=8, tile=4)
    with pytest.warns(DeprecationWarning, match="users_per_device"):
        lidu_jax.lidu_sharded(mu[:8], sd[:8], 3, grid_size=64, users_per_device=1)
    with pytest.raises(TypeError, match="chunk_size"):
        lidu_jax.lidu_chunked([], 3, chunk_size=8, pad_to=8)
    with pytest.raises(TypeError, match="unexpected keyword"):
        lidu_jax.lidu_chunked([], 3, chunks_per_tile=8)
    with pytest.warns(DeprecationWarning, match="lidu_jax.samples"):
        from lidu_jax.estimators import sample_moments
    assert sample_moments is lidu_jax.samples.sample_moments
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from lidu_jax.estimators import lidu, lidu_chunked  # noqa: F401  (no warning for names still here)


# ---------------------------------------------------------------------------------------- from samples


def test_kde_on_both_backends(batch):
    mu, sd, ranking, cand = batch
    samples = mu[None] + sd[None] * np.random.default_rng(0).standard_normal((6, *mu.shape)).astype(
        np.float32
    )
    kde = lambda be: lidu_jax.list_log_prob_from_samples(samples, ranking, candidates=cand, backend=be)
    chex.assert_trees_all_close(kde("accelerator"), kde("cpu"), rtol=1e-6, atol=1e-6)


def test_sample_methods_agree_with_gaussian_exact_for_many_gaussian_samples():
    rng = np.random.default_rng(12)
    n, k, s = N, 2, 40_000
    mu, sd = rng.normal(size=n), rng.uniform(0.3, 0.8, size=n)
    samples = (mu + sd * rng.standard_normal((s, n))).astype(np.float32)
    ranking = np.argsort(-mu)[:k]
    exact = float(jnp.exp(lidu_jax.list_log_prob(mu, sd, ranking)))
    gauss = float(jnp.exp(lidu_jax.list_log_prob_from_samples(samples, ranking, method="gaussian")))
    mc = float(jnp.exp(lidu_jax.list_log_prob_from_samples(samples, ranking, method="mc")))
    se = math.sqrt(exact * (1 - exact) / s)
    assert abs(gauss - exact) < 0.01
    assert abs(mc - exact) < 3 * se + 1 / s
    kde = float(jnp.exp(lidu_jax.list_log_prob_from_samples(samples[:2000], ranking, method="kde")))
    assert abs(kde - exact) < 0.02  # KDE widens each density by a small bandwidth


def test_lidu_from_samples_shapes_and_chunking():
    rng = np.random.default_rng(13)
    samples = rng.normal(size=(6, 2, N)).astype(np.float32)
    v, r = lidu_jax.lidu_from_samples(samples, 3, method="kde", bandwidth=0.3)
    v1, r1 = lidu_jax.lidu_from_samples(samples, 3, method="kde", bandwidth=0.3, chunk_size=1)
    chex.assert_shape(v, (2,))
    chex.assert_shape(r, (2, 3))
    np.testing.assert_allclose(v, v1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r, r1)
    np.testing.assert_array_equal(r, lidu_jax.top_k_rankings(samples.mean(0), 3))
    assert np.all(np.asarray(v) > 0)
    vp, _ = lidu_jax.lidu_from_samples(samples, 3, method="kde", bandwidth=0.3, per_position=True)
    np.testing.assert_allclose(vp, np.asarray(v) / 3, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- validation


def good():
    mu = np.array([[0.5, 0.1, -0.3, 0.9]], np.float32)
    sd = np.array([[0.3, 0.4, 0.5, 0.2]], np.float32)
    return mu, sd, np.array([[3, 0]]), np.ones((1, 4), bool)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m, s, r, c: (np.where(m > 0.8, np.nan, m), s, r, c), "mean"),
        (lambda m, s, r, c: (np.where(m > 0.8, np.inf, m), s, r, c), "mean"),
        (lambda m, s, r, c: (m, np.where(s < 0.25, 0.0, s), r, c), "std"),
        (lambda m, s, r, c: (m, -s, r, c), "std"),
        (lambda m, s, r, c: (m, s, np.array([[3, 3]]), c), "duplicate"),
        (lambda m, s, r, c: (m, s, np.array([[3, 7]]), c), "ranking"),
        (lambda m, s, r, c: (m, s, r, np.array([[False, True, True, True]])), "excluded"),
        (lambda m, s, r, c: (m, s, np.array([[3, 0, 1]]), np.array([[True, True, False, False]])), "K=3"),
        (lambda m, s, r, c: (m, s[:, :3], r, c), "std must have the shape"),
        (lambda m, s, r, c: (m, s, r, c[:, :3]), "candidates must have the shape"),
        (lambda m, s, r, c: (m, s, np.array([3, 0]), c), "ranking must have shape"),
        (lambda m, s, r, c: (m, s, r.astype(np.float32), c), "integer"),
    ],
)
def test_list_log_prob_bad_inputs(change, match):
    m, s, r, c = change(*good())
    with pytest.raises(ValueError, match=match):
        lidu_jax.list_log_prob(m, s, r, candidates=c)


def test_bad_method_grid_and_k():
    m, s, r, _c = good()
    with pytest.raises(ValueError, match="method"):
        lidu_jax.list_log_prob(m, s, r, method="magic")
    with pytest.raises(ValueError, match="grid_size"):
        lidu_jax.list_log_prob(m, s, r, grid_size=2)
    with pytest.raises(ValueError, match="k=5"):
        lidu_jax.lidu(m, s, 5)
    with pytest.raises(ValueError, match="K=3"):
        lidu_jax.lidu(m, s, 3, candidates=np.array([[True, True, False, False]]))
    with pytest.raises(ValueError, match="std"):
        lidu_jax.lidu(m, np.zeros_like(s), 2)
    with pytest.raises(ValueError, match="mean"):
        lidu_jax.lidu(np.full_like(m, np.nan), s, 2)
    with pytest.raises(ValueError, match="k must be"):
        lidu_jax.lidu(m, s, 0)


def test_sample_input_validation():
    samples = np.random.default_rng(0).normal(size=(4, 2, 5)).astype(np.float32)
    r = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="at least 2 draws"):
        lidu_jax.list_log_prob_from_samples(samples[:1], r)
    with pytest.raises(ValueError, match="NaN"):
        lidu_jax.list_log_prob_from_samples(np.where(samples > 1, np.nan, samples), r)
    with pytest.raises(ValueError, match="duplicate"):
        lidu_jax.list_log_prob_from_samples(samples, np.array([[0, 0], [2, 3]]))
    with pytest.raises(ValueError, match="method"):
        lidu_jax.list_log_prob_from_samples(samples, r, method="exact")
    with pytest.raises(ValueError, match="bandwidth"):
        lidu_jax.list_log_prob_from_samples(samples, r, bandwidth=0.0)
    with pytest.raises(ValueError, match="k="):
        lidu_jax.lidu_from_samples(samples, 6)
