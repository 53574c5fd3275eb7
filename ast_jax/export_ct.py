"""Sparse models out as compressed-tensors ``pack-quantized`` Hugging Face directories (W4A16 / W8A16).

:func:`save_compressed_tensors` writes a LLaMA-family model with its sparse linear layers quantised the way
llm-compressor writes ``W4A16`` / ``W8A16`` checkpoints (compressed-tensors format ``pack-quantized``,
symmetric, group-wise along the input dimension), which vLLM serves with its Marlin/Machete kernels and
transformers loads (and decompresses) through its compressed-tensors integration. Everything that is not a
quantised layer -- tensor names, ``config.json``, tokenizer, generation config, the ``ast_sparsity``
record, sharding -- is written as :func:`ast_jax.export_hf.save_hf` writes it.

The compressed-tensors layout (matched against compressed-tensors 0.20.1)
--------------------------------------------------------------------------
For a Linear weight ``W`` (out, in) and group size ``g`` (dense input columns, must divide ``in``), per group
of ``g`` consecutive input columns of one output row, with ``q_min = -2^(b-1)``, ``q_max = 2^(b-1) - 1``::

    s = max|W_g| / ((q_max - q_min) / 2)        # = max|W_g| / 7.5 for int4, / 127.5 for int8
    s = eps(dtype) where s == 0                 # stored as weight_scale (out, in/g) in the model dtype
    q = round_half_to_even(clamp(W / s, q_min, q_max))      # int in [q_min, q_max]
    W_hat = q · s

(compressed-tensors' ``calculate_qparams``, ``round_to_quantized_type_args``: clamp, then ``torch.round``).
A pruned weight is ``0``, so ``q = 0`` and ``W_hat = 0``: the N:M pattern survives dequantisation.
``weight_packed`` (out, ceil(in·b/32)) int32: the unsigned values ``u = q - q_min`` of one row, element ``j``
at bit ``j·b`` of a little-endian bit stream (8 int4 or 4 int8 values per word, element ``j`` in word
``j // (32/b)`` at shift ``b·(j mod 32/b)``); ``weight_shape`` int64 ``[out, in]``. The layer's ``weight``
itself is not written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ast_jax.export_hf import (
    _DTYPES,
    SPARSITY_KEY,
    _check_dtype,
    _config,
    _is_gpt2,
    _positive_zeros,
    _sparse_names,
    _sparsity_record,
    _write_dir,
    torch_state_dict,
)

__all__ = [
    "dequantize_compressed_tensors",
    "pack_int32",
    "quantize_group_symmetric",
    "save_compressed_tensors",
    "unpack_int32",
]


def _qrange(bits: int) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 (W4A16 / W8A16), got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize_group_symmetric(
    w: np.ndarray, bits: int, group_size: int, scale_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric group-wise int quantisation of a Linear weight ``w`` (out, in), as compressed-tensors does.

    Per group ``G`` of ``group_size`` consecutive input columns of one row:
    ``s = max_G |w| / ((q_max - q_min) / 2)`` (``eps`` of the scale dtype where that is 0), rounded to
    ``scale_dtype``; ``q = round_half_even(clamp(w / s, q_min, q_max))`` with ``q_min = -2^(b-1)``,
    ``q_max = 2^(b-1) - 1``. Returns ``(q int8 (out, in), s (out, in / group_size) in scale_dtype)``.
    """
    q_min, q_max = _qrange(bits)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D (out, in) weight, got shape {w.shape}")
    if group_size < 1 or w.shape[1] % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the input dimension {w.shape[1]} (shape {w.shape})"
        )
    sdt = _DTYPES[scale_dtype]
    g = w.reshape(w.shape[0], -1, group_size)
    s = (np.abs(g).max(axis=-1) / np.float32((q_max - q_min) / 2)).astype(sdt)
    s = np.where(s == 0, np.asarray(ml_dtypes.finfo(sdt).eps, sdt), s)
    s32 = s.astype(np.float32)
    q = np.round(np.clip(g / s32[..., None], q_min, q_max))  # np.round rounds half to even, as torch.round
    return q.reshape(w.shape).astype(np.int8), s


def pack_int32(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack int values ``q`` (rows, cols) in ``[-2^(b-1), 2^(b-1))`` into int32 ``(rows, ceil(cols·b/32))``.

    ``u = q + 2^(b-1)``; element ``j`` of a row occupies bits ``b·(j mod 32/b)`` .. of word ``j // (32/b)``
    (a little-endian bit stream; unused trailing bits are 0). compressed-tensors' ``pack_to_int32`` layout.
    """
    q_min, q_max = _qrange(bits)
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"q must be 2-D, got shape {q.shape}")
    if q.size and (q.min() < q_min or q.max() > q_max):
        raise ValueError(f"q holds values outside [{q_min}, {q_max}]")
    per = 32 // bits
    rows, cols = q.shape
    u = (q.astype(np.int64) - q_min).astype(np.uint32)
    u = np.pad(u, ((0, 0), (0, -cols % per))).reshape(rows, -1, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None]
    words = np.bitwise_or.reduce(u << shifts, axis=-1).astype(np.uint32)
    return words.view(np.int32)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_int32`: int32 ``(rows, words)`` -> int8 ``(rows, cols)``."""
    q_min, _ = _qrange(bits)
    per = 32 // bits
    words = np.asarray(packed).view(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None]
    u = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return (u.reshape(words.shape[0], -1)[:, :cols].astype(np.int64) + q_min).astype(np.int8)


def dequantize_compressed_tensors(
    weight_packed: np.ndarray, weight_scale: np.ndarray, weight_shape: Any, bits: int, group_size: int
) -> np.ndarray:
    """Dense weight ``(out, in)`` from a ``pack-quantized`` layer: ``W_hat[o, j] = q[o, j] · s[o, j // g]``.

    ``weight_packed`` int32 (out, ceil(in·b/32)), ``weight_scale`` (out, in/g) in any float dtype,
    ``weight_shape`` ``[out, in]``. The product is computed in float32 and returned in the scale's dtype
    (what compressed-tensors' ``dequantize`` returns).
    """
    out_f, in_f = (int(x) for x in np.asarray(weight_shape).reshape(-1))
    q = unpack_int32(weight_packed, bits, in_f)
    scale = np.asarray(weight_scale)
    if q.shape[0] != out_f or scale.shape != (out_f, in_f // group_size):
        raise ValueError(f"packed {q.shape} / scale {scale.shape} do not fit weight_shape {[out_f, in_f]}")
    s = np.repeat(scale.astype(np.float32), group_size, axis=1)
    return (q.astype(np.float32) * s).astype(scale.dtype)


def _quant_config(bits: int, group_size: int, ignore: list[str]) -> dict[str, Any]:
    try:
        from compressed_tensors import __version__ as ct_version
    except ImportError:  # the format does not depend on the package; the version is informative only
        ct_version = "0.20.1"
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "version": ct_version,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": group_size,
                    "dynamic": False,
                    "actorder": None,
                    "block_structure": None,
                    "observer": "minmax",
                    "observer_kwargs": {},
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def save_compressed_tensors(
    out_dir: str | os.PathLike,
    model_cfg: Any,
    params: Any,
    *,
    bits: int = 4,
    group_size: int = 128,
    sparse_filter: Callable[[tuple[str, ...], Any], bool] | None = None,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    generation_config: Mapping[str, Any] | None = None,
    dtype: str = "bfloat16",
    sparsity: Mapping[str, Any] | None = None,
    max_shard_bytes: int = 2 * 2**30,
) -> Path:
    """Write a LLaMA-family model as a compressed-tensors ``pack-quantized`` W4A16 / W8A16 directory.

    Every linear layer ``sparse_filter`` selects (default :func:`~ast_jax.sparsify.default_sparse_filter`:
    all linear layers inside the blocks, never embeddings or the LM head) is stored as ``weight_packed``
    int32 ``(out, ceil(in·b/32))``, ``weight_scale`` ``(out, in/group_size)`` in ``dtype`` and
    ``weight_shape`` int64 ``[out, in]``, quantised with :func:`quantize_group_symmetric`
    (``s = max|W_g| / ((2^b - 1)/2)``, ``q = round(clamp(W/s, -2^(b-1), 2^(b-1)-1))``); other tensors as in
    :func:`save_hf`. ``config.json["quantization_config"]`` names the scheme (``ignore``: ``lm_head`` and
    the linear layers not selected). ``group_size`` must divide every quantised layer's input dimension.
    ``sparsity`` is verified on the dequantised weights ``q·s`` and recorded as in :func:`save_hf`.

    GPT-2 is refused: its ``Conv1D`` layers are not ``nn.Linear``, which compressed-tensors targets.
    """
    if _is_gpt2(model_cfg):
        raise ValueError(
            "compressed-tensors quantises nn.Linear layers; Hugging Face GPT-2 uses Conv1D, so it cannot be "
            "written as pack-quantized (use save_hf)"
        )
    _check_dtype(dtype)
    _qrange(bits)
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    sd, src = torch_state_dict(model_cfg, params)
    quantised = _sparse_names(model_cfg, params, src, sparse_filter)
    bad = [f"{n} (in={sd[n].shape[1]})" for n in quantised if sd[n].shape[1] % group_size]
    if bad:
        widths = sorted({int(sd[n].shape[1]) for n in quantised})
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"group_size={group_size} does not divide the input dimension of {shown}; input widths here: "
            f"{widths} (choose a group size dividing all of them, e.g. --group-size 64 for 576 and 1536)"
        )
    linear = [n for n in src if n.endswith(".weight")]
    ignore = sorted({"lm_head"} | {n[: -len(".weight")] for n in linear if n not in quantised})
    cfg = _config(model_cfg, hf_config, dtype, tokenizer)
    cfg["quantization_config"] = _quant_config(bits, group_size, ignore)
    tensors: dict[str, np.ndarray] = {}
    dequantised: dict[str, np.ndarray] = {}
    for name, x in sd.items():
        if name not in quantised:
            tensors[name] = _positive_zeros(x.astype(_DTYPES[dtype]))
            continue
        q, s = quantize_group_symmetric(x, bits, group_size, dtype)
        module = name[: -len(".weight")]
        tensors[module + ".weight_packed"] = pack_int32(q, bits)
        tensors[module + ".weight_scale"] = s
        tensors[module + ".weight_shape"] = np.asarray(x.shape, dtype=np.int64)
        dequantised[name] = q.astype(np.float32) * np.repeat(s.astype(np.float32), group_size, axis=1)
    record = _sparsity_record(sparsity, quantised, {**tensors, **dequantised})
    if record is not None:
        cfg[SPARSITY_KEY] = record
    return _write_dir(out_dir, tensors, cfg, tokenizer_dir, tokenizer, generation_config, max_shard_bytes)
