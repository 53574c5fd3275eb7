"""Hugging Face model directories into our Flax models: :func:`from_pretrained`.

A directory written by ``transformers``' ``save_pretrained`` holds ``config.json``, the weights
(``model.safetensors``, or ``model.safetensors.index.json`` and its shards, in any float dtype),
``tokenizer.json`` (+ ``tokenizer_config.json``) and optionally ``generation_config.json``.

Supported architectures and what they map to:

* ``LlamaForCausalLM`` (LLaMA 1/2/3, SmolLM2, TinyLlama), ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` ->
  :class:`~ast_jax.models.llama.Llama`. Qwen2's q/k/v biases set ``LlamaConfig.attn_bias``; Mistral's
  ``sliding_window`` becomes ``LlamaConfig.sliding_window`` (a banded causal mask, also in the KV-cache path);
  an explicit ``head_dim`` becomes ``head_dim_override``; ``rope_scaling`` of type ``linear`` or ``llama3``
  becomes a :class:`~ast_jax.models.llama.RopeScaling`.
* ``GPT2LMHeadModel`` -> :class:`~ast_jax.models.gpt2.GPT2` (the loader of :mod:`ast_jax.models.loading`).

Layout: torch ``nn.Linear`` stores ``W`` as ``(out, in)`` for ``y = x Wᵀ + b``; Flax ``nn.Dense`` wants the
kernel ``(in, out)``, so every matrix is transposed (GPT-2's ``Conv1D`` is already ``(in, out)``). Hugging
Face LLaMA uses the rotate-half RoPE layout, as our model does, so Q/K rows are used as they are. Every
tensor is checked against the target shapes before any is converted (:class:`CheckpointMismatchError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ast_jax.models.llama import Llama, LlamaConfig, RopeScaling
from ast_jax.models.loading import (
    SafetensorsCheckpoint,
    _Entry,
    _gpt2_params,
    _identity,
    _safetensors_params,
    _transpose,
    gpt2_config_from_hf,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_SCALING",
    "from_pretrained",
    "hf_architecture",
    "llama_config_from_hf",
    "load_hf_llama_params",
    "rope_from_hf",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")
SUPPORTED_ROPE_SCALING = (None, "default", "linear", "llama3")

# A config.json written by hand (or by a bare PretrainedConfig) may lack "architectures"; model_type decides.
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# Non-parameter buffers some LLaMA-family checkpoints carry.
_LLAMA_BUFFERS = ("rotary_emb.inv_freq",)


def hf_architecture(hf_config: Mapping[str, Any]) -> str:
    """The architecture class name of a ``config.json`` dict (``architectures[0]``, else from ``model_type``).

    Raises ``ValueError`` naming it and listing :data:`SUPPORTED_ARCHITECTURES` when it is not supported.
    """
    archs = hf_config.get("architectures") or []
    name = archs[0] if archs else _MODEL_TYPES.get(hf_config.get("model_type"), hf_config.get("model_type"))
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return name


def rope_from_hf(hf_config: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` of a ``config.json`` dict.

    transformers 5 writes both under ``rope_parameters`` (``{"rope_type", "rope_theta", "factor", ...}``);
    older files have a top-level ``rope_theta`` and a ``rope_scaling`` dict whose kind is ``rope_type`` or
    ``type``. Kinds ``default``/absent (plain RoPE), ``linear`` (``factor``) and ``llama3`` (``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``) are supported; any
    other raises ``ValueError`` naming it.
    """
    params = hf_config.get("rope_parameters") or {}
    legacy = hf_config.get("rope_scaling") or {}
    spec = {**legacy, **params}
    theta = float(spec.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    kind = spec.get("rope_type", spec.get("type"))
    if float(spec.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ValueError(
            f"rope scaling type {kind!r} is not supported; supported: default (none), 'linear', 'llama3'"
        )
    if kind in (None, "default"):
        return theta, None
    factor = float(spec["factor"])
    if kind == "linear":
        return theta, RopeScaling("linear", factor)
    return theta, RopeScaling(
        "llama3",
        factor,
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_len=int(spec.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(hf_config: Mapping[str, Any], arch: str) -> int | None:
    if arch == "LlamaForCausalLM":
        return None
    window = hf_config.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not hf_config.get("use_sliding_window", False):
        window = None
    layer_types = hf_config.get("layer_types")
    if layer_types and len(set(layer_types)) > 1 and window is not None:
        # Qwen2 with use_sliding_window windows only the layers from max_window_layers on.
        raise ValueError(
            f"per-layer attention types {sorted(set(layer_types))} are not supported "
            "(one sliding window for all layers only)"
        )
    return None if window is None else int(window)


def llama_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from the ``config.json`` dict of a Llama, Mistral or Qwen2 model.

    Maps ``hidden_size`` -> ``d_model``, ``intermediate_size`` -> ``d_ff``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``max_position_embeddings`` -> ``max_len``,
    ``rms_norm_eps``, ``tie_word_embeddings`` (default False, as in transformers for these models),
    ``head_dim`` (-> ``head_dim_override`` when it is not ``hidden_size / heads``), RoPE
    (:func:`rope_from_hf`), Qwen2's q/k/v biases and Mistral's ``sliding_window``. ``overrides`` (``dtype``,
    ``param_dtype``, ``remat``, ...) replace fields. Activations other than SiLU and Llama's
    ``attention_bias``/``mlp_bias`` raise ``ValueError``.
    """
    arch = hf_architecture(hf_config)
    if arch == "GPT2LMHeadModel":
        raise ValueError("GPT2LMHeadModel maps to GPT2Config (gpt2_config_from_hf), not LlamaConfig")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf_config:
            raise ValueError(f"config.json lacks {key!r}")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}; the Llama model uses SiLU (SwiGLU)")
    if arch == "LlamaForCausalLM":
        for key in ("attention_bias", "mlp_bias"):
            if hf_config.get(key):
                raise ValueError(f"config.json {key}=true is not supported for LlamaForCausalLM")
    d_model, n_heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    head_dim = hf_config.get("head_dim")
    override = None
    if head_dim is not None and (d_model % n_heads or int(head_dim) != d_model // n_heads):
        override = int(head_dim)
    theta, scaling = rope_from_hf(hf_config)
    max_len = int(hf_config.get("max_position_embeddings", 2048))
    window = _sliding_window(hf_config, arch)
    kwargs = dict(
        vocab_size=int(hf_config["vocab_size"]),
        d_model=d_model,
        n_layers=int(hf_config["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf_config.get("num_key_value_heads") or n_heads),
        d_ff=int(hf_config["intermediate_size"]),
        max_len=max_len,
        rope_base=theta,
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        head_dim_override=override,
        attn_bias=arch == "Qwen2ForCausalLM",
        rope_scaling=scaling,
        # A window at least max_len long never masks anything; dropping it keeps the plain causal kernel.
        sliding_window=window if window is not None and window < max_len else None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _llama_entries(cfg: LlamaConfig, prefix: str) -> list[_Entry]:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    e = [
        _Entry(prefix + "embed_tokens.weight", ("embed", "embedding"), (cfg.vocab_size, d), _identity),
        _Entry(prefix + "norm.weight", ("final_norm", "scale"), (d,), _identity),
    ]
    if not cfg.tie_embeddings:
        e.append(_Entry("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, d), _transpose))
    for i in range(cfg.n_layers):
        src, lay = f"{prefix}layers.{i}.", f"layers_{i}"
        e += [
            _Entry(src + "input_layernorm.weight", (lay, "attn_norm", "scale"), (d,), _identity),
            _Entry(src + "post_attention_layernorm.weight", (lay, "mlp_norm", "scale"), (d,), _identity),
        ]
        for name, out, inp in (
            ("q_proj", q_out, d),
            ("k_proj", kv_out, d),
            ("v_proj", kv_out, d),
            ("o_proj", d, q_out),
        ):
            e.append(
                _Entry(f"{src}self_attn.{name}.weight", (lay, "attn", name, "kernel"), (out, inp), _transpose)
            )
            if cfg.attn_bias and name != "o_proj":
                e.append(
                    _Entry(f"{src}self_attn.{name}.bias", (lay, "attn", name, "bias"), (out,), _identity)
                )
        for name, out, inp in (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)):
            e.append(_Entry(f"{src}mlp.{name}.weight", (lay, "mlp", name, "kernel"), (out, inp), _transpose))
    return e


def load_hf_llama_params(
    ckpt: SafetensorsCheckpoint, cfg: LlamaConfig, *, dtype: Any = jnp.float32, strict: bool = True
) -> dict[str, Any]:
    """Flax params of :class:`Llama` ``(cfg)`` from the tensors of a Llama/Mistral/Qwen2 checkpoint.

    Linear weights ``(out, in)`` become kernels ``(in, out)``; biases, norms and the embedding ``(V, D)`` are
    used as they are; everything is cast to ``dtype``. Raises :class:`CheckpointMismatchError` naming
    missing, mis-shaped and (when ``strict``) unexpected tensors before any tensor is read. A tied model's
    stored ``lm_head.weight`` is accepted only if it equals the embedding.
    """
    entries = lambda prefix: _llama_entries(cfg, prefix)
    return _safetensors_params(
        ckpt, Llama(cfg), entries, "model.", "embed_tokens.weight", _LLAMA_BUFFERS, dtype, strict
    )


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def from_pretrained(
    path: Any,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    strict: bool = True,
    **config_overrides: Any,
) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """Load a Hugging Face model directory as ``(model, params, tokenizer, hf_config)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json`` +
        shards); ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` are optional.
      dtype: computation dtype of the model (``LlamaConfig.dtype`` / ``GPT2Config.dtype``).
      param_dtype: dtype of the returned params (default float32), whatever the stored dtype (bf16/fp16/fp32).
      strict: reject checkpoint tensors that nothing maps to.
      config_overrides: further fields of the model config (``remat=True``, ``max_len=...``).

    Returns:
      ``model``: :class:`~ast_jax.models.llama.Llama` or :class:`~ast_jax.models.gpt2.GPT2`;
      ``model.apply({"params": params}, tokens)`` maps tokens ``(B, T)`` int32 to logits ``(B, T, V)``.
      ``params``: the Flax params dict. ``tokenizer``: :class:`~ast_jax.tokenizer.TextTokenizer`, or ``None``
      without ``tokenizer.json``. ``hf_config``: the ``config.json`` dict as read, plus the key
      ``"_generation_config"`` holding the ``generation_config.json`` dict (``{}`` when absent); drop that key
      before writing the config back.

    Raises:
      ValueError: no ``config.json``, no weights, an unsupported architecture (the message lists
        :data:`SUPPORTED_ARCHITECTURES`), an unsupported RoPE scaling type, ...
      CheckpointMismatchError: missing, mis-shaped or unexpected tensors, named, before any conversion.
    """
    from ast_jax.models.gpt2 import GPT2
    from ast_jax.tokenizer import tokenizer_from_hf_dir

    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"Hugging Face model directory {path} lacks config.json")
    hf_config = _read_json(cfg_path)
    gen_path = os.path.join(path, "generation_config.json")
    gen = _read_json(gen_path) if os.path.isfile(gen_path) else {}
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    arch = hf_architecture(hf_config)
    if arch == "GPT2LMHeadModel":
        cfg: Any = gpt2_config_from_hf(hf_config, dtype=dtype, **config_overrides)
        ckpt = SafetensorsCheckpoint(path)
        model: Any = GPT2(cfg)
        params = _gpt2_params(ckpt, cfg, param_dtype, strict)
    else:
        cfg = llama_config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, **config_overrides)
        ckpt = SafetensorsCheckpoint(path)
        model = Llama(cfg)
        params = load_hf_llama_params(ckpt, cfg, dtype=param_dtype, strict=strict)
    tokenizer = tokenizer_from_hf_dir(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return model, params, tokenizer, {**hf_config, "_generation_config": gen}
