"""ast_jax.export: compressed N:M round trips, quantisation bounds, AWQ, on-disk layout, size report."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ast_jax.export import (
    CompressedNM,
    ExportConfig,
    awq_output_error,
    collect_dense_inputs,
    compress_nm,
    compress_params,
    decompress_nm,
    decompress_params,
    load_compressed,
    pack_bits,
    save_compressed,
    size_report,
    unpack_bits,
)
from ast_jax.masks import nm_mask
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.sparsify import apply_masks, compute_masks, get_path, path_str, sparse_paths


def _nm_sparse(rng: np.random.Generator, shape, n=2, m=4, dtype=np.float32) -> np.ndarray:
    """A random kernel made strictly n:m along axis 0 by an independent NumPy magnitude rule."""
    w = rng.normal(size=shape).astype(np.float32)
    k = shape[0]
    g = np.abs(w).reshape(k // m, m, -1)
    # rank by sorting (not the library's comparison trick): keep the n largest of each group
    order = np.argsort(-g, axis=1, kind="stable")
    keep = np.zeros_like(g, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.where(keep.reshape(w.shape), w, np.float32(0)).astype(dtype)


def _ref_group_scales(w: np.ndarray, n: int, m: int, bits: int, group: int) -> np.ndarray:
    """Per-element quantisation step of the kept values, recomputed with explicit loops (NumPy reference).

    Returns a dense ``(in, out)`` array holding, at each kept position, the scale ``max|v| / qmax`` of its
    group of ``group`` consecutive kept values in that column (0 at dropped positions).
    """
    k, out = w.shape
    qmax = 2 ** (bits - 1) - 1
    step = np.zeros_like(w, dtype=np.float64)
    for o in range(out):
        rows = []
        for gi in range(k // m):
            col = w[gi * m : (gi + 1) * m, o]
            nz = [gi * m + j for j in range(m) if col[j] != 0]
            # pad with the first zero positions, as the export keeps exactly n per group
            zeros = [gi * m + j for j in range(m) if col[j] == 0]
            rows.extend(sorted(nz + zeros[: n - len(nz)]))
        for start in range(0, len(rows), group):
            chunk = rows[start : start + group]
            s = max(abs(float(w[r, o])) for r in chunk) / qmax
            for r in chunk:
                step[r, o] = s
    return step


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), size=st.integers(0, 70), seed=st.integers(0, 2**16))
def test_pack_bits_round_trip(bits, size, seed):
    x = np.random.default_rng(seed).integers(0, 2**bits, size=size).astype(np.uint8)
    packed = pack_bits(x, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(size * bits / 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, size), x)


def test_pack_bits_layout_is_little_endian():
    # entries 1, 2, 3, 0 at 2 bits each: byte = 1 | 2<<2 | 3<<4 | 0<<6
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [1 | (2 << 2) | (3 << 4)]
    with pytest.raises(ValueError, match="values must lie"):
        pack_bits(np.array([4]), 2)


@pytest.mark.parametrize(
    "shape,n,m,dtype",
    [((16, 12), 2, 4, np.float32), ((32, 5), 1, 4, np.float32), ((24, 7), 4, 8, np.float32),
     ((8, 3, 4), 2, 4, np.float32), ((16, 6), 2, 4, ml_dtypes.bfloat16)],
)  # fmt: skip
def test_unquantised_round_trip_is_exact(shape, n, m, dtype):
    rng = np.random.default_rng(0)
    w = _nm_sparse(rng, (shape[0], int(np.prod(shape[1:]))), n, m).reshape(shape).astype(dtype)
    c = compress_nm(w, ExportConfig(n=n, m=m))
    assert c.values.shape == (shape[0] // m * n, int(np.prod(shape[1:])))
    assert c.indices.nbytes == math.ceil(c.values.size * math.ceil(math.log2(m)) / 8)
    d = decompress_nm(c)
    assert d.dtype == w.dtype and d.shape == w.shape
    np.testing.assert_array_equal(d.view(np.uint8), w.view(np.uint8))  # bitwise


def test_round_trip_with_explicit_mask_keeps_zero_valued_kept_weights():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 6)).astype(np.float32)
    mask = np.asarray(nm_mask(jnp.asarray(w), 2, 4))
    w = w * mask
    w[0, 0] = 0.0  # a kept weight that happens to be zero: mask positions must still be honoured
    mask_pos = mask.copy()
    c = compress_nm(w, ExportConfig(), mask=mask_pos)
    np.testing.assert_array_equal(decompress_nm(c), w)
    # stored positions are the mask's, not re-derived from |w|
    pos = unpack_bits(c.indices, 2, c.values.size).reshape(2, 2, 6)
    np.testing.assert_array_equal(np.sort(np.nonzero(mask_pos[:4, 0])[0]), pos[0, :, 0])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [4, 7, 128])
def test_quantised_error_within_bound(bits, group):
    rng = np.random.default_rng(bits + group)
    w = _nm_sparse(rng, (32, 9)) * np.exp(rng.normal(size=(1, 9))).astype(np.float32)
    c = compress_nm(w, ExportConfig(bits=bits, group_size=group))
    d = decompress_nm(c)
    step = _ref_group_scales(w, 2, 4, bits, group)
    err = np.abs(d.astype(np.float64) - w)
    # half a quantisation step; float16 scales are rounded up by at most one ulp (2^-10 relative)
    assert np.all(err <= step / 2 * (1 + 2**-9) + 1e-12)
    assert np.all(d[w == 0] == 0)  # dropped entries stay exactly zero
    if bits == 4:
        assert c.values.dtype == np.uint8 and c.values.size == math.ceil(16 * 9 / 2)
    else:
        assert c.values.dtype == np.int8
    assert c.scales.shape == (math.ceil(16 / group), 9)


def test_awq_never_worse_on_calibration_and_within_bound():
    rng = np.random.default_rng(3)
    w = _nm_sparse(rng, (64, 32))
    # a few salient input channels with large activations: where AWQ helps
    x = (rng.normal(size=(256, 64)) * np.where(rng.random(64) < 0.1, 20.0, 1.0)).astype(np.float32)
    plain = compress_nm(w, ExportConfig(bits=4, group_size=16))
    awq = compress_nm(w, ExportConfig(bits=4, group_size=16, awq=True, awq_grid=11), calib_inputs=x)
    e_plain = awq_output_error(x, w, decompress_nm(plain))
    e_awq = awq_output_error(x, w, decompress_nm(awq))
    assert e_awq <= e_plain
    assert awq.awq_scale is not None and awq.awq_scale.shape == (64,)
    assert e_awq < 0.9 * e_plain  # it actually helps on this input
    # reconstruction bound: the step of each element is that of c_j * w, divided back by c_j
    c = awq.awq_scale.astype(np.float64)
    step = _ref_group_scales(w * c[:, None], 2, 4, 4, 16) / c[:, None]
    assert np.all(np.abs(decompress_nm(awq) - w) <= step / 2 * (1 + 2**-9) + 1e-12)


def test_bad_inputs_name_the_layer():
    rng = np.random.default_rng(4)
    dense = rng.normal(size=(8, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"block_0/q/kernel: not 2:4 sparse"):
        compress_nm(dense, name="block_0/q/kernel")
    with pytest.raises(ValueError, match=r"mlp: input dimension 6"):
        compress_nm(np.zeros((6, 4), np.float32), name="mlp")
    bad = _nm_sparse(rng, (8, 4))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compress_nm(bad, name="x")
    with pytest.raises(ValueError, match="non-zero weights outside mask"):
        compress_nm(_nm_sparse(rng, (8, 4)), mask=np.tile([[True], [True], [False], [False]], (2, 4)))
    with pytest.raises(ValueError, match="bits"):
        ExportConfig(bits=3)
    with pytest.raises(ValueError, match="awq"):
        ExportConfig(awq=True)
    with pytest.raises(ValueError, match="0 < n < m"):
        ExportConfig(n=4, m=4)


@pytest.fixture(scope="module")
def sparse_gpt2():
    # d_model=128: kernels with >= 64 kept values per column, so one float16 scale per 64-128 values
    cfg = GPT2Config(vocab_size=64, max_len=16, n_layer=1, n_head=2, d_model=128)
    model = GPT2(cfg)

    @jax.jit
    def build(key):
        params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        masks = compute_masks(params, 2, 4)
        return apply_masks(params, masks), masks

    params, masks = build(jax.random.key(0))
    return model, params, masks


def test_params_round_trip_save_load_and_forward(sparse_gpt2, tmp_path):
    model, params, _ = sparse_gpt2
    exported = compress_params(params)
    sparse = {path_str(p) for p in sparse_paths(params)}
    assert {p for p, v in exported.items() if isinstance(v, CompressedNM)} == sparse
    save_compressed(tmp_path / "exp", exported)
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["format"] == "ast_jax.nm-export/2"
    assert {leaf["path"] for leaf in manifest["leaves"] if leaf["kind"] == "nm"} == sparse
    loaded = load_compressed(tmp_path / "exp")
    restored = decompress_params(loaded)
    for (pa, a), (pb, b) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_flatten_with_path(restored)[0],
        strict=True,
    ):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a), b)
    tokens = jnp.arange(8, dtype=jnp.int32)[None] % 64
    ref = np.asarray(model.apply({"params": params}, tokens))
    # The params are bitwise equal (above), but the two forwards may be run by different BLAS kernels.
    np.testing.assert_allclose(
        model.apply({"params": restored}, tokens), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max())
    )
    with pytest.raises(ValueError, match="not an ast_jax export"):
        load_compressed(tmp_path / "missing")


def test_bf16_dense_leaves_and_quantised_save_load(tmp_path):
    rng = np.random.default_rng(5)
    params = {
        "block_0": {"fc": {"kernel": _nm_sparse(rng, (16, 8))}},
        "ln_f": {"scale": rng.normal(size=8).astype(ml_dtypes.bfloat16)},
    }
    exported = compress_params(params, ExportConfig(bits=4, group_size=8))
    save_compressed(tmp_path, exported)
    loaded = load_compressed(tmp_path)
    assert loaded["ln_f/scale"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        loaded["ln_f/scale"].view(np.uint16), params["ln_f"]["scale"].view(np.uint16)
    )
    np.testing.assert_array_equal(
        decompress_nm(loaded["block_0/fc/kernel"]), decompress_nm(exported["block_0/fc/kernel"])
    )


def test_int4_strict_2of4_model_is_at_most_a_tenth_of_fp32(sparse_gpt2):
    _, params, _ = sparse_gpt2
    exported = compress_params(params, ExportConfig(bits=4, group_size=128))
    report = size_report(exported)
    # independent byte count: per kept value 4 bits + 2 index bits, plus one float16 scale per group
    expected = 0
    kernels = [get_path(params, p) for p in sparse_paths(params)]
    for w in kernels:
        k, out = w.shape
        kept = k // 2 * out
        expected += math.ceil(kept / 2) + math.ceil(kept * 2 / 8) + math.ceil(k // 2 / 128) * out * 2
    assert report["compressed_bytes"] == expected
    assert report["fp32_bytes"] == 4 * sum(w.size for w in kernels)
    assert report["compressed_bytes"] <= report["fp32_bytes"] / 10
    assert report["ratio_bf16"] == pytest.approx(report["ratio_fp32"] / 2)


def test_collect_dense_inputs_feeds_awq(sparse_gpt2):
    model, params, _ = sparse_gpt2
    tokens = (jnp.arange(32, dtype=jnp.int32).reshape(2, 16) * 7) % 64
    calib = collect_dense_inputs(model, params, tokens, max_tokens=20)
    assert set(calib) == {path_str(p) for p in sparse_paths(params)}
    assert calib["block_0/mlp/proj/kernel"].shape == (20, 512)
    exported = compress_params(params, ExportConfig(bits=4, group_size=16, awq=True), calib_inputs=calib)
    restored = decompress_params(exported)
    logits = model.apply({"params": params}, tokens)
    logits_q = model.apply({"params": restored}, tokens)
    assert np.all(np.isfinite(np.asarray(logits_q)))
    assert float(jnp.max(jnp.abs(logits - logits_q))) < 0.5 * float(jnp.max(jnp.abs(logits)))
