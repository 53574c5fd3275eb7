"""The compiled GPU path of the N:M kernel, checked on a CPU-only machine by lowering it for CUDA.

``jax.export(..., platforms=["cuda"])`` runs Pallas's Triton lowering (the step that rejects unsupported
operations, shapes and dtypes) without a GPU and returns the StableHLO program the GPU would compile. What
this cannot check is Triton's own compile to PTX and the speed: those need a device
(``benchmarks/bench_sparse_decode.py``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from ast_jax.export_codec import ExportConfig, compress_nm
from ast_jax.kernels import nm_matmul_pallas, nm_matmul_reference, to_kernel_layout
from ast_jax.masks import nm_mask
from ast_jax.models.llama import Llama, LlamaConfig
from ast_jax.sparse_inference import compress_for_inference, sparse_apply

TRITON_CALL = "__gpu$xla.gpu.triton"
# The Triton call has no serialisation-compatibility guarantee; the program is only inspected, never stored.
CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]


def _nm_weight(k: int, o: int, n: int, m: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((k, o)).astype(np.float32)
    return np.where(np.asarray(nm_mask(jnp.asarray(w), n, m)), w, 0.0)


def _lower_for_cuda(fn, batch: int, k: int, weight) -> str:
    x = jax.ShapeDtypeStruct((batch, k), jnp.bfloat16)
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=CHECKS)(x, weight).mlir_module()


# SmolLM2-135M's MLP down projection (1536 -> 576): in and out are not multiples of 4:8's 512-row input tile.
K, O = 1536, 576


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_compiled_kernel_lowers_to_one_triton_call_without_a_dense_weight(n, m, bits):
    c = compress_nm(_nm_weight(K, O, n, m), ExportConfig(n=n, m=m, bits=bits, group_size=128))
    kw = to_kernel_layout(c)
    dense_shapes = (f"tensor<{K}x{O}x", f"tensor<{O}x{K}x")
    for batch in (1, 8, 64):
        text = _lower_for_cuda(lambda x, w: nm_matmul_pallas(x, w), batch, K, kw)
        assert text.count(f"@{TRITON_CALL}") == 1
        # One program per (64-column output tile, batch tile of max(16, pow2(batch)) rows).
        (grid,) = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32", text)
        bb = max(16, 1 << (batch - 1).bit_length())
        assert (int(grid[0]), int(grid[1])) == (-(-O // 64), -(-batch // bb))
        assert not any(s in text for s in dense_shapes), "the lowered program materialises the dense weight"
    # The same check on the fallback, which does rebuild W in memory, finds it: the assertion has teeth.
    ref = _lower_for_cuda(lambda x, w: nm_matmul_reference(x, w), 1, K, kw)
    assert any(s in ref for s in dense_shapes) and TRITON_CALL not in ref


def test_compiled_kernel_refuses_tiles_triton_cannot_take():
    w = _nm_weight(256, 192, 2, 4)
    c = compress_nm(w, ExportConfig(n=2, m=4))
    x = jnp.ones((1, 256), jnp.float32)
    # 96 columns lower in interpret mode but not for Triton (power-of-two arrays only): named before lowering.
    with pytest.raises(ValueError, match="block_out to be a power of two >= 16, got 96"):
        nm_matmul_pallas(x, to_kernel_layout(c, block_out=96))
    with pytest.raises(ValueError, match="block_q to be a power of two >= 16, got 4"):
        nm_matmul_pallas(x, to_kernel_layout(c, block_q=4))
    with pytest.raises(ValueError, match="block_b to be a power of two >= 16, got 8"):
        nm_matmul_pallas(x, to_kernel_layout(c), block_b=8)
    # The interpreted kernel takes the same small tiles (the CPU tests use them).
    y = nm_matmul_pallas(x, to_kernel_layout(c, block_q=4, block_out=96), interpret=True)
    np.testing.assert_allclose(np.asarray(y), w.sum(0, keepdims=True), rtol=1e-5, atol=1e-4)


def test_model_with_compressed_kernels_lowers_every_sparse_layer_to_the_triton_kernel():
    # A LLaMA block through the Flax interceptor (sparse_apply), lowered for CUDA with impl="pallas":
    # every compressed Dense must become one Triton call of the GPU program, none a dense fallback.
    cfg = LlamaConfig.tiny(n_layers=1)
    model = Llama(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]

    def prune(path, leaf):
        names = [str(getattr(p, "key", "")) for p in path]
        if names[-1] == "kernel" and names[0].startswith("layers_"):
            a = np.array(leaf)
            return jnp.asarray(_nm_weight(*a.shape, 2, 4) * 0.02)
        return leaf

    dense, weights = compress_for_inference(jax.tree_util.tree_map_with_path(prune, params), 2, 4, bits=4)
    assert len(weights) == 7  # q, k, v, o, gate, up, down
    pallas = {p: w.with_impl("pallas") for p, w in weights.items()}
    tokens = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    text = export.export(
        jax.jit(lambda d, w, t: sparse_apply(model, d, w, t)), platforms=["cuda"], disabled_checks=CHECKS
    )(dense, pallas, tokens).mlir_module()
    assert text.count(f"@{TRITON_CALL}") == len(weights)
