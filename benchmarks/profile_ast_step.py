"""Where the time of one AST training step goes on XLA:CPU (the profile behind the README's step ratio).

Runs the step of ``bench_vs_torch.py`` (GPT-2-style 4x256, batch 16x128, ``sparse_adamw``, KL + CE against
the dense teacher) under ``jax.profiler`` with XLA's per-thunk trace events, then matches each event to its
instruction in the optimised HLO (dumped by XLA itself) and prints:

- the wall time per step and the summed thunk time (larger when thunks run at the same time);
- every matrix product: its shapes, its op name (forward ``GPT2/``, student ``jvp(GPT2)/``, backward
  ``transpose(jvp(GPT2))/``), milliseconds and GFLOP/s (``2 * prod(out) * contracted size / time``);
- the summed time per kind of other fusion (copies, element-wise, broadcasts).

    python benchmarks/profile_ast_step.py            # about 1 minute on 2 cores
    python benchmarks/profile_ast_step.py --top 20
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time


def _shape(text: str) -> list[int]:
    return [int(x) for x in re.search(r"\[([\d,]*)\]", text).group(1).split(",") if x]


def _hlo_tables(path: str) -> dict[str, dict]:
    """Tables of an optimised-HLO text file: ``lines`` (instruction -> its line), ``comps`` (computation ->
    its lines), ``calls`` (fusion instruction -> the computation it calls), ``shapes`` (instruction ->
    its shape, e.g. ``f32[2048,256]{1,0}``)."""
    lines_of: dict[str, str] = {}
    comps: dict[str, list[str]] = {}
    calls: dict[str, str] = {}
    current = None
    for line in open(path).read().splitlines():
        if line and not line.startswith(" ") and "{" in line:
            current = line.split()[0].lstrip("%")
            comps[current] = []
            continue
        if current is None:
            continue
        comps[current].append(line)
        m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            lines_of.setdefault(m.group(1), line.strip())
        m = re.search(r"%([\w.\-]+) = .* calls=%([\w.\-]+)", line)
        if m:
            calls[m.group(1)] = m.group(2)
    shapes = {k: re.search(r"= (\S+) ", v).group(1) for k, v in lines_of.items()}
    return {"lines": lines_of, "comps": comps, "calls": calls, "shapes": shapes}


def _dot_of(lines: list[str], shapes: dict[str, str]) -> tuple[str, float] | None:
    """(description, GFLOP) of the first dot among ``lines``, or None if there is none.

    HLO instruction names are unique in a module, so one name -> shape table serves fused and plain dots.
    """
    dots = [line.strip() for line in lines if " dot(" in line]
    if not dots:
        return None
    d = dots[0]
    out = re.search(r"= (\S+) dot", d).group(1)
    a, b = re.search(r"dot\(%([\w.\-]+), %([\w.\-]+)\)", d).groups()
    k = 1
    for c in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", d).group(1).split(","):
        k *= _shape(shapes[a])[int(c)]
    n = 1
    for x in _shape(out):
        n *= x
    op = re.search(r'op_name="([^"]*)"', d)
    name = op.group(1).replace("jit(step)/", "") if op else "?"
    return f"{shapes[a]:>22s} x {shapes[b]:<22s} {name}", 2 * n * k / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="traced steps (after two warm-up steps)")
    p.add_argument("--top", type=int, default=40, help="matrix products listed, slowest first")
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="profile_ast_step_")
    # XLA reads its flags once, when the backend starts: set them before jax is imported.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={work}/hlo --xla_cpu_enable_xprof_traceme=true"
    )
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ast_jax.distill import LossConfig
    from ast_jax.models.gpt2 import GPT2, GPT2Config
    from ast_jax.optim import sparse_adamw
    from ast_jax.step import init_train_state, make_train_step

    cfg = GPT2Config(n_layer=4, d_model=256, n_head=4, max_len=128)
    model = GPT2(cfg)
    teacher = model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    tx = sparse_adamw(1e-3, max_decay=2e-2, ramp_steps=50, mask_every=10, b2=0.99, weight_decay=0.1)
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.steps + 2, 16, cfg.max_len + 1))
    batches = [{"inputs": jnp.asarray(s[:, :-1]), "targets": jnp.asarray(s[:, 1:])} for s in toks]
    step = jax.jit(make_train_step(model, teacher, tx, LossConfig()), donate_argnums=0)
    state = init_train_state(teacher, tx)
    for b in batches[:2]:
        state, _ = step(state, b)
    jax.block_until_ready(state)
    jax.profiler.start_trace(f"{work}/trace", create_perfetto_trace=True)
    t0 = time.perf_counter()
    for b in batches[2:]:
        state, _ = step(state, b)
    jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / a.steps
    jax.profiler.stop_trace()

    hlo = glob.glob(f"{work}/hlo/*jit_step*cpu_after_optimizations.txt")[0]
    tab = _hlo_tables(hlo)
    lines_of, comps, calls, shapes = tab["lines"], tab["comps"], tab["calls"], tab["shapes"]
    trace = glob.glob(f"{work}/trace/plugins/profile/*/perfetto_trace.json.gz")[0]
    events = json.load(gzip.open(trace))["traceEvents"]
    per_thunk: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in lines_of:
            per_thunk[e["name"]] += e["dur"] / 1e3 / a.steps
    dots, other = [], collections.Counter()
    for name, ms in per_thunk.items():
        found = _dot_of(comps[calls[name]] if name in calls else [lines_of[name]], shapes)
        if found:
            dots.append((ms, *found))
        else:
            other[re.sub(r"[._]\d+$", "", name)] += ms
    dot_ms = sum(d[0] for d in dots)
    dot_gf = sum(d[2] for d in dots)
    print(f"wall per step {1e3 * wall:.1f} ms; summed thunk time {sum(per_thunk.values()):.1f} ms per step")
    rate = dot_gf / dot_ms * 1e3
    print(f"matrix products: {len(dots)}, {dot_ms:.1f} ms summed, {dot_gf:.1f} GFLOP, {rate:.0f} GFLOP/s")
    print(f"\nslowest {a.top} products (ms, GFLOP/s, lhs x rhs, op):")
    for ms, desc, gf in sorted(dots, reverse=True)[: a.top]:
        print(f"  {ms:6.2f} {gf / ms * 1e3:6.0f}  {desc[:150]}")
    print("\nother thunks by kind (ms per step):")
    for kind, ms in other.most_common(15):
        print(f"  {ms:7.2f}  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
