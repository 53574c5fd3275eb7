"""Sparse models out as Hugging Face directories of plain safetensors.

:func:`save_hf` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` (and vLLM) load
with no custom code: ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` shards
plus ``model.safetensors.index.json``), the tokenizer files and ``generation_config.json``. Weights are
"dense with zeros": every pruned weight is stored as exactly ``+0.0`` (never ``-0.0``, also after the cast to
bfloat16/float16), so a sparse kernel can find the N:M pattern again by comparing with zero.

The same directory with the sparse linear layers quantised (compressed-tensors ``pack-quantized``,
W4A16 / W8A16) is written by :func:`ast_jax.export_ct.save_compressed_tensors`, on the pieces of this module:
the tensor-name map, ``config.json``, the tokenizer files, the sparsity record and the sharded writer.

Tensor names and layouts
------------------------
LLaMA family (``LlamaForCausalLM``; Mistral and Qwen2 share the names, Qwen2 adds q/k/v biases)::

    embed/embedding                   (V, D)   -> model.embed_tokens.weight           (V, D)
    layers_i/attn_norm/scale          (D,)     -> model.layers.i.input_layernorm.weight
    layers_i/mlp_norm/scale           (D,)     -> model.layers.i.post_attention_layernorm.weight
    layers_i/attn/q_proj/kernel       (in,out) -> model.layers.i.self_attn.q_proj.weight  (out, in) = kernelᵀ
    layers_i/attn/q_proj/bias         (out,)   -> model.layers.i.self_attn.q_proj.bias     (Qwen2 only)
    ... k_proj, v_proj, o_proj; mlp/gate_proj, up_proj, down_proj -> model.layers.i.mlp.*.weight
    final_norm/scale                           -> model.norm.weight
    lm_head/kernel                    (D, V)   -> lm_head.weight (V, D)                 (untied only)

GPT-2 (``GPT2LMHeadModel``; its ``Conv1D`` weights are already ``(in, out)``, so they are not transposed)::

    wte/embedding, wpe/embedding      -> transformer.wte.weight, transformer.wpe.weight
    block_i/ln_1, ln_2 scale/bias     -> transformer.h.i.ln_1.weight/bias, ln_2.weight/bias
    block_i/attn/{q,k,v} kernel/bias  -> transformer.h.i.attn.c_attn.weight (D, 3D) = [q | k | v], bias (3D,)
    block_i/attn/proj, mlp/fc, mlp/proj -> transformer.h.i.attn.c_proj, mlp.c_fc, mlp.c_proj
    ln_f scale/bias                   -> transformer.ln_f.weight/bias; lm_head/kernel -> lm_head.weight (V, D)

The sparsity record
-------------------
With ``sparsity={"n": 2, "m": 4}`` (optionally ``"layers": [...]`` torch parameter names; default: every
sparse linear weight) the pattern is verified on the tensors about to be written and recorded in
``config.json`` under the key ``"ast_sparsity"``, which transformers keeps as an unused attribute and vLLM
ignores::

    "ast_sparsity": {
        "format": "dense-with-zeros",       # pruned weights are stored, as exact +0.0
        "structure": "2:4",                 # at most n non-zeros in every group of m
        "axis": "input",                    # groups run along the input (contraction) dimension:
                                            # the last axis of a Linear weight (out, in),
                                            # the first axis of a GPT-2 Conv1D weight (in, out)
        "targets": ["model.layers.0.self_attn.q_proj.weight", ...]
    }
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ast_jax.sparsify import default_sparse_filter, key_path

__all__ = ["SPARSITY_KEY", "check_nm_torch_layout", "save_hf", "torch_state_dict"]

SPARSITY_KEY = "ast_sparsity"

_DTYPES: dict[str, Any] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
# safetensors dtype tags of the arrays this module writes.
_ST_TAGS = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


# ---------------------------------------------------------------------------------------------------------
# Model kind, validation, naming
# ---------------------------------------------------------------------------------------------------------


def _is_gpt2(model_cfg: Any) -> bool:
    from ast_jax.models.gpt2 import GPT2Config

    return isinstance(model_cfg, GPT2Config)


def _model_shapes(model_cfg: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    if _is_gpt2(model_cfg):
        from ast_jax.models.gpt2 import GPT2 as model_cls
    else:
        from ast_jax.models.llama import Llama as model_cls
    tree = jax.eval_shape(lambda: model_cls(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
        "params"
    ]
    return {key_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_params(model_cfg: Any, params: Any) -> dict[tuple[str, ...], np.ndarray]:
    """Host float32 copies of ``params``, after checking they are exactly the model's params."""
    params = _unwrap(params)
    if isinstance(params, Mapping) and "slorb" in params:
        raise ValueError(
            "params hold SLoRB parameters ('slorb'): a serving program has no SLoRB term, so exporting them "
            "would silently drop it. Fold them into the kernels first (ast_jax.slorb.fold_slorb; the folded "
            "kernels are then dense) or export the model params alone"
        )
    want = _model_shapes(model_cfg)
    flat = {key_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    extra = sorted("/".join(p) for p in flat if p not in want)
    missing = sorted("/".join(p) for p in want if p not in flat)
    if extra or missing:
        raise ValueError(
            "params do not match the model config (a tree with other keys, e.g. SLoRB or a training "
            "state, cannot be written as a serving checkpoint; fold or strip it first): "
            f"unexpected {extra}, missing {missing}"
        )
    bad = [
        f"{'/'.join(p)}: {tuple(np.shape(x))} != {want[p]}"
        for p, x in flat.items()
        if tuple(np.shape(x)) != want[p]
    ]
    if bad:
        raise ValueError(f"params have the wrong shapes for the model config: {bad}")
    return {p: np.asarray(jax.device_get(x), dtype=np.float32) for p, x in flat.items()}


def _llama_names(model_cfg: Any) -> list[tuple[tuple[str, ...], str, bool]]:
    """``(our path, torch name, transpose)`` for every LLaMA-family tensor."""
    out = [(("embed", "embedding"), "model.embed_tokens.weight", False)]
    for i in range(model_cfg.n_layers):
        lay, hf = f"layers_{i}", f"model.layers.{i}."
        out.append(((lay, "attn_norm", "scale"), hf + "input_layernorm.weight", False))
        out.append(((lay, "mlp_norm", "scale"), hf + "post_attention_layernorm.weight", False))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(((lay, "attn", proj, "kernel"), f"{hf}self_attn.{proj}.weight", True))
            if getattr(model_cfg, "attn_bias", False) and proj != "o_proj":
                out.append(((lay, "attn", proj, "bias"), f"{hf}self_attn.{proj}.bias", False))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out.append(((lay, "mlp", proj, "kernel"), f"{hf}mlp.{proj}.weight", True))
    out.append((("final_norm", "scale"), "model.norm.weight", False))
    if not model_cfg.tie_embeddings:
        out.append((("lm_head", "kernel"), "lm_head.weight", True))
    return out


def torch_state_dict(model_cfg: Any, params: Any) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, ...]]]:
    """The Hugging Face state dict of ``params`` as float32 NumPy arrays, and ``torch name -> our path``
    for the tensors that come from one kernel (GPT-2's fused ``c_attn`` maps to its ``q`` kernel path).

    LLaMA-family kernels ``(in, out)`` are transposed to ``nn.Linear`` weights ``(out, in)``; GPT-2 kernels
    stay ``(in, out)`` (``Conv1D``) and ``c_attn = concat([q, k, v], axis=1)``. See the module docstring.
    """
    flat = _flat_params(model_cfg, params)
    sd: dict[str, np.ndarray] = {}
    src: dict[str, tuple[str, ...]] = {}
    if _is_gpt2(model_cfg):
        sd["transformer.wte.weight"] = flat[("wte", "embedding")]
        sd["transformer.wpe.weight"] = flat[("wpe", "embedding")]
        for i in range(model_cfg.n_layer):
            b, h = f"block_{i}", f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[h + ln + ".weight"] = flat[(b, ln, "scale")]
                sd[h + ln + ".bias"] = flat[(b, ln, "bias")]
            for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
                sd[f"{h}attn.c_attn.{suffix}"] = np.concatenate(
                    [flat[(b, "attn", x, leaf)] for x in ("q", "k", "v")], axis=-1
                )
            src[h + "attn.c_attn.weight"] = (b, "attn", "q", "kernel")
            for ours, theirs in (
                ("attn/proj", "attn.c_proj"),
                ("mlp/fc", "mlp.c_fc"),
                ("mlp/proj", "mlp.c_proj"),
            ):
                mod = (b, *ours.split("/"))
                sd[f"{h}{theirs}.weight"] = flat[(*mod, "kernel")]
                sd[f"{h}{theirs}.bias"] = flat[(*mod, "bias")]
                src[f"{h}{theirs}.weight"] = (*mod, "kernel")
        sd["transformer.ln_f.weight"] = flat[("ln_f", "scale")]
        sd["transformer.ln_f.bias"] = flat[("ln_f", "bias")]
        if not model_cfg.tie_embeddings:
            sd["lm_head.weight"] = np.ascontiguousarray(flat[("lm_head", "kernel")].T)
            src["lm_head.weight"] = ("lm_head", "kernel")
        return sd, src
    for path, name, transpose in _llama_names(model_cfg):
        sd[name] = np.ascontiguousarray(flat[path].T) if transpose else flat[path]
        if path[-1] == "kernel":
            src[name] = path
    return sd, src


def _is_conv1d(name: str) -> bool:
    return name.startswith("transformer.h.") and name.endswith(
        ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    )


def _sparse_names(
    model_cfg: Any, params: Any, src: Mapping[str, tuple[str, ...]], sparse_filter: Any
) -> list[str]:
    """Torch names of the weights whose kernels ``sparse_filter`` (default: every linear layer inside the
    blocks) selects; a fused GPT-2 ``c_attn`` counts when its ``q`` kernel does."""
    f = default_sparse_filter if sparse_filter is None else sparse_filter
    flat = {key_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(_unwrap(params))[0]}
    return [name for name, path in src.items() if f(path, flat[path])]


def _unwrap(params: Any) -> Any:
    if isinstance(params, Mapping) and "params" in params and len(params) == 1:
        return params["params"]
    return params


def _positive_zeros(x: np.ndarray) -> np.ndarray:
    # -0.0 == 0 is True, so this maps both signed zeros (and values that underflowed in the cast) to +0.0.
    return np.where(x == 0, np.zeros((), x.dtype), x)


# ---------------------------------------------------------------------------------------------------------
# N:M check in torch layout
# ---------------------------------------------------------------------------------------------------------


def check_nm_torch_layout(
    state_dict_or_dir: Mapping[str, Any] | str | os.PathLike, n: int, m: int, names: Iterable[str]
) -> dict[str, bool]:
    """Per tensor name: at most ``n`` non-zeros in every group of ``m`` consecutive inputs?

    ``state_dict_or_dir``: a mapping name -> array-like (NumPy or torch tensors) or a directory written by
    :func:`save_hf` (its safetensors files are read). Linear weights ``(out, in)`` are grouped along the last
    axis; GPT-2 ``Conv1D`` weights (``transformer.h.*.{c_attn,c_proj,c_fc}.weight``, ``(in, out)``) along
    the first. ``count_nonzero(W[o, m·k : m·(k+1)]) <= n`` for every row ``o`` and group ``k``. A tensor whose
    input dimension is not a multiple of ``m``, or a missing name, gives ``False``.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"need integers 0 < n <= m, got n={n}, m={m}")
    names = list(names)
    sd = (
        _read_dir(state_dict_or_dir, names)
        if isinstance(state_dict_or_dir, (str, os.PathLike))
        else state_dict_or_dir
    )
    report = {}
    for name in names:
        if name not in sd:
            report[name] = False
            continue
        w = _to_numpy(sd[name])
        if w.ndim != 2:
            report[name] = False
            continue
        w = w.T if _is_conv1d(name) else w  # -> (out, in)
        if w.shape[1] % m:
            report[name] = False
            continue
        nz = (w != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(axis=-1)
        report[name] = bool(np.all(nz <= n))
    return report


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; float() because NumPy has no bfloat16
        x = x.detach().cpu()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def _read_dir(directory: str | os.PathLike, names: list[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in names:
                    out[name] = _to_numpy(f.get_tensor(name))
    return out


# ---------------------------------------------------------------------------------------------------------
# safetensors writing (sharded)
# ---------------------------------------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """The safetensors format: u64 header length, JSON header (dtype, shape, byte offsets), raw C-order bytes.

    Written here rather than with ``safetensors.numpy`` because NumPy has no native bfloat16."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, x in tensors.items():
        nbytes = x.size * x.dtype.itemsize
        header[name] = {
            "dtype": _ST_TAGS[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data start stays 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for x in tensors.values():
            fh.write(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes())


def _write_weights(out: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> None:
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        # A tensor larger than the limit gets a shard of its own, as transformers' own sharding does.
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / file, shard)
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# config.json, tokenizer, generation config
# ---------------------------------------------------------------------------------------------------------


def _base_config(model_cfg: Any) -> dict[str, Any]:
    if _is_gpt2(model_cfg):
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": model_cfg.vocab_size,
            "n_positions": model_cfg.max_len,
            "n_embd": model_cfg.d_model,
            "n_layer": model_cfg.n_layer,
            "n_head": model_cfg.n_head,
            "n_inner": model_cfg.d_mlp,
            "activation_function": "gelu_new",  # our MLP uses the tanh-approximate GELU
            "layer_norm_epsilon": model_cfg.layer_norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "tie_word_embeddings": model_cfg.tie_embeddings,
            "use_cache": True,
            # GPT2Config would otherwise default both to 50256, outside a small vocabulary.
            "bos_token_id": None,
            "eos_token_id": None,
        }
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.d_ff,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_kv_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_len,
        "rms_norm_eps": model_cfg.norm_eps,
        # transformers < 5 reads rope_theta, transformers >= 5 rope_parameters; both are written.
        "rope_theta": model_cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_base},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "use_cache": True,
    }
    scaling = getattr(model_cfg, "rope_scaling", None)
    if scaling is not None:
        rope = {"rope_type": scaling.kind, "factor": scaling.factor}
        if scaling.kind == "llama3":
            rope |= {
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_len,
            }
        cfg["rope_parameters"] |= rope
        cfg["rope_scaling"] = rope
    window = getattr(model_cfg, "sliding_window", None)
    if getattr(model_cfg, "attn_bias", False):
        # Qwen2 is the LLaMA layout plus q/k/v biases; its window (if any) covers every layer from
        # max_window_layers = 0 on, i.e. all of them, as our single window does.
        cfg |= {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "use_sliding_window": window is not None,
        }
        cfg |= {"sliding_window": window, "max_window_layers": 0}
        del cfg["attention_bias"], cfg["mlp_bias"]
    elif window is not None:
        cfg |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": window}
        del cfg["attention_bias"], cfg["mlp_bias"]
    return cfg


def _config(
    model_cfg: Any, hf_config: Mapping[str, Any] | None, dtype: str, tokenizer: Any
) -> dict[str, Any]:
    """``config.json`` of the export: ``hf_config`` checked against ``model_cfg`` (or one built from it), the
    dtype, and the BOS/EOS ids the tokenizer knows where the config has none."""
    if hf_config is None:
        cfg = _base_config(model_cfg)
    else:
        cfg = json.loads(json.dumps(dict(hf_config)))  # a deep copy; the caller's dict stays as it was
        cfg.pop("quantization_config", None)
        cfg.pop(SPARSITY_KEY, None)
        ours = _base_config_sizes(model_cfg)
        wrong = {k: (cfg.get(k), v) for k, v in ours.items() if k in cfg and cfg[k] != v}
        if wrong:
            raise ValueError(f"hf_config disagrees with the model config (hf_config value, ours): {wrong}")
        cfg["tie_word_embeddings"] = model_cfg.tie_embeddings
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    _special_ids(cfg, tokenizer)
    return cfg


def _base_config_sizes(model_cfg: Any) -> dict[str, Any]:
    if _is_gpt2(model_cfg):
        keys = ("vocab_size", "n_embd", "n_layer", "n_head")
    else:
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    full = _base_config(model_cfg)
    return {k: full[k] for k in keys}


def _write_tokenizer(out: Path, tokenizer_dir: str | os.PathLike | None, tokenizer: Any) -> None:
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        if not src.is_dir():
            raise ValueError(f"tokenizer_dir {src} is not a directory")
        copied = [f for f in _TOKENIZER_FILES if (src / f).is_file()]
        if not copied:
            raise ValueError(f"tokenizer_dir {src} holds none of {list(_TOKENIZER_FILES)}")
        for f in copied:
            shutil.copyfile(src / f, out / f)
        return
    if tokenizer is None:
        return
    # save_hf takes a plain tokenizers.Tokenizer as well as a TextTokenizer (which wraps one as .inner).
    inner = getattr(tokenizer, "inner", tokenizer)
    if hasattr(inner, "save_pretrained"):  # a transformers tokenizer writes its own set of files
        inner.save_pretrained(str(out))
        return
    if not hasattr(inner, "save"):
        raise ValueError(f"cannot save a tokenizer of type {type(inner).__name__}: need tokenizers.Tokenizer")
    inner.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    # Programs built on transformers (lm-eval's prefix token, generate's stop rule) need the special tokens
    # named; a tokenizer that knows them (ast_jax.tokenizer.TextTokenizer) passes them on.
    for key, ident in (("bos_token", getattr(tokenizer, "bos_id", None)), ("eos_token", _eos(tokenizer))):
        if ident is not None:
            config[key] = inner.id_to_token(int(ident))
    # A tokenizer without a BOS token can add none, so the key would say nothing; it is left out then, which
    # also keeps the files of the byte-level tokenizer as they were when it was a plain tokenizers.Tokenizer.
    if getattr(tokenizer, "bos_id", None) is not None and getattr(tokenizer, "add_bos", None) is not None:
        config["add_bos_token"] = bool(tokenizer.add_bos)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _eos(tokenizer: Any) -> int | None:
    return None if tokenizer is None else getattr(tokenizer, "eos_id", None)


def _special_ids(cfg: dict[str, Any], tokenizer: Any) -> None:
    """Fill ``bos_token_id`` / ``eos_token_id`` of a built config from the tokenizer when it knows them."""
    ids = (("bos_token_id", getattr(tokenizer, "bos_id", None)), ("eos_token_id", _eos(tokenizer)))
    for key, ident in ids:
        if cfg.get(key) is None and ident is not None:
            cfg[key] = int(ident)


def _write_generation_config(
    out: Path, cfg: Mapping[str, Any], generation_config: Mapping[str, Any] | None
) -> None:
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    gen.update(generation_config or {})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _sparsity_record(
    sparsity: Mapping[str, Any] | None, default_targets: list[str], tensors: Mapping[str, np.ndarray]
) -> dict[str, Any] | None:
    if sparsity is None:
        return None
    unknown = set(sparsity) - {"n", "m", "layers"}
    if unknown:
        raise ValueError(f"sparsity has unknown keys {sorted(unknown)}; expected n, m and optionally layers")
    n, m = sparsity.get("n"), sparsity.get("m")
    targets = list(sparsity.get("layers") or default_targets)
    report = check_nm_torch_layout(tensors, n, m, targets)
    failing = [name for name, ok in report.items() if not ok]
    if failing:
        raise ValueError(
            f"sparsity claims {n}:{m} but these tensors are not {n}:{m} along the input: {failing}"
        )
    return {"format": "dense-with-zeros", "structure": f"{n}:{m}", "axis": "input", "targets": targets}


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


def _write_dir(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    cfg: Mapping[str, Any],
    tokenizer_dir: str | os.PathLike | None,
    tokenizer: Any,
    generation_config: Mapping[str, Any] | None,
    max_shard_bytes: int,
) -> Path:
    """The files of one model directory: weights, ``config.json``, tokenizer, ``generation_config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(out, tensors, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(out, tokenizer_dir, tokenizer)
    _write_generation_config(out, cfg, generation_config)
    return out


# ---------------------------------------------------------------------------------------------------------
# save_hf
# ---------------------------------------------------------------------------------------------------------


def save_hf(
    out_dir: str | os.PathLike,
    model_cfg: Any,
    params: Any,
    *,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    generation_config: Mapping[str, Any] | None = None,
    dtype: str = "bfloat16",
    sparsity: Mapping[str, Any] | None = None,
    max_shard_bytes: int = 2 * 2**30,
) -> Path:
    """Write ``params`` of a :class:`~ast_jax.models.llama.Llama` or :class:`~ast_jax.models.gpt2.GPT2`
    as a Hugging Face model directory and return its path.

    Args:
      out_dir: the directory (created if needed; earlier weight files in it are replaced).
      model_cfg: ``LlamaConfig`` or ``GPT2Config`` of ``params``.
      params: the model params (``{"params": ...}`` is unwrapped); nothing else (SLoRB: ``ValueError``).
      hf_config: the source model's ``config.json`` as a dict, kept (architecture, token ids, RoPE scaling)
        except ``tie_word_embeddings`` and the dtype; its sizes must agree with ``model_cfg``. Without it a
        config is built from ``model_cfg``: ``GPT2LMHeadModel``, ``Qwen2ForCausalLM`` (q/k/v biases),
        ``MistralForCausalLM`` (sliding window) or ``LlamaForCausalLM``, with its RoPE scaling.
      tokenizer_dir: copy the tokenizer files found there; or ``tokenizer``: a
        :class:`~ast_jax.tokenizer.TextTokenizer` (its BOS/EOS named in ``tokenizer_config.json``) or a plain
        ``tokenizers.Tokenizer``, saved as ``tokenizer.json``.
      generation_config: entries of ``generation_config.json`` (bos/eos/pad ids come from the config).
      dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` for every tensor.
      sparsity: ``{"n", "m"[, "layers"]}``: verified and recorded under ``config.json["ast_sparsity"]``.
      max_shard_bytes: above this the weights are split into ``model-0000i-of-0000N.safetensors`` shards.

    Linear kernels ``(in, out)`` become ``weight = kernelᵀ`` ``(out, in)``; zeros are written as ``+0.0``.
    """
    _check_dtype(dtype)
    sd, src = torch_state_dict(model_cfg, params)
    cfg = _config(model_cfg, hf_config, dtype, tokenizer)
    tensors = {name: _positive_zeros(x.astype(_DTYPES[dtype])) for name, x in sd.items()}
    record = _sparsity_record(sparsity, _sparse_names(model_cfg, params, src, None), tensors)
    if record is not None:
        cfg[SPARSITY_KEY] = record
    return _write_dir(out_dir, tensors, cfg, tokenizer_dir, tokenizer, generation_config, max_shard_bytes)
