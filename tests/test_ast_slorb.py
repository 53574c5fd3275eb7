"""SLoRB: initialisation, the reshape-and-sum fast path, the interceptor on any Flax model."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.slorb import (
    apply_with_slorb,
    block_project,
    block_projection_matrix,
    slorb_delta,
    slorb_init,
    slorb_init_tree,
    slorb_layer,
    split_trainable,
    trainable_masks,
    trainable_params,
)
from ast_jax.sparsify import compute_masks, masked_params


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 6)).astype(np.float32)
    mask = np.zeros_like(w, bool)
    for g in range(0, 32, 4):  # reference 2:4 mask by a loop
        for c in range(6):
            mask[g + np.argsort(-np.abs(w[g : g + 4, c]), kind="stable")[:2], c] = True
    x = rng.normal(size=(64, 32)).astype(np.float32)
    return w, mask, x


@pytest.mark.parametrize("init", ["mean", "sum"])
def test_slorb_init_matches_loop(layer, init):
    w, mask, _ = layer
    k = 8
    s = np.asarray(slorb_init(jnp.asarray(w), jnp.asarray(mask), k, init))
    assert s.shape == (32 // k, 6)
    ref = np.zeros((32 // k, 6))
    for g in range(32 // k):
        for o in range(6):
            tot = sum(w[j, o] * (1 - mask[j, o]) for j in range(g * k, g * k + k))
            ref[g, o] = tot / k if init == "mean" else tot
    np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-6)


def test_xavier_init_needs_key_and_k_must_divide(layer):
    w, mask, _ = layer
    s = slorb_init(jnp.asarray(w), jnp.asarray(mask), 16, "xavier", key=jax.random.key(0))
    assert s.shape == (2, 6) and float(jnp.std(s)) > 0
    # Glorot-uniform with fan-in d/k = 16 and fan-out 64: U(-a, a), a = sqrt(6 / 80), std a / sqrt(3)
    big = slorb_init(jnp.ones((256, 64)), jnp.ones((256, 64), bool), 16, "xavier", key=jax.random.key(1))
    a = np.sqrt(6 / (16 + 64))
    assert big.shape == (16, 64) and float(jnp.abs(big).max()) <= a
    assert float(jnp.std(big)) == pytest.approx(a / np.sqrt(3), rel=0.1)  # 1024 draws: ~2% sampling error
    with pytest.raises(ValueError, match="PRNG key"):
        slorb_init(jnp.asarray(w), jnp.asarray(mask), 16, "xavier")
    with pytest.raises(ValueError, match="does not divide"):
        slorb_init(jnp.asarray(w), jnp.asarray(mask), 5)


def test_fast_path_equals_explicit_projection_matmul(layer):
    w, mask, x = layer
    k = 4
    s = slorb_init(jnp.asarray(w), jnp.asarray(mask), k)
    proj = block_projection_matrix(32, k)
    # block sums cancel: an absolute floor at float32 rounding of the inputs' scale (BLAS-kernel independent)
    np.testing.assert_allclose(
        np.asarray(block_project(jnp.asarray(x), k)),
        x @ np.asarray(proj).T,
        rtol=1e-5,
        atol=1e-6 * float(np.abs(x).max()),
    )
    fast = slorb_delta(jnp.asarray(x), s)
    explicit = (jnp.asarray(x) @ proj.T) @ s
    chex.assert_trees_all_close(fast, explicit, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(slorb_delta(jnp.asarray(x), s, proj), explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [4, 8, 16])
def test_slorb_at_init_is_closer_to_dense_than_plain_2of4(layer, k):
    w, mask, x = layer
    wj, mj, xj = jnp.asarray(w), jnp.asarray(mask), jnp.asarray(x)
    dense = x @ w
    plain = np.asarray(xj @ jnp.where(mj, wj, 0.0))
    boosted = np.asarray(slorb_layer(xj, wj, mj, slorb_init(wj, mj, k)))
    assert np.linalg.norm(boosted - dense) < np.linalg.norm(plain - dense)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, return_hidden=False):
        h = nn.relu(nn.Dense(8, name="block_0")(x))
        return nn.Dense(3, name="head")(h)


def test_interceptor_matches_explicit_layer_on_a_user_model():
    model = _Tiny()
    x = jax.random.normal(jax.random.key(1), (5, 16))
    params = model.init(jax.random.key(0), x)["params"]
    masks = compute_masks(params, sparse_filter=lambda p, leaf: p == ("block_0", "kernel"))
    sl = slorb_init_tree(params, masks, k=4)
    assert set(sl) == {"block_0"} and sl["block_0"]["S"].shape == (4, 8)
    got = apply_with_slorb(model, masked_params(params, masks), sl, x)
    b0 = params["block_0"]
    h = nn.relu(slorb_layer(x, b0["kernel"], masks["block_0"]["kernel"], sl["block_0"]["S"], b0["bias"]))
    want = h @ params["head"]["kernel"] + params["head"]["bias"]
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_slorb_on_gpt2_gets_gradients_and_trainable_projection():
    model = GPT2(GPT2Config(n_layer=1, d_model=16, n_head=2, max_len=8))
    tok = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 7
    fast = {"xla_backend_optimization_level": 0}  # compilation dominates on CPU
    params = jax.jit(model.init, compiler_options=fast)(jax.random.key(0), tok)["params"]
    masks = compute_masks(params)
    sl = slorb_init_tree(params, masks, k=4, trainable_projection=True)
    assert set(sl["block_0"]["attn"]) == {"q", "k", "v", "proj"}
    fc = params["block_0"]["mlp"]["fc"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(sl["block_0"]["mlp"]["fc"]["X"]), np.asarray(block_projection_matrix(16, 4))
    )
    # S of a layer is the block mean of its pruned weights (slorb_init is checked against a loop above)
    chex.assert_trees_all_equal(
        sl["block_0"]["mlp"]["fc"]["S"], slorb_init(fc, masks["block_0"]["mlp"]["fc"]["kernel"], 4)
    )
    fixed = {
        a: {b: {"S": v["S"]} for b, v in sub.items()} for a, sub in sl["block_0"].items()
    }  # same S, fixed indicator projection
    pm = masked_params(params, masks)

    def raw(s):
        return apply_with_slorb(model, pm, s, tok)

    fwd = jax.jit(raw, compiler_options=fast)
    chex.assert_trees_all_close(fwd(sl), fwd({"block_0": fixed}), rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda s: jnp.mean(raw(s) ** 2)), compiler_options=fast)(sl)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))
    with pytest.raises(ValueError, match="dimension 16 of block_0/attn/k/kernel"):
        slorb_init_tree(params, masks, k=48)


def test_trainable_layout_helpers():
    model = {"block_0": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
    masks = {"block_0": {"kernel": jnp.ones((8, 2), bool), "bias": None}}
    sl = {"block_0": {"S": jnp.full((2, 2), 0.5)}}
    assert trainable_params(model) == {"model": model} and trainable_params(model, {}) == {"model": model}
    both = trainable_params(model, sl)
    assert both == {"model": model, "slorb": sl} and split_trainable(both) == (model, sl)
    assert split_trainable({"model": model}) == (model, None)
    tm = trainable_masks(masks, sl)
    assert tm["model"] is masks and tm["slorb"] == {"block_0": {"S": None}}
    # the masks have the trainable params' structure, as sparse_adamw's initial_masks need
    assert jax.tree_util.tree_structure(both).flatten_up_to(tm)[-1] is None
    with pytest.raises(ValueError, match="trainable params"):
        split_trainable({"params": model})
