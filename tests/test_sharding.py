"""Sharding on 8 virtual CPU devices: mesh parsing, FSDP rules, sharded AST step == single-device step,
sharded LiDu == unsharded LiDu."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from ast_jax import sharding as shd
from ast_jax.optim import get_masks
from ast_jax.sparsify import key_path
from ast_jax.train import parse_args, run


def test_a_sharded_computation_runs_on_eight_devices():
    """An FSDP-sharded kernel and a batch split over ``data=4,fsdp=2``: the jitted product runs on all 8
    devices, each holding only its own block of every operand (XLA gathers the kernel shards itself), the
    result equals the single-device NumPy product, and `to_host` / `any_process` bring it back whole."""
    mesh = shd.make_mesh("data=4,fsdp=2")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 128)).astype(np.float32)  # (out, in): sharded over fsdp along out
    x = rng.normal(size=(16, 128)).astype(np.float32)  # batch: 16 rows over 8 devices
    w_sh = shd.param_shardings({"w": w}, mesh, min_shard_size=0)["w"]
    assert w_sh.spec == P("fsdp", None)
    w_dev = shd.shard_pytree({"w": w}, {"w": w_sh})["w"]
    x_dev = shd.host_to_global(x, shd.batch_sharding(mesh))
    fn = jax.jit(lambda a, b: b @ a.T, out_shardings=shd.batch_sharding(mesh))
    y = fn(w_dev, x_dev)
    assert "all-gather" in fn.lower(w_dev, x_dev).compile().as_text()  # the kernel's shards were gathered

    assert len(y.sharding.device_set) == 8 and len(w_dev.sharding.device_set) == 8
    # every device holds a distinct 2-row block of the output, and half of the kernel (replicated over data)
    assert sorted(s.device.id for s in y.addressable_shards) == sorted(d.id for d in jax.devices()[:8])
    assert {s.data.shape for s in y.addressable_shards} == {(2, 256)}
    assert len({str(s.index) for s in y.addressable_shards}) == 8
    assert {s.data.shape for s in w_dev.addressable_shards} == {(128, 128)}
    assert len({str(s.index) for s in w_dev.addressable_shards}) == 2
    np.testing.assert_allclose(shd.to_host(y), x @ w.T, rtol=1e-5, atol=1e-4)
    assert shd.any_process(True) and not shd.any_process(False)


def test_parse_mesh():
    assert shd.parse_mesh("data=4,fsdp=2", 8) == {"data": 4, "fsdp": 2}
    assert shd.parse_mesh("fsdp=2", 2) == {"data": 1, "fsdp": 2}
    assert shd.parse_mesh("data=-1,fsdp=2", 8) == {"data": 4, "fsdp": 2}
    assert shd.parse_mesh({"data": 8}, 8) == {"data": 8, "fsdp": 1}
    with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
        shd.parse_mesh("data=3,fsdp=2", 8)
    with pytest.raises(ValueError, match="unknown axis"):
        shd.parse_mesh("model=2", 2)
    with pytest.raises(ValueError, match="given twice"):
        shd.parse_mesh("data=2,data=4", 8)
    with pytest.raises(ValueError, match="must be an integer"):
        shd.parse_mesh("data=two")
    with pytest.raises(ValueError, match="axis=size"):
        shd.parse_mesh("data")
    with pytest.raises(ValueError, match="at most one axis"):
        shd.parse_mesh("data=-1,fsdp=-1", 8)
    with pytest.raises(ValueError, match="cannot be split"):
        shd.parse_mesh("data=-1,fsdp=3", 8)


def test_make_mesh_and_subset():
    mesh = shd.make_mesh("data=4,fsdp=2")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    small = shd.make_mesh("data=2", jax.devices()[:2])
    assert dict(small.shape) == {"data": 2, "fsdp": 1}
    with pytest.raises(ValueError, match="needs 8 devices but 4"):
        shd.make_mesh("data=4,fsdp=2", jax.devices()[:4])


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 24), min_size=0, max_size=3),
    fsdp=st.sampled_from([1, 2, 3, 4]),
)
def test_leaf_spec_shards_largest_divisible_dim(shape, fsdp):
    spec = shd.leaf_spec(shape, fsdp, min_shard_size=0)
    divisible = [d for d in shape if d % fsdp == 0]
    if fsdp == 1 or not shape or not divisible:
        assert spec == P()
        return
    axes = [i for i, a in enumerate(spec) if a == "fsdp"]
    assert len(axes) == 1 and all(a in (None, "fsdp") for a in spec)
    ax = axes[0]
    assert shape[ax] % fsdp == 0 and shape[ax] == max(divisible)
    assert ax == shape.index(max(divisible))  # first of equal dims: a pure function of the shape


def test_small_leaves_are_replicated():
    assert shd.leaf_spec((8, 8), 2) == P()  # 64 < default min_shard_size
    assert shd.leaf_spec((256, 128), 2) == P("fsdp", None)


# ---------------------------------------------------------------------------------------------------------
# The AST training step (teacher forward + student step), sharded vs single device


def test_sharded_training_equals_single_device(tiny_reference):
    """``data=4,fsdp=2`` on 8 devices vs one device: same losses, params and masks after 12 steps."""
    ref = tiny_reference["result"]
    res = run(parse_args([*tiny_reference["args"], "--mesh", "data=4,fsdp=2"]))
    assert res.summary["devices"] == 8 and res.step == ref.step
    np.testing.assert_allclose([x for _, x in res.losses], [x for _, x in ref.losses], rtol=1e-5, atol=1e-5)
    # Sharded reductions sum in another order; Adam's g / sqrt(v) magnifies that on entries whose gradient
    # is ~0 (seen: ~1e-5 on 1e-6-sized values), hence atol 1e-4 against weights of size ~0.02-1.
    for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(ref.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    s_masks = jax.tree.leaves(get_masks(res.state.opt_state))
    r_masks = jax.tree.leaves(get_masks(ref.state.opt_state))
    for a, b in zip(s_masks, r_masks, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # It really was FSDP-sharded: a kernel is split over fsdp, its mask follows it; teacher sharded alike.
    fc = res.state.params["model"]["block_0"]["mlp"]["fc"]["kernel"]  # (32, 128)
    assert fc.sharding.spec == P(None, "fsdp") and len(fc.addressable_shards) == 8
    assert fc.addressable_shards[0].data.shape == (32, 64)
    mask = get_masks(res.state.opt_state)["model"]["block_0"]["mlp"]["fc"]["kernel"]
    assert mask.sharding.spec == fc.sharding.spec


def test_masks_and_moments_follow_their_kernels(tiny_reference):
    state0 = tiny_reference["result"].state
    mesh = shd.make_mesh("data=2,fsdp=4")
    ssh = shd.param_shardings(state0, mesh, min_shard_size=64)
    params_sh = {key_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(ssh.params)[0]}
    checked = 0
    for p, s in jax.tree_util.tree_flatten_with_path(ssh.opt_state)[0]:
        kp = key_path(p)
        # a moment or mask at .../model/block_0/attn/q/kernel sits where that kernel sits
        for start in range(len(kp)):
            if kp[start:] in params_sh:
                assert s.spec == params_sh[kp[start:]].spec, kp
                checked += 1
                break
    n_sparse = len(jax.tree.leaves(get_masks(state0.opt_state)))
    assert n_sparse == 6  # q, k, v, proj, fc, proj of the one block
    assert checked == 2 * len(params_sh) + 2 * n_sparse  # mu, nu; current and initial masks
    assert any("fsdp" in s.spec for s in params_sh.values())


# ---------------------------------------------------------------------------------------------------------
# LiDu over users


def test_sharded_lidu_equals_unsharded(monkeypatch):
    import lidu_jax.sharding as lidu_sharding
    from lidu_jax import lidu, lidu_sharded

    placed = []  # devices each user block was laid out on

    def recording_host_to_global(x, sharding):
        arr = host_to_global_orig(x, sharding)
        placed.append(len({str(sh.index) for sh in arr.addressable_shards}))  # distinct blocks
        return arr

    host_to_global_orig = lidu_sharding.host_to_global
    monkeypatch.setattr(lidu_sharding, "host_to_global", recording_host_to_global)

    rng = np.random.default_rng(1)
    n_users, n_items, k = 37, 40, 5  # 37 users: not a multiple of 8, so the last block is padded
    mean = rng.normal(size=(n_users, n_items)).astype(np.float32)
    std = rng.uniform(0.2, 1.0, size=(n_users, n_items)).astype(np.float32)
    cand = rng.random((n_users, n_items)) > 0.2
    values, ranks = lidu_sharded(mean, std, k, candidates=cand, grid_size=128, chunk_size=2)
    ref_values, ref_ranks = lidu(mean, std, k, candidates=cand, grid_size=128)
    np.testing.assert_array_equal(ranks, np.asarray(ref_ranks))
    np.testing.assert_allclose(values, np.asarray(ref_values), rtol=1e-5, atol=1e-5)
    assert np.all(values > 0)
    # every input block was split into 8 distinct shards (2 users each), one per device, not replicated
    assert placed and set(placed) == {8}
    with pytest.raises(ValueError, match="larger than the number of candidates"):
        lidu_sharded(mean, std, 5, candidates=np.zeros_like(cand))
    with pytest.raises(ValueError, match="std"):
        lidu_sharded(mean, -std, 5)


def test_sharded_lidu_zero_users_and_affine_invariance():
    """Zero users give empty results (at HEAD a ValueError); a common affine map of a user's scores, float64
    far from 0 or float32 at extreme scales, leaves sharded LiDu unchanged (at HEAD float64 inputs were cast
    to float32 first and small scales broke the grid)."""
    from lidu_jax.sharding import lidu_sharded

    rng = np.random.default_rng(2)
    n_users, n_items, k = 8, 12, 3
    mean = rng.normal(size=(n_users, n_items))
    std = rng.uniform(0.2, 1.0, size=(n_users, n_items))
    kw = dict(grid_size=64, chunk_size=1)
    v0, r0 = lidu_sharded(mean[:0], std[:0], k, **kw)
    assert v0.shape == (0,) and r0.shape == (0, k)
    want, want_r = lidu_sharded(mean, std, k, **kw)
    for a, b, dtype in [(1.0, 1e7, np.float64), (1e-9, 0.0, np.float32), (1e-12, -3e-6, np.float64)]:
        m, s = (mean * a + b).astype(dtype), (std * a).astype(dtype)
        got, got_r = lidu_sharded(m, s, k, **kw)
        np.testing.assert_array_equal(got_r, want_r)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="chunk_size"):
        lidu_sharded(mean, std, k, grid_size=64, chunk_size=0)
