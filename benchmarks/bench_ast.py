"""Two costs of AST in JAX, from one run (issue 4, must-show 3).

(a) ``nm_mask`` on a 4096x4096 float32 matrix (jitted) against a per-group loop reference: PyTorch with
    ``torch.topk`` per group of rows (the authors' style) when torch is importable, else NumPy with a
    Python loop over the 1,024 row groups. Target: >= 30x.
(b) One full AST training step (straight-through masking, Annealing SR-STE AdamW, mask refresh every 10
    steps amortised, KL + CE distillation from the dense teacher, SLoRB off) against the plain dense step of
    the same student with optax AdamW and the same loss on the same batches. Target: <= 1.10x.

Run: ``python benchmarks/bench_ast.py`` (``--quick`` for a smaller smoke run). Times are medians over
interleaved repetitions, after compilation.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Let `python benchmarks/bench_ast.py` work from a source checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ast_jax.distill import LossConfig
from ast_jax.masks import nm_mask
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.optim import sparse_adamw
from ast_jax.step import init_train_state, make_train_step


def _timeit(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def loop_reference(w: np.ndarray, n: int = 2, m: int = 4):
    """Per-group loop: for each group of m rows, keep the top-n |w| of every column."""
    try:
        import torch

        wt = torch.from_numpy(w)

        def run():
            mask = torch.zeros_like(wt, dtype=torch.bool)
            for g in range(0, wt.shape[0], m):
                idx = torch.topk(wt[g : g + m].abs(), n, dim=0).indices
                mask[g : g + m].scatter_(0, idx, True)
            return mask.numpy()

        return run, "pytorch topk loop over row groups"
    except ImportError:

        def run():
            mask = np.zeros(w.shape, bool)
            cols = np.arange(w.shape[1])
            for g in range(0, w.shape[0], m):
                idx = np.argsort(-np.abs(w[g : g + m]), axis=0, kind="stable")[:n]
                mask[g + idx, cols[None, :]] = True
            return mask

        return run, "numpy argsort loop over row groups"


def bench_mask(size: int, reps: int) -> dict:
    w = np.asarray(jax.random.normal(jax.random.key(0), (size, size), jnp.float32))
    wj = jnp.asarray(w)
    f = jax.jit(lambda x: nm_mask(x, 2, 4))
    ours = np.asarray(f(wj).block_until_ready())
    ref_fn, ref_name = loop_reference(w)
    ref = ref_fn()
    # Random normal weights have no ties, so both must agree exactly.
    if not np.array_equal(ours, ref):
        raise AssertionError("nm_mask disagrees with the loop reference")
    t_jax = statistics.median(_timeit(lambda: f(wj).block_until_ready(), reps))
    t_ref = statistics.median(_timeit(ref_fn, max(2, reps // 3)))
    return {
        "size": size,
        "jax_ms": 1e3 * t_jax,
        "reference_ms": 1e3 * t_ref,
        "reference": ref_name,
        "speedup": t_ref / t_jax,
    }


def bench_step(cfg: GPT2Config, batch: int, steps: int, rounds: int) -> dict:
    model = GPT2(cfg)
    teacher = model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    loss = LossConfig()  # 0.67 KL + 0.33 CE, both steps
    decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
    tx_dense = optax.adamw(1e-4, b2=0.99, weight_decay=0.1, mask=decay_mask)
    tx_ast = sparse_adamw(1e-4, max_decay=1e-2, ramp_steps=100, mask_every=10, b2=0.99, weight_decay=0.1)
    rng = np.random.default_rng(0)
    batches = [
        {
            "inputs": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.max_len)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.max_len)), jnp.int32),
        }
        for _ in range(steps)
    ]
    runs = {}
    for name, tx in (("dense_adamw", tx_dense), ("ast", tx_ast)):
        step = jax.jit(make_train_step(model, teacher, tx, loss))
        state = init_train_state(teacher, tx)
        state, _ = step(state, batches[0])  # compile
        jax.block_until_ready(state)
        runs[name] = [step, state]

    def run_block(name):
        step, state = runs[name]
        for b in batches:  # `steps` is a multiple of 10, so each block holds the same number of refreshes
            state, _ = step(state, b)
        jax.block_until_ready(state)
        runs[name][1] = state

    times = {"dense_adamw": [], "ast": []}
    for _ in range(rounds):
        for name in ("dense_adamw", "ast"):
            t = time.perf_counter()
            run_block(name)
            times[name].append((time.perf_counter() - t) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(teacher))
    return {
        "model": {
            "n_layer": cfg.n_layer,
            "d_model": cfg.d_model,
            "seq_len": cfg.max_len,
            "batch": batch,
            "params": int(n_params),
        },
        "dense_ms_per_step": 1e3 * med["dense_adamw"],
        "ast_ms_per_step": 1e3 * med["ast"],
        "ratio": med["ast"] / med["dense_adamw"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    if a.quick:
        mask = bench_mask(512, 5)
        step = bench_step(GPT2Config(n_layer=1, d_model=64, n_head=2, max_len=32), 4, 10, 2)
    else:
        mask = bench_mask(4096, 15)
        step = bench_step(GPT2Config(n_layer=4, d_model=256, n_head=4, max_len=128), 16, 20, 5)
    print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}")
    print(
        f"(a) nm_mask {mask['size']}x{mask['size']} float32: jax {mask['jax_ms']:.1f} ms vs "
        f"{mask['reference']} {mask['reference_ms']:.1f} ms -> {mask['speedup']:.1f}x faster (target >= 30x)"
    )
    m = step["model"]
    print(
        f"(b) training step, GPT-2-style {m['n_layer']}x{m['d_model']} ({m['params']:,} params), batch "
        f"{m['batch']}x{m['seq_len']}, KL+CE distillation: dense AdamW {step['dense_ms_per_step']:.1f} ms, "
        f"AST {step['ast_ms_per_step']:.1f} ms -> {step['ratio']:.3f}x (target <= 1.10x)"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"nm_mask": mask, "step": step}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
