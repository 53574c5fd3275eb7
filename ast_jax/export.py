"""Deployable N:M sparse export of whole param trees, and the public namespace of the export.

This module compresses a params pytree leaf by leaf (:func:`compress_params`, :func:`decompress_params`),
collects the AWQ calibration inputs (:func:`collect_dense_inputs`) and reports sizes (:func:`size_report`,
:func:`format_size_table`). Every public name of the export is importable from here, including those of

* :mod:`ast_jax.export_codec` -- one kernel: the N:M layout, bit packing, int8/int4 quantisation and AWQ
  (:class:`CompressedNM`, :class:`ExportConfig`, :func:`compress_nm`, :func:`decompress_nm`, ...);
* :mod:`ast_jax.export_format` -- the on-disk format: manifest schema, SHA-256 records, validation and
  :class:`ExportIntegrityError`;
* :mod:`ast_jax.export_io` -- atomic :func:`save_compressed` and fully verified :func:`load_compressed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ast_jax.export_codec import (
    CompressedNM,
    ExportConfig,
    _as_numpy,
    awq_output_error,
    compress_nm,
    decompress_nm,
    pack_bits,
    unpack_bits,
)
from ast_jax.export_format import FORMAT as FORMAT
from ast_jax.export_format import ExportIntegrityError
from ast_jax.export_io import load_compressed, save_compressed
from ast_jax.sparsify import SparseFilter, default_sparse_filter, key_path, path_str, sparse_paths

__all__ = [
    "CompressedNM",
    "ExportConfig",
    "ExportIntegrityError",
    "awq_output_error",
    "collect_dense_inputs",
    "compress_nm",
    "compress_params",
    "decompress_nm",
    "decompress_params",
    "format_size_table",
    "load_compressed",
    "pack_bits",
    "save_compressed",
    "size_report",
    "unpack_bits",
]


# ---------------------------------------------------------------------------------------------------------
# Whole param trees


def compress_params(
    params: Any,
    config: ExportConfig = ExportConfig(),
    *,
    sparse_filter: SparseFilter | None = None,
    masks: Mapping[str, Any] | None = None,
    calib_inputs: Mapping[str, Any] | None = None,
) -> dict[str, CompressedNM | np.ndarray]:
    """Compress every sparse kernel of a params pytree; other leaves are kept dense on the host.

    Which kernels are sparse is decided by ``sparse_filter(path_tuple, leaf)`` (default:
    :func:`ast_jax.sparsify.default_sparse_filter`, the same rule training uses). Returns a flat
    ``{path: CompressedNM | np.ndarray}`` dict in pytree order, ``path`` being ``/``-joined keys such as
    ``"block_0/attn/q/kernel"``. ``masks`` and ``calib_inputs`` are optional ``{path: array}`` maps (the mask
    of a kernel; its calibration inputs ``(tokens, in)`` for AWQ, see :func:`collect_dense_inputs`).
    """
    f = default_sparse_filter if sparse_filter is None else sparse_filter
    out: dict[str, CompressedNM | np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        kp = key_path(path)
        p = path_str(kp)
        if f(kp, leaf):
            out[p] = compress_nm(
                leaf,
                config,
                mask=None if masks is None else masks.get(p),
                calib_inputs=None if calib_inputs is None else calib_inputs.get(p),
                name=p,
            )
        else:
            out[p] = _as_numpy(leaf, p)
    return out


def decompress_params(model: Mapping[str, CompressedNM | np.ndarray]) -> dict[str, Any]:
    """Nested-dict params (the layout of a Flax params pytree) from :func:`compress_params`'s output."""
    tree: dict[str, Any] = {}
    for p, leaf in model.items():
        node = tree
        *parents, last = p.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = decompress_nm(leaf) if isinstance(leaf, CompressedNM) else np.asarray(leaf)
    return tree


# ---------------------------------------------------------------------------------------------------------
# Size report


def size_report(model: Mapping[str, CompressedNM | np.ndarray]) -> dict[str, Any]:
    """Bytes of the sparse layers, compressed vs dense FP32 and BF16 (dense leaves are not counted).

    Returns ``{"layers": [{"path", "shape", "compressed_bytes", "fp32_bytes", "bf16_bytes"}, ...],
    "compressed_bytes", "fp32_bytes", "bf16_bytes", "ratio_fp32", "ratio_bf16", "bits_per_weight"}`` where the
    ratios are dense bytes / compressed bytes over all sparse layers.
    """
    rows = []
    for p, leaf in model.items():
        if isinstance(leaf, CompressedNM):
            size = int(np.prod(leaf.shape))
            rows.append(
                {
                    "path": p,
                    "shape": list(leaf.shape),
                    "compressed_bytes": leaf.nbytes,
                    "fp32_bytes": 4 * size,
                    "bf16_bytes": 2 * size,
                }
            )
    comp = sum(r["compressed_bytes"] for r in rows)
    fp32 = sum(r["fp32_bytes"] for r in rows)
    bf16 = sum(r["bf16_bytes"] for r in rows)
    return {
        "layers": rows,
        "compressed_bytes": comp,
        "fp32_bytes": fp32,
        "bf16_bytes": bf16,
        "ratio_fp32": fp32 / comp if comp else float("nan"),
        "ratio_bf16": bf16 / comp if comp else float("nan"),
        "bits_per_weight": 8 * comp / (fp32 / 4) if fp32 else float("nan"),
    }


def format_size_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table with one row per ``{label: size_report(...)}`` entry."""
    lines = [
        "| export | sparse-layer bytes | dense FP32 bytes | dense BF16 bytes | x vs FP32 | x vs BF16 "
        "| bits/weight |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in reports.items():
        lines.append(
            f"| {label} | {r['compressed_bytes']:,} | {r['fp32_bytes']:,} | {r['bf16_bytes']:,} | "
            f"{r['ratio_fp32']:.2f} | {r['ratio_bf16']:.2f} | {r['bits_per_weight']:.3f} |"
        )
    return "\n".join(lines)


def collect_dense_inputs(
    model: nn.Module,
    params: Any,
    batch: Any,
    *,
    sparse_filter: SparseFilter | None = None,
    max_tokens: int = 512,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs of every sparse ``flax.linen.Dense`` layer during ``model.apply({"params": params}, batch)``.

    Returns ``{path: (tokens, in) float32}`` keyed like :func:`compress_params` (``"block_0/attn/q/kernel"``),
    keeping the first ``max_tokens`` rows per layer: the calibration inputs of the AWQ search. Runs eagerly.
    """
    wanted = {path_str(p) for p in sparse_paths(params, sparse_filter)}
    captured: dict[str, np.ndarray] = {}

    def hook(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Dense) and context.method_name == "__call__" and args:
            key = path_str((*tuple(mod.path), "kernel"))
            if key in wanted:
                x = np.asarray(jax.device_get(args[0]), np.float32)
                x = x.reshape(-1, x.shape[-1])
                prev = captured.get(key)
                captured[key] = (x if prev is None else np.concatenate([prev, x]))[:max_tokens]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(hook):
        model.apply({"params": params}, batch, **dict(apply_kwargs or {}))
    return captured


if __name__ == "__main__":  # python -m ast_jax.export: the command line lives in ast_jax.export_cli
    from ast_jax.export_cli import main

    raise SystemExit(main())
