"""N:M sparse decode: the compressed-weight matmul against dense bf16 ``jnp.dot``, per layer and end to end.

Per layer shape of SmolLM2-135M (576x576, 576x192, 576x1536, 1536x576) and a 7B-sized MLP layer
(4096x11008), batch 1 / 8 / 64, 2:4 with bf16 / int8 / int4 kept values: the time of
:func:`ast_jax.kernels.nm_matmul` and of a dense bf16 ``jnp.dot`` on the same device, the speed-up, and the
achieved memory bandwidth (bytes read: weights in their stored layout + activations + output, / time) as a
fraction of the device peak (``--peak-gbps``; default by device kind). Then end-to-end greedy decode
tokens/s of SmolLM2-135M (magnitude 2:4 + int4, group 128) through
:func:`ast_jax.sparse_inference.sparse_generate` against the dense bf16 model through
:func:`ast_jax.generate.generate`: the same generator, same prompts, batch 1 and 8.

``--quick`` (CPU): two small shapes, batch 1 and 8, 3 reps, the kernel in Pallas *interpret* mode plus the
plain-JAX fallback (``--impl``), and the end-to-end run on the first 2 blocks with the fallback. Interpret
timings say nothing about GPU speed; they record that the path runs and agrees with the reference.

    python benchmarks/bench_sparse_decode.py --json out.json          # GPU: the speed figures
    python benchmarks/bench_sparse_decode.py --quick --json out.json  # CPU: correctness + smoke timings
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.export_codec import ExportConfig, compress_nm, decompress_nm
from ast_jax.kernels import nm_matmul, to_kernel_layout

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 11008)]
QUICK_SHAPES = [(576, 192), (576, 576)]
PEAK_GBPS = {"h200": 4800.0, "h100": 3350.0, "a100": 2039.0, "l4": 300.0, "cpu": 50.0}


def _peak_for(device: Any) -> float:
    kind = getattr(device, "device_kind", "cpu").lower()
    for key, gbps in PEAK_GBPS.items():
        if key in kind:
            return gbps
    return PEAK_GBPS["cpu"] if device.platform == "cpu" else float("nan")


def _time(fn: Any, *args: Any, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _sparse_weight(k: int, o: int, rng: np.random.Generator) -> np.ndarray:
    w = (rng.standard_normal((k, o)) * 0.02).astype(np.float32)
    g = w.reshape(k // 4, 4, o)
    np.put_along_axis(g, np.argsort(np.abs(g), axis=1)[:, :2, :], 0.0, axis=1)  # magnitude 2:4
    import ml_dtypes

    return g.reshape(k, o).astype(ml_dtypes.bfloat16)


def bench_layers(args: argparse.Namespace, peak: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    bit_widths = [None, 4] if args.quick else [None, 8, 4]
    for k, o in shapes:
        w = _sparse_weight(k, o, rng)
        wd = jnp.asarray(w)
        dense_fn = jax.jit(lambda x, wd: jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype))
        for bits in bit_widths:
            c = compress_nm(w, ExportConfig(n=2, m=4, bits=bits, group_size=128))
            kw = to_kernel_layout(c, block_q=args.block_q, block_out=args.block_out)
            ref_w = jnp.asarray(decompress_nm(c))
            for b in args.batches:
                x = jnp.asarray(rng.standard_normal((b, k)), jnp.bfloat16)
                io_bytes = 2 * b * (k + o)
                t_dense = _time(dense_fn, x, wd, reps=args.reps)
                ref = np.asarray(dense_fn(x, ref_w), np.float32)
                for impl in args.impl:
                    fn = jax.jit(lambda x, kw, impl=impl: nm_matmul(x, kw, impl=impl))
                    label = "bf16" if bits is None else f"int{bits}"
                    try:
                        y = np.asarray(fn(x, kw), np.float32)
                        t = _time(fn, x, kw, reps=args.reps)
                    except Exception as e:  # e.g. a Triton lowering failure: record it, keep the other rows
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                        rows.append(
                            {"in": k, "out": o, "batch": b, "bits": label, "impl": impl, "error": msg}
                        )
                        print(f"{k:>5}x{o:<5} B={b:<3} {label:>4} {impl:>9}: FAILED {msg}", flush=True)
                        continue
                    err = float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
                    row = {
                        "in": k,
                        "out": o,
                        "batch": b,
                        "bits": label,
                        "impl": impl,
                        "t_sparse_us": t * 1e6,
                        "t_dense_bf16_us": t_dense * 1e6,
                        "speedup_vs_dense": t_dense / t,
                        "bytes_sparse": kw.nbytes + io_bytes,
                        "bytes_dense": 2 * k * o + io_bytes,
                        "gbps_sparse": (kw.nbytes + io_bytes) / t / 1e9,
                        "gbps_dense": (2 * k * o + io_bytes) / t_dense / 1e9,
                        "max_rel_err_vs_dense_of_dequantised": err,
                    }
                    row["frac_peak_sparse"] = row["gbps_sparse"] / peak
                    row["frac_peak_dense"] = row["gbps_dense"] / peak
                    rows.append(row)
                    print(
                        f"{k:>5}x{o:<5} B={b:<3} {label:>4} {impl:>9}: sparse {row['t_sparse_us']:10.1f} us"
                        f"  dense {row['t_dense_bf16_us']:9.1f} us  x{row['speedup_vs_dense']:6.3f}"
                        f"  {row['gbps_sparse']:8.2f} GB/s ({100 * row['frac_peak_sparse']:5.1f}% peak)"
                        f"  dense {row['gbps_dense']:8.2f} GB/s  err {err:.1e}",
                        flush=True,
                    )
    return rows


def bench_e2e(args: argparse.Namespace) -> dict[str, Any]:
    from ast_jax.export_cli import prune_oneshot
    from ast_jax.generate import generate
    from ast_jax.kernels import nm_dense
    from ast_jax.model_source import load_model
    from ast_jax.sparse_inference import compress_for_inference, sparse_generate

    loaded = load_model("", max_layers=args.e2e_layers)
    cfg = dataclasses.replace(loaded.model.cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = type(loaded.model)(cfg)
    pruned, _ = prune_oneshot(loaded.model, loaded.params, None, "magnitude")
    to_bf16 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), t)
    dense_params = to_bf16(loaded.params)
    dense_rest, weights = compress_for_inference(
        to_bf16(pruned), 2, 4, bits=4, group_size=128, block_q=args.block_q, block_out=args.block_out
    )
    impl = args.e2e_impl
    # The same pruned + int4 weights as a plain dense tree: the compressed path must decode the same tokens.
    deq = jax.tree.map(lambda a: a, dense_rest)
    for p, w in weights.items():
        node = deq
        for key in p.split("/")[:-1]:
            node = node.setdefault(key, {})
        node["kernel"] = nm_dense(w)
    out: dict[str, Any] = {"layers": cfg.n_layers, "impl": impl, "new_tokens": args.new_tokens, "rows": []}
    rng = np.random.default_rng(1)
    for b in args.e2e_batches:
        prompts = rng.integers(0, cfg.vocab_size, size=(b, 16)).astype(np.int32)

        def run_dense(n: int, prompts: np.ndarray = prompts) -> Any:
            return generate(model, dense_params, prompts, max_new_tokens=n).tokens

        def run_sparse(n: int, prompts: np.ndarray = prompts) -> Any:
            return sparse_generate(model, dense_rest, weights, prompts, max_new_tokens=n, impl=impl).tokens

        res: dict[str, Any] = {"batch": b}
        try:
            for name, fn in (("dense_bf16", run_dense), ("sparse_2of4_int4", run_sparse)):
                # Decode time = t(N new tokens) - t(1 new token): prefill and first token cancel out.
                t_n = _time(fn, args.new_tokens, reps=args.e2e_reps)
                t_1 = _time(fn, 1, reps=args.e2e_reps)
                res[f"{name}_tok_s"] = b * (args.new_tokens - 1) / max(t_n - t_1, 1e-9)
            res["sparse_over_dense"] = res["sparse_2of4_int4_tok_s"] / res["dense_bf16_tok_s"]
            ref = generate(model, deq, prompts, max_new_tokens=args.new_tokens).tokens
            res["tokens_equal"] = float((np.asarray(run_sparse(args.new_tokens)) == np.asarray(ref)).mean())
        except Exception as e:  # a lowering failure of the kernel: keep what was measured
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"e2e B={b}: FAILED {res['error']}", flush=True)
            out["rows"].append(res)
            continue
        out["rows"].append(res)
        print(
            f"e2e SmolLM2-135M ({cfg.n_layers} blocks) B={b}: "
            f"dense bf16 {res['dense_bf16_tok_s']:.1f} tok/s, "
            f"2:4+int4 [{impl}] {res['sparse_2of4_int4_tok_s']:.1f} tok/s, "
            f"ratio x{res['sparse_over_dense']:.3f}, "
            f"greedy tokens equal to the decompressed-dense run: {100 * res['tokens_equal']:.0f}%",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small shapes, interpret + fallback")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--peak-gbps", type=float, help="device peak memory bandwidth (default by device kind)")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes of the layer runs")
    ap.add_argument("--impl", nargs="+", help="nm_matmul implementations (pallas, interpret, reference)")
    ap.add_argument("--reps", type=int, help="timed repetitions (median)")
    ap.add_argument("--block-q", type=int, default=16)
    ap.add_argument("--block-out", type=int, default=64)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--new-tokens", type=int, help="decoded tokens per end-to-end run")
    args = ap.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    args.batches = args.batches or ([1, 8] if args.quick else [1, 8, 64])
    args.impl = args.impl or (
        ["interpret", "reference"] if args.quick else (["pallas"] if gpu else ["reference"])
    )
    args.reps = args.reps or (3 if args.quick else 50)
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    args.e2e_layers = 2 if args.quick else 0
    args.e2e_batches = [1] if args.quick else [1, 8]
    args.e2e_reps = 1 if args.quick else 5
    args.e2e_impl = "reference" if args.quick else ("pallas" if gpu else "reference")
    dev = jax.devices()[0]
    peak = args.peak_gbps or _peak_for(dev)
    header = {
        "device": getattr(dev, "device_kind", dev.platform),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "peak_gbps": peak,
        "quick": args.quick,
        "impls": args.impl,
        "block_q": args.block_q,
        "block_out": args.block_out,
    }
    print(json.dumps(header), flush=True)
    result: dict[str, Any] = {"header": header, "layers": bench_layers(args, peak)}
    if not args.skip_e2e:
        result["e2e"] = bench_e2e(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
