"""Exact LiDu end to end on one accelerator: 100,000 users x 10,000 items, K=10, grid 256, in chunks.

    python benchmarks/bench_lidu_gpu.py --json lidu_gpu.json                # the accelerator run (defaults)
    python benchmarks/bench_lidu_gpu.py --users 5000 --cpu-users 500        # smaller; runs on a CPU too

One script, meant to be run once on a lent accelerator, that reports:

* the device (``device_kind``, platform) and the JAX version;
* compile time: the first `lidu_jax.lidu_chunked` call on chunk 0 minus the steady-state time of one chunk,
  and the sum of JAX's own trace + lowering + backend-compile durations (``jax.monitoring``) during it;
* steady-state users/s of `lidu_chunked` over every user (chunk 0 again included), with the data generation
  timed apart. ``--data device`` (default) draws each chunk ON the device with ``jax.random`` from
  ``(seed, chunk index)``, so no input crosses the host-device link; ``--data host`` draws it on the host
  (``bench_lidu.make_chunk``) and times the transfer apart as well. Only real users are counted: the short
  last chunk is computed whole (the padding `lidu_chunked` would add anyway) and its first rows kept (at the
  defaults 352 rows of 100,352 are no user's, so the figure is understated by 0.35%);
* peak device memory (``memory_stats()["peak_bytes_in_use"]``; None where the device has no such stats, e.g.
  the CPU);
* agreement with the CPU: the first ``--check-users`` users' inputs (the same float32 arrays, copied off the
  device) recomputed on ``jax.devices("cpu")[0]``; max |delta| and max relative delta. The process exits 1
  when max |delta| > ``--tolerance`` (1e-4) or nothing could be compared, so a failed agreement is visible;
* the CPU figure: users/s of the same `lidu_chunked` call on the CPU over ``max(--cpu-users, checked users)``
  users rounded up to whole chunks, on ``--cpu-cores`` cores (default 2, as this project's 2-core machines),
  and the accelerator/CPU ratio;
* PASS/FAIL per goal: agreement <= 1e-4, speed-up >= 50x, compile < 60 s. Only agreement sets the exit code:
  the other two are properties of the hardware (a CPU-only run cannot reach 50x over itself);
* with ``--sharded``, `lidu_jax.lidu_sharded` over every local device of the default platform (it takes host
  arrays, so that figure includes copying each block off and back onto the devices).

The CPU leg runs in a child process pinned (``sched_setaffinity``) to ``--cpu-cores`` cores before JAX
starts, because XLA sizes its CPU thread pool from the cores it may use when it starts, and the parent's
JAX has already started with every core. A machine without an accelerator runs everything on the CPU and
says so. ``--max-seconds`` bounds each accelerator loop: it starts no new chunk after that many seconds and
reports the users done, so a slow device cannot cost the whole run; results go to stdout (flushed) and to
``--json`` after every stage.

Inputs are the synthetic BPR-like scores of ``bench_lidu.py`` (rank-16 means with spread ``--mean-spread``
per user, per-item std ``--std-scale * LogNormal(0, 0.3)``); chunks are always drawn at ``--chunk-size``
users and a short last chunk keeps its first rows, so user ``u`` is row ``u % chunk`` of chunk
``u // chunk`` in every leg.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# bench_lidu (make_chunk, the NumPy reference) sits beside this file; lidu_jax is importable from the repo
# root even where the package is not installed (the lent machine gets a bare copy of the tree).
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

GOAL_MAX_ABS = 1e-4
GOAL_SPEEDUP = 50.0
GOAL_COMPILE_S = 60.0
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def say(*parts: Any) -> None:
    """Print and flush at once, so a run killed at its time limit still shows everything up to then."""
    print(*parts, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--grid", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=1024, help="users per jitted call")
    p.add_argument("--tile-size", type=int, default=-1, help="users per tile in a call (-1: library default)")
    p.add_argument("--mean-spread", type=float, default=2.2)
    p.add_argument("--std-scale", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("device", "host"), default="device", help="where chunks are drawn")
    p.add_argument("--max-seconds", type=float, default=180.0, help="time budget of each accelerator loop")
    p.add_argument("--check-users", type=int, default=2000, help="first users recomputed on the CPU")
    p.add_argument("--cpu-users", type=int, default=2000, help="users timed on the CPU (>= checked)")
    p.add_argument("--cpu-cores", type=int, default=2, help="cores of the CPU leg (0: every core)")
    p.add_argument("--cpu-timeout", type=float, default=600.0, help="seconds before the CPU leg is abandoned")
    p.add_argument("--numpy-users", type=int, default=10, help="first users checked against NumPy float64")
    p.add_argument("--tolerance", type=float, default=GOAL_MAX_ABS, help="max |accelerator - CPU| allowed")
    p.add_argument("--sharded", action="store_true", help="also time lidu_sharded over every local device")
    p.add_argument("--json", type=Path, default=None, help="write the results here (after every stage)")
    # A self-test of the failure path: added to the accelerator's first value before the comparison.
    p.add_argument("--perturb", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--cpu-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("users", "items", "k", "grid", "chunk_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.k >= args.items:
        p.error("--k must be below --items")
    return args


def lidu_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of every `lidu_chunked` call, identical in the accelerator and CPU legs."""
    return dict(
        grid_size=args.grid,
        chunk_size=args.chunk_size,
        tile_size=None if args.tile_size < 0 else args.tile_size,
    )


class CompileLog:
    """Sums JAX's compile-phase durations (trace, lowering, backend compile) reported via jax.monitoring."""

    def __init__(self) -> None:
        import jax

        self.seconds = 0.0
        self.backend_compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.backend_compiles += event == COMPILE_EVENTS[-1]

    def snapshot(self) -> tuple[float, int]:
        return self.seconds, self.backend_compiles


@functools.cache
def _device_generator() -> Callable:
    """The jitted on-device version of `bench_lidu.make_chunk` (same distribution, jax.random bits)."""
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def gen(seed, index, n_users, n_items, spread, std_scale):
        key = jax.random.key(seed)
        q = jax.random.normal(jax.random.fold_in(key, 0), (n_items, 16))  # item factors shared by all chunks
        kp, ks = jax.random.split(jax.random.fold_in(key, index + 1))
        p = jax.random.normal(kp, (n_users, 16))
        # HIGHEST: no TF32 on GPUs, so the scores do not depend on the matmul unit's default precision.
        mean = jnp.dot(p, q.T, precision=jax.lax.Precision.HIGHEST) / 4.0
        mean = spread * mean / mean.std(axis=1, keepdims=True)
        std = std_scale * jnp.exp(0.3 * jax.random.normal(ks, (n_users, n_items)))
        return mean, std

    return gen


def chunk_inputs(args: argparse.Namespace, index: int, device: Any) -> tuple[Any, Any, float, float]:
    """Chunk ``index`` (``--chunk-size`` users) on ``device``: ``(mean, std, generation s, transfer s)``."""
    import jax

    t = time.perf_counter()
    if args.data == "device":
        mean, std = _device_generator()(
            args.seed, index, args.chunk_size, args.items, args.mean_spread, args.std_scale
        )
        jax.block_until_ready((mean, std))
        return mean, std, time.perf_counter() - t, 0.0
    from bench_lidu import make_chunk

    mean, std = make_chunk(args.seed, index, args.chunk_size, args.items, args.mean_spread, args.std_scale)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    mean, std = jax.block_until_ready(jax.device_put((mean, std), device))
    return mean, std, gen_s, time.perf_counter() - t


def chunk_users(args: argparse.Namespace, index: int, n_users: int) -> int:
    """Real users in chunk ``index`` of ``n_users`` (the rest of a short last chunk is dropped)."""
    return min(args.chunk_size, n_users - index * args.chunk_size)


def host_inputs(args: argparse.Namespace, n_users: int, device: Any) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_users`` users' float32 inputs on the host, drawn exactly as in the accelerator loop."""
    means, stds = [], []
    for c in range(math.ceil(n_users / args.chunk_size)):
        mean, std, _, _ = chunk_inputs(args, c, device)
        b = chunk_users(args, c, n_users)
        means.append(np.asarray(mean)[:b])
        stds.append(np.asarray(std)[:b])
    return np.concatenate(means), np.concatenate(stds)


def device_memory(device: Any) -> dict[str, int] | None:
    """Peak/limit bytes of ``device`` where the runtime keeps them (GPUs, TPUs); None otherwise (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some runtimes raise instead of returning None
        return None
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def run_chunked(args: argparse.Namespace, device: Any, log: CompileLog) -> tuple[dict, np.ndarray]:
    """`lidu_chunked` chunk by chunk on ``device``: first call (compile) apart, then every user timed."""
    from lidu_jax import lidu_chunked

    kw = lidu_kwargs(args)
    n_chunks = math.ceil(args.users / args.chunk_size)
    t = time.perf_counter()
    mean, std, _, _ = chunk_inputs(args, 0, device)  # compiles the generator, not timed as generation
    gen_first_s = time.perf_counter() - t
    say(f"[chunked] chunk 0 drawn ({gen_first_s:.1f} s, the generator's compilation included); compiling")
    before = log.snapshot()
    t = time.perf_counter()
    np.asarray(lidu_chunked([(mean, std, None)], args.k, **kw).values)
    first_s = time.perf_counter() - t
    compile_events_s = log.snapshot()[0] - before[0]
    say(f"[chunked] first call {first_s:.1f} s (JAX compile phases {compile_events_s:.1f} s)")

    values, gen_s, transfer_s, lidu_s, chunk_s = [], 0.0, 0.0, 0.0, []
    before = log.snapshot()
    t_loop = time.perf_counter()
    report_every = max(1, n_chunks // 10)
    stopped_early = False
    for c in range(n_chunks):
        if c and time.perf_counter() - t_loop > args.max_seconds:
            stopped_early = True
            say(f"[chunked] --max-seconds {args.max_seconds:g} reached after {c} of {n_chunks} chunks")
            break
        mean, std, g, x = chunk_inputs(args, c, device)
        gen_s, transfer_s = gen_s + g, transfer_s + x
        t = time.perf_counter()
        v = np.asarray(lidu_chunked([(mean, std, None)], args.k, **kw).values)
        chunk_s.append(time.perf_counter() - t)
        lidu_s += chunk_s[-1]
        values.append(v[: chunk_users(args, c, args.users)])
        if (c + 1) % report_every == 0 or c + 1 == n_chunks:
            done = sum(map(len, values))
            say(f"[chunked] {c + 1}/{n_chunks} chunks, {done} users, {done / lidu_s:,.0f} users/s (LiDu), "
                f"{time.perf_counter() - t_loop:.1f} s")  # fmt: skip
    vals = np.concatenate(values)
    loop_events_s, loop_compiles = (a - b for a, b in zip(log.snapshot(), before, strict=True))
    steady_chunk_s = float(np.median(chunk_s))
    out = {
        "users_done": len(vals),
        "complete": not stopped_early,
        "chunks_done": len(chunk_s),
        "lidu_s": lidu_s,
        "users_per_s": len(vals) / lidu_s,
        "steady_chunk_s_median": steady_chunk_s,
        "generation_s": gen_s,
        "transfer_s": transfer_s,
        "loop_wall_s": time.perf_counter() - t_loop,
        "first_call_s": first_s,
        "compile_s": max(0.0, first_s - steady_chunk_s),
        "compile_events_s": compile_events_s,
        "generator_first_call_s": gen_first_s,
        "loop_backend_compiles": loop_compiles,
        "loop_compile_events_s": loop_events_s,
        "peak_memory": device_memory(device),
        "mean_lidu": float(np.mean(vals)),
        "finite": bool(np.all(np.isfinite(vals))),
    }
    return out, vals


def run_sharded(args: argparse.Namespace, device: Any, reference: np.ndarray) -> dict:
    """`lidu_sharded` over every local device of the default platform, blocks of ``chunk * devices`` users;
    its values are compared with ``reference`` (the chunked run's) on the users both did."""
    import jax

    from lidu_jax import lidu_sharded
    from lidu_jax.sharding import user_mesh

    devices = jax.local_devices()
    mesh = user_mesh(devices)
    n_dev = len(devices)
    per_block = n_dev  # chunks per block: one per device
    n_blocks = math.ceil(math.ceil(args.users / args.chunk_size) / per_block)

    def block(j: int) -> tuple[np.ndarray, np.ndarray, int, float]:
        # Always whole blocks: lidu_sharded shrinks a short block, which would compile a second shape.
        t = time.perf_counter()
        n = min(per_block * args.chunk_size, args.users - j * per_block * args.chunk_size)
        parts = [chunk_inputs(args, j * per_block + i, device) for i in range(per_block)]
        mean = np.concatenate([np.asarray(m) for m, _, _, _ in parts])
        std = np.concatenate([np.asarray(s) for _, s, _, _ in parts])
        return mean, std, n, time.perf_counter() - t

    def call(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return np.asarray(lidu_sharded(mean, std, args.k, grid_size=args.grid, mesh=mesh,
                                       chunk_size=args.chunk_size).values)  # fmt: skip

    mean, std, _, _ = block(0)
    t = time.perf_counter()
    call(mean, std)
    first_s = time.perf_counter() - t
    say(f"[sharded] {n_dev} device(s); first call {first_s:.1f} s")
    values, gen_s, lidu_s, stopped_early = [], 0.0, 0.0, False
    t_loop = time.perf_counter()
    for j in range(n_blocks):
        if j and time.perf_counter() - t_loop > args.max_seconds:
            stopped_early = True
            say(f"[sharded] --max-seconds {args.max_seconds:g} reached after {j} of {n_blocks} blocks")
            break
        mean, std, n, g = block(j)
        gen_s += g
        t = time.perf_counter()
        values.append(call(mean, std)[:n])
        lidu_s += time.perf_counter() - t
    vals = np.concatenate(values)
    n = min(len(vals), len(reference))
    diff = np.abs(vals[:n].astype(np.float64) - reference[:n])
    out = {
        "devices": n_dev,
        "users_done": len(vals),
        "complete": not stopped_early,
        "first_call_s": first_s,
        "lidu_s": lidu_s,
        "users_per_s": len(vals) / lidu_s,
        "generation_and_host_copy_s": gen_s,
        "max_abs_diff_vs_chunked": float(diff.max()) if n else None,
    }
    say(f"[sharded] {out['users_per_s']:,.0f} users/s over {len(vals)} users (includes the host<->device "
        f"copies lidu_sharded makes); max |sharded - chunked| {out['max_abs_diff_vs_chunked']}")  # fmt: skip
    return out


def cpu_child(args: argparse.Namespace) -> None:
    """The CPU leg, in its own process: pin to ``--cpu-cores`` cores, start JAX on the CPU, time
    `lidu_chunked` on the inputs in ``--cpu-child`` DIR and write ``values.npy`` and ``stats.json`` there."""
    allowed = sorted(os.sched_getaffinity(0))
    cores = allowed if args.cpu_cores <= 0 else allowed[: args.cpu_cores]
    pinned = True
    try:
        os.sched_setaffinity(0, cores)  # before JAX starts: XLA sizes its thread pool from this set
    except OSError:  # a sandbox without the call: the leg then runs unpinned, and the stats say so
        pinned = False
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from lidu_jax import lidu_chunked

    mean, std = np.load(args.cpu_child / "mean.npy"), np.load(args.cpu_child / "std.npy")
    kw = lidu_kwargs(args)
    cpu = jax.devices("cpu")[0]
    n = mean.shape[0]
    with jax.default_device(cpu):
        c = args.chunk_size
        t = time.perf_counter()
        np.asarray(lidu_chunked([(mean[:c], std[:c], None)], args.k, **kw).values)
        first_s = time.perf_counter() - t
        chunks = [(mean[i : i + c], std[i : i + c], None) for i in range(0, n, c)]
        t, cpu_t = time.perf_counter(), time.process_time()
        values = np.asarray(lidu_chunked(chunks, args.k, **kw).values)
        lidu_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu_t
    np.save(args.cpu_child / "values.npy", values)
    # busy_cores (CPU seconds per wall second) shows whether the pinning held where the sandbox may
    # accept sched_setaffinity without honouring it.
    stats = {"device": str(cpu), "cores": len(cores), "pinned": pinned,
             "affinity_after": len(os.sched_getaffinity(0)), "busy_cores": cpu_s / lidu_s, "users": n,
             "first_call_s": first_s, "lidu_s": lidu_s, "users_per_s": n / lidu_s,
             "jax_version": jax.__version__}  # fmt: skip
    (args.cpu_child / "stats.json").write_text(json.dumps(stats))


def run_cpu_leg(args: argparse.Namespace, mean: np.ndarray, std: np.ndarray) -> tuple[dict, np.ndarray]:
    """Start `cpu_child` on ``mean, std`` and return its stats and values."""
    with tempfile.TemporaryDirectory(prefix="bench_lidu_gpu_") as tmp:
        tmp_path = Path(tmp)
        np.save(tmp_path / "mean.npy", mean)
        np.save(tmp_path / "std.npy", std)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--cpu-child", tmp, "--k", str(args.k),
               "--items", str(args.items), "--grid", str(args.grid), "--chunk-size", str(args.chunk_size),
               "--tile-size", str(args.tile_size), "--cpu-cores", str(args.cpu_cores)]  # fmt: skip
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.cpu_timeout)
        if proc.returncode:
            raise RuntimeError(f"CPU leg failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        stats = json.loads((tmp_path / "stats.json").read_text())
        return stats, np.load(tmp_path / "values.npy")


def agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Max absolute and relative |got - ref| (float64); non-finite values count as disagreement."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(got - ref)
    finite = bool(np.all(np.isfinite(diff)))
    return {
        "users": len(ref),
        "max_abs": float(diff.max()) if finite else math.inf,
        "max_rel": float(np.max(diff / np.maximum(np.abs(ref), 1e-30))) if finite else math.inf,
        "finite": finite,
    }


def host_info() -> dict:
    """CPU model and core counts of the machine running this script."""
    model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))}


def verdict(ok: bool | None) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (module docstring); 0 when the CPU agreement holds, 1 otherwise."""
    args = parse_args(argv)
    if args.cpu_child is not None:
        cpu_child(args)
        return 0
    t_start = time.perf_counter()
    import jax
    import jaxlib

    log = CompileLog()
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    result: dict[str, Any] = {
        "stage": "started",
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "cpu_child"
        },
        "device": {
            "device_kind": device.device_kind,
            "platform": device.platform,
            "local_devices": jax.local_device_count(),
            "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__,
            "accelerator": not on_cpu,
        },
        "host": host_info(),
        "compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR") or None,
        "data": (
            "drawn on the device per chunk with jax.random from (seed, chunk index); no input transfer"
            if args.data == "device"
            else "drawn on the host per chunk (bench_lidu.make_chunk), then jax.device_put (timed apart)"
        ),
    }

    def save(stage: str) -> None:
        result["stage"] = stage
        result["wall_s"] = time.perf_counter() - t_start
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    say(f"exact LiDu, {args.users} users x {args.items} items, K={args.k}, grid={args.grid}, "
        f"chunks of {args.chunk_size}; data {args.data}")  # fmt: skip
    say(f"device: {device.device_kind} ({device.platform}, {jax.local_device_count()} local), "
        f"jax {jax.__version__}")  # fmt: skip
    if on_cpu:
        say("no accelerator: every leg runs on the CPU (the 'accelerator' leg with every usable core)")
    save("started")

    chunked, values = run_chunked(args, device, log)
    result["chunked"] = chunked
    say(f"[chunked] {chunked['users_per_s']:,.1f} users/s steady state over {chunked['users_done']} users "
        f"({chunked['lidu_s']:.2f} s LiDu; data generation {chunked['generation_s']:.2f} s, transfer "
        f"{chunked['transfer_s']:.2f} s, not counted); compile {chunked['compile_s']:.1f} s; "
        f"recompiles in the loop {chunked['loop_backend_compiles']}; peak device memory "
        f"{chunked['peak_memory']}")  # fmt: skip
    save("chunked")

    if args.sharded:
        try:
            result["sharded"] = run_sharded(args, device, values)
        except Exception as e:  # the sharded figure is optional: it must not cost the rest of the run
            result["sharded"] = {"error": repr(e)}
            say(f"[sharded] failed: {e!r}")
        save("sharded")

    n_check = min(args.check_users, chunked["users_done"])
    # Whole chunks only: lidu_chunked pads a short chunk to --chunk-size, and that padding would be timed
    # as work for no user, understating the CPU's rate.
    n_cpu = math.ceil(max(n_check, args.cpu_users, 1) / args.chunk_size) * args.chunk_size
    cpu, cpu_values = None, None
    try:
        t = time.perf_counter()
        mean, std = host_inputs(args, n_cpu, device)
        say(f"[cpu] {n_cpu} users' inputs copied to the host ({time.perf_counter() - t:.1f} s); timing on "
            f"{args.cpu_cores or 'every'} core(s)")  # fmt: skip
        cpu, cpu_values = run_cpu_leg(args, mean, std)
        say(f"[cpu] {cpu['users_per_s']:,.1f} users/s on {cpu['cores']} core(s) over {cpu['users']} users "
            f"({cpu['lidu_s']:.1f} s, {cpu['busy_cores']:.1f} cores busy; first call "
            f"{cpu['first_call_s']:.1f} s)")  # fmt: skip
        if not cpu["pinned"] or cpu["busy_cores"] > cpu["cores"] + 0.5:
            say(f"[cpu] warning: the CPU leg was not held to {cpu['cores']} core(s)")
        if args.numpy_users > 0:
            from bench_lidu import numpy_lidu_one

            n_np = min(args.numpy_users, n_check)
            t = time.perf_counter()
            ref = np.array([numpy_lidu_one(mean[u], std[u], args.k, args.grid) for u in range(n_np)])
            result["numpy_check"] = {**agreement(ref, values[:n_np]), "seconds": time.perf_counter() - t}
            say(f"[numpy] max |accelerator - NumPy float64| on {n_np} users "
                f"{result['numpy_check']['max_abs']:.2e} (informational)")  # fmt: skip
    except Exception as e:  # reported, and the agreement goal then fails, but the device figures are kept
        result["cpu_error"] = repr(e)
        say(f"[cpu] failed: {e!r}")
    result["cpu"] = cpu

    checked = values[:n_check].astype(np.float64)
    if args.perturb:
        checked[0] += args.perturb
    agree = agreement(cpu_values[:n_check], checked) if cpu_values is not None and n_check else None
    result["agreement"] = agree
    speedup = chunked["users_per_s"] / cpu["users_per_s"] if cpu else None
    goals = {
        "agreement": bool(agree and agree["finite"] and agree["max_abs"] <= args.tolerance),
        "speedup": bool(speedup is not None and speedup >= GOAL_SPEEDUP),
        "compile": chunked["compile_s"] < GOAL_COMPILE_S,
    }
    result["speedup"] = speedup
    result["goals"] = {k: verdict(v) for k, v in goals.items()}
    if agree:
        say(f"agreement with the CPU on {agree['users']} users: max |delta| {agree['max_abs']:.2e}, max "
            f"relative {agree['max_rel']:.2e} (goal <= {args.tolerance:g}): "
            f"{verdict(goals['agreement'])}")  # fmt: skip
    else:
        say("agreement with the CPU: not measured: FAIL")
    say(f"speed-up {device.platform}/{cpu['cores'] if cpu else '?'}-core CPU: "
        f"{'n/a' if speedup is None else f'{speedup:.1f}x'} (goal >= {GOAL_SPEEDUP:g}x): "
        f"{verdict(goals['speedup'])}")  # fmt: skip
    say(f"compile {chunked['compile_s']:.1f} s (goal < {GOAL_COMPILE_S:g} s): {verdict(goals['compile'])}")
    if not chunked["complete"]:
        say(f"note: stopped at --max-seconds: {chunked['users_done']} of {args.users} users done")
    result["host_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    save("done")
    say(f"total wall {result['wall_s']:.1f} s" + (f"; JSON in {args.json}" if args.json else ""))
    return 0 if goals["agreement"] else 1


if __name__ == "__main__":
    sys.exit(main())
