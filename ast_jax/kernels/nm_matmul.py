"""``y = x @ W`` with an N:M sparse ``W`` that stays compressed on the device: a Pallas kernel + a fallback.

Equation (``x`` (B, in), ``W`` (in, out) Flax layout, ``G = in / M`` groups of ``M`` consecutive input rows):

    y[b, o] = Σ_g Σ_{j<N} x[b, g·M + pos[g, j, o]] · v[g, j, o] · s[(g·N + j) // group_size, o] / c[g·M + pos]

``v`` are the kept values (float, or int8 / int4 codes), ``pos`` in ``[0, M)`` their row inside the group,
``s`` the per-group quantisation scales (``1`` when unquantised) and ``c`` the optional AWQ input scale
(folded into ``x`` before the kernel: ``x / c``).

Device layout (:class:`NMWeight`, built from the compact export format by :func:`to_kernel_layout`)
--------------------------------------------------------------------------------------------------
The input dimension is cut into *tiles* of ``T = S · block_q`` groups (``S · block_q · M`` dense rows), each
tile into ``S`` *sub-blocks* of ``block_q`` consecutive groups. ``S = 8 // ib`` is the number of positions one
byte holds (``ib = 2`` bits per position for ``M <= 4``, ``4`` bits for ``M <= 16``).

* ``values``    ``(N, G_pad, out_pad)`` -- plane ``j`` holds the ``j``-th kept value of every group, groups in
  their natural order, in the kept dtype (bf16/f16/f32) or int8. int4: ``(N, G_pad / 2, out_pad)`` uint8, the
  byte at packed row ``t·T/2 + s·block_q + q`` holds sub-block ``s`` (low nibble) and sub-block
  ``s + S/2`` (high nibble) of tile ``t``, codes offset by 8 (``q = nibble - 8``).
* ``positions`` ``(N, G_pad / S, out_pad)`` uint8 -- the byte at row ``t·block_q + q`` holds the position of
  group ``t·T + s·block_q + q`` in bits ``[ib·s, ib·s + ib)`` for ``s < S``. Unpacking a ``(block_q, bo)``
  tile of bytes therefore yields ``S`` whole sub-block tiles with shifts and masks only: no in-kernel
  reshape, gather or concatenate (all awkward or unsupported in Triton).
* ``scales``    ``(ceil(G_pad·N / group_size), out_pad)`` f16/f32 -- the export's scales, unchanged (one per
  ``group_size`` kept values of a column); ``block_q · N`` divides ``group_size``: one scale per sub-block.
* ``awq_scale`` ``(in,)`` float32 or ``None``.

``G_pad`` rounds ``in / M`` up to a multiple of ``T`` and ``out_pad`` rounds ``out`` up to ``block_out``; the
padding is zero weights (position 0, value 0), so it adds nothing to ``y``.

Bits per dense weight read by the kernel (2:4, ``group_size = 128``): values ``16·N/M`` (bf16: 8, int8: 4,
int4: 2) + positions ``ib·N/M`` (1) + scales ``16/group_size·N/M`` (0.06), i.e. 9 / 5.06 / 3.06 bits against
16 for a dense bf16 kernel (plus the padding of ``in`` to a whole tile). 4:8 stores positions in 4-bit
nibbles: 2 bits per dense weight.

Kernel (:func:`nm_matmul` with the Pallas path)
-----------------------------------------------
Grid ``(out_pad / block_out, B_pad / block_b)``: one program per output tile and batch tile; it loops over
the ``G_pad / T`` input tiles with ``lax.fori_loop`` (a float32 accumulator ``(block_b, block_out)`` in
registers, no revisited output blocks, which Triton lacks). Per sub-block ``s`` and kept plane ``j`` it
loads a ``(block_q, block_out)`` tile of values and of position bytes, unpacks the positions
(``(byte >> ib·s) & (2^ib - 1)``), dequantises (int8 / int4 nibble ``- 8`` times the sub-block's scale, in
float32, then the compute dtype), and expands into ``M`` dense tiles ``w_p = Σ_j where(pos_j == p, v_j, 0)``
(``w_p[q, o] = W[(g0 + q)·M + p, o]``). The activation is pre-permuted outside the kernel (cheap: ``B × in``)
to ``x_perm[p, b, g] = x[b, g·M + p]`` so that the contraction is ``Σ_p x_perm[p, :, g0:g0+block_q] @ w_p``:
``M`` dots of depth ``block_q`` with float32 accumulation (``preferred_element_type``). The dense ``W`` only
ever exists one ``(block_q, block_out)`` tile at a time, never in HBM.

What pays on H100/H200 (decode is memory bound: B ≤ 64 rows against megabytes of weights): bytes read per
weight (above), loads of contiguous ``block_out``-wide rows of every plane (``block_out >= 64`` bf16 / 128
int8 columns = 128-byte coalesced segments, 16-byte vector loads per thread), several input tiles in flight
(``num_stages`` of the Triton pipeliner, ``num_warps``), and dequantisation fused into the load so only
compressed bytes cross HBM. Triton wants power-of-two tile shapes and dot operands of at least 16 in every
dimension, so the GPU path pads the batch to ``block_b >= 16`` and uses ``block_q = 16`` (the default); the
compiled path refuses other tiles with an error naming the setting. CI lowers the compiled kernel for CUDA
on a CPU machine (``jax.export``, ``tests/test_nm_kernel_lowering.py``): Pallas's Triton lowering accepts it
and the program holds no dense ``(in, out)`` array; Triton's compile to PTX and the speed need a GPU.

Where it runs
-------------
``nm_matmul(..., impl=None)`` picks the compiled Pallas kernel (Triton lowering) on a GPU backend; elsewhere
the kernel runs with ``interpret=True`` when asked (``interpret=True`` or ``impl="interpret"``), else the
plain-JAX fallback :func:`nm_matmul_reference` (dense ``W`` rebuilt in plain JAX from the same layout, then
``jnp.dot``: same numbers, none of the memory saving at run time). The kernel is never required.

Decoding from a compressed model: :mod:`ast_jax.sparse_inference` (``compress_for_inference`` then
``sparse_generate`` / ``sparse_generate_stream``), which routes every listed ``nn.Dense`` through
:func:`nm_matmul` with ``flax.linen.intercept_methods``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.export_codec import CompressedNM, unpack_bits

__all__ = ["NMWeight", "nm_dense", "nm_matmul", "nm_matmul_pallas", "nm_matmul_reference", "to_kernel_layout"]

_IMPLS = ("auto", "pallas", "interpret", "reference")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "positions", "scales", "awq_scale"],
    meta_fields=[
        "in_features",
        "out_features",
        "n",
        "m",
        "bits",
        "group_size",
        "block_q",
        "block_out",
        "dtype",
        "impl",
    ],
)
@dataclasses.dataclass(frozen=True)
class NMWeight:
    """An N:M sparse kernel in the device layout of the module docstring (a pytree: arrays are leaves, the
    settings are static, so changing ``impl`` retraces a jitted caller instead of reusing its program).

    Attributes:
      values: ``(N, G_pad, out_pad)`` float/int8, or ``(N, G_pad / 2, out_pad)`` uint8 for int4.
      positions: ``(N, G_pad / S, out_pad)`` uint8, ``S`` positions of ``ib`` bits per byte.
      scales: ``(ceil(G_pad·N / group_size), out_pad)`` float16/float32, or ``None`` (unquantised).
      awq_scale: ``(in_features,)`` float32 or ``None``.
      in_features, out_features: the dense kernel shape ``(in, out)``.
      n, m, bits, group_size: the N:M pattern and quantisation of the export.
      block_q: groups per sub-block (``S`` sub-blocks per input tile).
      block_out: output columns per tile (``out_pad`` is a multiple).
      dtype: the dense kernel dtype name (``"bfloat16"``, ``"float32"``, ...).
      impl: ``"auto"``, ``"pallas"``, ``"interpret"`` or ``"reference"`` (see :func:`nm_matmul`).
    """

    values: Any
    positions: Any
    scales: Any
    awq_scale: Any
    in_features: int
    out_features: int
    n: int
    m: int
    bits: int | None
    group_size: int
    block_q: int
    block_out: int
    dtype: str
    impl: str = "auto"

    @property
    def index_bits(self) -> int:
        return _index_bits(self.m)

    @property
    def per_byte(self) -> int:
        """``S``: positions per byte, = sub-blocks per input tile."""
        return 8 // self.index_bits

    @property
    def groups_padded(self) -> int:
        return int(self.positions.shape[1]) * self.per_byte

    @property
    def out_padded(self) -> int:
        return int(self.positions.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight (every stored array, padding included)."""
        parts = (self.values, self.positions, self.scales, self.awq_scale)
        return int(sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in parts if p is not None))

    def with_impl(self, impl: str) -> NMWeight:
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        return dataclasses.replace(self, impl=impl)


def _index_bits(m: int) -> int:
    # 2 bits (4 per byte) up to M = 4; nibbles (2 per byte) up to M = 16. Powers of two keep the unpack a
    # shift and a mask, and an even S lets int4 values pair sub-blocks s and s + S/2 in one byte.
    if m <= 4:
        return 2
    if m <= 16:
        return 4
    raise ValueError(f"the N:M kernel supports m <= 16, got m={m}")


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def to_kernel_layout(
    c: CompressedNM, *, block_q: int = 16, block_out: int = 64, impl: str = "auto"
) -> NMWeight:
    """Device layout of one exported kernel (host-side numpy rearrangement, then ``jnp`` arrays).

    Args:
      c: an exported kernel (:class:`~ast_jax.export_codec.CompressedNM`), ``shape = (in, out)`` (trailing
        dims are flattened into ``out``).
      block_q: groups per sub-block; must be a power of two with ``block_q · n`` dividing ``group_size`` when
        quantised. 16 suits the GPU (Triton dot depth); smaller values waste less padding on small layers.
      block_out: output columns per tile (``out`` is padded to a multiple).
      impl: the default implementation recorded in the weight (see :func:`nm_matmul`).
    Returns:
      :class:`NMWeight` with ``values``, ``positions``, ``scales`` as described in the module docstring.
    """
    if block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two, got {block_q}")
    if block_out < 1:
        raise ValueError(f"block_out must be positive, got {block_out}")
    n, m, bits, gs = c.n, c.m, c.bits, c.group_size
    if bits is not None and gs % (block_q * n):
        raise ValueError(
            f"block_q * n = {block_q * n} must divide group_size={gs} (one scale per sub-block); "
            f"use a smaller block_q"
        )
    ib = _index_bits(m)
    s_per = 8 // ib
    k = int(c.shape[0])
    out = int(np.prod(c.shape[1:]))
    g = k // m
    kk = g * n
    tile = s_per * block_q
    g_pad = -(-g // tile) * tile
    out_pad = -(-out // block_out) * block_out

    pos = unpack_bits(c.indices, c.index_bits, kk * out).reshape(g, n, out)
    pos_p = np.zeros((g_pad, n, out_pad), np.uint8)
    pos_p[:g, :, :out] = pos
    # (t, s, q) split of the group axis: byte (t, q) packs the positions of groups t·T + s·block_q + q.
    lanes = pos_p.reshape(g_pad // tile, s_per, block_q, n, out_pad)
    packed = np.zeros((g_pad // tile, block_q, n, out_pad), np.uint8)
    for s in range(s_per):
        packed |= (lanes[:, s] << np.uint8(ib * s)).astype(np.uint8)
    positions = packed.reshape(g_pad // s_per, n, out_pad).transpose(1, 0, 2)

    if bits is None:
        v = np.asarray(c.values).reshape(g, n, out)
        vals = np.zeros((g_pad, n, out_pad), v.dtype)
        vals[:g, :, :out] = v
        values = vals.transpose(1, 0, 2)
        scales = None
    else:
        if bits == 4:
            q = unpack_bits(c.values, 4, kk * out).astype(np.int16).reshape(g, n, out) - 8
        else:
            q = np.asarray(c.values).reshape(g, n, out).astype(np.int16)
        qp = np.zeros((g_pad, n, out_pad), np.int16)
        qp[:g, :, :out] = q
        if bits == 4:
            # Pair sub-block s (low nibble) with s + S/2 (high nibble) of the same tile: one packed row block
            # per pair, so a kernel tile reads its S/2 packed sub-blocks contiguously.
            lanes4 = (qp + 8).astype(np.uint8).reshape(g_pad // tile, s_per, block_q, n, out_pad)
            half = s_per // 2
            packed4 = lanes4[:, :half] | (lanes4[:, half:] << np.uint8(4))
            values = packed4.reshape(g_pad // 2, n, out_pad).transpose(1, 0, 2)
        else:
            values = qp.astype(np.int8).transpose(1, 0, 2)
        sc = np.asarray(c.scales)
        rows = -(-(g_pad * n) // gs)
        # Padding groups hold zero codes: any finite scale works; 1 keeps the product exactly zero.
        scales = np.ones((rows, out_pad), sc.dtype)
        scales[: sc.shape[0], :out] = sc
    awq = None if c.awq_scale is None else jnp.asarray(np.asarray(c.awq_scale, np.float32))
    return NMWeight(
        values=jnp.asarray(np.ascontiguousarray(values)),
        positions=jnp.asarray(np.ascontiguousarray(positions)),
        scales=None if scales is None else jnp.asarray(scales),
        awq_scale=awq,
        in_features=k,
        out_features=out,
        n=n,
        m=m,
        bits=bits,
        group_size=gs,
        block_q=block_q,
        block_out=block_out,
        dtype=str(c.dtype),
        impl=impl,
    ).with_impl(impl)


# ---------------------------------------------------------------------------------------------------------
# Plain-JAX reference (also the fallback)


def _unpacked_codes(w: NMWeight) -> tuple[jax.Array, jax.Array]:
    """(positions int32, values before scaling), both ``(N, G_pad, out_pad)``, groups in natural order."""
    s_per, bq, ib = w.per_byte, w.block_q, w.index_bits
    n, out_pad = w.n, w.out_padded
    n_t = w.groups_padded // (s_per * bq)
    pb = w.positions.reshape(n, n_t, bq, out_pad).astype(jnp.int32)
    pos = jnp.stack([(pb >> (ib * s)) & (2**ib - 1) for s in range(s_per)], axis=2)  # (N, n_t, S, bq, out)
    pos = pos.reshape(n, -1, out_pad)
    if w.bits == 4:
        half = s_per // 2
        vb = w.values.reshape(n, n_t, half, bq, out_pad).astype(jnp.int32)
        v = jnp.concatenate([(vb & 15) - 8, (vb >> 4) - 8], axis=2).reshape(n, -1, out_pad)
    else:
        v = w.values
    return pos, v.astype(jnp.float32) if w.bits is not None else v


def nm_dense(w: NMWeight, dtype: Any = None) -> jax.Array:
    """The dense kernel ``(in, out)`` rebuilt from the device layout in plain JAX (dequantised, AWQ undone).

    Rounded to ``dtype`` (default the exported kernel dtype) from the float32 product ``q · s``, exactly as
    :func:`~ast_jax.export_codec.decompress_nm` does, so both give the same dense weights.
    """
    pos, v = _unpacked_codes(w)
    n, g_pad, out_pad = pos.shape
    if w.bits is not None:
        kept_row = (jnp.arange(g_pad)[None, :] * n + jnp.arange(n)[:, None]) // w.group_size  # (N, G_pad)
        v = v * w.scales.astype(jnp.float32)[kept_row]
    onehot = pos[:, :, None, :] == jnp.arange(w.m)[None, None, :, None]  # (N, G_pad, M, out_pad)
    dense = jnp.sum(jnp.where(onehot, v[:, :, None, :], 0), axis=0).reshape(g_pad * w.m, out_pad)
    dense = dense[: w.in_features, : w.out_features]
    if w.awq_scale is not None:
        dense = dense.astype(jnp.float32) / w.awq_scale[:, None]
    return dense.astype(_np_dtype(w.dtype) if dtype is None else dtype)


def _compute_dtype(x: jax.Array, w: NMWeight) -> Any:
    return jnp.result_type(x.dtype, _np_dtype(w.dtype))


def nm_matmul_reference(x: jax.Array, w: NMWeight, *, out_dtype: Any = None) -> jax.Array:
    """``x (B, in) @ W (in, out)`` with ``W = nm_dense(w)`` and a float32-accumulated ``jnp.dot``.

    The fallback where Pallas is unavailable: rebuilds the dense ``W`` (in HBM, per call) from the compact
    layout, so the stored model stays compressed but this path reads dense bytes.
    """
    cd = _compute_dtype(x, w)
    y = jnp.dot(x.astype(cd), nm_dense(w, cd), preferred_element_type=jnp.float32)
    return y.astype(cd if out_dtype is None else out_dtype)


# ---------------------------------------------------------------------------------------------------------
# Pallas kernel


def _kernel(x_ref, v_ref, p_ref, *rest, w: NMWeight, bb: int, bo: int, n_tiles: int, cd: Any) -> None:
    """One (output tile, batch tile) program; refs are whole arrays (see the module docstring)."""
    from jax.experimental import pallas as pl

    if w.bits is None:
        (o_ref,) = rest
        s_ref = None
    else:
        s_ref, o_ref = rest
    n, m, bq, ib, s_per = w.n, w.m, w.block_q, w.index_bits, w.per_byte
    tile = s_per * bq
    mask = 2**ib - 1
    cols = pl.ds(pl.program_id(0) * bo, bo)
    rows = pl.ds(pl.program_id(1) * bb, bb)

    def body(t: jax.Array, acc: jax.Array) -> jax.Array:
        pbytes = [p_ref[j, pl.ds(t * bq, bq), cols].astype(jnp.int32) for j in range(n)]
        for s in range(s_per):
            g0 = t * tile + s * bq
            if w.bits is not None:
                # One scale per sub-block: block_q·N divides group_size (checked by to_kernel_layout).
                scale = s_ref[pl.ds((g0 * n) // w.group_size, 1), cols].astype(jnp.float32)  # (1, bo)
            wp = [jnp.zeros((bq, bo), cd) for _ in range(m)]
            for j in range(n):
                pos = (pbytes[j] >> (ib * s)) & mask
                if w.bits == 4:
                    half = s_per // 2
                    byte = v_ref[j, pl.ds(t * (tile // 2) + (s % half) * bq, bq), cols].astype(jnp.int32)
                    code = (byte & 15) if s < half else (byte >> 4)
                    v = ((code - 8).astype(jnp.float32) * scale).astype(cd)
                elif w.bits == 8:
                    v = (v_ref[j, pl.ds(g0, bq), cols].astype(jnp.float32) * scale).astype(cd)
                else:
                    v = v_ref[j, pl.ds(g0, bq), cols].astype(cd)
                # A group's positions are distinct, so at most one plane j lands on row p: the sum is exact.
                for p in range(m):
                    wp[p] = wp[p] + jnp.where(pos == p, v, jnp.zeros_like(v))
            for p in range(m):
                xs = x_ref[p, rows, pl.ds(g0, bq)]
                acc = acc + jnp.dot(xs, wp[p], preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((bb, bo), jnp.float32))
    o_ref[rows, cols] = acc.astype(o_ref.dtype)


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(v, 1)))))


def nm_matmul_pallas(
    x: jax.Array,
    w: NMWeight,
    *,
    interpret: bool = False,
    block_b: int | None = None,
    block_out: int | None = None,
    out_dtype: Any = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:
    """The Pallas kernel: ``x (B, in) -> (B, out)``; compiled (Triton) or ``interpret=True`` (any backend).

    ``block_b`` (default: batch rounded up to a power of two, at least 16, at most 64; the batch is
    zero-padded to a multiple) and ``block_out`` (default ``w.block_out``; must divide ``out_pad``) are the
    program tile; ``num_warps`` / ``num_stages`` go to the Triton compiler.
    """
    from jax.experimental import pallas as pl

    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"nm_matmul: x must be (B, {w.in_features}), got {x.shape}")
    b = x.shape[0]
    cd = _compute_dtype(x, w)
    bb = block_b or min(64, _pow2_at_least(b, 16))
    bo = block_out or w.block_out
    if w.out_padded % bo:
        raise ValueError(f"block_out={bo} must divide the padded output dim {w.out_padded}")
    if not interpret:
        _check_triton_tiles(block_b=bb, block_out=bo, block_q=w.block_q)
    b_pad = -(-b // bb) * bb
    g_pad = w.groups_padded
    xf = x.astype(jnp.float32) / w.awq_scale if w.awq_scale is not None else x
    xf = jnp.pad(xf.astype(cd), ((0, b_pad - b), (0, g_pad * w.m - w.in_features)))
    # x_perm[p, b, g] = x[b, g·M + p]: B × in bytes, negligible next to the weights, and it turns the
    # in-kernel interleave of the M rows of a group into M plain dots.
    x_perm = xf.reshape(b_pad, g_pad, w.m).transpose(2, 0, 1)
    operands = [x_perm, w.values, w.positions] + ([] if w.bits is None else [w.scales])
    kernel = functools.partial(_kernel, w=w, bb=bb, bo=bo, n_tiles=g_pad // (w.per_byte * w.block_q), cd=cd)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b_pad, w.out_padded), jnp.float32),
        grid=(w.out_padded // bo, b_pad // bb),
        interpret=interpret,
        compiler_params=params,
        name="nm_matmul",
    )(*operands)
    return y[:b, : w.out_features].astype(cd if out_dtype is None else out_dtype)


def _check_triton_tiles(**tiles: int) -> None:
    # Pallas's Triton lowering only takes power-of-two array shapes, and tl.dot operands need at least 16
    # in every dimension; failing here names the setting instead of a Triton compile error on the device.
    for name, v in tiles.items():
        if v < 16 or v & (v - 1):
            fix = (
                "leave block_b=None (the batch rounded up to a power of two >= 16)"
                if name == "block_b"
                else "lay the weight out with to_kernel_layout(block_q=16, block_out=64) (the defaults)"
            )
            raise ValueError(
                f"the compiled (Triton) N:M kernel needs {name} to be a power of two >= 16, got {v}: "
                f"{fix}, or run it with impl='interpret' or 'reference'"
            )


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def nm_matmul(
    x: jax.Array,
    w: NMWeight,
    *,
    interpret: bool | None = None,
    impl: str | None = None,
    block_b: int | None = None,
    block_out: int | None = None,
    out_dtype: Any = None,
) -> jax.Array:
    """``y = x @ W`` for an N:M compressed ``W``: ``x (..., in) -> y (..., out)``, float32 accumulation.

    ``y[b, o] = Σ_g Σ_{j<N} x[b, g·M + pos[g, j, o]] · v[g, j, o] · s[(g·N + j) // group_size, o]``.

    Implementation (``impl`` argument, else ``w.impl``): ``"pallas"`` the compiled kernel; ``"interpret"``
    the kernel in Pallas interpret mode; ``"reference"`` :func:`nm_matmul_reference`; ``"auto"``: compiled
    kernel on a GPU backend, otherwise interpret mode when ``interpret=True``, otherwise the reference.
    The output dtype is ``result_type(x, W)`` unless ``out_dtype`` is given.
    """
    choice = impl or w.impl
    if choice not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {choice!r}")
    if choice == "auto":
        choice = "pallas" if _on_gpu() and not interpret else ("interpret" if interpret else "reference")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if choice == "reference":
        y = nm_matmul_reference(x2, w, out_dtype=out_dtype)
    else:
        y = nm_matmul_pallas(
            x2,
            w,
            interpret=choice == "interpret",
            block_b=block_b,
            block_out=block_out,
            out_dtype=out_dtype,
        )
    return y.reshape(*lead, y.shape[-1])
