"""The on-disk format of an export: manifest schema, SHA-256 records and the checks a manifest must pass.

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

Integrity: :func:`~ast_jax.export_io.load_compressed` verifies every field, the manifest's form and
checksum, the file's size and SHA-256, the zip's members and every array's dtype, shape and SHA-256 before it
decodes anything, and raises :class:`ExportIntegrityError` (a ``ValueError``) naming the tensor's param path,
or the file, and the problem. Format ``"ast_jax.nm-export/1"`` (before checksums) is refused with that error
too: it cannot be verified, so it must be exported again. :func:`~ast_jax.export_io.save_compressed` checks
every leaf the same way before it writes anything and replaces an export without a moment where a mix of old
and new loads.

This module defines the format and its checks; :mod:`ast_jax.export_io` writes and reads the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from ast_jax.export_codec import _MAX_M, CompressedNM, _np_dtype, unpack_bits

FORMAT = "ast_jax.nm-export/2"
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
    """An export that :func:`~ast_jax.export_io.load_compressed` refuses: damaged, incomplete or inconsistent.

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
