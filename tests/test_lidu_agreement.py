"""list_self_agreement: 1 - E|top-K(S) ∩ L|/K under independent Gaussians, against references written here."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import integrate, stats

from lidu_jax.agreement import list_self_agreement

KEY = jax.random.key(3)


def _numpy_mc(mean, std, cand, k, n, rng):
    """The same expectation by brute force in NumPy: draw, rank, count the overlap with the mean's top-k."""
    out = []
    for m, s, c in zip(mean, std, cand, strict=True):
        lst = np.argsort(np.where(c, -m, np.inf), kind="stable")[:k]
        draws = m + s * rng.standard_normal((n, m.size))
        top = np.argsort(np.where(c, -draws, np.inf), axis=1, kind="stable")[:, :k]
        out.append(1.0 - np.mean([len(set(t) & set(lst)) for t in top]) / k)
    return np.array(out)


def test_top_1_equals_the_integral_of_the_argmax_probability():
    # K = 1: A = Pr[S_l1 > every other S_j] = integral of phi_l1(x) prod_j Phi_j(x) dx, by quadrature.
    mean = np.array([[1.0, 0.6, 0.2, -0.5]], np.float32)
    std = np.array([[0.5, 0.7, 0.4, 1.0]], np.float32)

    def f(x):
        return stats.norm.pdf(x, mean[0, 0], std[0, 0]) * np.prod(stats.norm.cdf(x, mean[0, 1:], std[0, 1:]))

    p_top = integrate.quad(f, -10, 10, limit=200)[0]
    n = 8192
    val = float(list_self_agreement(mean, std, 1, key=KEY, n_draws=n).values[0])
    se = np.sqrt(p_top * (1 - p_top) / n)
    assert abs((1 - val) - p_top) < 4 * se + 1e-6


def test_matches_numpy_brute_force_with_masked_items():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(5, 7)).astype(np.float32)
    std = rng.uniform(0.2, 1.0, size=(5, 7)).astype(np.float32)
    cand = np.ones((5, 7), bool)
    cand[:, 0] = False
    mean[:, 0] = 50.0  # a masked item far above the rest must never count
    n = 4096
    ours = np.asarray(list_self_agreement(mean, std, 3, key=KEY, candidates=cand, n_draws=n).values)
    ref = _numpy_mc(mean, std, cand, 3, 200_000, rng)
    # per-user SE of a mean of K=3 correlated indicators is at most 0.5/sqrt(n); the reference adds its own
    assert np.all(np.abs(ours - ref) < 4 * 0.5 / np.sqrt(n) + 4 * 0.5 / np.sqrt(200_000))
    assert ours.min() >= 0.0 and ours.max() <= 1.0


def test_affine_invariance_chunking_and_reproducibility():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(6, 20)).astype(np.float32)
    std = rng.uniform(0.3, 1.0, size=(6, 20)).astype(np.float32)
    a = np.asarray(list_self_agreement(mean, std, 4, key=KEY, n_draws=64).values)
    b = np.asarray(list_self_agreement(3.0 * mean + 7.0, 3.0 * std, 4, key=KEY, n_draws=64).values)
    c = np.asarray(list_self_agreement(mean, std, 4, key=KEY, n_draws=64, chunk_size=4).values)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(a, c)  # user u draws from fold_in(key, u) whatever the chunk
    d = np.asarray(list_self_agreement(mean, std, 4, key=jax.random.key(4), n_draws=64).values)
    assert not np.array_equal(a, d)


def test_certain_list_gives_zero_and_inputs_are_checked():
    mean = np.array([[10.0, 5.0, 0.0, -5.0]], np.float32)
    std = np.full((1, 4), 1e-3, np.float32)
    assert float(list_self_agreement(mean, std, 2, key=KEY, n_draws=16).values[0]) == 0.0
    with pytest.raises(ValueError, match="n_draws"):
        list_self_agreement(mean, std, 2, key=KEY, n_draws=0)
    with pytest.raises(ValueError, match="k=5 is larger than the number of items"):
        list_self_agreement(mean, std, 5, key=KEY)
    with pytest.raises(ValueError, match=r"NaN|finite"):
        list_self_agreement(np.where(mean > 9, np.nan, mean), std, 2, key=KEY)
    with pytest.raises(ValueError, match="std"):
        list_self_agreement(mean, np.zeros_like(std), 2, key=KEY)
