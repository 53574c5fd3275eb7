"""Compression of one N:M sparse kernel: kept values + packed positions, int8/int4 quantisation, AWQ.

A strictly N:M sparse kernel ``W`` of Flax layout ``(in, out)`` (groups of ``m`` consecutive input rows per
output column, at most ``n`` non-zeros each) is stored as

* ``values``  -- the ``n`` kept entries of every group, in increasing row order: logically
  ``(in // m * n, out)``. Row ``r`` of ``values`` belongs to group ``r // n``.
* ``indices`` -- the position ``p`` in ``[0, m)`` of every kept value inside its group, ``ceil(log2 m)`` bits
  each (2 bits for 2:4), packed little-endian into ``uint8``. The dense row of kept value ``r`` is
  ``(r // n) * m + p``.

Optionally the kept values are quantised symmetrically per group of ``group_size`` consecutive kept values of
one output column (default 128 kept values = 256 dense input rows for 2:4; the last group of a column may be
shorter):

    s_g = max_{r in g} |v_r| / q_max,   q_r = clip(round(v_r / s_g), -q_max, q_max),   v_hat_r = q_r * s_g

with ``q_max = 7`` for int4 (values stored as offset nibbles ``q + 8``, two per byte) and ``q_max = 127`` for
int8. ``s_g`` is stored as float16 (rounded up, so no kept value clips) unless ``scale_dtype="float32"``. The
reconstruction error of every kept value is at most ``s_g / 2``; dropped entries are exactly zero.

AWQ-style activation-aware scaling (optional, needs calibration inputs ``X`` of shape ``(tokens, in)``): with
``a_j = mean_t |X_tj|`` the per-input-channel scale is ``c_j = a_j^alpha`` (normalised to geometric mean 1);
the kernel is quantised as ``Q(diag(c) W)`` and reconstructed as ``diag(c)^-1 Q(diag(c) W)``, where ``alpha``
in ``[0, 1]`` is grid-searched to minimise ``||X W - X W_hat||_F^2`` on the calibration inputs.
``alpha = 0`` is plain quantisation, so AWQ never does worse on the calibration set. ``c`` (float32,
``(in,)``) is stored too.

How a compressed model is stored on disk is :mod:`ast_jax.export_format`; whole param trees are
:mod:`ast_jax.export`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

_MAX_M = 256  # positions are packed in at most 8 bits each (pack_bits)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """How sparse kernels are exported.

    Attributes:
      n, m: the N:M pattern (at most ``n`` non-zeros per ``m`` consecutive input rows).
      bits: ``None`` (kept values stored in their own dtype, exact), ``8`` or ``4`` (symmetric int
        quantisation).
      group_size: kept values per quantisation scale, along the contraction axis of one output column.
      scale_dtype: ``"float16"`` (default) or ``"float32"`` for the per-group scales.
      awq: use activation-aware scaling when calibration inputs are given for a layer (needs ``bits``).
      awq_grid: number of ``alpha`` values tried in ``[0, 1]`` (``alpha = i / (awq_grid - 1)``).
    """

    n: int = 2
    m: int = 4
    bits: int | None = None
    group_size: int = 128
    scale_dtype: str = "float16"
    awq: bool = False
    awq_grid: int = 11

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"ExportConfig: need integers 0 < n < m, got n={self.n}, m={self.m}")
        if self.m > _MAX_M:
            raise ValueError(f"ExportConfig: m={self.m} > {_MAX_M} (positions are stored in at most 8 bits)")
        if self.bits not in (None, 4, 8):
            raise ValueError(f"ExportConfig.bits must be None, 4 or 8, got {self.bits!r}")
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"ExportConfig.group_size must be a positive int, got {self.group_size!r}")
        if self.scale_dtype not in ("float16", "float32"):
            raise ValueError(
                f"ExportConfig.scale_dtype must be 'float16' or 'float32', got {self.scale_dtype!r}"
            )
        if self.awq and self.bits is None:
            raise ValueError("ExportConfig.awq=True needs bits=4 or 8 (AWQ only changes quantisation error)")
        if self.awq_grid < 2:
            raise ValueError(f"ExportConfig.awq_grid must be >= 2, got {self.awq_grid}")


class CompressedNM(NamedTuple):
    """One compressed N:M kernel (see the module docstring for the meaning of every part).

    Attributes:
      values: unquantised: ``(in // m * n, out)`` in ``dtype``; int8: same shape ``int8``; int4: packed
        ``uint8`` of ``ceil(in // m * n * out / 2)`` bytes.
      indices: packed ``uint8``, ``index_bits`` bits per kept value (row-major over ``(in // m * n, out)``).
      scales: ``(ceil(in // m * n / group_size), out)`` float16/float32, or ``None`` when unquantised.
      awq_scale: ``(in,)`` float32 per-input-channel AWQ scale ``c``, or ``None``.
      shape: the dense kernel shape (``shape[0]`` is the contraction dim; trailing dims flatten to ``out``).
      dtype: the dense kernel dtype name (``"float32"``, ``"bfloat16"``, ...).
      n, m, bits, group_size: the settings used.
    """

    values: np.ndarray
    indices: np.ndarray
    scales: np.ndarray | None
    awq_scale: np.ndarray | None
    shape: tuple[int, ...]
    dtype: str
    n: int
    m: int
    bits: int | None
    group_size: int

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.m)))

    @property
    def nbytes(self) -> int:
        """Bytes of every stored part (values + indices + scales + AWQ scale)."""
        parts = (self.values, self.indices, self.scales, self.awq_scale)
        return int(sum(p.nbytes for p in parts if p is not None))


# ---------------------------------------------------------------------------------------------------------
# Bit packing


def pack_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers ``< 2**bits`` into a little-endian bit stream of ``uint8``.

    ``x`` of any shape (flattened row-major) -> ``(ceil(x.size * bits / 8),)`` uint8. Entry ``i`` occupies
    bits ``[i * bits, (i + 1) * bits)`` of the stream, least significant bit first.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    flat = np.asarray(x).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"pack_bits: values must lie in [0, {2**bits}), got [{flat.min()}, {flat.max()}]")
    flat = flat.astype(np.uint8)
    if 8 % bits == 0:
        # Whole entries per byte: shift-and-or, far faster and lighter than a per-bit expansion.
        per = 8 // bits
        pad = (-flat.size) % per
        lanes = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, per)
        out = np.zeros(lanes.shape[0], np.uint8)
        for i in range(per):
            out |= lanes[:, i] << np.uint8(i * bits)
        return out
    bitplanes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitplanes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` entries, as ``(count,)`` uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if packed.size * 8 < count * bits:
        raise ValueError(f"unpack_bits: {packed.size} bytes cannot hold {count} entries of {bits} bits")
    if 8 % bits == 0:
        per = 8 // bits
        lanes = np.stack([(packed >> np.uint8(i * bits)) & np.uint8(2**bits - 1) for i in range(per)], axis=1)
        return lanes.reshape(-1)[:count].copy()
    stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (stream.astype(np.uint16) @ weights).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# One kernel


def _as_numpy(w: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(jax.device_get(w))
    except Exception as e:  # a non-addressable global array, a string, ...
        raise ValueError(f"{name}: cannot read the kernel as a host array ({e})") from e
    return arr


def _kept_positions(w2: np.ndarray, n: int, m: int, mask: np.ndarray | None, name: str) -> np.ndarray:
    """Positions ``(in // m, n, out)`` (ascending within a group) of the kept entries of ``w2 (in, out)``."""
    k, out = w2.shape
    wg = w2.reshape(k // m, m, out)
    if mask is None:
        nnz = (wg != 0).sum(axis=1)
        if (nnz > n).any():
            g, o = np.argwhere(nnz > n)[0]
            raise ValueError(
                f"{name}: not {n}:{m} sparse (group {g} of output column {o} has {nnz[g, o]} non-zeros); "
                f"prune it first (ast_jax.nm_mask) or pass mask="
            )
        # Largest |w| first, lower index wins ties: the non-zeros (at most n) always come first.
        order = np.argsort(-np.abs(wg.astype(np.float32)), axis=1, kind="stable")[:, :n, :]
    else:
        mg = np.asarray(mask, bool).reshape(k // m, m, out)
        kept = mg.sum(axis=1)
        if (kept != n).any():
            g, o = np.argwhere(kept != n)[0]
            raise ValueError(
                f"{name}: mask must keep exactly {n} of every {m} entries "
                f"(group {g} of output column {o} keeps {kept[g, o]})"
            )
        if (wg[~mg] != 0).any():
            raise ValueError(f"{name}: non-zero weights outside mask; apply the mask before exporting")
        order = np.argsort(~mg, axis=1, kind="stable")[:, :n, :]
    return np.sort(order, axis=1)


def _dense_rows(pos: np.ndarray, m: int) -> np.ndarray:
    """Dense row index ``(in // m, n, out)`` of every kept value."""
    return pos + (np.arange(pos.shape[0]) * m)[:, None, None]


def _group_reduce_absmax(v: np.ndarray, g: int) -> np.ndarray:
    """``max |v|`` over row groups of size ``g``: ``(K, out) -> (ceil(K / g), out)`` (last may be short)."""
    k, out = v.shape
    pad = (-k) % g
    vp = np.concatenate([np.abs(v), np.zeros((pad, out), v.dtype)]) if pad else np.abs(v)
    return vp.reshape(-1, g, out).max(axis=1)


def _quantise(v: np.ndarray, bits: int, g: int, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric group-wise quantisation of ``v (K, out)`` float32 -> (``q`` int8 ``(K, out)``, scales)."""
    qmax = 2 ** (bits - 1) - 1
    s = (_group_reduce_absmax(v, g) / qmax).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1.0))  # an all-zero group quantises to zeros at any scale
    s_store = s.astype(scale_dtype)
    if not np.all(np.isfinite(s_store)):
        raise ValueError(f"quantisation scales overflow {scale_dtype}; use scale_dtype='float32'")
    # Round the stored scale up so that |v| / s_store <= qmax: no kept value clips, error <= s_store / 2.
    low = s_store.astype(np.float32) < s
    s_store = np.where(low, np.nextafter(s_store, np.asarray(np.inf, s_store.dtype)), s_store)
    s_rows = np.repeat(s_store.astype(np.float32), g, axis=0)[: v.shape[0]]
    q = np.clip(np.rint(v / s_rows), -qmax, qmax).astype(np.int8)
    return q, s_store


def _dequantise(q: np.ndarray, scales: np.ndarray, g: int) -> np.ndarray:
    s_rows = np.repeat(scales.astype(np.float32), g, axis=0)[: q.shape[0]]
    return q.astype(np.float32) * s_rows


def _encode(
    w2: np.ndarray, rows: np.ndarray, cfg: ExportConfig, awq_scale: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Kept values of ``w2`` at ``rows``, AWQ-scaled and quantised -> (stored values, scales, v_hat).

    ``v_hat`` is the float32 reconstruction of the kept values ``(K', out)`` (before undoing the AWQ scale).
    """
    out = w2.shape[1]
    v = np.take_along_axis(w2, rows.reshape(-1, out), axis=0)  # (K', out), K' = in // m * n
    if cfg.bits is None:
        return v, None, v
    v = v.astype(np.float32)
    if awq_scale is not None:
        v = v * awq_scale[rows.reshape(-1, out)]
    q, scales = _quantise(v, cfg.bits, cfg.group_size, cfg.scale_dtype)
    v_hat = _dequantise(q, scales, cfg.group_size)
    if cfg.bits == 4:
        stored = pack_bits((q.astype(np.int16) + 8).astype(np.uint8), 4)
    else:
        stored = q
    return stored, scales, v_hat


def _scatter(v_hat: np.ndarray, rows: np.ndarray, k: int, dtype: Any) -> np.ndarray:
    out = v_hat.shape[1]
    dense = np.zeros((k, out), dtype)
    np.put_along_axis(dense, rows.reshape(-1, out), v_hat.astype(dtype), axis=0)
    return dense


def awq_output_error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """Relative output error ``||x w - x w_hat||_F^2 / ||x w||_F^2``; ``x (T, in)``, ``w, w_hat (in,out)``."""
    x = np.asarray(x, np.float64)
    ref = x @ np.asarray(w, np.float64)
    err = ref - x @ np.asarray(w_hat, np.float64)
    return float((err**2).sum() / max((ref**2).sum(), 1e-300))


def compress_nm(
    w: Any,
    config: ExportConfig = ExportConfig(),
    *,
    mask: Any | None = None,
    calib_inputs: Any | None = None,
    name: str = "kernel",
) -> CompressedNM:
    """Compress one N:M sparse kernel ``w`` of shape ``(in, ...)`` (contraction axis 0).

    Without ``mask`` the kept positions are the ``n`` largest ``|w|`` of each group (lower index wins ties),
    and every group must already have at most ``n`` non-zeros. With ``mask`` (bool, shape of ``w``, exactly
    ``n`` True per group) the positions are the mask's and ``w`` must be zero outside it. ``calib_inputs`` of
    shape ``(tokens, in)`` enables the AWQ search when ``config.awq``. Raises ``ValueError`` naming ``name``
    for a non-finite kernel, an input dimension that is not a multiple of ``m``, or a kernel that is not N:M.
    """
    cfg = config
    arr = _as_numpy(w, name)
    if arr.ndim < 2:
        raise ValueError(f"{name}: a sparse kernel needs >= 2 dims (in, out...), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != ml_dtypes.bfloat16:
        raise ValueError(f"{name}: kernel must be floating point, got {arr.dtype}")
    if not np.all(np.isfinite(arr.astype(np.float32))):
        raise ValueError(f"{name}: kernel has NaN/inf entries")
    k = arr.shape[0]
    if k % cfg.m:
        raise ValueError(f"{name}: input dimension {k} (shape {arr.shape}) is not a multiple of m={cfg.m}")
    w2 = arr.reshape(k, -1)
    m2 = None if mask is None else _as_numpy(mask, f"{name} mask").reshape(k, -1)
    if m2 is not None and m2.shape != w2.shape:
        raise ValueError(f"{name}: mask shape {np.shape(mask)} must equal kernel shape {arr.shape}")
    pos = _kept_positions(w2, cfg.n, cfg.m, m2, name)
    rows = _dense_rows(pos, cfg.m)
    indices = pack_bits(pos.reshape(-1), max(1, math.ceil(math.log2(cfg.m))))

    awq_scale = None
    if cfg.awq and calib_inputs is not None:
        x = _as_numpy(calib_inputs, f"{name} calib_inputs").astype(np.float32)
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != k:
            raise ValueError(f"{name}: calib_inputs last dim {x.shape[-1]} must equal input dimension {k}")
        act = np.abs(x).mean(axis=0) + 1e-8
        w_sparse = w2.astype(np.float32)
        best = None
        for i in range(cfg.awq_grid):
            alpha = i / (cfg.awq_grid - 1)
            c = act**alpha
            c = (c / np.exp(np.log(c).mean())).astype(np.float32)
            _, _, v_hat = _encode(w2, rows, cfg, c)
            w_hat = _scatter(v_hat / c[rows.reshape(-1, w2.shape[1])], rows, k, np.float32)
            # ||X W - X W_hat||^2 with one float32 matmul per alpha (the reference X W is never needed).
            err = float(np.square((x @ (w_sparse - w_hat)).astype(np.float64)).sum())
            # Strict "<" keeps the smallest alpha on ties, so alpha = 0 (plain quantisation) wins by default.
            if best is None or err < best[0]:
                best = (err, c)
        awq_scale = best[1]
        if np.all(awq_scale == 1.0):
            awq_scale = None
    values, scales, _ = _encode(w2, rows, cfg, awq_scale)
    return CompressedNM(
        values=values,
        indices=indices,
        scales=scales,
        awq_scale=awq_scale,
        shape=tuple(int(d) for d in arr.shape),
        dtype=str(arr.dtype),
        n=cfg.n,
        m=cfg.m,
        bits=cfg.bits,
        group_size=cfg.group_size,
    )


def decompress_nm(c: CompressedNM) -> np.ndarray:
    """Dense kernel of shape ``c.shape`` and dtype ``c.dtype`` from a :class:`CompressedNM`.

    Exact for ``bits=None``; otherwise each kept value is within ``s_g / 2`` (divided by its AWQ scale) of the
    original and every dropped entry is exactly zero.
    """
    k = c.shape[0]
    out = int(np.prod(c.shape[1:]))
    kk = k // c.m * c.n
    pos = unpack_bits(c.indices, c.index_bits, kk * out).reshape(k // c.m, c.n, out)
    if (pos >= c.m).any():
        raise ValueError(f"corrupt export: position index >= m={c.m}")
    rows = _dense_rows(pos.astype(np.int64), c.m)
    dtype = _np_dtype(c.dtype)
    if c.bits is None:
        v_hat = np.asarray(c.values).reshape(kk, out)
    else:
        if c.bits == 4:
            q = unpack_bits(c.values, 4, kk * out).astype(np.int16).reshape(kk, out) - 8
        else:
            q = np.asarray(c.values).reshape(kk, out)
        v_hat = _dequantise(q, c.scales, c.group_size)
        if c.awq_scale is not None:
            v_hat = v_hat / c.awq_scale[rows.reshape(kk, out)]
    return _scatter(v_hat, rows, k, dtype).reshape(c.shape)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
