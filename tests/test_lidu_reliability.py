"""LiDu never answers silently wrong (tracker issue 12): invariance to a common affine map of one user's
scores at any scale and offset, NaN rows under `jax.jit` and eager-mode messages from the checked
(`jax.experimental.checkify`) variants, empty inputs and non-positive counts, and a fuzz test of the public
API. (Item 14, an absolute tolerance on every float comparison, is checked suite-wide by
tests/test_tolerances.py.)

Every grid call below uses (U, N, K, G) = (4 users, 8 items, K = 3, 64 cells) with candidates given, so the
jit compilations are shared across tests and hypothesis examples.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lidu_jax
from lidu_jax import standardise

U, N, K, G = 4, 8, 3, 64
S = 6  # draws per user for the sample methods
# LiDu values are O(1-10) nats; float32 standardisation and the float32 grid agree to ~1e-5 across scales.
RTOL, ATOL = 1e-4, 1e-4
PROPERTY = settings(max_examples=30, deadline=None, database=None, derandomize=True)

VARIANTS = {
    "exact": dict(method="exact"),
    "sequential": dict(method="sequential"),
    "pairwise": dict(method="pairwise"),
    "unordered": dict(method="exact", ordered=False),
    "per_position": dict(method="exact", per_position=True),
}


def case(seed: int):
    """float64 ``(mean, std, candidates)`` of shape (U, N); every user has at least K + 1 candidates."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(U, N))
    std = rng.uniform(0.2, 1.0, size=(U, N))
    cand = rng.random((U, N)) > 0.25
    cand[:, : K + 1] = True
    return mean, std, cand


_UNSCALED: dict = {}


def unscaled(seed: int, variant: str):
    """LiDu and rankings of `case(seed)` as given (scale 1, offset 0), computed once."""
    if (seed, variant) not in _UNSCALED:
        mean, std, cand = case(seed)
        v, r = lidu_jax.lidu(mean, std, K, candidates=cand, grid_size=G, **VARIANTS[variant])
        _UNSCALED[seed, variant] = (np.asarray(v), np.asarray(r))
    return _UNSCALED[seed, variant]


def affine(x, a: float, b: float, dtype):
    return (np.asarray(x, np.float64) * a + b).astype(dtype)


# ------------------------------------------------------------------------------ item 7: affine invariance


@PROPERTY
@given(
    seed=st.integers(0, 3),
    log_a=st.floats(-12, 12),
    log_b=st.floats(-3, 9),
    sign=st.sampled_from([-1.0, 0.0, 1.0]),
    variant=st.sampled_from(sorted(VARIANTS)),
    dtype=st.sampled_from([np.float64, np.float32]),
)
@example(seed=0, log_a=-12.0, log_b=9.0, sign=1.0, variant="exact", dtype=np.float64)  # b capped: 1e-5
@example(seed=1, log_a=12.0, log_b=9.0, sign=-1.0, variant="sequential", dtype=np.float64)
@example(seed=2, log_a=2.0, log_b=9.0, sign=1.0, variant="pairwise", dtype=np.float64)  # b = 1e9
@example(seed=3, log_a=-10.0, log_b=0.0, sign=0.0, variant="unordered", dtype=np.float32)
def test_lidu_is_invariant_to_an_affine_map_of_the_scores(seed, log_a, log_b, sign, variant, dtype):
    """``lidu(a mean + b, a std) == lidu(mean, std)`` for a in 1e-12..1e12, |b| up to 1e9, every method.

    The offset is capped where the input itself cannot hold ``a mean + b``: a float64 carries it to
    ``1.1e-16 |b|``, so ``|b| <= 1e7 a`` keeps the input exact to ~1e-9 of the spread of the means (a
    float32 input: ``|b| <= 10 a``, to ~1e-6)."""
    a = 10.0**log_a
    b = sign * 10.0 ** min(log_b, log_a + (7.0 if dtype == np.float64 else 1.0))
    mean, std, cand = case(seed)
    want, want_r = unscaled(seed, variant)
    got, got_r = lidu_jax.lidu(
        affine(mean, a, b, dtype),
        affine(std, a, 0.0, dtype),
        K,
        candidates=cand,
        grid_size=G,
        **VARIANTS[variant],
    )
    np.testing.assert_array_equal(np.asarray(got_r), want_r)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def samples_case(seed: int):
    mean, std, cand = case(seed)
    rng = np.random.default_rng(seed + 100)
    return mean + std * rng.standard_normal((S, U, N)), cand


@PROPERTY
@given(
    seed=st.integers(0, 3),
    log_a=st.floats(-12, 12),
    log_b=st.floats(-3, 9),
    sign=st.sampled_from([-1.0, 1.0]),
    method=st.sampled_from(["kde", "gaussian", "mc", "kde-bandwidth"]),
)
@example(seed=0, log_a=-12.0, log_b=9.0, sign=1.0, method="kde")
@example(seed=1, log_a=12.0, log_b=9.0, sign=-1.0, method="gaussian")
@example(seed=2, log_a=2.0, log_b=9.0, sign=1.0, method="mc")
@example(seed=3, log_a=-9.0, log_b=0.0, sign=1.0, method="kde-bandwidth")
def test_lidu_from_samples_is_invariant_to_an_affine_map_of_the_samples(seed, log_a, log_b, sign, method):
    """The same for `lidu_from_samples` (float64 samples; a KDE bandwidth given in score units scales with
    them)."""
    a, b = 10.0**log_a, sign * 10.0 ** min(log_b, log_a + 7.0)
    samples, cand = samples_case(seed)
    kw = dict(candidates=cand, grid_size=G, method=method.split("-")[0])
    bw = 0.3 if method == "kde-bandwidth" else None
    want, want_r = lidu_jax.lidu_from_samples(samples, K, bandwidth=bw, **kw)
    got, got_r = lidu_jax.lidu_from_samples(
        affine(samples, a, b, np.float64), K, bandwidth=bw and bw * a, **kw
    )
    np.testing.assert_array_equal(np.asarray(got_r), np.asarray(want_r))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL)


def issue_case():
    """The issue's 4-item user (K = 3), repeated for the U users; items 4..7 are not candidates."""
    mean = np.zeros((U, N))
    std = np.ones((U, N))
    mean[:, :4] = [0.5, 0.1, -0.3, 0.9]
    std[:, :4] = [0.3, 0.4, 0.5, 0.2]
    cand = np.zeros((U, N), bool)
    cand[:, :4] = True
    return mean, std, cand


ISSUE_EXAMPLES = {
    # name: (transform of (mean, std), expected LiDu: "base" = the unscaled value, "iid" = the value for four
    # identical N(0, 1) items, or a number)
    "mean and std x1e-9": (lambda m, s: (m * 1e-9, s * 1e-9), "base"),
    "mean and std x1e-10": (lambda m, s: (m * 1e-10, s * 1e-10), "base"),
    "mean and std x1e-12": (lambda m, s: (m * 1e-12, s * 1e-12), "base"),
    "mean and std x1e12": (lambda m, s: (m * 1e12, s * 1e12), "base"),
    # point masses at well-separated means: the list is certain, P = 1
    "std 1e-20": (lambda m, s: (m, np.full_like(s, 1e-20)), 0.0),
    "mean x1e20": (lambda m, s: (m * 1e20, s), 0.0),
    # the means are nothing next to the stds: four identical distributions, P = 1/24 for every order
    "std 1e38": (lambda m, s: (m, np.full_like(s, 1e38)), "iid"),
}


def lidu32(mean, std, cand):
    return np.asarray(
        lidu_jax.lidu(mean.astype(np.float32), std.astype(np.float32), K, candidates=cand, grid_size=G)[0]
    )


@pytest.mark.parametrize("name", sorted(ISSUE_EXAMPLES))
def test_issue_examples_give_the_right_answer(name):
    """The issue's examples in float32: at HEAD x1e-9 and x1e-10 gave wrong plausible values (x1e-10: log 4
    for every user), and std <= 1e-20, mean x 1e20 and std 1e38 gave NaN."""
    transform, expected = ISSUE_EXAMPLES[name]
    mean, std, cand = issue_case()
    got = lidu32(*transform(mean, std), cand)
    if expected == "base":
        want = lidu32(mean, std, cand)
    elif expected == "iid":
        want = lidu32(np.zeros_like(mean), np.ones_like(std), cand)
        assert abs(want[0] - math.log(24.0)) < 1e-2  # the 64-cell grid's own error
    else:
        want = np.full(U, expected)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("offset", [1e7, 1e9, -1e9])
def test_float64_offsets_are_removed_before_float32(offset):
    """A float64 ``mean + 1e7`` used to be cast to float32 (ulp 1 at 1e7) before anything else."""
    mean, std, cand = issue_case()
    base, base_r = lidu_jax.lidu(mean, std, K, candidates=cand, grid_size=G)
    got, got_r = lidu_jax.lidu(mean + offset, std, K, candidates=cand, grid_size=G)
    np.testing.assert_array_equal(np.asarray(got_r), np.asarray(base_r))
    np.testing.assert_allclose(np.asarray(got), np.asarray(base), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(lidu_jax.top_k_rankings(mean + offset, K, cand), base_r)


@pytest.mark.parametrize("scale", [1e-300, 1e-40, 1e40, 1e300])
def test_float64_scales_beyond_float32_range(scale):
    """Float64 scores at scales float32 cannot hold (at HEAD 1e-300 became std = 0, a ValueError)."""
    mean, std, cand = issue_case()
    base, _ = lidu_jax.lidu(mean, std, K, candidates=cand, grid_size=G)
    got, _ = lidu_jax.lidu(mean * scale, std * scale, K, candidates=cand, grid_size=G)
    np.testing.assert_allclose(np.asarray(got), np.asarray(base), rtol=RTOL, atol=ATOL)


def test_chunked_list_log_prob_and_jit_are_invariant_too():
    """`lidu_chunked` (float64 chunks), `list_log_prob` and `lidu` under `jax.jit` (float32, scale only:
    a traced input is float32 unless x64 is on) at extreme scales."""
    mean, std, cand = case(0)
    want, want_r = unscaled(0, "exact")
    for a, b in [(1e-11, 3e-5), (1e11, -4e17)]:
        got, got_r = lidu_jax.lidu_chunked(
            [
                (affine(mean[:2], a, b, np.float64), std[:2] * a, cand[:2]),
                (mean[2:] * a + b, std[2:] * a, cand[2:]),
            ],
            K,
            grid_size=G,
            chunk_size=U,
        )
        np.testing.assert_array_equal(got_r, want_r)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        lp = lidu_jax.list_log_prob(mean * a + b, std * a, want_r, candidates=cand, grid_size=G)
        np.testing.assert_allclose(-np.asarray(lp), want, rtol=RTOL, atol=ATOL)
    for a in (1e-12, 1e12):
        m32, s32 = affine(mean, a, 0.0, np.float32), affine(std, a, 0.0, np.float32)
        np.testing.assert_allclose(np.asarray(_jit_lidu(m32, s32, cand)), want, rtol=RTOL, atol=ATOL)


def test_tiny_std_is_a_defined_point_mass_and_subnormal_std_is_rejected():
    """The degenerate-std rule: a positive normal std far below the spread of the means is a point mass
    (LiDu of a list ordered by separated means -> 0, never NaN); a float32 std below the smallest normal
    (XLA flushes it to 0) is a ValueError naming std, and NaN under `jax.jit`."""
    mean, _, cand = issue_case()
    for tiny in (1e-20, 1e-30, 1e-37):
        got, _ = lidu_jax.lidu(
            mean.astype(np.float32), np.full((U, N), tiny, np.float32), K, candidates=cand, grid_size=G
        )
        np.testing.assert_allclose(np.asarray(got), 0.0, atol=1e-4)
    sub = np.full((U, N), 1e-40, np.float32)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        lidu_jax.lidu(mean.astype(np.float32), sub, K, candidates=cand, grid_size=G)
    got = _jit_lidu(mean, sub, cand)
    assert np.all(np.isnan(np.asarray(got)))


# ---------------------------------------------------------------- item 8: NaN rows under jit; checkify


def valid_inputs():
    mean, std, cand = case(5)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    ranking = np.asarray(lidu_jax.top_k_rankings(mean, K, cand))
    return mean, std, ranking, cand


def _set(x, row, col, value):
    x = x.copy()
    x[row, col] = value
    return x


# fault name -> (mean, std, ranking, cand) -> the same with the fault in users 1 and 3
FAULTS = {
    "NaN mean": lambda m, s, r, c: (_set(m, [1, 3], 5, np.nan), s, r, c),
    "inf mean": lambda m, s, r, c: (_set(m, [1, 3], 0, np.inf), s, r, c),
    "negative std": lambda m, s, r, c: (m, _set(s, [1, 3], 2, -0.5), r, c),
    "zero std": lambda m, s, r, c: (m, _set(s, [1, 3], 6, 0.0), r, c),
    "NaN std": lambda m, s, r, c: (m, _set(s, [1, 3], 1, np.nan), r, c),
    "subnormal std": lambda m, s, r, c: (m, _set(s, [1, 3], 0, 1e-40), r, c),
    "duplicate id": lambda m, s, r, c: (m, s, _set(r, [1, 3], 2, r[[1, 3], 0]), c),
    "id out of range": lambda m, s, r, c: (m, s, _set(r, [1, 3], 1, N), c),
    "negative id": lambda m, s, r, c: (m, s, _set(r, [1, 3], 1, -1), c),
    "excluded item": lambda m, s, r, c: (m, s, r, _set(c, [1, 3], r[[1, 3], 0], False)),
}
LIDU_FAULTS = ["NaN mean", "negative std", "zero std", "subnormal std", "too few candidates"]

_jit_list = jax.jit(lambda m, s, r, c: lidu_jax.list_log_prob(m, s, r, candidates=c, grid_size=G))
_jit_lidu = jax.jit(lambda m, s, c: lidu_jax.lidu(m, s, K, candidates=c, grid_size=G)[0])
_jit_samples = jax.jit(
    lambda x, r, c: lidu_jax.list_log_prob_from_samples(x, r, candidates=c, grid_size=G, method="kde")
)


def faulty(name):
    if name == "too few candidates":
        m, s, r, c = valid_inputs()
        c = c.copy()
        c[[1, 3], 2:] = False  # 2 candidates < K
        return m, s, r, c
    return FAULTS[name](*valid_inputs())


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_jit_list_log_prob_gives_nan_for_invalid_users_only(name):
    m, s, r, c = faulty(name)
    got = np.asarray(_jit_list(m, s, r, c))
    assert np.all(np.isnan(got[[1, 3]])), got
    want = np.asarray(lidu_jax.list_log_prob(*valid_inputs()[:3], candidates=valid_inputs()[3], grid_size=G))
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LIDU_FAULTS)
def test_jit_lidu_gives_nan_for_invalid_users_only(name):
    m, s, _, c = faulty(name)
    got = np.asarray(_jit_lidu(m, s, c))
    assert np.all(np.isnan(got[[1, 3]])), got
    vm, vs, _, vc = valid_inputs()
    want = np.asarray(lidu_jax.lidu(vm, vs, K, candidates=vc, grid_size=G)[0])
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)


def test_jit_samples_give_nan_for_invalid_users_only():
    vm, vs, r, c = valid_inputs()
    x = vm + vs * np.random.default_rng(0).standard_normal((S, U, N)).astype(np.float32)
    want = np.asarray(lidu_jax.list_log_prob_from_samples(x, r, candidates=c, grid_size=G))
    bad_x = x.copy()
    bad_x[2, [1, 3], 4] = np.nan
    bad_r = _set(r, [1, 3], 2, r[[1, 3], 0])
    for xs, rs in ((bad_x, r), (x, bad_r)):
        got = np.asarray(_jit_samples(xs, rs, c))
        assert np.all(np.isnan(got[[1, 3]])), got
        np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)


def _eager_message(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_checked_list_log_prob_raises_the_eager_message(name):
    m, s, r, c = faulty(name)
    eager = _eager_message(lambda: lidu_jax.list_log_prob(m, s, r, candidates=c, grid_size=G))
    checked = _eager_message(lambda: lidu_jax.checked_list_log_prob(m, s, r, candidates=c, grid_size=G))
    assert checked == eager


@pytest.mark.parametrize("name", LIDU_FAULTS)
def test_checked_lidu_raises_the_eager_message(name):
    m, s, _, c = faulty(name)
    eager = _eager_message(lambda: lidu_jax.lidu(m, s, K, candidates=c, grid_size=G))
    checked = _eager_message(lambda: lidu_jax.checked_lidu(m, s, K, candidates=c, grid_size=G))
    assert checked == eager


def test_checked_variants_return_the_eager_values():
    m, s, r, c = valid_inputs()
    v, rk = lidu_jax.checked_lidu(m, s, K, candidates=c, grid_size=G)
    want, want_r = lidu_jax.lidu(m, s, K, candidates=c, grid_size=G)
    np.testing.assert_array_equal(np.asarray(rk), np.asarray(want_r))
    np.testing.assert_allclose(np.asarray(v), np.asarray(want), rtol=1e-5, atol=1e-5)
    lp = lidu_jax.checked_list_log_prob(m, s, r, candidates=c, grid_size=G)
    np.testing.assert_allclose(np.asarray(lp), -np.asarray(want), rtol=1e-5, atol=1e-5)
    # float64 input far from 0: located in float64 on the host before the float32 jit
    v64, _ = lidu_jax.checked_lidu(
        m.astype(np.float64) + 1e8, s.astype(np.float64), K, candidates=c, grid_size=G
    )
    np.testing.assert_allclose(np.asarray(v64), np.asarray(want), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------- item 10: empty inputs, counts <= 0


def test_zero_users_give_empty_results():
    m0, s0, c0 = np.zeros((0, N), np.float32), np.ones((0, N), np.float32), np.ones((0, N), bool)
    v, r = lidu_jax.lidu(m0, s0, K, candidates=c0, grid_size=G)
    assert np.asarray(v).shape == (0,) and np.asarray(r).shape == (0, K)
    lp = lidu_jax.list_log_prob(m0, s0, np.zeros((0, K), np.int32), grid_size=G)
    assert np.asarray(lp).shape == (0,)
    v, r = lidu_jax.lidu_chunked([], K, grid_size=G)
    assert v.shape == (0,) and r.shape == (0, K)
    v, r = lidu_jax.lidu_chunked([(m0, s0, None)], K, grid_size=G)
    assert v.shape == (0,) and r.shape == (0, K)
    x0 = np.zeros((S, 0, N), np.float32)
    for method in ("kde", "gaussian", "mc"):
        v, r = lidu_jax.lidu_from_samples(x0, K, method=method, grid_size=G)
        assert np.asarray(v).shape == (0,) and np.asarray(r).shape == (0, K), method
    lp = lidu_jax.list_log_prob_from_samples(x0, np.zeros((0, K), np.int32), grid_size=G)
    assert np.asarray(lp).shape == (0,)


@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_counts_raise_naming_the_argument(bad):
    m, s, r, c = valid_inputs()
    x = np.stack([m] * S)
    calls = {
        "chunk_size": [
            lambda: lidu_jax.lidu(m, s, K, chunk_size=bad),
            lambda: lidu_jax.lidu_from_samples(x, K, chunk_size=bad),
            lambda: lidu_jax.lidu_chunked([(m, s, c)], K, chunk_size=bad),
            lambda: lidu_jax.lidu_sharded(m, s, K, chunk_size=bad),
        ],
        "tile_size": [lambda: lidu_jax.lidu_chunked([(m, s, c)], K, tile_size=bad)],
        "max_items": [lambda: lidu_jax.list_log_prob(m, s, r, max_items=bad)],
        "min_std": [lambda: lidu_jax.lidu_from_samples(x, K, min_std=float(bad))],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match=name):
                fn()


# ------------------------------------------------------------------------------- item 15a: fuzz test

ARG_NAMES = (
    r"\b(mean|std|k|K|candidates|ranking|method|grid_size|chunk_size|tile_size)\b"  # named in the message
)


def standardised_reference(mean, std, cand):
    """The test's own standardisation, in float64: per user ``(x - max_C mean) / spread_C`` (spread of the
    candidates' means, 1 if they are all equal)."""
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    top = np.max(np.where(cand, m, -np.inf), axis=1, keepdims=True)
    spread = top - np.min(np.where(cand, m, np.inf), axis=1, keepdims=True)
    spread = np.where(spread > 0, spread, 1.0)
    return (m - top) / spread, s / spread


FUZZ_COMPARED: list = []  # the examples that returned values (checked below: not all raise)


FAULTS_FUZZ = [None] * 10 + ["nan", "std<=0", "shape", "method", "grid", "chunk", "point", "point"]


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_fuzz_public_api(seed):
    """Random user counts (0 or U), K (valid, 0, > N), scales (1e-12..1e12), offsets, dtypes, candidate
    masks, methods, entry points (`lidu`, `lidu_chunked`, `list_log_prob`) and faults, all drawn from one
    hypothesis seed (uniform coverage rather than hypothesis' bias to simple values): each call either raises
    a ValueError naming an argument or returns finite values equal (``RTOL``, ``ATOL``) to the same
    estimator on the test's own float64 standardisation of the same input."""
    pick = np.random.default_rng(seed)
    users = int(pick.choice([U] * 7 + [0]))
    k = int(pick.choice([K] * 5 + [0, N + 1]))
    log_a, offset = pick.uniform(-12, 12), pick.choice([0.0, pick.uniform(-1e3, 1e3)])
    dtype = (np.float32, np.float64)[pick.integers(2)]
    variant = str(pick.choice(sorted(VARIANTS)))
    api = str(pick.choice(["lidu", "lidu_chunked", "list_log_prob"]))
    mask_p = pick.choice([0.0, 0.0, 0.1, 0.3, 0.7])
    fault = FAULTS_FUZZ[pick.integers(len(FAULTS_FUZZ))]
    rng = np.random.default_rng(seed + 1)
    a = 10.0**log_a
    mean = rng.normal(size=(users, N)) * a + offset * a * (1e6 if dtype == np.float64 else 1.0)
    std = rng.uniform(0.1, 1.5, size=(users, N)) * a
    cand = rng.random((users, N)) >= mask_p
    kw = dict(VARIANTS[variant], grid_size=G)
    if fault == "point":
        std = std * 1e-20  # a point mass: defined, not an error
    if users and fault == "nan":
        mean[rng.integers(users), rng.integers(N)] = np.nan
    if users and fault == "std<=0":
        std[rng.integers(users), rng.integers(N)] = -a * rng.integers(0, 2)
    if fault == "shape":
        std = std[:, :-1]
    if fault == "method":
        kw["method"] = "magic"
    if fault == "grid":
        kw["grid_size"] = 4
    mean, std = mean.astype(dtype), std.astype(dtype)

    chunk = dict(chunk_size=0) if fault == "chunk" else {}

    def call(m, s):
        if api == "lidu":
            return lidu_jax.lidu(m, s, k, candidates=cand, **chunk, **kw)[0]
        if api == "lidu_chunked":
            tile = dict(tile_size=0) if fault == "chunk" else {}
            return lidu_jax.lidu_chunked([(m, s, cand)], k, **tile, **kw)[0]
        opts = dict(kw)
        per_position = opts.pop("per_position", False)
        # a list of k items: the top by mean (k = 0: empty; k > N: one id twice)
        ranking = np.argsort(-np.where(cand, np.nan_to_num(np.asarray(m, np.float64)), -np.inf), axis=1)
        ranking = np.concatenate([ranking, ranking[:, :1]], axis=1)[:, :k].astype(np.int32)
        lp = lidu_jax.list_log_prob(m, s, ranking, candidates=cand, **opts)
        return -np.asarray(lp) / (k if per_position else 1)

    try:
        got = np.asarray(call(mean, std))
    except ValueError as err:
        assert re.search(ARG_NAMES, str(err)), str(err)
        return
    assert got.shape == (users,) and np.all(np.isfinite(got)), got
    if users:
        want = np.asarray(call(*standardised_reference(mean, std, cand)))
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        FUZZ_COMPARED.append((api, variant, fault))


# ---------------------------------------------------------------------------------------- the frame


def test_standardised_frame_is_float32_safe_for_extreme_inputs():
    """Whatever the scale of a valid input, the standardised scores the kernels see are finite, the list
    items' means lie in [-1, 0] and stds within [STD_FLOOR, STD_CEIL] (the bounds that keep every
    intermediate of the float32 grid finite)."""
    mean, std, cand = case(1)
    r = np.asarray(lidu_jax.top_k_rankings(mean, K, cand))
    for a, b, s_scale in [(1e-30, 0.0, 1.0), (1e30, 3e37, 1.0), (1.0, 0.0, 1e-30), (1.0, 0.0, 1e30)]:
        m32 = affine(mean, a, b, np.float32)
        s32 = affine(std, a * s_scale, 0.0, np.float32)
        ms, ss = standardise.standardise(
            jnp.asarray(m32), jnp.asarray(s32), jnp.asarray(r), jnp.asarray(cand)
        )
        ms, ss = np.asarray(ms), np.asarray(ss)
        assert np.all(np.isfinite(ms)) and np.all(np.isfinite(ss))
        mu_l = np.take_along_axis(ms, r, 1)
        assert np.all((mu_l >= -1.0) & (mu_l <= 0.0))
        assert np.all((ss >= standardise.STD_FLOOR) & (ss <= standardise.STD_CEIL))
        v, _ = lidu_jax.lidu(m32, s32, K, candidates=cand, grid_size=G)
        assert np.all(np.isfinite(np.asarray(v)))
