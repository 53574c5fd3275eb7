"""ast_jax.export integrity: a damaged, incomplete or inconsistent export never loads.

``load_compressed`` must raise ``ExportIntegrityError`` naming the tensor (or the file) and the problem for
every fault; ``save_compressed`` must refuse bad leaves before writing and never leave a half-written export
that loads. The checksums here are recomputed independently from the documented manifest format.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ast_jax.export import (
    CompressedNM,
    ExportConfig,
    ExportIntegrityError,
    compress_nm,
    load_compressed,
    pack_bits,
    save_compressed,
)

KERNEL = "block_0/fc/kernel"  # (256, 8) float32, 2:4 unquantised: the issue's example
QKERNEL = "block_0/proj/kernel"  # (16, 8) bfloat16, int4, group 4
AWQKERNEL = "block_0/out/kernel"  # (32, 4) float32, int8 + AWQ scale
DENSE = "ln_f/scale"  # (8,) float32
FILES = ("manifest.json", "tensors.npz")
KERNEL_VALUES_KEY = "0.values"  # KERNEL is the first leaf of _model()


def _nm_sparse(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random 2:4 kernel (the two largest |w| of every 4 consecutive input rows kept)."""
    w = rng.normal(size=shape).astype(np.float32)
    g = np.abs(w).reshape(shape[0] // 4, 4, shape[1])
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, np.argsort(-g, axis=1)[:, :2], True, axis=1)
    return np.where(keep.reshape(shape), w, np.float32(0))


def _model(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(64, 32)) * np.where(np.arange(32) % 5 == 0, 30.0, 1.0)).astype(np.float32)
    awq = compress_nm(
        _nm_sparse(rng, (32, 4)), ExportConfig(bits=8, group_size=8, awq=True), calib_inputs=x, name=AWQKERNEL
    )
    assert awq.awq_scale is not None  # the fixture must exercise the AWQ part
    return {
        KERNEL: compress_nm(_nm_sparse(rng, (256, 8)), name=KERNEL),
        QKERNEL: compress_nm(
            _nm_sparse(rng, (16, 8)).astype(ml_dtypes.bfloat16),
            ExportConfig(bits=4, group_size=4),
            name=QKERNEL,
        ),
        AWQKERNEL: awq,
        DENSE: rng.normal(size=8).astype(np.float32),
    }


def _dump(obj: Any) -> bytes:
    # The documented canonical form of manifest.json.
    return (json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def _array_sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "manifest.json").read_text())


def _leaf(manifest: dict[str, Any], path: str) -> dict[str, Any]:
    return next(leaf for leaf in manifest["leaves"] if leaf["path"] == path)


def _reseal(
    d: Path, manifest: dict[str, Any], edit: Callable[[dict[str, Any]], Any] = lambda m: None
) -> None:
    """Write ``manifest``, its tensors.npz record recomputed, then ``edit``-ed, then its self-checksum."""
    raw = (d / "tensors.npz").read_bytes()
    manifest["tensors"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    edit(manifest)
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(_dump(body)).hexdigest()
    (d / "manifest.json").write_bytes(_dump(manifest))


def _edit_manifest(d: Path, edit: Callable[[dict[str, Any]], Any], reseal: bool) -> None:
    manifest = _manifest(d)
    if reseal:
        _reseal(d, manifest, edit)
    else:
        edit(manifest)
        (d / "manifest.json").write_bytes(_dump(manifest))


def _rewrite_members(d: Path, edit: Callable[[dict[str, bytes]], Any]) -> None:
    with zipfile.ZipFile(d / "tensors.npz") as z:
        members = {name: z.read(name) for name in z.namelist()}
    edit(members)
    with zipfile.ZipFile(d / "tensors.npz", "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _key(record: Any) -> str:
    # Format 1 (before checksums) stored the bare key: accepted so that these tests show what that loader did.
    return record if isinstance(record, str) else record["key"]


def _member(manifest: dict[str, Any], path: str, part: str) -> str:
    return _key(_leaf(manifest, path)["arrays"][part]) + ".npy"


def _load_fails(d: Path, where: str, *fragments: str) -> ExportIntegrityError:
    with pytest.raises(ExportIntegrityError) as info:
        load_compressed(d)
    err = info.value
    assert err.where == where, str(err)
    for fragment in fragments:
        assert fragment in err.problem, str(err)
    assert where in str(err)
    return err


@pytest.fixture
def export(tmp_path: Path) -> Path:
    d = tmp_path / "exp"
    save_compressed(d, _model())
    return d


def _assert_same(loaded: dict[str, Any], model: dict[str, Any]) -> None:
    assert list(loaded) == list(model)
    for p, ref in model.items():
        got = loaded[p]
        if isinstance(ref, CompressedNM):
            assert isinstance(got, CompressedNM)
            for part in ("values", "indices", "scales", "awq_scale"):
                a, b = getattr(got, part), getattr(ref, part)
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape
                    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))  # bitwise
            assert got._replace(values=0, indices=0, scales=0, awq_scale=0) == ref._replace(
                values=0, indices=0, scales=0, awq_scale=0
            )
        else:
            assert got.dtype == ref.dtype and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------------------
# The intact export and what its manifest records


def test_round_trip_and_manifest_records_checksums_shapes_and_settings(tmp_path):
    d = tmp_path / "exp"
    d.mkdir()
    (d / "notes.txt").write_text("mine")  # a file of the user's beside the export is left alone
    model = _model()
    save_compressed(d, model)
    _assert_same(load_compressed(d), model)
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "notes.txt", "tensors.npz"]

    raw = (d / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    assert manifest["format"] == "ast_jax.nm-export/2"
    assert raw == _dump(manifest)
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    assert manifest["manifest_sha256"] == hashlib.sha256(_dump(body)).hexdigest()
    npz = (d / "tensors.npz").read_bytes()
    assert manifest["tensors"] == {"size": len(npz), "sha256": hashlib.sha256(npz).hexdigest()}
    with np.load(d / "tensors.npz") as z:
        for leaf in manifest["leaves"]:
            for rec in leaf["arrays"].values():
                a = z[rec["key"]]
                assert rec == {
                    "key": rec["key"],
                    "dtype": str(a.dtype),
                    "shape": list(a.shape),
                    "sha256": _array_sha(a),
                }
    q = {k: v for k, v in _leaf(manifest, QKERNEL).items() if k not in ("path", "kind", "arrays")}
    want = {"n": 2, "m": 4, "bits": 4, "group_size": 4, "index_bits": 2, "scale_dtype": "float16"}
    assert q == {"shape": [16, 8], "dtype": "bfloat16", **want}
    assert set(_leaf(manifest, AWQKERNEL)["arrays"]) == {"values", "indices", "scales", "awq_scale"}


def test_error_keeps_its_fields_through_pickle():
    err = ExportIntegrityError("/x", KERNEL, "bad")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError)
    assert (back.export, back.where, back.problem, str(back)) == ("/x", KERNEL, "bad", f"/x: {KERNEL}: bad")


# ---------------------------------------------------------------------------------------------------------
# Manifest faults


@pytest.mark.parametrize("reseal", [False, True], ids=["as-edited", "resealed"])
def test_issue_example_shape_edit_256x8_to_512x4_is_refused(export, reseal):
    _edit_manifest(export, lambda m: _leaf(m, KERNEL).__setitem__("shape", [512, 4]), reseal)
    _load_fails(export, KERNEL, "shape [512, 4]", "values of float32 (256, 4)", "float32 (128, 8)")


def _set(path: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: _leaf(m, path).__setitem__(field, value)


def _set_record(path: str, part: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        arrays = _leaf(m, path)["arrays"]
        if isinstance(arrays[part], dict):
            arrays[part][field] = value
        elif field == "key":
            arrays[part] = value

    return edit


FIELD_FAULTS = {
    "kernel dtype": (_set(KERNEL, "dtype", "float16"), KERNEL, "values of float16"),
    "dense dtype int32": (_set(DENSE, "dtype", "int32"), DENSE, "dense of int32"),
    "dense dtype float16": (_set(DENSE, "dtype", "float16"), DENSE, "dense of float16"),
    "dense dtype unknown": (_set(DENSE, "dtype", "object"), DENSE, "unsupported dtype 'object'"),
    "dense shape": (_set(DENSE, "shape", [4]), DENSE, "shape [4]"),
    "m too large": (_set(KERNEL, "m", 300), KERNEL, "unsupported m=300"),
    "m one": (_set(KERNEL, "m", 1), KERNEL, "unsupported m=1"),
    "m string": (_set(KERNEL, "m", "4"), KERNEL, "unsupported m='4'"),
    "m 8": (_set(KERNEL, "m", 8), KERNEL, "index_bits=2"),
    "n equals m": (_set(KERNEL, "n", 4), KERNEL, "unsupported n=4"),
    "n zero": (_set(KERNEL, "n", 0), KERNEL, "unsupported n=0"),
    "n one": (_set(KERNEL, "n", 1), KERNEL, "values of float32 (64, 8)"),
    "bits 3": (_set(QKERNEL, "bits", 3), QKERNEL, "unsupported bits=3"),
    "bits 16": (_set(QKERNEL, "bits", 16), QKERNEL, "unsupported bits=16"),
    "bits true": (_set(QKERNEL, "bits", True), QKERNEL, "unsupported bits=True"),
    "bits 4 to 8": (_set(QKERNEL, "bits", 8), QKERNEL, "values of int8"),
    "bits dropped": (_set(QKERNEL, "bits", None), QKERNEL, "scale_dtype"),
    "group size 0": (_set(QKERNEL, "group_size", 0), QKERNEL, "group_size=0"),
    "group size negative": (_set(QKERNEL, "group_size", -4), QKERNEL, "group_size=-4"),
    "group size float": (_set(QKERNEL, "group_size", 4.0), QKERNEL, "group_size=4.0"),
    "group size 8": (_set(QKERNEL, "group_size", 8), QKERNEL, "scales of float16 (1, 8)"),
    "scale dtype": (_set(QKERNEL, "scale_dtype", "float64"), QKERNEL, "scale_dtype='float64'"),
    "index bits": (_set(KERNEL, "index_bits", 3), KERNEL, "index_bits=3"),
    "kind": (_set(KERNEL, "kind", "sparse"), KERNEL, "unknown kind 'sparse'"),
    "extra field": (_set(KERNEL, "values_dtype", "float32"), KERNEL, "unexpected ['values_dtype']"),
    "missing field": (lambda m: _leaf(m, QKERNEL).pop("group_size"), QKERNEL, "missing ['group_size']"),
    "missing part": (lambda m: _leaf(m, QKERNEL)["arrays"].pop("scales"), QKERNEL, "missing ['scales']"),
    "awq shape": (_set_record(AWQKERNEL, "awq_scale", "shape", [16]), AWQKERNEL, "awq_scale of float32"),
    "record dtype": (_set_record(KERNEL, "indices", "dtype", "int8"), KERNEL, "indices of uint8"),
    "record hash": (_set_record(KERNEL, "values", "sha256", "XYZ"), KERNEL, "SHA-256 of values"),
    "duplicate path": (_set(DENSE, "path", KERNEL), KERNEL, "twice"),
    "nested path": (_set(DENSE, "path", KERNEL + "/x"), KERNEL + "/x", "nests under"),
    "shared member": (
        _set_record(DENSE, "dense", "key", KERNEL_VALUES_KEY),
        DENSE,
        "claimed by another part",
    ),
    "format": (lambda m: m.__setitem__("format", "ast_jax.nm-export/9"), "manifest.json", "unknown export"),
    "leaves": (lambda m: m.__setitem__("leaves", {}), "manifest.json", "'leaves' must be"),
    "tensors size": (lambda m: m["tensors"].__setitem__("size", "1"), "manifest.json", "'tensors' must be"),
}


@pytest.mark.parametrize("fault", list(FIELD_FAULTS))
def test_manifest_field_faults_are_refused_by_name_even_when_resealed(export, fault):
    # Resealed: the self-checksum matches, so the field checks alone must catch the fault.
    edit, where, fragment = FIELD_FAULTS[fault]
    assert _member(_manifest(export), KERNEL, "values") == KERNEL_VALUES_KEY + ".npy"
    _edit_manifest(export, edit, reseal=True)
    _load_fails(export, where, fragment)


def _retab(raw: bytes) -> bytes:
    return raw.replace(b'\n "format"', b'\n\t"format"', 1)


CONTENT_FAULTS = {
    # Consistent with the data, so only the self-checksum can see them.
    "dtype of an int4 kernel": lambda d: _edit_manifest(d, _set(QKERNEL, "dtype", "float32"), reseal=False),
    "renamed path": lambda d: _edit_manifest(d, _set(KERNEL, "path", "block_0/fc/kernel2"), reseal=False),
    "leaves reordered": lambda d: _edit_manifest(d, lambda m: m["leaves"].reverse(), reseal=False),
    # Same JSON content, different bytes.
    "tab for a space": lambda d: (d / "manifest.json").write_bytes(
        _retab((d / "manifest.json").read_bytes())
    ),
    "final newline dropped": lambda d: (d / "manifest.json").write_bytes(
        (d / "manifest.json").read_bytes()[:-1]
    ),
}


@pytest.mark.parametrize("fault", list(CONTENT_FAULTS))
def test_manifest_edits_the_field_checks_cannot_see_fail_the_self_checksum(export, fault):
    CONTENT_FAULTS[fault](export)
    _load_fails(export, "manifest.json", "edited or corrupted")


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"\xff\xfe{}", b"[]", b"null", b'{"format": "ast_jax.nm-export/2"'], ids=repr
)
def test_bad_manifest_json(export, raw):
    (export / "manifest.json").write_bytes(raw)
    with pytest.raises(ExportIntegrityError) as info:
        load_compressed(export)
    assert info.value.where == "manifest.json"
    assert "JSON" in info.value.problem


def test_format_1_manifest_without_checksums_is_refused(export):
    m = _manifest(export)
    v1 = {"format": "ast_jax.nm-export/1", "leaves": []}
    for leaf in m["leaves"]:
        # The layout format 1 had: bare member keys, the values' dtype, no checksums.
        old = {k: v for k, v in leaf.items() if k != "arrays"}
        old["arrays"] = {part: _key(rec) for part, rec in leaf["arrays"].items()}
        if leaf["kind"] == "nm" and "values_dtype" not in leaf:
            values = leaf["arrays"]["values"]["dtype"]
            old["values_dtype"] = leaf["dtype"] if leaf["bits"] is None else values
        v1["leaves"].append(old)
    (export / "manifest.json").write_text(json.dumps(v1, indent=1))
    _load_fails(export, "manifest.json", "ast_jax.nm-export/1 records no checksums")


# ---------------------------------------------------------------------------------------------------------
# tensors.npz faults


def _data_offset(raw: bytes, member: str) -> tuple[int, int]:
    """(first byte, byte count) of the array data of ``member`` inside the stored (uncompressed) zip."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = z.getinfo(member)
    h = info.header_offset  # local header: 30 bytes, then the name and the extra field
    start = (
        h
        + 30
        + int.from_bytes(raw[h + 26 : h + 28], "little")
        + int.from_bytes(raw[h + 28 : h + 30], "little")
    )
    header = 10 + int.from_bytes(raw[start + 8 : start + 10], "little")  # .npy format 1.0 header
    return start + header, info.file_size - header


@pytest.mark.parametrize(
    "path,part",
    [(KERNEL, "values"), (KERNEL, "indices"), (QKERNEL, "values"), (QKERNEL, "scales"),
     (AWQKERNEL, "awq_scale"), (DENSE, "dense")],
)  # fmt: skip
@pytest.mark.parametrize("where_in_data", [0.0, 0.5, 1.0])
def test_flipped_byte_in_tensor_data_names_the_tensor(export, path, part, where_in_data):
    raw = bytearray((export / "tensors.npz").read_bytes())
    start, size = _data_offset(bytes(raw), _member(_manifest(export), path, part))
    raw[start + min(int(where_in_data * size), size - 1)] ^= 0x10
    (export / "tensors.npz").write_bytes(bytes(raw))
    _load_fails(export, path, f"'{part}'", "SHA-256")


@pytest.mark.parametrize("keep", [0, 1, 22, 0.5, -1], ids=lambda k: f"keep={k}")
def test_truncated_tensors_file(export, keep):
    raw = (export / "tensors.npz").read_bytes()
    n = int(keep * len(raw)) if isinstance(keep, float) else keep % len(raw)
    (export / "tensors.npz").write_bytes(raw[:n])
    _load_fails(export, "tensors.npz", f"is {n} bytes, the manifest records {len(raw)}")


@pytest.mark.parametrize("reseal", [False, True], ids=["as-edited", "resealed"])
def test_missing_member_names_the_tensor(export, reseal):
    member = _member(_manifest(export), QKERNEL, "scales")
    _rewrite_members(export, lambda ms: ms.pop(member))
    if reseal:
        _reseal(export, _manifest(export))
    _load_fails(export, QKERNEL, "'scales'", "missing")


@pytest.mark.parametrize("reseal", [False, True], ids=["as-edited", "resealed"])
def test_extra_member_is_refused(export, reseal):
    _rewrite_members(export, lambda ms: ms.__setitem__("9.extra.npy", _npy(np.zeros(3, np.float32))))
    if reseal:
        _reseal(export, _manifest(export))
    _load_fails(export, "tensors.npz", "9.extra.npy")


@pytest.mark.parametrize("replacement", ["same shape", "other shape"])
def test_member_replaced_by_other_valid_data_names_the_tensor(export, replacement):
    m = _manifest(export)
    new = np.zeros(8 if replacement == "same shape" else 4, np.float32)
    _rewrite_members(export, lambda ms: ms.__setitem__(_member(m, DENSE, "dense"), _npy(new)))
    _reseal(export, m)  # the file checksum matches: the per-tensor record must catch it
    fragment = "'dense' does not match its SHA-256" if replacement == "same shape" else "holds float32 (4,)"
    _load_fails(export, DENSE, fragment)


def test_positions_that_are_not_nm_are_refused_even_with_every_checksum_matching(export):
    m = _manifest(export)
    member = _member(m, KERNEL, "indices")
    with np.load(export / "tensors.npz") as z:
        dup = np.zeros_like(z[member[: -len(".npy")]])  # every kept value at position 0: two on one row
    _rewrite_members(export, lambda ms: ms.__setitem__(member, _npy(dup)))
    _set_record(KERNEL, "indices", "sha256", _array_sha(dup))(m)
    _reseal(export, m)
    _load_fails(export, KERNEL, "position twice", "2:4")


@pytest.mark.parametrize("fault", ["no manifest", "no tensors", "tensors is a directory", "export is a file"])
def test_missing_files_and_non_directories(export, fault):
    if fault == "no manifest":
        (export / "manifest.json").unlink()
    elif fault == "no tensors":
        (export / "tensors.npz").unlink()
    elif fault == "tensors is a directory":
        (export / "tensors.npz").unlink()
        (export / "tensors.npz").mkdir()
    else:
        for f in FILES:
            (export / f).unlink()
        export.rmdir()
        export.write_text("not an export")
    where = "tensors.npz" if "tensors" in fault else "manifest.json"
    _load_fails(export, where, "not an ast_jax export")


# ---------------------------------------------------------------------------------------------------------
# Writing


def test_save_refuses_leaves_that_are_not_nm_before_writing_anything(tmp_path):
    model = _model()
    kernel = model[KERNEL]
    dup = kernel._replace(indices=pack_bits(np.zeros(kernel.values.size, np.uint8), 2))
    bad_bits = model[QKERNEL]._replace(bits=3)
    cases = [
        ({**model, KERNEL: dup}, KERNEL, "position twice"),
        ({**model, QKERNEL: bad_bits}, QKERNEL, "unsupported bits=3"),
        ({**model, DENSE: np.array(["a", "b"])}, DENSE, "unsupported dtype"),
        ({**model, "block_0": np.zeros(2, np.float32)}, KERNEL, "nests under"),
    ]
    for bad, name, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as info:
            save_compressed(tmp_path / "exp", bad)
        assert name in str(info.value)
        assert not (tmp_path / "exp").exists()


def test_save_into_a_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "exp"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        save_compressed(target, _model())
    assert target.read_text() == "keep me"


def test_crash_while_writing_keeps_the_previous_export(tmp_path, monkeypatch):
    d = tmp_path / "exp"
    old = _model(seed=0)
    save_compressed(d, old)
    real_dumps = json.dumps

    def crash(obj: Any, *args: Any, **kwargs: Any) -> str:
        if isinstance(obj, dict) and "leaves" in obj:
            raise KeyboardInterrupt("simulated crash while writing the manifest")
        return real_dumps(obj, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(json, "dumps", crash)
        with pytest.raises(KeyboardInterrupt):
            save_compressed(d, _model(seed=1))  # same shapes and keys, other values
    _assert_same(load_compressed(d), old)
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "tensors.npz"]  # no temporary left


def test_crash_between_the_renames_never_loads_mixed_data(tmp_path, monkeypatch):
    d = tmp_path / "exp"
    save_compressed(d, _model(seed=0))
    real_replace = os.replace

    def crash(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).name == "manifest.json":
            raise KeyboardInterrupt("simulated crash before the manifest is renamed in")
        real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            save_compressed(d, _model(seed=1))
    _load_fails(d, "manifest.json", "not an ast_jax export")
    save_compressed(d, _model(seed=1))  # a later save recovers the directory
    _assert_same(load_compressed(d), _model(seed=1))


def test_export_config_refuses_m_whose_positions_do_not_fit_8_bits():
    with pytest.raises(ValueError, match="m=512"):
        ExportConfig(n=2, m=512)
    assert ExportConfig(n=2, m=256).m == 256


# ---------------------------------------------------------------------------------------------------------
# Fuzz: random byte flips and truncations always give the documented error


@pytest.fixture(scope="module")
def pristine() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(Path(tmp) / "exp", _model())
        return {f: (Path(tmp) / "exp" / f).read_bytes() for f in FILES}


def _load_damaged(pristine: dict[str, bytes], name: str, damage: Callable[[bytes], bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for f, raw in pristine.items():
            (d / f).write_bytes(damage(raw) if f == name else raw)
        with pytest.raises(ExportIntegrityError) as info:
            load_compressed(d)
        assert info.value.where in {*FILES, KERNEL, QKERNEL, AWQKERNEL, DENSE}, str(info.value)


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(FILES), at=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_fuzz_byte_flip_never_loads(pristine, name, at, xor):
    def flip(raw: bytes) -> bytes:
        out = bytearray(raw)
        out[int(at * len(raw))] ^= xor
        return bytes(out)

    _load_damaged(pristine, name, flip)


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(FILES), at=st.floats(0, 1, exclude_max=True))
def test_fuzz_truncation_never_loads(pristine, name, at):
    _load_damaged(pristine, name, lambda raw: raw[: int(at * len(raw))])
