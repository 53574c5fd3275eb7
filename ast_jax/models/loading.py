"""Pretrained checkpoints into our Flax models: GGUF -> :class:`~ast_jax.models.llama.Llama`, and Hugging Face
GPT-2 ``model.safetensors`` -> :class:`~ast_jax.models.gpt2.GPT2`.

Both loaders check every tensor against the shapes of the target model (from ``jax.eval_shape`` of its
``init``) and raise :class:`CheckpointMismatchError` naming each missing tensor, each unexpected one and each
shape mismatch before anything is converted.

Layout notes.

* GGUF (llama.cpp) stores a linear layer ``y = W x`` as ``W`` of shape ``(out, in)`` (its ``ne`` shape lists
  ``[in, out]``); Flax ``nn.Dense`` wants the kernel ``(in, out)``, so every matrix is transposed. Quantised
  tensors (Q4_1, Q8_0, ...) are dequantised with ``gguf.quants.dequantize`` to float32 first.
* llama.cpp applies RoPE to adjacent pairs ``(x[2i], x[2i+1])`` while Hugging Face LLaMA (and our model)
  rotate the halves ``(x[i], x[i + hd/2])``. The GGUF converter therefore permutes the rows of ``W_q`` and
  ``W_k`` inside every head: HF row ``j·hd/2 + i`` (half ``j``, frequency ``i``) is stored at GGUF row
  ``2i + j``. :func:`unpermute_qk` inverts that; without it the model produces garbage.
* Hugging Face GPT-2 uses ``Conv1D`` layers whose ``weight`` is already ``(in, out)``: no transpose. The fused
  ``c_attn`` weight ``(D, 3D)`` holds ``[q | k | v]`` along its output axis.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.models.llama import Llama, LlamaConfig

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "llama_config_from_gguf",
    "load_llama_gguf",
    "permute_qk_for_gguf",
    "unpermute_qk",
]


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What did not line up between a checkpoint and the target model.

    ``missing``: target tensors the checkpoint lacks; ``unexpected``: checkpoint tensors nothing maps to;
    ``mismatched``: ``(name, expected_shape, found_shape)`` for tensors of the wrong shape. Names are the
    checkpoint's own tensor names.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = []
        if self.missing:
            lines.append(f"missing tensors ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected tensors ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for name, want, got in self.mismatched:
            lines.append(f"shape mismatch for {name}: expected {want}, found {got}")
        return "\n".join(lines) if lines else "all tensors matched"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the target model; ``.report`` holds the details by tensor name."""

    def __init__(self, source: str, report: LoadReport):
        self.report = report
        super().__init__(f"checkpoint {source} does not match the model:\n{report.describe()}")


# ---------------------------------------------------------------------------------------------------------
# Shared plumbing: a mapping "checkpoint tensor name -> (param path, transform)" checked against shapes.
# ---------------------------------------------------------------------------------------------------------

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple[str, ...]  # path in the Flax params pytree
    stored_shape: tuple[int, ...]  # shape the checkpoint must store (before the transform)
    transform: Transform


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _check(
    source: str,
    entries: Mapping[str, _Entry],
    found_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    *,
    strict: bool,
    ignore: Callable[[str], bool] = lambda name: False,
) -> LoadReport:
    mapped_paths = {e.path for e in entries.values()}
    unmapped = sorted("/".join(p) for p in target_shapes if p not in mapped_paths)
    if unmapped:  # a bug in this module, not in the checkpoint
        raise AssertionError(f"loader has no source for model params: {unmapped}")
    missing = tuple(name for name in entries if name not in found_shapes)
    unexpected = tuple(name for name in found_shapes if name not in entries and not ignore(name))
    mismatched = tuple(
        (name, e.stored_shape, tuple(found_shapes[name]))
        for name, e in entries.items()
        if name in found_shapes and tuple(found_shapes[name]) != e.stored_shape
    )
    report = LoadReport(missing, unexpected, mismatched)
    if report.missing or report.mismatched or (strict and report.unexpected):
        raise CheckpointMismatchError(source, report)
    return report


def _assemble(entries: Mapping[str, _Entry], read: Callable[[str], np.ndarray], dtype: Any) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, e in entries.items():
        value = np.asarray(e.transform(read(name)), dtype=np.float32)
        node = params
        for key in e.path[:-1]:
            node = node.setdefault(key, {})
        node[e.path[-1]] = jnp.asarray(value, dtype=dtype)
    return params


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


# ---------------------------------------------------------------------------------------------------------
# GGUF -> Llama
# ---------------------------------------------------------------------------------------------------------


def permute_qk_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation, HF layout -> GGUF layout, for ``w`` of shape ``(n_heads·hd, in)``.

    Within each head, row ``j·hd/2 + i`` moves to row ``2i + j`` (``j`` in {0, 1}, ``i < hd/2``), turning the
    rotate-half pairs into adjacent pairs. Provided to write GGUF files and to test :func:`unpermute_qk`.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"rows={rows} is not a multiple of 2·n_heads={2 * n_heads}")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk_for_gguf`: GGUF Q/K rows ``(n_heads·hd, in)`` to rotate-half order."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"rows={rows} is not a multiple of 2·n_heads={2 * n_heads}")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(source: Any) -> Any:
    import gguf

    if isinstance(source, gguf.GGUFReader):
        return source
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    return gguf.GGUFReader(path)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config_from_gguf(source: Any, **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from the ``llama.*`` metadata of a GGUF file (path or ``gguf.GGUFReader``).

    Reads block count, embedding/feed-forward lengths, head counts, RoPE base, RMSNorm ε and the vocabulary
    size; embeddings are tied iff the file has no ``output.weight``. ``overrides`` (e.g. ``dtype``, ``remat``)
    replace fields of the result.
    """
    reader = _open_gguf(source)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; load_llama_gguf reads 'llama' files only")

    def req(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    d_model = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    rope_dim = _field(reader, "llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != d_model // n_heads:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count={rope_dim}) are not supported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("RoPE scaling (llama.rope.scaling.type) is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ValueError("GGUF metadata gives no vocabulary size (llama.vocab_size or tokenizer.ggml.tokens)")
    names = {t.name for t in reader.tensors}
    kwargs = dict(
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(req("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        d_ff=int(req("feed_forward_length")),
        max_len=int(_field(reader, "llama.context_length", 2048)),
        rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _gguf_entries(cfg: LlamaConfig) -> dict[str, _Entry]:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd

    def qk(n_heads: int) -> Transform:
        return lambda w: _transpose(unpermute_qk(w, n_heads))

    e = {
        "token_embd.weight": _Entry(("embed", "embedding"), (cfg.vocab_size, d), _identity),
        "output_norm.weight": _Entry(("final_norm", "scale"), (d,), _identity),
    }
    if not cfg.tie_embeddings:
        e["output.weight"] = _Entry(("lm_head", "kernel"), (cfg.vocab_size, d), _transpose)
    for i in range(cfg.n_layers):
        blk, lay = f"blk.{i}.", f"layers_{i}"
        e[blk + "attn_norm.weight"] = _Entry((lay, "attn_norm", "scale"), (d,), _identity)
        e[blk + "ffn_norm.weight"] = _Entry((lay, "mlp_norm", "scale"), (d,), _identity)
        e[blk + "attn_q.weight"] = _Entry((lay, "attn", "q_proj", "kernel"), (q_out, d), qk(cfg.n_heads))
        e[blk + "attn_k.weight"] = _Entry((lay, "attn", "k_proj", "kernel"), (kv_out, d), qk(cfg.n_kv_heads))
        e[blk + "attn_v.weight"] = _Entry((lay, "attn", "v_proj", "kernel"), (kv_out, d), _transpose)
        e[blk + "attn_output.weight"] = _Entry((lay, "attn", "o_proj", "kernel"), (d, q_out), _transpose)
        e[blk + "ffn_gate.weight"] = _Entry((lay, "mlp", "gate_proj", "kernel"), (f, d), _transpose)
        e[blk + "ffn_up.weight"] = _Entry((lay, "mlp", "up_proj", "kernel"), (f, d), _transpose)
        e[blk + "ffn_down.weight"] = _Entry((lay, "mlp", "down_proj", "kernel"), (d, f), _transpose)
    return e


def _gguf_tensor_shape(t: Any) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first (ne0 = row length); numpy order is the reverse.
    return tuple(int(x) for x in reversed([int(s) for s in t.shape]))


def load_llama_gguf(
    path: Any, *, dtype: Any = jnp.float32, strict: bool = True, **config_overrides: Any
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Read a llama-architecture GGUF file into ``(config, params)`` for :class:`Llama`.

    Every tensor is dequantised to float32 (``gguf.quants.dequantize``), matrices are transposed to Flax
    ``(in, out)`` kernels, Q/K rows are un-permuted (:func:`unpermute_qk`), and the result is cast to
    ``dtype`` (``jnp.float32`` or ``jnp.bfloat16``). ``config_overrides`` go to
    :func:`llama_config_from_gguf` (e.g. ``remat=True``, ``dtype=jnp.bfloat16`` for the computation dtype).

    Raises :class:`CheckpointMismatchError` (a ``ValueError``) naming missing tensors, shape mismatches and,
    when ``strict``, unexpected tensors; this happens before any tensor is dequantised.
    """
    import gguf

    reader = _open_gguf(path)
    cfg = llama_config_from_gguf(reader, **config_overrides)
    entries = _gguf_entries(cfg)
    tensors = {t.name: t for t in reader.tensors}
    found = {name: _gguf_tensor_shape(t) for name, t in tensors.items()}
    target = _flat_shapes(
        jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    )
    _check(str(path), entries, found, target, strict=strict)

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(found[name])

    return cfg, _assemble(entries, read, dtype)
