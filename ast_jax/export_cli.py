"""``python -m ast_jax.export``: any model a user has, pruned on the way if asked, to the program serving it.

    python -m ast_jax.export --from PATH --format {hf,compressed-tensors,gguf,compact} --out OUT
        [--oneshot {magnitude,wanda,sparsegpt} --calib-text FILE] [--bits {4,8}] [--gguf-type {f32,f16,q8_0}]

``PATH`` is a Hugging Face directory, a GGUF file, a compact export directory or a ``python -m ast_jax.train``
checkpoint directory (:func:`ast_jax.model_source.load_model`). Formats and what reads them:

* ``hf``: ``config.json`` + ``model.safetensors`` with the pruned weights as +0.0 (dense with zeros);
  ``transformers``, vLLM and every HF-layout tool load it (:func:`ast_jax.export_hf.save_hf`);
* ``compressed-tensors``: the same with the block linear layers quantised ``pack-quantized`` W4A16/W8A16,
  what vLLM serves on its dense weight-only kernels (:func:`ast_jax.export_ct.save_compressed_tensors`);
* ``gguf``: llama-architecture GGUF in F32, F16 or Q8_0 with the tokenizer inside, for llama.cpp
  (:func:`ast_jax.export_gguf.save_gguf`);
* ``compact``: our own N:M format, the smallest on disk: ``manifest.json`` + ``tensors.npz`` (kept values +
  2-bit positions [+ int8/int4 with group scales], read by :func:`ast_jax.export.load_compressed`), plus
  ``ast_model.json`` (model family and config, N:M and bits settings, tokenizer BOS/EOS ids and BOS rule)
  and ``tokenizer.json``, so ``--model DIR`` / ``--from DIR`` of every command loads it
  (:func:`ast_jax.model_source.load_model`, dense params).

SLoRB (from a checkpoint trained with ``--slorb``) has no place in the HF / GGUF layouts; ``--fold-slorb``
folds it into the kernels (``W' = M ⊙ W + Xᵀ S``: the same function, dense kernels, the N:M structure lost),
otherwise the export is refused with an error that says so.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ast_jax._cli import config_parser, option, run_cli

__all__ = ["FORMATS", "ExportArgs", "export_model", "main", "prune_oneshot"]

FORMATS = ("hf", "compressed-tensors", "gguf", "compact")


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    """Flags of ``python -m ast_jax.export`` (``--from`` is added by the parser as ``source``)."""

    out: str = option("", "output: a directory (hf, compressed-tensors, compact) or a .gguf file (gguf)")
    format: str = option("hf", "hf, compressed-tensors, gguf or compact")
    oneshot: str | None = option(None, "prune N:M on the way: magnitude, wanda or sparsegpt (none = as is)")
    n: int = option(2, "keep N of every M consecutive inputs (with --oneshot; the recorded structure)")
    m: int = option(4, "group size M of the N:M structure")
    calib_text: str | None = option(None, "UTF-8 text file for Wanda/SparseGPT calibration (none = built-in)")
    calib_seqs: int = option(128, "calibration windows (>= 1)")
    calib_len: int = option(512, "tokens per calibration window (>= 2)")
    bits: int | None = option(None, "compressed-tensors: 4 or 8 (default 4); compact: quantise to 4 or 8")
    group_size: int = option(128, "quantisation group size, in dense input columns")
    gguf_type: str = option("f16", "gguf tensor type of the matrices: f32, f16 or q8_0")
    dtype: str = option("bfloat16", "hf / compressed-tensors weight dtype: bfloat16, float16 or float32")
    fold_slorb: bool = option(False, "fold SLoRB into the kernels (dense) instead of refusing the export")
    max_layers: int = option(0, "keep only the first K blocks (smoke runs; 0 = all)")
    seed: int = option(0, "seed of the calibration window draw")

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("--out is required")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.oneshot not in (None, "magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"--oneshot must be magnitude, wanda, sparsegpt or none, got {self.oneshot!r}")
        if not (1 <= self.n < self.m):
            raise ValueError(f"--n {self.n} --m {self.m}: need 1 <= n < m")
        if self.bits not in (None, 4, 8):
            raise ValueError(f"--bits must be 4 or 8, got {self.bits}")
        if self.gguf_type not in ("f32", "f16", "q8_0"):
            raise ValueError(f"--gguf-type must be f32, f16 or q8_0, got {self.gguf_type!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        for name, low in (("calib_seqs", 1), ("calib_len", 2), ("group_size", 1), ("max_layers", 0)):
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be >= {low}, got {getattr(self, name)}")
        if self.calib_text is not None and not os.path.isfile(self.calib_text):
            raise ValueError(f"--calib-text file not found: {self.calib_text}")


def calibration_tokens(tokenizer: Any, text: str | None, seqs: int, length: int, seed: int) -> np.ndarray:
    """``(seqs, length)`` int32 windows at random starts of the tokenised ``text`` (default: the built-in
    corpus of :func:`ast_jax.data.builtin_corpus`); ``ValueError`` when the text is shorter than a window."""
    from ast_jax.data import builtin_corpus
    from ast_jax.tokenizer import encode

    body = builtin_corpus() if text is None else Path(text).read_text(encoding="utf-8")
    ids = encode(tokenizer, body)
    if len(ids) <= length:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than --calib-len {length} + 1")
    starts = np.random.default_rng(seed).integers(0, len(ids) - length, size=seqs)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int32)


def prune_oneshot(
    model: Any, params: Any, calib: np.ndarray | None, method: str, n: int = 2, m: int = 4
) -> tuple[Any, dict[str, Any]]:
    """One-shot N:M pruning of every block linear layer (:func:`ast_jax.oneshot.prune_model`).

    ``calib`` is ``(N, T)`` int32 calibration windows (unused by ``"magnitude"``). Returns
    ``(pruned_params, info)``.
    """
    from ast_jax.oneshot import OneShotConfig, blockwise_for, prune_model

    if calib is None:
        calib = np.zeros((1, 2), np.int32)
    pruned, _, info = prune_model(blockwise_for(model), params, calib, OneShotConfig(method=method, n=n, m=m))
    return pruned, info


def _sparsity(params: Any, n: int, m: int) -> dict[str, Any] | None:
    """``{"n", "m"}`` when every block linear kernel is strictly N:M (the writers verify it again on the bytes
    they write and record it), else ``None``."""
    from ast_jax.sparsify import is_strict_nm

    return {"n": n, "m": m} if is_strict_nm(params, n, m) else None


def export_model(
    model: Any,
    params: Any,
    out: str | os.PathLike,
    *,
    format: str,
    tokenizer: Any = None,
    hf_config: dict[str, Any] | None = None,
    tokenizer_dir: str | None = None,
    n: int = 2,
    m: int = 4,
    bits: int | None = None,
    group_size: int = 128,
    gguf_type: str = "f16",
    dtype: str = "bfloat16",
    slorb: Any = None,
    fold_slorb: bool = False,
) -> dict[str, Any]:
    """Write ``params`` of ``model`` (a :class:`~ast_jax.models.llama.Llama` or GPT2) in ``format``.

    The N:M structure recorded in HF's ``config.json`` is checked on the weights (strict N:M per group of
    ``m`` inputs), never assumed. ``compact`` also writes the architecture record and tokenizer
    (:func:`ast_jax.compact_model.model_record`, checked before anything is written). Returns
    ``{"format", "path", "bytes", "nm"}``; for ``compact`` also the totals of
    :func:`ast_jax.export.size_report` of the kernels written (``compressed_bytes``, ``ratio_fp32``, ...).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    params = jax.tree.map(np.asarray, params)
    if slorb:
        if not fold_slorb:
            raise ValueError(
                "this model has SLoRB params (trained with --slorb); the HF, GGUF and compact layouts have "
                "no place for them. --fold-slorb folds them into the kernels (W' = M*W + X^T S: the same "
                "outputs, but dense kernels, so the N:M structure is lost)"
            )
        from ast_jax.slorb import fold_slorb as fold

        params = jax.tree.map(np.asarray, fold(params, slorb))
    sparsity = _sparsity(params, n, m)
    cfg = model.cfg
    generation_config = None
    if hf_config is not None:  # from_pretrained carries generation_config.json inside the config dict
        hf_config = dict(hf_config)
        generation_config = hf_config.pop("_generation_config", None) or None
    out = Path(out)
    sizes: dict[str, Any] = {}  # the compact format also reports its kernels' sizes
    if format == "hf":
        from ast_jax.export_hf import save_hf

        path = save_hf(
            out, cfg, params, hf_config=hf_config, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer,
            dtype=dtype, sparsity=sparsity, generation_config=generation_config,
        )  # fmt: skip
    elif format == "compressed-tensors":
        from ast_jax.export_ct import save_compressed_tensors

        path = save_compressed_tensors(
            out, cfg, params, bits=bits or 4, group_size=group_size, hf_config=hf_config,
            tokenizer_dir=tokenizer_dir, tokenizer=tokenizer, dtype=dtype, sparsity=sparsity,
            generation_config=generation_config,
        )  # fmt: skip
    elif format == "gguf":
        from ast_jax.export_gguf import save_gguf

        path = save_gguf(out, cfg, params, tokenizer=tokenizer, gguf_type=gguf_type)
    else:
        from ast_jax.compact_model import MODEL_RECORD, model_record, write_model_record
        from ast_jax.export import ExportConfig, compress_params, save_compressed, size_report

        if sparsity is None:
            raise ValueError(
                f"the compact format stores N:M kernels and this model is not strictly {n}:{m} sparse; "
                "prune it on the way (--oneshot magnitude|wanda|sparsegpt) or use --format hf"
            )
        if tokenizer is None and tokenizer_dir is not None:
            from ast_jax.tokenizer import tokenizer_from_hf_dir

            tokenizer = tokenizer_from_hf_dir(tokenizer_dir)
        ecfg = ExportConfig(n=n, m=m, bits=bits)
        record, tokenizer_json = model_record(
            model, tokenizer, n=n, m=m, bits=bits, group_size=ecfg.group_size, hf_config=hf_config,
            generation_config=generation_config,
        )  # fmt: skip
        # Until the new record is written the directory reads as an export without one (refused by
        # load_model with a clear error), never as new tensors under an old record.
        (out / MODEL_RECORD).unlink(missing_ok=True)
        exported = compress_params(params, ecfg)
        path = save_compressed(out, exported)
        write_model_record(path, record, tokenizer_json)
        sizes = {k: v for k, v in size_report(exported).items() if k != "layers"}
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {
        "format": format,
        "path": str(path),
        "bytes": int(sum(p.stat().st_size for p in files)),
        "nm": None if sparsity is None else f"{n}:{m}",
        **sizes,
    }


def _build(ns: dict[str, Any]) -> tuple[str, ExportArgs]:
    source = ns.pop("source")
    return source, ExportArgs(**ns)


def _body(parsed: tuple[str, ExportArgs]) -> int:
    from ast_jax.model_source import describe_source, load_model

    source, a = parsed
    kind = describe_source(source)  # a bad path fails here, before anything is loaded
    loaded = load_model(source, max_layers=a.max_layers)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    say(f"ast_jax.export: {kind} model from {loaded.source}")
    params, n, m = loaded.params, a.n, a.m
    if loaded.sparsity is not None and a.oneshot is None:
        n, m = loaded.sparsity["n"], loaded.sparsity["m"]
    if a.oneshot is not None:
        calib = None
        if a.oneshot != "magnitude":
            if loaded.tokenizer is None:
                raise ValueError(f"{source} has no tokenizer, needed to calibrate --oneshot {a.oneshot}")
            calib = calibration_tokens(loaded.tokenizer, a.calib_text, a.calib_seqs, a.calib_len, a.seed)
        params, info = prune_oneshot(loaded.model, params, calib, a.oneshot, n, m)
        say(f"pruned {n}:{m} with {a.oneshot} in {info['wall_s']:.1f} s")
    tokenizer_dir = loaded.source if loaded.kind == "hf" else None
    result = export_model(
        loaded.model, params, a.out, format=a.format, tokenizer=loaded.tokenizer, hf_config=loaded.hf_config,
        tokenizer_dir=tokenizer_dir, n=n, m=m, bits=a.bits, group_size=a.group_size, gguf_type=a.gguf_type,
        dtype=a.dtype, slorb=loaded.slorb, fold_slorb=a.fold_slorb,
    )  # fmt: skip
    nm = f", strict {result['nm']}" if result["nm"] else ", not N:M sparse"
    print(f"wrote {result['format']} to {result['path']} ({result['bytes']:,} bytes{nm})")
    return 0


def _parser():
    p = config_parser(ExportArgs, "python -m ast_jax.export", __doc__.split("\n\n")[0])
    p.add_argument(
        "--from", dest="source", required=True, metavar="PATH",
        help="the model: a Hugging Face dir, a GGUF file, a compact export or an ast_jax.train checkpoint",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a bad flag or path)."""
    return run_cli(_parser(), _build, _body, argv)
