"""Sparse LLaMA models out as llama.cpp GGUF files (``general.architecture = "llama"``).

:func:`save_gguf` writes the tensors under llama.cpp's names with the Q/K rows permuted for its adjacent-pair
RoPE (:func:`~ast_jax.models.loading.permute_qk_for_gguf`; :func:`~ast_jax.models.loading.load_llama_gguf`
undoes it), the ``llama.*`` hyper-parameters and, when a tokenizer is given, the ``tokenizer.ggml.*``
vocabulary. GGUF stores a linear layer as ``W`` ``(out, in)`` (its ``ne`` lists ``[in, out]``), so every
Flax kernel ``(in, out)`` is transposed::

    embed/embedding            (V, D)    -> token_embd.weight     (V, D)
    layers_i/attn/q_proj/kernel (D, H·hd) -> blk.i.attn_q.weight   permute_qk(kernelᵀ, H)
    layers_i/attn/k_proj/kernel           -> blk.i.attn_k.weight   permute_qk(kernelᵀ, Hkv)
    layers_i/attn/{v,o}_proj/kernel       -> blk.i.attn_v.weight, blk.i.attn_output.weight (kernelᵀ)
    layers_i/mlp/{gate,up,down}_proj      -> blk.i.ffn_gate.weight, ffn_up.weight, ffn_down.weight (kernelᵀ)
    layers_i/{attn,mlp}_norm/scale        -> blk.i.attn_norm.weight, blk.i.ffn_norm.weight
    final_norm/scale, lm_head/kernel      -> output_norm.weight, output.weight (untied only)

Tensor types (``gguf_type``): ``"f32"`` everything F32; ``"f16"`` matrices F16, 1-D norms F32 (as
llama.cpp's converter does); ``"q8_0"`` matrices whose row length is a multiple of 32 in Q8_0 (blocks of 32
values: ``d = max|x| / 127`` stored as float16, ``q = round(x / d)`` int8, so ``|x - q·d| <= d / 2``), other
matrices F16 and norms F32. A pruned weight is written as exactly ``+0.0`` (Q8_0 stores it as ``q = 0``), so
the N:M pattern of the sparse matrices is in the file; llama.cpp itself computes them densely.

Only the plain llama architecture is written: q/k/v biases (Qwen2), RoPE scaling, a sliding window
(Mistral), a head size other than ``d_model / n_heads`` and GPT-2 models raise ``ValueError``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ast_jax.export_hf import _flat_params, _is_gpt2, _positive_zeros
from ast_jax.models.loading import permute_qk_for_gguf

__all__ = ["GGUF_TYPES", "gguf_tokenizer_metadata", "save_gguf"]

GGUF_TYPES = ("f32", "f16", "q8_0")
_Q8_BLOCK = 32
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# Common BOS / EOS spellings, tried in order when the ids are not given.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")


def _check_model(model_cfg: Any) -> None:
    if _is_gpt2(model_cfg):
        raise ValueError("save_gguf writes the llama architecture only; a GPT2Config model is not llama")
    if getattr(model_cfg, "attn_bias", False):
        raise ValueError(
            "the model has q/k/v biases (Qwen2): llama.cpp's 'llama' architecture has none, and save_gguf "
            "writes that architecture only"
        )
    if getattr(model_cfg, "rope_scaling", None) is not None:
        raise ValueError("RoPE scaling is not written by save_gguf (llama arch without rope.scaling.* only)")
    if getattr(model_cfg, "sliding_window", None) is not None:
        raise ValueError(
            "a sliding attention window (Mistral) is not part of llama.cpp's 'llama' architecture"
        )
    if model_cfg.head_dim * model_cfg.n_heads != model_cfg.d_model:
        raise ValueError(
            f"head_dim={model_cfg.head_dim} is not d_model / n_heads: the llama GGUF metadata written here "
            "derives the head size from embedding_length / head_count"
        )


def _gguf_tensors(model_cfg: Any, params: Any) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in GGUF row layout ``(out, in)`` (or ``(D,)`` for norms)."""
    flat = _flat_params(model_cfg, params)
    t = lambda path: np.ascontiguousarray(flat[path].T)
    out = {"token_embd.weight": flat[("embed", "embedding")]}
    for i in range(model_cfg.n_layers):
        lay, b = f"layers_{i}", f"blk.{i}."
        out[b + "attn_norm.weight"] = flat[(lay, "attn_norm", "scale")]
        out[b + "ffn_norm.weight"] = flat[(lay, "mlp_norm", "scale")]
        out[b + "attn_q.weight"] = permute_qk_for_gguf(
            t((lay, "attn", "q_proj", "kernel")), model_cfg.n_heads
        )
        out[b + "attn_k.weight"] = permute_qk_for_gguf(
            t((lay, "attn", "k_proj", "kernel")), model_cfg.n_kv_heads
        )
        out[b + "attn_v.weight"] = t((lay, "attn", "v_proj", "kernel"))
        out[b + "attn_output.weight"] = t((lay, "attn", "o_proj", "kernel"))
        out[b + "ffn_gate.weight"] = t((lay, "mlp", "gate_proj", "kernel"))
        out[b + "ffn_up.weight"] = t((lay, "mlp", "up_proj", "kernel"))
        out[b + "ffn_down.weight"] = t((lay, "mlp", "down_proj", "kernel"))
    out["output_norm.weight"] = flat[("final_norm", "scale")]
    if not model_cfg.tie_embeddings:
        out["output.weight"] = t(("lm_head", "kernel"))
    return out


# ---------------------------------------------------------------------------------------------------------
# tokenizer metadata
# ---------------------------------------------------------------------------------------------------------


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every dict in a tokenizer.json sub-tree (pre-tokenizer Sequences nest)."""
    if isinstance(node, dict):
        found = [node]
        for v in node.values():
            found += _walk(v)
        return found
    if isinstance(node, list):
        return [d for v in node for d in _walk(v)]
    return []


def _pre_tag(spec: Mapping[str, Any]) -> str:
    nodes = _walk(spec.get("pre_tokenizer"))
    types = {n.get("type") for n in nodes}
    if not spec["model"].get("merges") and types <= {"ByteLevel", "Sequence", "Digits", None}:
        return "gpt2"  # with no merges every byte is its own token, however the text is split first
    if any(n.get("type") == "Digits" and n.get("individual_digits") for n in nodes) and "ByteLevel" in types:
        return "smollm"  # digits split one by one, then the GPT-2 regex (llama.cpp's "smollm" tag)
    if types <= {"ByteLevel", "Sequence", None} and all(
        n.get("use_regex", True) for n in nodes if n.get("type") == "ByteLevel"
    ):
        return "gpt2"
    raise ValueError(
        f"cannot name the pre-tokenizer {sorted(t for t in types if t)} with a llama.cpp tag; "
        "pass tokenizer_pre= (tokenizer.ggml.pre) explicitly"
    )


def _merges(model: Mapping[str, Any]) -> list[str]:
    # tokenizer.json stores merges as "a b" strings (older files) or as [a, b] pairs (newer ones).
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _find(vocab: Mapping[str, int], names: Sequence[str]) -> int | None:
    return next((vocab[n] for n in names if n in vocab), None)


def gguf_tokenizer_metadata(
    tokenizer: Any,
    vocab_size: int,
    *,
    tokenizer_pre: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    add_bos_token: bool | None = None,
) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` entries for a ``tokenizers.Tokenizer`` (or an object with ``.inner``).

    Byte-level BPE (BPE model, ``ByteLevel`` pre-tokenizer): ``model = "gpt2"``, ``pre`` (``"smollm"`` when
    digits are split one by one, else ``"gpt2"``, or ``tokenizer_pre``), ``tokens``, ``merges``,
    ``token_type`` (3 special added tokens, 4 other added tokens, 1 normal); a vocabulary without merges
    (one token per byte) gets ``pre = "gpt2"`` and no ``merges`` key, because gguf cannot write an empty
    array (llama.cpp's loader wants the key, so such a file is for our reader only). SentencePiece-style BPE
    (``Metaspace`` or ``byte_fallback``) or Unigram: ``model = "llama"``, ``tokens``, ``scores`` (Unigram:
    the model's log-probabilities; BPE: ``-rank`` of the merge that forms the token, 0 for the base symbols),
    ``token_type`` (6 ``<0xXX>`` byte tokens, 3 control, 2 unknown, 1 normal), ``add_space_prefix``.
    ``tokens`` is padded to ``vocab_size`` with ``[PAD<i>]`` (type 5, unused) when the model's embedding has
    more rows than the tokenizer has tokens. Returns ``{key suffix: value}`` plus the bos/eos ids.
    """
    inner = getattr(tokenizer, "inner", tokenizer)
    if not hasattr(inner, "to_str"):
        raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, got {type(inner).__name__}")
    spec = json.loads(inner.to_str())
    model = spec["model"]
    vocab: dict[str, int] = dict(inner.get_vocab(with_added_tokens=True))
    n_tok = max(vocab.values()) + 1
    if n_tok > vocab_size:
        raise ValueError(f"the tokenizer has {n_tok} tokens but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 1
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    pre_nodes = _walk(spec.get("pre_tokenizer")) + _walk(spec.get("normalizer"))
    sentencepiece = model["type"] == "Unigram" or (
        model["type"] == "BPE"
        and (model.get("byte_fallback") or any(n.get("type") == "Metaspace" for n in pre_nodes))
    )
    meta: dict[str, Any] = {}
    if sentencepiece:
        unk = model.get("unk_token")
        unk_id = vocab.get(unk) if isinstance(unk, str) else (unk if isinstance(unk, int) else None)
        scores = [0.0] * vocab_size
        if model["type"] == "Unigram":
            for i, (_, score) in enumerate(model["vocab"]):
                scores[i] = float(score)
        else:
            for rank, merge in enumerate(_merges(model)):
                merged = merge.replace(" ", "")
                if merged in vocab and scores[vocab[merged]] == 0.0:
                    scores[vocab[merged]] = -float(rank + 1)
        for tok, i in vocab.items():
            if _BYTE_TOKEN.match(tok):
                types[i] = 6
        for i, a in added.items():
            types[i] = 3 if a.get("special") else 4
        if unk_id is not None:
            types[unk_id] = 2
        prefix = any(
            n.get("type") == "Metaspace" and n.get("prepend_scheme", "always") != "never" for n in pre_nodes
        )
        prefix = prefix or any(n.get("type") == "Prepend" for n in pre_nodes)
        meta |= {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types}
        meta["add_space_prefix"] = prefix
        if unk_id is not None:
            meta["unknown_token_id"] = unk_id
        default_add_bos = True
    elif model["type"] == "BPE" and any(n.get("type") == "ByteLevel" for n in pre_nodes):
        for i, a in added.items():
            types[i] = 3 if a.get("special") else 4
        meta |= {
            "model": "gpt2",
            "pre": tokenizer_pre or _pre_tag(spec),
            "tokens": tokens,
            "merges": _merges(model),
            "token_type": types,
        }
        default_add_bos = False
    else:
        raise ValueError(
            f"tokenizer model {model['type']!r} is neither byte-level BPE nor SentencePiece-style; "
            "it has no GGUF tokenizer.ggml.model"
        )
    bos = bos_token_id if bos_token_id is not None else _find(vocab, _BOS_NAMES)
    eos = eos_token_id if eos_token_id is not None else _find(vocab, _EOS_NAMES)
    if bos is not None:
        meta["bos_token_id"] = int(bos)
    if eos is not None:
        meta["eos_token_id"] = int(eos)
    meta["add_bos_token"] = default_add_bos if add_bos_token is None else bool(add_bos_token)
    return meta


def _write_tokenizer(writer: Any, meta: Mapping[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    if meta.get("merges"):
        # gguf's writer refuses empty arrays, so a merge-less vocabulary has no merges key at all.
        writer.add_token_merges(meta["merges"])
    if "scores" in meta:
        writer.add_token_scores(meta["scores"])
    writer.add_token_types(meta["token_type"])
    if "bos_token_id" in meta:
        writer.add_bos_token_id(meta["bos_token_id"])
    if "eos_token_id" in meta:
        writer.add_eos_token_id(meta["eos_token_id"])
    if "unknown_token_id" in meta:
        writer.add_unk_token_id(meta["unknown_token_id"])
    writer.add_add_bos_token(meta["add_bos_token"])
    if "add_space_prefix" in meta:
        writer.add_add_space_prefix(meta["add_space_prefix"])


# ---------------------------------------------------------------------------------------------------------
# save_gguf
# ---------------------------------------------------------------------------------------------------------


def save_gguf(
    path: str | os.PathLike,
    model_cfg: Any,
    params: Any,
    *,
    tokenizer: Any = None,
    gguf_type: str = "f32",
    name: str = "ast_jax model",
    tokenizer_pre: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    add_bos_token: bool | None = None,
) -> Path:
    """Write a :class:`~ast_jax.models.llama.Llama` as a llama-architecture GGUF file and return its path.

    Args:
      path: the file to write (its directory must exist).
      model_cfg: the ``LlamaConfig`` of ``params`` (no biases, no RoPE scaling; GPT-2: ``ValueError``).
      params: the model params (``{"params": ...}`` is unwrapped; SLoRB params: ``ValueError``).
      tokenizer: optional ``tokenizers.Tokenizer`` (or object with ``.inner``), written as
        ``tokenizer.ggml.*`` by :func:`gguf_tokenizer_metadata` (with ``tokenizer_pre``, the bos/eos ids and
        ``add_bos_token``, guessed from common token names when not given).
      gguf_type: ``"f32"``, ``"f16"`` or ``"q8_0"`` (see the module docstring; ``general.file_type`` follows).
      name: ``general.name``.

    Metadata: ``llama.context_length`` (``max_len``), ``embedding_length`` (D), ``block_count``,
    ``feed_forward_length``, ``rope.dimension_count`` (``head_dim``), ``attention.head_count(_kv)``,
    ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``, ``vocab_size``.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    _check_model(model_cfg)
    tensors = _gguf_tensors(model_cfg, params)
    tok_meta = None
    if tokenizer is not None:
        tok_meta = gguf_tokenizer_metadata(
            tokenizer,
            model_cfg.vocab_size,
            tokenizer_pre=tokenizer_pre,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            add_bos_token=add_bos_token,
        )
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_context_length(model_cfg.max_len)
        writer.add_embedding_length(model_cfg.d_model)
        writer.add_block_count(model_cfg.n_layers)
        writer.add_feed_forward_length(model_cfg.d_ff)
        writer.add_rope_dimension_count(model_cfg.head_dim)
        writer.add_head_count(model_cfg.n_heads)
        writer.add_head_count_kv(model_cfg.n_kv_heads)
        writer.add_layer_norm_rms_eps(float(model_cfg.norm_eps))
        writer.add_rope_freq_base(float(model_cfg.rope_base))
        writer.add_vocab_size(model_cfg.vocab_size)
        if tok_meta is not None:
            _write_tokenizer(writer, tok_meta)
        for tname, x in tensors.items():
            _add_tensor(writer, tname, x, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def _add_tensor(writer: Any, name: str, x: np.ndarray, gguf_type: str) -> None:
    import gguf

    if x.ndim == 1 or gguf_type == "f32":
        writer.add_tensor(name, _positive_zeros(x.astype(np.float32)))
    elif gguf_type == "q8_0" and x.shape[-1] % _Q8_BLOCK == 0:
        q = gguf.quants.quantize(_positive_zeros(x), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # f16, and the q8_0 fallback for rows that do not tile into blocks of 32
        writer.add_tensor(name, _positive_zeros(x.astype(np.float16)))
