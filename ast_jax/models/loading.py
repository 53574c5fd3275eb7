"""Pretrained checkpoints into our Flax models: GGUF -> :class:`~ast_jax.models.llama.Llama`, and Hugging Face
GPT-2 ``model.safetensors`` (single file or sharded) -> :class:`~ast_jax.models.gpt2.GPT2`. Whole Hugging Face
model directories of every supported architecture are read by :func:`ast_jax.models.hf.from_pretrained`,
which shares this module's plumbing (:class:`SafetensorsCheckpoint`, the checked ``_Entry`` tables).

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
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.models.llama import Llama, LlamaConfig
from ast_jax.sparsify import key_path

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "SafetensorsCheckpoint",
    "gpt2_config_from_hf",
    "llama_config_from_gguf",
    "load_gpt2_safetensors",
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
    source: str  # tensor name in the checkpoint (one tensor may feed several params, e.g. GPT-2's c_attn)
    path: tuple[str, ...]  # path in the Flax params pytree
    stored_shape: tuple[int, ...]  # shape the checkpoint must store (before the transform)
    transform: Transform


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {key_path(path): tuple(leaf.shape) for path, leaf in flat}


def _module_shapes(module: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{param path: shape}`` of a Flax decoder, by tracing its ``init`` (nothing is allocated)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return _flat_shapes(jax.eval_shape(lambda: module.init(jax.random.key(0), tokens))["params"])


def _check(
    source: str,
    entries: list[_Entry],
    found_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    *,
    strict: bool,
    ignore: Callable[[str], bool] = lambda name: False,
) -> LoadReport:
    mapped_paths = {e.path for e in entries}
    unmapped = sorted("/".join(p) for p in target_shapes if p not in mapped_paths)
    if unmapped:  # a bug in this module, not in the checkpoint
        raise AssertionError(f"loader has no source for model params: {unmapped}")
    expected = {e.source: e.stored_shape for e in entries}
    missing = tuple(name for name in expected if name not in found_shapes)
    unexpected = tuple(name for name in found_shapes if name not in expected and not ignore(name))
    mismatched = tuple(
        (name, shape, tuple(found_shapes[name]))
        for name, shape in expected.items()
        if name in found_shapes and tuple(found_shapes[name]) != shape
    )
    report = LoadReport(missing, unexpected, mismatched)
    if report.missing or report.mismatched or (strict and report.unexpected):
        raise CheckpointMismatchError(source, report)
    return report


def _assemble(entries: list[_Entry], read: Callable[[str], np.ndarray], dtype: Any) -> dict[str, Any]:
    params: dict[str, Any] = {}
    cache: dict[str, np.ndarray] = {}
    for e in entries:
        if e.source not in cache:
            cache = {e.source: read(e.source)}  # consecutive entries share a tensor; keep only the last one
        value = np.asarray(e.transform(cache[e.source]), dtype=np.float32)
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
        rope_base=_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def _gguf_entries(cfg: LlamaConfig) -> list[_Entry]:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd

    def qk(n_heads: int) -> Transform:
        return lambda w: _transpose(unpermute_qk(w, n_heads))

    e = [
        _Entry("token_embd.weight", ("embed", "embedding"), (cfg.vocab_size, d), _identity),
        _Entry("output_norm.weight", ("final_norm", "scale"), (d,), _identity),
    ]
    if not cfg.tie_embeddings:
        e.append(_Entry("output.weight", ("lm_head", "kernel"), (cfg.vocab_size, d), _transpose))
    for i in range(cfg.n_layers):
        b, lay = f"blk.{i}.", f"layers_{i}"
        e += [
            _Entry(b + "attn_norm.weight", (lay, "attn_norm", "scale"), (d,), _identity),
            _Entry(b + "ffn_norm.weight", (lay, "mlp_norm", "scale"), (d,), _identity),
            _Entry(b + "attn_q.weight", (lay, "attn", "q_proj", "kernel"), (q_out, d), qk(cfg.n_heads)),
            _Entry(b + "attn_k.weight", (lay, "attn", "k_proj", "kernel"), (kv_out, d), qk(cfg.n_kv_heads)),
            _Entry(b + "attn_v.weight", (lay, "attn", "v_proj", "kernel"), (kv_out, d), _transpose),
            _Entry(b + "attn_output.weight", (lay, "attn", "o_proj", "kernel"), (d, q_out), _transpose),
            _Entry(b + "ffn_gate.weight", (lay, "mlp", "gate_proj", "kernel"), (f, d), _transpose),
            _Entry(b + "ffn_up.weight", (lay, "mlp", "up_proj", "kernel"), (f, d), _transpose),
            _Entry(b + "ffn_down.weight", (lay, "mlp", "down_proj", "kernel"), (d, f), _transpose),
        ]
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
    target = _module_shapes(Llama(cfg))
    _check(str(path), entries, found, target, strict=strict)

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(found[name])

    return cfg, _assemble(entries, read, dtype)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 safetensors -> GPT2
# ---------------------------------------------------------------------------------------------------------

# Non-parameter buffers older GPT-2 checkpoints carry (the causal mask); they are expected and skipped.
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def gpt2_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> Any:
    """A :class:`~ast_jax.models.gpt2.GPT2Config` from a Hugging Face GPT-2 ``config.json`` dictionary.

    Maps ``vocab_size``, ``n_positions`` -> ``max_len``, ``n_layer``, ``n_head``, ``n_embd`` -> ``d_model``,
    ``n_inner`` -> ``d_mlp``, ``layer_norm_epsilon``, ``tie_word_embeddings``. Only the tanh-approximate GELU
    (``gelu_new``, GPT-2's own) matches our MLP; other activations are rejected.
    """
    from ast_jax.models.gpt2 import GPT2Config

    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"config.json activation_function={act!r}; the GPT2 model uses tanh-GELU ('gelu_new')"
        )
    for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if key not in hf_config:
            raise ValueError(f"config.json lacks {key!r}")
    kwargs = dict(
        vocab_size=int(hf_config["vocab_size"]),
        max_len=int(hf_config.get("n_positions", hf_config.get("n_ctx", 1024))),
        n_layer=int(hf_config["n_layer"]),
        n_head=int(hf_config["n_head"]),
        d_model=int(hf_config["n_embd"]),
        d_mlp=None if hf_config.get("n_inner") is None else int(hf_config["n_inner"]),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
        layer_norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def _gpt2_entries(cfg: Any, prefix: str) -> list[_Entry]:
    d, f = cfg.d_model, cfg.mlp_dim

    def split(part: int) -> Transform:
        # c_attn packs [q | k | v] along its output (last) axis: weight (D, 3D), bias (3D,).
        return lambda x: x[..., part * d : (part + 1) * d]

    e = [
        _Entry(prefix + "wte.weight", ("wte", "embedding"), (cfg.vocab_size, d), _identity),
        _Entry(prefix + "wpe.weight", ("wpe", "embedding"), (cfg.max_len, d), _identity),
        _Entry(prefix + "ln_f.weight", ("ln_f", "scale"), (d,), _identity),
        _Entry(prefix + "ln_f.bias", ("ln_f", "bias"), (d,), _identity),
    ]
    if not cfg.tie_embeddings:
        e.append(_Entry("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, d), _transpose))
    for i in range(cfg.n_layer):
        h, blk = f"{prefix}h.{i}.", f"block_{i}"
        for ln in ("ln_1", "ln_2"):
            e.append(_Entry(h + ln + ".weight", (blk, ln, "scale"), (d,), _identity))
            e.append(_Entry(h + ln + ".bias", (blk, ln, "bias"), (d,), _identity))
        for part, name in enumerate(("q", "k", "v")):
            e.append(_Entry(h + "attn.c_attn.weight", (blk, "attn", name, "kernel"), (d, 3 * d), split(part)))
        for part, name in enumerate(("q", "k", "v")):
            e.append(_Entry(h + "attn.c_attn.bias", (blk, "attn", name, "bias"), (3 * d,), split(part)))
        for src, dst, shape in (
            ("attn.c_proj.weight", ("attn", "proj", "kernel"), (d, d)),
            ("attn.c_proj.bias", ("attn", "proj", "bias"), (d,)),
            ("mlp.c_fc.weight", ("mlp", "fc", "kernel"), (d, f)),
            ("mlp.c_fc.bias", ("mlp", "fc", "bias"), (f,)),
            ("mlp.c_proj.weight", ("mlp", "proj", "kernel"), (f, d)),
            ("mlp.c_proj.bias", ("mlp", "proj", "bias"), (d,)),
        ):
            e.append(_Entry(h + src, (blk, *dst), shape, _identity))
    return e


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint directory: ``model.safetensors``, or the shards listed by
    ``model.safetensors.index.json``.

    ``shapes``: tensor name -> shape; ``dtypes``: name -> safetensors dtype tag (``"F32"``, ``"BF16"``, ...);
    :meth:`read` returns one tensor as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``, which numpy casts to
    float32 exactly). Only the headers are read on construction.
    """

    def __init__(self, directory: Any):
        from safetensors import safe_open

        directory = os.fspath(directory)
        single = os.path.join(directory, "model.safetensors")
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(single):
            files = [single]
            self.source = single
        elif os.path.isfile(index):
            with open(index) as fh:
                weight_map = json.load(fh).get("weight_map", {})
            files = [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise ValueError(f"{index} lists shards that are absent: {absent}")
            self.source = index
        else:
            raise ValueError(
                f"checkpoint directory {directory} lacks model.safetensors (or model.safetensors.index.json)"
            )
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._file: dict[str, str] = {}
        for file in files:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.shapes[name] = tuple(sl.get_shape())
                    self.dtypes[name] = sl.get_dtype()
                    self._file[name] = file

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as stored (its own dtype and shape)."""
        from safetensors import safe_open

        # safetensors' numpy backend has no bfloat16; its flax backend does (via ml_dtypes).
        framework = "flax" if self.dtypes[name] == "BF16" else "numpy"
        with safe_open(self._file[name], framework=framework) as f:
            return np.asarray(f.get_tensor(name))


def _safetensors_params(
    ckpt: SafetensorsCheckpoint,
    module: Any,
    entries_for: Callable[[str], list[_Entry]],
    root: str,
    embedding: str,
    buffers: tuple[str, ...],
    dtype: Any,
    strict: bool,
) -> dict[str, Any]:
    """Params of ``module`` from an HF checkpoint whose names may carry the ``root`` prefix (``"model."``,
    ``"transformer."``): every tensor checked against the module's shapes before any is read; ``buffers``
    (name suffixes) and a tied ``lm_head.weight`` equal to ``root + embedding`` are accepted and skipped."""
    found = ckpt.shapes
    prefix = root if any(n.startswith(root) for n in found) else ""
    entries = entries_for(prefix)
    tied = module.cfg.tie_embeddings

    def ignore(name: str) -> bool:
        return name.endswith(buffers) or (name == "lm_head.weight" and tied)

    target = _module_shapes(module)
    _check(ckpt.source, entries, found, target, strict=strict, ignore=ignore)
    _check_tied(ckpt, "lm_head.weight", prefix + embedding, tied)
    return _assemble(entries, ckpt.read, dtype)


def _gpt2_params(ckpt: SafetensorsCheckpoint, cfg: Any, dtype: Any, strict: bool) -> dict[str, Any]:
    from ast_jax.models.gpt2 import GPT2

    entries = lambda prefix: _gpt2_entries(cfg, prefix)
    return _safetensors_params(
        ckpt, GPT2(cfg), entries, "transformer.", "wte.weight", _GPT2_BUFFERS, dtype, strict
    )


def _check_tied(ckpt: SafetensorsCheckpoint, head: str, embed: str, tied: bool) -> None:
    """A tied model may still store its head; accept it only if it equals the embedding."""
    if tied and head in ckpt.shapes:
        h, e = ckpt.read(head), ckpt.read(embed)
        if h.shape != e.shape or not np.array_equal(h, e):
            raise CheckpointMismatchError(
                ckpt.source, LoadReport(unexpected=(f"{head} (differs from {embed}, config ties them)",))
            )


def load_gpt2_safetensors(
    directory: Any, *, dtype: Any = jnp.float32, strict: bool = True, **config_overrides: Any
) -> tuple[Any, dict[str, Any]]:
    """Read a Hugging Face GPT-2 checkpoint directory (``config.json`` + ``model.safetensors``, or sharded
    ``model.safetensors.index.json`` + shards) into ``(GPT2Config, params)`` for
    :class:`ast_jax.models.gpt2.GPT2`; ``dtype`` is the dtype of the returned params.

    Accepts the key names of both ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight``, ...) and the
    bare ``GPT2Model`` (``h.0.attn.c_attn.weight``, ...). Conv1D weights are already ``(in, out)`` and are
    used as they are; ``c_attn`` is split into our ``q``, ``k``, ``v`` kernels and biases. A tied
    ``lm_head.weight`` (equal to ``wte``) and the causal-mask buffers ``attn.bias``/``attn.masked_bias`` are
    accepted and skipped. Raises :class:`CheckpointMismatchError` naming missing, unexpected (when
    ``strict``) and mis-shaped tensors before converting anything.
    """
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"GPT-2 checkpoint directory {directory} lacks config.json")
    with open(cfg_path) as fh:
        cfg = gpt2_config_from_hf(json.load(fh), **config_overrides)
    return cfg, _gpt2_params(SafetensorsCheckpoint(directory), cfg, dtype, strict)
