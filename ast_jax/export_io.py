"""Writing and reading an export directory: atomic :func:`save_compressed`, verified :func:`load_compressed`.

The layout and every check are defined in :mod:`ast_jax.export_format`.
"""

from __future__ import annotations

import hashlib
import operator
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ast_jax.export_codec import CompressedNM, _as_numpy
from ast_jax.export_format import (
    _HASH_FIELD,
    _MANIFEST,
    _TENSORS,
    FORMAT,
    ExportIntegrityError,
    _canonical,
    _check_decoded,
    _check_leaf,
    _check_paths,
    _Fail,
    _index_bits,
    _parse_manifest,
    _record,
    _restore_dtype,
    _sha256_array,
    _storable,
)


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


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


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
