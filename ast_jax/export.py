"""Deployable N:M sparse export: kept values + per-group positions, optional int8/int4 quantisation and AWQ.

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

On-disk layout (``save_compressed(path, model)``), format ``"ast_jax.nm-export/2"``: a directory holding

* ``tensors.npz`` -- uncompressed NumPy arrays, one zip member ``<key>.npy`` per stored part. Dtypes NumPy
  cannot store (bfloat16) are saved as their raw ``uint16`` bits and viewed back using the leaf's ``"dtype"``.
* ``manifest.json`` -- ``{"format", "tensors", "leaves", "manifest_sha256"}``:

  - ``"tensors"``: ``{"size", "sha256"}`` of the whole ``tensors.npz`` file;
  - ``"leaves"``: one object per param leaf, in pytree order, with ``"path"`` (``/``-joined pytree keys),
    ``"kind"`` (``"nm"`` or ``"dense"``), ``"shape"`` and ``"dtype"`` of the dense param and ``"arrays"``,
    mapping each stored part (``dense``; or ``values``, ``indices``, ``scales``, ``awq_scale``) to
    ``{"key", "dtype", "shape", "sha256"}``: its member in ``tensors.npz``, the dtype and shape it is
    stored with and the SHA-256 of its C-order bytes. ``"nm"`` leaves also hold ``"n"``, ``"m"``,
    ``"bits"`` (null = unquantised), ``"group_size"``, ``"index_bits"`` and ``"scale_dtype"`` (null when
    unquantised);
  - ``"manifest_sha256"``: SHA-256 of the other three fields written as
    ``json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False) + "\\n"``. The file itself is exactly
    that serialisation of all four fields.

Integrity: :func:`load_compressed` verifies every field, the manifest's form and checksum, the file's size
and SHA-256, the zip's members and every array's dtype, shape and SHA-256 before it decodes anything, and
raises :class:`ExportIntegrityError` (a ``ValueError``) naming the tensor's param path, or the file, and the
problem. Format ``"ast_jax.nm-export/1"`` (before checksums) is refused with that error too: it cannot be
verified, so it must be exported again. :func:`save_compressed` checks every leaf the same way before it
writes anything and replaces an export without a moment where a mix of old and new loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from ast_jax.sparsify import SparseFilter, default_sparse_filter, key_path, path_str, sparse_paths

__all__ = [
    "CompressedNM",
    "ExportConfig",
    "ExportIntegrityError",
    "awq_output_error",
    "collect_dense_inputs",
    "compress_nm",
    "compress_params",
    "decompress_nm",
    "decompress_params",
    "format_size_table",
    "load_compressed",
    "pack_bits",
    "save_compressed",
    "size_report",
    "unpack_bits",
]

FORMAT = "ast_jax.nm-export/2"
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


# ---------------------------------------------------------------------------------------------------------
# Whole param trees


def compress_params(
    params: Any,
    config: ExportConfig = ExportConfig(),
    *,
    sparse_filter: SparseFilter | None = None,
    masks: Mapping[str, Any] | None = None,
    calib_inputs: Mapping[str, Any] | None = None,
) -> dict[str, CompressedNM | np.ndarray]:
    """Compress every sparse kernel of a params pytree; other leaves are kept dense on the host.

    Which kernels are sparse is decided by ``sparse_filter(path_tuple, leaf)`` (default:
    :func:`ast_jax.sparsify.default_sparse_filter`, the same rule training uses). Returns a flat
    ``{path: CompressedNM | np.ndarray}`` dict in pytree order, ``path`` being ``/``-joined keys such as
    ``"block_0/attn/q/kernel"``. ``masks`` and ``calib_inputs`` are optional ``{path: array}`` maps (the mask
    of a kernel; its calibration inputs ``(tokens, in)`` for AWQ, see :func:`collect_dense_inputs`).
    """
    f = default_sparse_filter if sparse_filter is None else sparse_filter
    out: dict[str, CompressedNM | np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        kp = key_path(path)
        p = path_str(kp)
        if f(kp, leaf):
            out[p] = compress_nm(
                leaf,
                config,
                mask=None if masks is None else masks.get(p),
                calib_inputs=None if calib_inputs is None else calib_inputs.get(p),
                name=p,
            )
        else:
            out[p] = _as_numpy(leaf, p)
    return out


def decompress_params(model: Mapping[str, CompressedNM | np.ndarray]) -> dict[str, Any]:
    """Nested-dict params (the layout of a Flax params pytree) from :func:`compress_params`'s output."""
    tree: dict[str, Any] = {}
    for p, leaf in model.items():
        node = tree
        *parents, last = p.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = decompress_nm(leaf) if isinstance(leaf, CompressedNM) else np.asarray(leaf)
    return tree


# ---------------------------------------------------------------------------------------------------------
# Save / load

_MANIFEST = "manifest.json"
_TENSORS = "tensors.npz"
_HASH_FIELD = "manifest_sha256"
_UNVERIFIABLE_FORMATS = ("ast_jax.nm-export/1",)
_NM_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
_DENSE_DTYPES = _NM_DTYPES | frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "complex64",
        "complex128",
    }
)
_SCALE_DTYPES = frozenset({"float16", "float32"})
_TOP_FIELDS = frozenset({"format", "tensors", "leaves", _HASH_FIELD})
_NM_FIELDS = frozenset(
    {"path", "kind", "shape", "dtype", "n", "m", "bits", "group_size", "index_bits", "scale_dtype", "arrays"}
)
_DENSE_FIELDS = frozenset({"path", "kind", "shape", "dtype", "arrays"})
_RECORD_FIELDS = frozenset({"key", "dtype", "shape", "sha256"})
_HEX64 = re.compile(r"[0-9a-f]{64}")

_Fail = Callable[[str, str], Exception]


class ExportIntegrityError(ValueError):
    """An export directory that :func:`load_compressed` refuses: damaged, incomplete or inconsistent.

    Attributes:
      export: the export directory, as given.
      where: the param path of the tensor at fault (``"block_0/attn/q/kernel"``), or the file
        (``"manifest.json"``, ``"tensors.npz"``) when the fault belongs to no single tensor.
      problem: what is wrong, in words.
    """

    def __init__(self, export: str | os.PathLike, where: str, problem: str) -> None:
        self.export = str(export)
        self.where = where
        self.problem = problem
        super().__init__(f"{self.export}: {where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce passes only the message back to __init__, which takes three arguments.
        return (type(self), (self.export, self.where, self.problem))


def _storable_dtype(dtype: str) -> str:
    # np.savez cannot round-trip ml_dtypes (bfloat16): the raw bits are stored, the manifest keeps the dtype.
    return "uint16" if dtype == "bfloat16" else dtype


def _storable(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def _restore_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    target = _np_dtype(dtype)
    return a.view(target) if a.dtype != target else a


def _index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())  # ceil(log2 m) without float rounding


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(v: Any) -> bool:
    return type(v) is int  # JSON true/false load as bool, an int subclass: they must not pass as 1/0


def _sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _canonical(obj: Any) -> bytes:
    # One fixed serialisation. Comparing the file with it byte for byte refuses edits that JSON reads as the
    # same content (whitespace, escapes, a dropped final newline), which a content checksum lets through.
    return (json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def _record(key: str, a: np.ndarray) -> dict[str, Any]:
    return {"key": key, "dtype": str(a.dtype), "shape": list(a.shape), "sha256": _sha256_array(a)}


def _check_shape(v: Any, where: str, what: str, fail: _Fail) -> tuple[int, ...]:
    if not (isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)):
        raise fail(where, f"{what} must be a list of non-negative ints, got {v!r}")
    return tuple(v)


_Expected = dict[str, tuple[str, tuple[int, ...]]]


def _nm_expected(
    leaf: dict[str, Any], p: str, shape: tuple[int, ...], fail: _Fail
) -> tuple[_Expected, _Expected]:
    """(required, optional) stored parts of an ``"nm"`` leaf: part -> (dtype, shape) they must have."""
    n, m, bits, g, ib, sd = (leaf[f] for f in ("n", "m", "bits", "group_size", "index_bits", "scale_dtype"))
    if not (_is_int(m) and 2 <= m <= _MAX_M):
        raise fail(p, f"unsupported m={m!r} (need an int in [2, {_MAX_M}])")
    if not (_is_int(n) and 0 < n < m):
        raise fail(p, f"unsupported n={n!r} for m={m} (need an int with 0 < n < m)")
    if not (bits is None or (_is_int(bits) and bits in (4, 8))):
        raise fail(p, f"unsupported bits={bits!r} (need null, 4 or 8)")
    if not (_is_int(g) and g >= 1):
        raise fail(p, f"group_size={g!r} must be an int >= 1")
    if not (_is_int(ib) and ib == _index_bits(m)):
        raise fail(p, f"index_bits={ib!r}, but m={m} stores positions in {_index_bits(m)} bits")
    if bits is None and sd is not None:
        raise fail(p, f"scale_dtype={sd!r} on an unquantised kernel (must be null)")
    if bits is not None and not (isinstance(sd, str) and sd in _SCALE_DTYPES):
        raise fail(p, f"unsupported scale_dtype={sd!r} (need 'float16' or 'float32')")
    if len(shape) < 2:
        raise fail(p, f"shape {list(shape)}: an N:M kernel needs >= 2 dims (in, out...)")
    k = shape[0]
    if k % m:
        raise fail(p, f"shape {list(shape)}: input dimension {k} is not a multiple of m={m}")
    kk, out = k // m * n, math.prod(shape[1:])
    if bits is None:
        values = (_storable_dtype(leaf["dtype"]), (kk, out))
    elif bits == 8:
        values = ("int8", (kk, out))
    else:
        values = ("uint8", (_ceil_div(kk * out, 2),))
    required = {"values": values, "indices": ("uint8", (_ceil_div(kk * out * ib, 8),))}
    optional: _Expected = {}
    if bits is not None:
        required["scales"] = (sd, (_ceil_div(kk, g), out))
        optional["awq_scale"] = ("float32", (k,))
    return required, optional


def _check_leaf(leaf: Any, index: int, fail: _Fail) -> None:
    """Every field of one manifest leaf (types, ranges) and the dtype and shape each stored part must have."""
    if not isinstance(leaf, dict) or not isinstance(leaf.get("path"), str):
        raise fail(_MANIFEST, f"leaf {index} is not a JSON object with a string 'path'")
    p, kind = leaf["path"], leaf.get("kind")
    fields = {"nm": _NM_FIELDS, "dense": _DENSE_FIELDS}.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise fail(p, f"unknown kind {kind!r} (need 'nm' or 'dense')")
    if set(leaf) != fields:
        missing, extra = sorted(fields - set(leaf)), sorted(set(leaf) - fields)
        raise fail(p, f"wrong manifest fields for a {kind!r} leaf (missing {missing}, unexpected {extra})")
    shape = _check_shape(leaf["shape"], p, "shape", fail)
    dtype = leaf["dtype"]
    if not (isinstance(dtype, str) and dtype in (_NM_DTYPES if kind == "nm" else _DENSE_DTYPES)):
        raise fail(p, f"unsupported dtype {dtype!r} for a {kind!r} leaf")
    if kind == "nm":
        required, optional = _nm_expected(leaf, p, shape, fail)
        settings = f"{leaf['n']}:{leaf['m']}, bits={leaf['bits']}, group_size={leaf['group_size']}"
        context = f"shape {list(shape)}, dtype {dtype}, {settings}"
    else:
        required, optional = {"dense": (_storable_dtype(dtype), shape)}, {}
        context = f"shape {list(shape)}, dtype {dtype}"
    arrays = leaf["arrays"]
    if not isinstance(arrays, dict):
        raise fail(p, "'arrays' must be a JSON object")
    missing = sorted(set(required) - set(arrays))
    extra = sorted(set(arrays) - set(required) - set(optional))
    if missing or extra:
        raise fail(p, f"stored parts missing {missing}, unexpected {extra} (manifest: {context})")
    for part, rec in arrays.items():
        if not (isinstance(rec, dict) and set(rec) == _RECORD_FIELDS):
            raise fail(p, f"the record of {part} must have exactly the fields {sorted(_RECORD_FIELDS)}")
        if not (isinstance(rec["key"], str) and rec["key"]):
            raise fail(p, f"the record of {part} has no member key")
        if not (isinstance(rec["sha256"], str) and _HEX64.fullmatch(rec["sha256"])):
            raise fail(p, f"the SHA-256 of {part} is not 64 lowercase hex digits")
        got_shape = _check_shape(rec["shape"], p, f"the shape of {part}", fail)
        want_dtype, want_shape = {**required, **optional}[part]
        if rec["dtype"] != want_dtype or got_shape != want_shape:
            raise fail(
                p,
                f"manifest {context} needs {part} of {want_dtype} {want_shape}, "
                f"but {part} is stored as {rec['dtype']} {got_shape}",
            )


def _check_paths(paths: list[str], fail: _Fail) -> None:
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise fail(p, "appears twice in the manifest")
        seen.add(p)
    for p in paths:
        parts = p.split("/")
        for j in range(1, len(parts)):
            if "/".join(parts[:j]) in seen:
                # decompress_params would overwrite one with the other: not one params tree.
                raise fail(p, f"nests under the leaf {'/'.join(parts[:j])!r}")


def _check_decoded(c: CompressedNM, p: str, fail: _Fail) -> None:
    """Positions that form a real N:M pattern (in range, strictly increasing per group); usable scales."""
    k, out = c.shape[0], math.prod(c.shape[1:])
    kk = k // c.m * c.n
    pos = unpack_bits(c.indices, _index_bits(c.m), kk * out).reshape(k // c.m, c.n, out)
    if (pos >= c.m).any():
        raise fail(p, f"a stored position is >= m={c.m}")
    if (np.diff(pos.astype(np.int16), axis=1) <= 0).any():
        # Two kept values on one row would overwrite each other: fewer than n kept, silently.
        raise fail(p, f"a group stores a position twice or out of order: not a {c.n}:{c.m} pattern")
    for name, s in (("scales", c.scales), ("awq_scale", c.awq_scale)):
        if s is not None and not np.all(np.isfinite(s) & (s > 0)):
            raise fail(p, f"{name} must be finite and > 0")


def _prepare(model: Mapping[str, CompressedNM | np.ndarray]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Manifest leaves and the arrays to store, every leaf checked as load_compressed will check it."""

    def fail(where: str, problem: str) -> Exception:
        return ValueError(f"save_compressed: {where}: {problem}")

    leaves: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for i, (p, leaf) in enumerate(model.items()):
        if not isinstance(p, str):
            raise fail(repr(p), "leaf paths must be strings")
        if isinstance(leaf, CompressedNM):
            try:
                n, m, g = (operator.index(v) for v in (leaf.n, leaf.m, leaf.group_size))
                bits = None if leaf.bits is None else operator.index(leaf.bits)
                shape = [operator.index(d) for d in leaf.shape]
            except TypeError as e:
                raise fail(p, f"n, m, bits, group_size and shape must be ints ({e})") from e
            stored = {}
            for part in ("values", "indices", "scales", "awq_scale"):
                val = getattr(leaf, part)
                if val is not None:
                    stored[part] = _storable(np.asarray(val))
                    arrays[f"{i}.{part}"] = stored[part]
            entry = {
                "path": p,
                "kind": "nm",
                "shape": shape,
                "dtype": str(leaf.dtype),
                "n": n,
                "m": m,
                "bits": bits,
                "group_size": g,
                "index_bits": _index_bits(m),
                "scale_dtype": None if leaf.scales is None else str(stored["scales"].dtype),
                "arrays": {part: _record(f"{i}.{part}", a) for part, a in stored.items()},
            }
            _check_leaf(entry, i, fail)
            canon = leaf._replace(
                n=n,
                m=m,
                bits=bits,
                group_size=g,
                shape=tuple(shape),
                **{k: np.asarray(v) for k, v in stored.items()},
            )
            _check_decoded(canon, p, fail)
        else:
            a = _as_numpy(leaf, p)
            if not a.dtype.isnative:
                a = a.astype(a.dtype.newbyteorder("="))
            arrays[f"{i}.dense"] = _storable(a)
            entry = {
                "path": p,
                "kind": "dense",
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "arrays": {"dense": _record(f"{i}.dense", arrays[f"{i}.dense"])},
            }
            _check_leaf(entry, i, fail)
        leaves.append(entry)
    _check_paths([leaf["path"] for leaf in leaves], fail)
    return leaves, arrays


def _write_synced(path: Path, write: Callable[[Any], Any]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory: the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_compressed(path: str | os.PathLike, model: Mapping[str, CompressedNM | np.ndarray]) -> Path:
    """Write ``model`` (from :func:`compress_params`) to directory ``path`` as manifest.json + tensors.npz.

    Every leaf is checked first, as :func:`load_compressed` will check it (an N:M leaf whose positions are not
    a valid N:M pattern, an unsupported ``m``/``bits``/``group_size``/dtype, parts of the wrong shape), and
    ``ValueError`` naming the leaf is raised before anything is written. ``NotADirectoryError`` if ``path``
    exists and is not a directory. Other files in ``path`` are left alone.

    Both files are written and synced in a temporary directory inside ``path``; then the old manifest is
    removed, ``tensors.npz`` renamed into place and the new manifest renamed in last. A crash before that
    leaves the previous export intact; a crash between the renames leaves no manifest, which
    :func:`load_compressed` refuses. No crash leaves an export that loads with mixed or partial data.
    """
    root = Path(path)
    leaves, arrays = _prepare(model)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"save_compressed: {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-tmp-", dir=root))
    try:
        _write_synced(tmp / _TENSORS, lambda f: np.savez(f, **arrays))
        size, digest = _file_digest(tmp / _TENSORS)
        body = {"format": FORMAT, "tensors": {"size": size, "sha256": digest}, "leaves": leaves}
        manifest = {**body, _HASH_FIELD: hashlib.sha256(_canonical(body)).hexdigest()}
        raw = _canonical(manifest)
        _write_synced(tmp / _MANIFEST, lambda f: f.write(raw))
        (root / _MANIFEST).unlink(missing_ok=True)
        os.replace(tmp / _TENSORS, root / _TENSORS)
        os.replace(tmp / _MANIFEST, root / _MANIFEST)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _parse_manifest(raw: bytes, fail: _Fail) -> dict[str, Any]:
    """The manifest, after every field check, the canonical-form check and its self-checksum."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(_MANIFEST, f"not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise fail(_MANIFEST, "the top level is not a JSON object")
    fmt = manifest.get("format")
    if fmt in _UNVERIFIABLE_FORMATS:
        raise fail(
            _MANIFEST,
            f"format {fmt} records no checksums, so its data cannot be verified; export the params again "
            f"with save_compressed (format {FORMAT})",
        )
    if fmt != FORMAT:
        raise fail(_MANIFEST, f"unknown export format {fmt!r} (expected {FORMAT!r})")
    if set(manifest) != _TOP_FIELDS:
        raise fail(_MANIFEST, f"top-level fields {sorted(manifest)}, expected {sorted(_TOP_FIELDS)}")
    tensors = manifest["tensors"]
    if not (
        isinstance(tensors, dict)
        and set(tensors) == {"size", "sha256"}
        and _is_int(tensors["size"])
        and isinstance(tensors["sha256"], str)
        and _HEX64.fullmatch(tensors["sha256"])
    ):
        raise fail(_MANIFEST, "'tensors' must be {'size': bytes, 'sha256': 64 lowercase hex digits}")
    if not isinstance(manifest["leaves"], list):
        raise fail(_MANIFEST, "'leaves' must be a JSON list")
    keys: set[str] = set()
    for i, leaf in enumerate(manifest["leaves"]):
        _check_leaf(leaf, i, fail)
        for part, rec in leaf["arrays"].items():
            if rec["key"] in keys:
                raise fail(leaf["path"], f"member {rec['key']!r} of {part} is claimed by another part too")
            keys.add(rec["key"])
    _check_paths([leaf["path"] for leaf in manifest["leaves"]], fail)
    # After the field checks, so that an inconsistent field is reported with the tensor it belongs to.
    if _canonical(manifest) != raw:
        raise fail(_MANIFEST, "not byte-identical to what save_compressed writes (edited or corrupted)")
    body = {k: v for k, v in manifest.items() if k != _HASH_FIELD}
    if hashlib.sha256(_canonical(body)).hexdigest() != manifest[_HASH_FIELD]:
        raise fail(_MANIFEST, f"{_HASH_FIELD} does not match the manifest's content (edited or corrupted)")
    return manifest


def _read_arrays(path: Path, manifest: dict[str, Any], fail: _Fail) -> dict[str, np.ndarray]:
    """Every stored part by member key, each checked against its record (dtype, shape, SHA-256)."""
    records = [
        (leaf["path"], part, rec) for leaf in manifest["leaves"] for part, rec in leaf["arrays"].items()
    ]
    out: dict[str, np.ndarray] = {}
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise fail(_TENSORS, f"not a readable zip archive ({e})") from e
    with zf:
        names = zf.namelist()
        if len(set(names)) != len(names):
            raise fail(_TENSORS, "the archive holds two members of one name")
        for p, part, rec in records:
            if rec["key"] + ".npy" not in names:
                raise fail(p, f"its stored {part!r} (member {rec['key']}.npy) is missing from {_TENSORS}")
        extra = sorted(set(names) - {rec["key"] + ".npy" for _, _, rec in records})
        if extra:
            raise fail(_TENSORS, f"member(s) the manifest does not list: {extra[:5]}")
        for p, part, rec in records:
            try:
                with zf.open(rec["key"] + ".npy") as f:
                    a = np.lib.format.read_array(f, allow_pickle=False)
            except Exception as e:  # CRC, npy header, short data: all mean a damaged member
                raise fail(p, f"its stored {part!r} cannot be read ({type(e).__name__}: {e})") from e
            if str(a.dtype) != rec["dtype"] or list(a.shape) != rec["shape"]:
                raise fail(
                    p,
                    f"the manifest records {part} as {rec['dtype']} {tuple(rec['shape'])}, "
                    f"{_TENSORS} holds {a.dtype} {a.shape}",
                )
            if _sha256_array(a) != rec["sha256"]:
                raise fail(p, f"its stored {part!r} does not match its SHA-256 (corrupted or replaced)")
            out[rec["key"]] = a
    return out


def _diagnose(path: Path, manifest: dict[str, Any], head: str, fail: _Fail) -> Exception:
    """The most specific error for a tensors.npz whose size or SHA-256 (``head``) differs from its record."""
    owner = {
        rec["key"] + ".npy": (leaf["path"], part)
        for leaf in manifest["leaves"]
        for part, rec in leaf["arrays"].items()
    }
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                # Every member through its CRC-32 before any .npy header is parsed: its shape may be damaged.
                try:
                    with zf.open(info) as f:
                        while f.read(1 << 20):
                            pass
                except Exception as e:
                    p, part = owner.get(info.filename, (_TENSORS, info.filename))
                    return fail(p, f"{head}; its stored {part!r} is damaged ({type(e).__name__}: {e})")
    except Exception as e:
        return fail(_TENSORS, f"{head}, and it is not a readable zip archive ({type(e).__name__}: {e})")
    try:
        _read_arrays(path, manifest, fail)
    except ExportIntegrityError as e:
        return fail(e.where, f"{head}; {e.problem}")
    except Exception as e:
        return fail(_TENSORS, f"{head} ({type(e).__name__}: {e})")
    return fail(_TENSORS, f"{head}, in its zip metadata (every tensor reads back intact)")


def load_compressed(path: str | os.PathLike) -> dict[str, CompressedNM | np.ndarray]:
    """Read a directory written by :func:`save_compressed` back into ``{path: CompressedNM | np.ndarray}``.

    Nothing is decoded before everything is verified: the manifest's fields (types; ``0 < n < m``,
    ``2 <= m <= 256``, ``bits`` in ``{null, 4, 8}``, ``group_size >= 1``, supported dtypes; the dtype and
    shape of every stored part as implied by the kernel's shape and settings), its canonical form and
    self-checksum, the size and SHA-256 of tensors.npz, the exact set of zip members, then each stored
    array's dtype, shape and SHA-256. Last, every N:M leaf's positions must form a valid N:M pattern.

    Raises:
      ExportIntegrityError: for any failed check (a flipped byte, a truncated or missing file, a missing or
        extra member, a manifest disagreeing with the data, bad JSON, unsupported settings, an older format
        without checksums). ``where`` names the tensor's param path, or the file when no single tensor is
        at fault.
    """
    root = Path(path)

    def fail(where: str, problem: str) -> Exception:
        return ExportIntegrityError(root, where, problem)

    for name in (_MANIFEST, _TENSORS):
        if not (root / name).is_file():
            raise fail(name, f"not an ast_jax export ({name} is missing or not a file)")
    manifest = _parse_manifest((root / _MANIFEST).read_bytes(), fail)
    size, digest = _file_digest(root / _TENSORS)
    if size != manifest["tensors"]["size"]:
        head = f"{_TENSORS} is {size} bytes, the manifest records {manifest['tensors']['size']}"
        raise _diagnose(root / _TENSORS, manifest, head, fail)
    if digest != manifest["tensors"]["sha256"]:
        raise _diagnose(
            root / _TENSORS, manifest, f"{_TENSORS} differs from its SHA-256 in the manifest", fail
        )
    arrays = _read_arrays(root / _TENSORS, manifest, fail)

    model: dict[str, CompressedNM | np.ndarray] = {}
    for leaf in manifest["leaves"]:
        p, recs = leaf["path"], leaf["arrays"]

        def part(name: str, recs: dict[str, Any] = recs) -> np.ndarray | None:
            return arrays[recs[name]["key"]] if name in recs else None

        if leaf["kind"] == "dense":
            model[p] = _restore_dtype(part("dense"), leaf["dtype"])
            continue
        values = part("values")
        c = CompressedNM(
            values=_restore_dtype(values, leaf["dtype"]) if leaf["bits"] is None else values,
            indices=part("indices"),
            scales=part("scales"),
            awq_scale=part("awq_scale"),
            shape=tuple(leaf["shape"]),
            dtype=leaf["dtype"],
            n=leaf["n"],
            m=leaf["m"],
            bits=leaf["bits"],
            group_size=leaf["group_size"],
        )
        _check_decoded(c, p, fail)
        model[p] = c
    return model


# ---------------------------------------------------------------------------------------------------------
# Size report


def size_report(model: Mapping[str, CompressedNM | np.ndarray]) -> dict[str, Any]:
    """Bytes of the sparse layers, compressed vs dense FP32 and BF16 (dense leaves are not counted).

    Returns ``{"layers": [{"path", "shape", "compressed_bytes", "fp32_bytes", "bf16_bytes"}, ...],
    "compressed_bytes", "fp32_bytes", "bf16_bytes", "ratio_fp32", "ratio_bf16", "bits_per_weight"}`` where the
    ratios are dense bytes / compressed bytes over all sparse layers.
    """
    rows = []
    for p, leaf in model.items():
        if isinstance(leaf, CompressedNM):
            size = int(np.prod(leaf.shape))
            rows.append(
                {
                    "path": p,
                    "shape": list(leaf.shape),
                    "compressed_bytes": leaf.nbytes,
                    "fp32_bytes": 4 * size,
                    "bf16_bytes": 2 * size,
                }
            )
    comp = sum(r["compressed_bytes"] for r in rows)
    fp32 = sum(r["fp32_bytes"] for r in rows)
    bf16 = sum(r["bf16_bytes"] for r in rows)
    return {
        "layers": rows,
        "compressed_bytes": comp,
        "fp32_bytes": fp32,
        "bf16_bytes": bf16,
        "ratio_fp32": fp32 / comp if comp else float("nan"),
        "ratio_bf16": bf16 / comp if comp else float("nan"),
        "bits_per_weight": 8 * comp / (fp32 / 4) if fp32 else float("nan"),
    }


def format_size_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table with one row per ``{label: size_report(...)}`` entry."""
    lines = [
        "| export | sparse-layer bytes | dense FP32 bytes | dense BF16 bytes | x vs FP32 | x vs BF16 "
        "| bits/weight |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in reports.items():
        lines.append(
            f"| {label} | {r['compressed_bytes']:,} | {r['fp32_bytes']:,} | {r['bf16_bytes']:,} | "
            f"{r['ratio_fp32']:.2f} | {r['ratio_bf16']:.2f} | {r['bits_per_weight']:.3f} |"
        )
    return "\n".join(lines)


def collect_dense_inputs(
    model: nn.Module,
    params: Any,
    batch: Any,
    *,
    sparse_filter: SparseFilter | None = None,
    max_tokens: int = 512,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs of every sparse ``flax.linen.Dense`` layer during ``model.apply({"params": params}, batch)``.

    Returns ``{path: (tokens, in) float32}`` keyed like :func:`compress_params` (``"block_0/attn/q/kernel"``),
    keeping the first ``max_tokens`` rows per layer: the calibration inputs of the AWQ search. Runs eagerly.
    """
    wanted = {path_str(p) for p in sparse_paths(params, sparse_filter)}
    captured: dict[str, np.ndarray] = {}

    def hook(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Dense) and context.method_name == "__call__" and args:
            key = path_str((*tuple(mod.path), "kernel"))
            if key in wanted:
                x = np.asarray(jax.device_get(args[0]), np.float32)
                x = x.reshape(-1, x.shape[-1])
                prev = captured.get(key)
                captured[key] = (x if prev is None else np.concatenate([prev, x]))[:max_tokens]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(hook):
        model.apply({"params": params}, batch, **dict(apply_kwargs or {}))
    return captured
