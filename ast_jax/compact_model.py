"""The compact export as a model source: its architecture record, written beside the kernels and read back.

``python -m ast_jax.export --format compact`` writes ``manifest.json`` + ``tensors.npz`` (the N:M kernels,
:mod:`ast_jax.export`), and this module adds ``ast_model.json`` (:data:`MODEL_RECORD`: model family and
config, N:M and bits settings, tokenizer ids and BOS rule, SHA-256 of the manifest and of the tokenizer)
and ``tokenizer.json``, so :func:`ast_jax.model_source.load_model` can rebuild the module, decompress the
kernels and hand back a model like any other source. The record is checked to read back equal before
anything is written, and every field is checked again when it is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ast_jax.export_io import _MANIFEST as _MANIFEST_FILE
from ast_jax.export_io import _file_digest, _fsync_dir, _write_synced
from ast_jax.model_source import MODEL_RECORD, LoadedModel
from ast_jax.tokenizer import TextTokenizer

__all__ = ["MODEL_RECORD", "load_compact", "model_record", "write_model_record"]

_RECORD_FORMAT = "ast_jax.compact-model"
_RECORD_VERSION = 1
_TOKENIZER_FILE = "tokenizer.json"


def _families() -> dict[str, tuple[Any, Any]]:
    from ast_jax.models.gpt2 import GPT2, GPT2Config
    from ast_jax.models.llama import Llama, LlamaConfig

    return {"Llama": (Llama, LlamaConfig), "GPT2": (GPT2, GPT2Config)}


def _nested_types() -> dict[str, Any]:
    from ast_jax.models.llama import RopeScaling

    return {"RopeScaling": RopeScaling}


def _encode_value(value: Any, where: str) -> Any:
    """A config field as JSON: scalars as they are, a dtype as ``{"dtype": name}``, a nested config
    (``RopeScaling``) as ``{"dataclass": name, "fields": {...}}``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and type(value).__name__ in _nested_types():
        fields = {
            f.name: _encode_value(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
        return {"dataclass": type(value).__name__, "fields": fields}
    try:
        return {"dtype": jnp.dtype(value).name}
    except TypeError:
        raise ValueError(f"config field {where} = {value!r} cannot be written to {MODEL_RECORD}") from None


def _decode_value(value: Any, where: str, fail: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if set(value) == {"dtype"}:
        name = value["dtype"]
        if not isinstance(name, str) or not hasattr(jnp, name):
            raise fail(f"{where}: unknown dtype {name!r}")
        try:
            jnp.dtype(name)
        except TypeError:
            raise fail(f"{where}: unknown dtype {name!r}") from None
        return getattr(jnp, name)  # the jnp scalar type itself, as the config defaults are
    if set(value) == {"dataclass", "fields"} and value["dataclass"] in _nested_types():
        cls = _nested_types()[value["dataclass"]]
        return _build_dataclass(cls, value["fields"], where, fail)
    raise fail(f"{where}: unrecognised value {value!r}")


def _build_dataclass(cls: Any, fields: Any, where: str, fail: Any) -> Any:
    if not isinstance(fields, dict):
        raise fail(f"{where}: expected an object of {cls.__name__} fields, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise fail(f"{where}.{unknown[0]}: not a field of {cls.__name__}")
    kwargs = {k: _decode_value(v, f"{where}.{k}", fail) for k, v in fields.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise fail(f"{where}: not a valid {cls.__name__} ({e})") from e


def model_record(
    model: Any,
    tokenizer: Any = None,
    *,
    n: int,
    m: int,
    bits: int | None,
    group_size: int,
    hf_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """The checked :data:`MODEL_RECORD` of ``model`` and its tokenizer's ``tokenizer.json`` text.

    Returns ``(record, tokenizer_json)`` (``tokenizer_json`` is ``None`` without a tokenizer). ``record``:
    ``format``/``version``; ``family`` (``"Llama"`` or ``"GPT2"``); ``config``, every field of the model's
    config dataclass (dtypes as ``{"dtype": "float32"}``, ``RopeScaling`` as
    ``{"dataclass": "RopeScaling", "fields": {...}}``); ``sparsity`` ``{"n", "m", "bits", "group_size"}`` of
    the compressed kernels; ``tokenizer`` ``{"file", "bos_id", "eos_id", "eos_ids", "add_bos"}`` or
    ``None``; ``hf_config`` and ``generation_config`` of an HF source (or ``None``). The SHA-256 of
    ``tokenizer.json`` and ``manifest.json`` are added by :func:`write_model_record`.

    Raises ``ValueError`` when the family is not supported, a field is not JSON-serialisable or does not
    read back equal, or the tokenizer is not a ``tokenizers.Tokenizer`` (plain or inside a
    :class:`~ast_jax.tokenizer.TextTokenizer`) -- before anything is written.
    """
    family = next((name for name, (cls, _) in _families().items() if type(model) is cls), None)
    if family is None:
        raise ValueError(f"{MODEL_RECORD}: model {type(model).__name__} is not one of {sorted(_families())}")
    cfg = model.cfg
    config = {
        f.name: _encode_value(getattr(cfg, f.name), f"config.{f.name}") for f in dataclasses.fields(cfg)
    }
    tok_entry, tok_json = None, None
    if tokenizer is not None:
        tt = tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer(tokenizer)
        if not hasattr(tt.inner, "to_str"):
            raise ValueError(
                f"{MODEL_RECORD}: cannot save a tokenizer of type {type(tt.inner).__name__}: need "
                "tokenizers.Tokenizer"
            )
        tok_json = tt.inner.to_str()
        tok_entry = {
            "file": _TOKENIZER_FILE,
            "bos_id": tt.bos_id,
            "eos_id": tt.eos_id,
            "eos_ids": list(tt.eos_ids),
            "add_bos": tt.add_bos,
        }
    record = {
        "format": _RECORD_FORMAT,
        "version": _RECORD_VERSION,
        "family": family,
        "config": config,
        "sparsity": {
            "n": int(n),
            "m": int(m),
            "bits": None if bits is None else int(bits),
            "group_size": int(group_size),
        },
        "tokenizer": tok_entry,
        "hf_config": hf_config,
        "generation_config": generation_config,
    }
    try:
        text = json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{MODEL_RECORD}: the record is not JSON-serialisable ({e})") from e
    # What the loader will build must be the model exported: a field JSON changes (a tuple, a float type)
    # is caught here, not after the export has been written.
    rebuilt, tok = _model_from_record(json.loads(text), tok_json, MODEL_RECORD)
    if rebuilt.cfg != cfg:
        raise ValueError(f"{MODEL_RECORD}: the config does not read back equal: {rebuilt.cfg} != {cfg}")
    if tok is not None and tok.vocab_size != tt.vocab_size:
        raise ValueError(
            f"{MODEL_RECORD}: the tokenizer does not read back ({tok.vocab_size} != {tt.vocab_size} ids)"
        )
    return record, tok_json


def write_model_record(out: str | os.PathLike, record: dict[str, Any], tokenizer_json: str | None) -> Path:
    """Write ``tokenizer.json`` (if any) then :data:`MODEL_RECORD` into the compact export ``out`` (whose
    ``manifest.json`` must be written already), each to a synced temporary file renamed into place.

    The record gets the SHA-256 of ``manifest.json`` and ``tokenizer.json``, so a record is only ever read
    with the tensors and tokenizer it was written with. Returns the record's path.
    """
    root = Path(out)
    record = dict(record)
    record["manifest_sha256"] = _sha256_file(root / _MANIFEST_FILE)
    if tokenizer_json is not None:
        _replace_atomically(root / _TOKENIZER_FILE, tokenizer_json.encode("utf-8"))
        record["tokenizer"] = {**record["tokenizer"], "sha256": _sha256_file(root / _TOKENIZER_FILE)}
    _replace_atomically(root / MODEL_RECORD, (json.dumps(record, indent=2, allow_nan=False) + "\n").encode())
    _fsync_dir(root)
    return root / MODEL_RECORD


def _replace_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        _write_synced(Path(tmp), lambda f: f.write(data))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256_file(path: Path) -> str:
    return _file_digest(path)[1]


def _model_from_record(
    record: Any, tokenizer_json: str | None, where: str
) -> tuple[Any, TextTokenizer | None]:
    """The Flax module and tokenizer a record describes; ``ValueError`` naming ``where`` and the field."""

    def fail(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem}")

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    if record.get("format") != _RECORD_FORMAT or record.get("version") != _RECORD_VERSION:
        raise fail(
            f"format/version is {record.get('format')!r}/{record.get('version')!r}, expected "
            f"{_RECORD_FORMAT!r}/{_RECORD_VERSION}"
        )
    family = record.get("family")
    if family not in _families():
        raise fail(f"family: {family!r} is not one of {sorted(_families())}")
    module_cls, cfg_cls = _families()[family]
    model = module_cls(_build_dataclass(cfg_cls, record.get("config"), "config", fail))
    entry = record.get("tokenizer")
    if entry is None:
        return model, None
    if not isinstance(entry, dict):
        raise fail(f"tokenizer: expected an object or null, got {type(entry).__name__}")
    if tokenizer_json is None:
        raise fail("tokenizer: the record names a tokenizer but none was given")
    from tokenizers import Tokenizer

    try:
        inner = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the tokenizers package raises its own exception type for a malformed file
        raise fail(f"tokenizer: {entry.get('file', _TOKENIZER_FILE)} cannot be read ({e})") from e
    ids = {k: entry.get(k) for k in ("bos_id", "eos_id")}
    for k, v in ids.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise fail(f"tokenizer.{k}: expected an int or null, got {v!r}")
    eos_ids = entry.get("eos_ids", [])
    if not isinstance(eos_ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in eos_ids
    ):
        raise fail(f"tokenizer.eos_ids: expected a list of ints, got {eos_ids!r}")
    add_bos = entry.get("add_bos", False)
    if not isinstance(add_bos, bool):
        raise fail(f"tokenizer.add_bos: expected true or false, got {add_bos!r}")
    try:
        tok = TextTokenizer(
            inner, bos_id=ids["bos_id"], eos_id=ids["eos_id"], add_bos=add_bos, eos_ids=eos_ids
        )
    except ValueError as e:
        raise fail(f"tokenizer: {e}") from e
    return model, tok


def load_compact(directory: str, dtype: Any) -> LoadedModel:
    """The dense params of a compact export (N:M kernels decompressed), with the module and tokenizer of its
    :data:`MODEL_RECORD`."""
    from ast_jax.export import decompress_params, load_compressed

    root = Path(directory)
    rec_path = root / MODEL_RECORD
    try:
        record = json.loads(rec_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{rec_path}: not valid JSON ({e}); re-export the model") from e

    def fail(problem: str) -> ValueError:
        return ValueError(f"{rec_path}: {problem}")

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    if record.get("manifest_sha256") != _sha256_file(root / _MANIFEST_FILE):
        raise fail(
            f"manifest_sha256 does not match {_MANIFEST_FILE}: the record belongs to another export "
            "(or the export was interrupted); re-export the model"
        )
    entry, tok_json = record.get("tokenizer"), None
    if entry is not None:
        if not isinstance(entry, dict):
            raise fail(f"tokenizer: expected an object or null, got {type(entry).__name__}")
        tok_path = root / _TOKENIZER_FILE
        if not tok_path.is_file():
            raise fail(f"tokenizer: {tok_path} is missing")
        if entry.get("sha256") != _sha256_file(tok_path):
            raise fail(f"tokenizer.sha256 does not match {tok_path} (changed or damaged)")
        tok_json = tok_path.read_text(encoding="utf-8")
    model, tok = _model_from_record(record, tok_json, str(rec_path))
    sp = record.get("sparsity")
    if not (isinstance(sp, dict) and all(isinstance(sp.get(k), int) for k in ("n", "m"))):
        raise fail(f"sparsity: expected an object with int n and m, got {sp!r}")
    for key in ("hf_config", "generation_config"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise fail(f"{key}: expected an object or null, got {type(record[key]).__name__}")
    hf_config = record.get("hf_config")
    if hf_config is not None and record.get("generation_config"):
        hf_config = {**hf_config, "_generation_config": record["generation_config"]}

    params = decompress_params(load_compressed(root))
    if set(params) == {"params"}:
        params = params["params"]
    _check_params(model, params, rec_path)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    sparsity = {"n": sp["n"], "m": sp["m"]}
    return LoadedModel(model, params, tok, hf_config, "compact", directory, None, sparsity)


def _check_params(model: Any, params: Any, rec_path: Path) -> None:
    """``ValueError`` unless ``params`` has exactly the paths and shapes ``model`` initialises."""
    from ast_jax.sparsify import key_path, path_str

    want = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    flat = lambda t: {
        path_str(key_path(p)): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]
    }
    have, need = flat(params), flat(want)
    for p in sorted(set(need) | set(have)):
        if have.get(p) != need.get(p):
            raise ValueError(
                f"{rec_path}: the model it describes needs {p} of shape {need.get(p)}, the export holds "
                f"{have.get(p)}; the record does not match the tensors (re-export the model)"
            )
