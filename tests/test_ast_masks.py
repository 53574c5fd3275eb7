"""N:M masks, Wanda scores, the sparse path filter, straight-through masking and calibration norms."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ast_jax.masks import check_nm, flip_count, nm_mask, tree_flip_count, wanda_scores
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.sparsify import (
    apply_masks,
    collect_input_norms,
    compute_masks,
    count_params,
    is_strict_nm,
    masked_params,
    path_str,
    sparse_paths,
    strict_nm_report,
    validate_sparse_params,
    wanda_masks,
)


def np_nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Reference: a Python loop over groups, stable sort on -score (so the lower index wins ties)."""
    s = np.moveaxis(scores, axis, 0)
    out = np.zeros(s.shape, bool)
    flat_s = s.reshape(s.shape[0], -1)
    flat_o = out.reshape(s.shape[0], -1)
    for col in range(flat_s.shape[1]):
        for g in range(0, s.shape[0], m):
            order = np.argsort(-flat_s[g : g + m, col], kind="stable")
            flat_o[g + order[:n], col] = True
    return np.moveaxis(flat_o.reshape(s.shape), 0, axis)


# A few shapes (rank 1-3, the grouped axis anywhere) so the jitted mask compiles once per combination while
# hypothesis varies the values, the n:m pair and whether exact ties occur.
_SHAPES = [((8,), 0), ((8, 3), 0), ((3, 8), 1), ((2, 16, 3), 1), ((2, 3, 8), 2)]
# Compilation dominates these tests on CPU; XLA's lowest backend optimisation level roughly halves it.
FAST = {"xla_backend_optimization_level": 0}
_nm_jit = jax.jit(nm_mask, static_argnames=("n", "m", "axis"), compiler_options=FAST)


@settings(max_examples=30, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]),
    shape_axis=st.sampled_from(_SHAPES),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_mask_keeps_exactly_n_per_group_and_matches_loop_reference(nm, shape_axis, ties, seed):
    n, m = nm
    shape, axis = shape_axis
    rng = np.random.default_rng(seed)
    # Small integer values create many exact ties, which exercises the tie-break rule.
    w = (
        rng.integers(-2, 3, size=shape).astype(np.float32)
        if ties
        else rng.normal(size=shape).astype(np.float32)
    )
    mask = np.asarray(_nm_jit(jnp.asarray(w), n=n, m=m, axis=axis))
    assert mask.dtype == bool and mask.shape == w.shape
    counts = np.moveaxis(mask, axis, 0).reshape(shape[axis] // m, m, -1).sum(axis=1)
    assert np.all(counts == n)
    np.testing.assert_array_equal(mask, np_nm_mask(np.abs(w), n, m, axis))


def test_nm_mask_tie_break_lower_index_and_scores_argument():
    w = jnp.ones((8, 2))
    np.testing.assert_array_equal(np.asarray(nm_mask(w))[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])
    scores = jnp.asarray([[0.0], [3.0], [1.0], [2.0]])
    np.testing.assert_array_equal(np.asarray(nm_mask(jnp.ones((4, 1)), scores=scores))[:, 0], [0, 1, 0, 1])
    # A NaN score never displaces a finite one.
    scores = jnp.asarray([[jnp.nan], [0.1], [0.2], [jnp.nan]])
    np.testing.assert_array_equal(np.asarray(nm_mask(jnp.ones((4, 1)), scores=scores))[:, 0], [0, 1, 1, 0])


def test_nm_mask_is_jittable_and_vmappable():
    w = jax.random.normal(jax.random.key(0), (3, 16, 5))
    batched = jax.jit(jax.vmap(lambda x: nm_mask(x, 2, 4)), compiler_options=FAST)(w)
    jitted = jax.jit(lambda x: nm_mask(x, 2, 4, axis=1), compiler_options=FAST)(w)
    chex.assert_trees_all_equal(batched, jitted)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 4, "m": 4}, "0 < n < m"),
        ({"n": 0, "m": 4}, "0 < n < m"),
        ({"n": 2, "m": 1}, "m must be"),
        ({"n": 2, "m": 3}, "not a multiple of m=3"),
        ({"axis": 2}, "axis=2 out of range"),
    ],
)
def test_nm_mask_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nm_mask(jnp.ones((8, 4)), **kwargs)


def test_wanda_scores_and_check_nm():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    norms = rng.uniform(0.1, 10, size=8).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(wanda_scores(w, norms)), np.abs(w) * norms[:, None], rtol=1e-6, atol=0.0
    )  # one product each: exact
    with pytest.raises(ValueError, match="input_norms"):
        wanda_scores(w, norms[:4])
    mask = nm_mask(w, scores=wanda_scores(w, norms))
    assert bool(check_nm(mask)) and bool(check_nm(w * mask))
    assert not bool(check_nm(w))
    assert int(flip_count(mask, ~mask)) == mask.size
    assert int(tree_flip_count({"a": mask, "b": None}, {"a": mask, "b": None})) == 0


# ---- sparsify: which kernels, masked params, calibration ---------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_small():
    model = GPT2(GPT2Config(n_layer=2, d_model=16, n_head=2, max_len=8))
    params = jax.jit(model.init, compiler_options=FAST)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))[
        "params"
    ]
    return model, params


def test_default_filter_selects_block_linear_kernels_only(gpt2_small):
    _, params = gpt2_small
    got = {path_str(p) for p in sparse_paths(params)}
    want = {
        f"block_{i}/{mod}/kernel"
        for i in range(2)
        for mod in ("attn/q", "attn/k", "attn/v", "attn/proj", "mlp/fc", "mlp/proj")
    }
    assert got == want
    masks = compute_masks(params)
    assert masks["wte"]["embedding"] is None and masks["block_0"]["attn"]["q"]["bias"] is None
    assert masks["block_0"]["ln_1"]["scale"] is None
    custom = sparse_paths(params, lambda path, leaf: path[-1] == "kernel" and path[1] == "mlp")
    assert len(custom) == 4


def test_layer_with_bad_input_dim_is_named():
    params = {"block_0": {"ok": {"kernel": jnp.ones((8, 4))}, "odd": {"kernel": jnp.ones((6, 4))}}}
    with pytest.raises(ValueError, match="block_0/odd/kernel"):
        validate_sparse_params(params, 2, 4)
    with pytest.raises(ValueError, match="selected no kernel"):
        compute_masks({"head": {"kernel": jnp.ones((8, 4))}})


def test_straight_through_gradient_equals_gradient_wrt_masked_weight():
    k1, k2 = jax.random.split(jax.random.key(1))
    w = jax.random.normal(k1, (8, 6))
    x = jax.random.normal(k2, (5, 8))
    params = {"block_0": {"fc": {"kernel": w}}}
    masks = compute_masks(params)
    mk = masks["block_0"]["fc"]["kernel"]

    def f(wm):
        return jnp.sum(jnp.tanh(x @ wm) ** 2)

    grad = lambda fn: jax.jit(jax.grad(fn), compiler_options=FAST)
    g_dense = grad(lambda p: f(masked_params(p, masks)["block_0"]["fc"]["kernel"]))(params)
    w_masked = jnp.where(mk, w, 0.0)
    g_ref = grad(f)(w_masked)
    tol = 1e-6 * float(jnp.abs(g_ref).max())  # two compiled programs may sum in different orders
    chex.assert_trees_all_close(g_dense["block_0"]["fc"]["kernel"], g_ref, rtol=1e-6, atol=tol)
    assert bool(jnp.any(jnp.where(mk, 0.0, g_ref) != 0))  # the masked positions really get gradient
    # Forward values are exactly the masked weights; the non-straight-through product zeroes those gradients.
    chex.assert_trees_all_equal(masked_params(params, masks)["block_0"]["fc"]["kernel"], w_masked)
    g_plain = grad(lambda p: f(apply_masks(p, masks)["block_0"]["fc"]["kernel"]))(params)
    chex.assert_trees_all_close(
        g_plain["block_0"]["fc"]["kernel"], jnp.where(mk, g_ref, 0.0), rtol=1e-6, atol=tol
    )


class _TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x, **_):
        h = nn.relu(nn.Dense(8, name="block_0")(x))
        return nn.Dense(4, name="block_1")(h)


def test_collect_input_norms_and_wanda_masks_match_numpy():
    model = _TwoLayer()
    x1 = jax.random.normal(jax.random.key(2), (3, 5, 4))
    x2 = jax.random.normal(jax.random.key(3), (3, 5, 4))
    params = jax.jit(model.init, compiler_options=FAST)(jax.random.key(0), x1)["params"]
    filt = lambda path, leaf: path[-1] == "kernel"
    norms = collect_input_norms(model, params, [x1, x2], sparse_filter=filt)
    xs = np.concatenate([np.asarray(x1).reshape(-1, 4), np.asarray(x2).reshape(-1, 4)])
    np.testing.assert_allclose(
        np.asarray(norms["block_0"]["kernel"]), np.linalg.norm(xs, axis=0), rtol=1e-5, atol=1e-6
    )
    w0, b0 = np.asarray(params["block_0"]["kernel"]), np.asarray(params["block_0"]["bias"])
    h = np.maximum(xs @ w0 + b0, 0)
    np.testing.assert_allclose(
        np.asarray(norms["block_1"]["kernel"]), np.linalg.norm(h, axis=0), rtol=1e-4, atol=1e-6
    )
    assert norms["block_0"]["bias"] is None
    wm = wanda_masks(params, norms, sparse_filter=filt)
    w1 = np.asarray(params["block_1"]["kernel"])
    ref = np_nm_mask(np.abs(w1) * np.linalg.norm(h, axis=0)[:, None], 2, 4, 0)
    np.testing.assert_array_equal(np.asarray(wm["block_1"]["kernel"]), ref)


def test_strict_checker_and_counts(gpt2_small):
    _, params = gpt2_small
    masks = compute_masks(params)
    pruned = apply_masks(params, masks)
    assert is_strict_nm(pruned, masks=masks)
    assert not is_strict_nm(params)
    broken = jax.tree_util.tree_map(lambda x: x, pruned)
    dropped = np.argwhere(~np.asarray(masks["block_1"]["mlp"]["fc"]["kernel"]))[0]
    kernel = broken["block_1"]["mlp"]["fc"]["kernel"]
    broken["block_1"]["mlp"]["fc"]["kernel"] = kernel.at[tuple(dropped)].set(1.0)
    report = strict_nm_report(broken, masks=masks)
    assert report["block_1/mlp/fc/kernel"] is False and report["block_0/mlp/fc/kernel"] is True
    assert not strict_nm_report(broken)["block_1/mlp/fc/kernel"]  # 3 non-zeros in a group of 4
    counts = count_params(params, masks)
    assert counts["nonzero_after_mask"] == counts["total"] - counts["sparse"] // 2
