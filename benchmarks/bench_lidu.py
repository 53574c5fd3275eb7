"""Benchmark of exact LiDu: JAX (`lidu_jax.lidu_chunked`) against a straightforward per-user NumPy/SciPy
implementation of the same grid algorithm (same grid, same quadrature), plus peak memory versus user count.

    python benchmarks/bench_lidu.py                       # speed: 10,000 users x 1,000 items, K=10
    python benchmarks/bench_lidu.py --memory              # also peak RSS for 10,000 and 100,000 users

JAX is timed twice in the same process: `lidu_jax.lidu_chunked` on one XLA device (XLA still spreads each
operation over the cores), and `lidu_jax.lidu_sharded` with the users split over ``--devices`` XLA
host devices (``--xla_force_host_platform_device_count``, set before JAX starts; one per core is the usual
way to occupy every core of a CPU with JAX). ``--devices 1`` skips the second figure.

Scores are synthetic but shaped like a trained BPR-MF ensemble on the synthetic study data: per-user
item means from a rank-16 model with spread ``--mean-spread`` across items and per-item std
``--std-scale * LogNormal(0, 0.3)`` (the study's 8-seed ensemble has a mean spread of ~2.2 and a mean std
of ~1.1; see docs/results-lidu-synthetic.md). Chunks are generated from (seed, chunk index): before the
clock starts in the speed run (only LiDu is timed, for both implementations), on the fly in the memory
runs, so the inputs of all users never sit in memory at once; the memory runs use ``--memory-grid`` cells
(default: the speed grid) only to keep the 100,000-user run short, since per-chunk memory does not depend
on U.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from scipy.special import log_ndtr

GRID_HALF_WIDTH = 7.0


def make_chunk(seed: int, index: int, n_users: int, n_items: int, spread: float, std_scale: float):
    """Deterministic ``(mean, std)`` float32 ``(n_users, n_items)`` for one chunk of users."""
    rng = np.random.default_rng([seed, 0])
    q = rng.standard_normal((n_items, 16))  # item factors shared by every chunk
    rng = np.random.default_rng([seed, index + 1])
    p = rng.standard_normal((n_users, 16))
    mean = (p @ q.T) / 4.0
    mean = spread * mean / mean.std(axis=1, keepdims=True)
    std = std_scale * np.exp(0.3 * rng.standard_normal((n_users, n_items)))
    return mean.astype(np.float32), std.astype(np.float32)


def numpy_lidu_one(mean: np.ndarray, std: np.ndarray, k: int, grid: int) -> float:
    """Per-user reference in float64: the grid recursion of `lidu_jax.reference` written plainly."""
    rank = np.argsort(-mean, kind="stable")[:k]
    mu_l, sd_l = mean[rank].astype(np.float64), std[rank].astype(np.float64)
    rest = np.ones(mean.size, bool)
    rest[rank] = False
    mu_r, sd_r = mean[rest].astype(np.float64), std[rest].astype(np.float64)
    lo = np.min(mu_l - GRID_HALF_WIDTH * sd_l)
    hi = max(np.max(mu_l + GRID_HALF_WIDTH * sd_l), mu_r.max())
    edges = lo + (hi - lo) * np.arange(grid + 1) / grid
    mids = 0.5 * (edges[:-1] + edges[1:])
    # H(m_g) = prod over rest items of Phi((m_g - mu_j) / sd_j), in log space.
    log_h = log_ndtr((mids[:, None] - mu_r[None, :]) / sd_r[None, :]).sum(axis=1)
    # Cell masses of the list items: CDF differences (survival differences in the upper tail).
    z = (edges[None, :] - mu_l[:, None]) / sd_l[:, None]
    lcdf, lsf = log_ndtr(z), log_ndtr(-z)
    upper = lsf[:, :-1] < lcdf[:, :-1]
    a_hi = np.where(upper, lsf[:, :-1], lcdf[:, 1:])
    a_lo = np.where(upper, lsf[:, 1:], lcdf[:, :-1])
    with np.errstate(divide="ignore"):
        log_mass = a_hi + np.log(-np.expm1(np.minimum(a_lo - a_hi, -1e-30)))
    a = log_mass[-1] + log_h
    for level in range(k - 2, -1, -1):
        incl = np.logaddexp.accumulate(a)
        excl = np.concatenate([[-np.inf], incl[:-1]])
        a = log_mass[level] + np.logaddexp(excl, a + np.log(0.5))
    m = a.max()
    return float(-(m + np.log(np.exp(a - m).sum())))


def user_chunks(args, n_users: int):
    """``(mean, std)`` for ``n_users`` users, ``--chunk-size`` users at a time (`make_chunk`)."""
    for c in range(0, n_users, args.chunk_size):
        yield make_chunk(
            args.seed,
            c // args.chunk_size,
            min(args.chunk_size, n_users - c),
            args.items,
            args.mean_spread,
            args.std_scale,
        )


def run_jax(args, n_users: int, lazy: bool) -> tuple[np.ndarray, float]:
    """JAX LiDu over ``n_users`` users in chunks. ``lazy=False`` (the speed run) generates every chunk before
    the clock starts, so only LiDu is timed, as for the NumPy reference; ``lazy=True`` (the memory runs)
    generates each chunk on the fly so the inputs of all users never sit in memory at once."""
    import jax

    from lidu_jax import lidu_chunked

    kw = dict(
        grid_size=args.grid,
        chunk_size=args.chunk_size,
        tile_size=None if args.tile_size < 0 else args.tile_size,
    )
    # Warm-up on one chunk so compilation is not timed.
    mean, std = next(user_chunks(args, args.chunk_size))
    lidu_chunked([(mean, std, None)], args.k, **kw)
    source = ((m, s, None) for m, s in user_chunks(args, n_users))
    if not lazy:
        source = list(source)
    t = time.perf_counter()
    values, _ = lidu_chunked(source, args.k, **kw)
    jax.block_until_ready(values)
    return values, time.perf_counter() - t


def run_jax_sharded(args) -> tuple[np.ndarray, float]:
    """JAX LiDu over ``--users`` users split over every XLA device (`lidu_jax.sharding.lidu_sharded`);
    inputs generated before the clock starts, compilation not timed."""
    from lidu_jax import lidu_sharded

    parts = list(user_chunks(args, args.users))
    mean = np.concatenate([m for m, _ in parts])
    std = np.concatenate([s for _, s in parts])
    kw = dict(grid_size=args.grid, chunk_size=args.chunk_size)  # each device takes a chunk of users per call
    warm = min(
        args.users, args.chunk_size * args.devices
    )  # same block shape as the timed call: compiled once
    lidu_sharded(mean[:warm], std[:warm], args.k, **kw)
    t = time.perf_counter()
    values, _ = lidu_sharded(mean, std, args.k, **kw)
    return values, time.perf_counter() - t


def memory_child(args) -> None:
    """Run JAX LiDu on ``--memory-users`` users and print the peak RSS (MiB) as JSON."""
    values, seconds = run_jax(args, args.memory_users, lazy=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"users": args.memory_users, "peak_rss_mib": peak_mib, "seconds": seconds,
                      "finite": bool(np.all(np.isfinite(values)))}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=1_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--grid", type=int, default=256)
    p.add_argument(
        "--chunk-size", "--chunk", type=int, default=1024, help="users per jitted call (per device)"
    )
    p.add_argument(
        "--tile-size",
        "--tile",
        type=int,
        default=-1,
        help="users per tile inside a chunk (-1: library default)",
    )
    p.add_argument("--numpy-users", type=int, default=500, help="users timed for the NumPy reference")
    p.add_argument("--mean-spread", type=float, default=2.2)
    p.add_argument("--std-scale", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=2, help="XLA host devices for the sharded figure (1: skip)")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS for 10k and 100k users")
    p.add_argument("--memory-grid", type=int, default=0, help="grid of the memory runs (0 = --grid)")
    p.add_argument("--memory-users", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.devices > 1:  # must precede JAX's start (run_jax imports it)
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    if args.memory_users:
        memory_child(args)
        return

    values, jax_s = run_jax(args, args.users, lazy=False)
    sharded = run_jax_sharded(args) if args.devices > 1 else None
    mean, std = next(user_chunks(args, args.chunk_size))
    n_ref = min(args.numpy_users, args.chunk_size)
    t = time.perf_counter()
    ref = np.array([numpy_lidu_one(mean[u], std[u], args.k, args.grid) for u in range(n_ref)])
    np_s = time.perf_counter() - t
    np_rate = n_ref / np_s
    print(f"exact LiDu, {args.users} users x {args.items} items, K={args.k}, grid={args.grid}")
    print(f"  NumPy : {np_rate:10.1f} users/s ({np_s:.1f} s for {n_ref} users, float64, per-user loop)")
    runs = [("JAX, 1 device", values, jax_s, f"lidu_chunked, chunks of {args.chunk_size}")]
    if sharded is not None:
        runs.append((f"JAX, {args.devices} devices", *sharded, "lidu_sharded"))
    for name, vals, secs, how in runs:
        rate = args.users / secs
        diff = np.abs(ref - np.asarray(vals[:n_ref], np.float64))
        print(f"  {name:16s}: {rate:10.1f} users/s ({secs:.1f} s, {how}) = {rate / np_rate:5.1f}x NumPy; "
              f"max |LiDu - LiDu_numpy| on {n_ref} users = {diff.max():.2e} "
              f"(relative {np.max(diff / np.abs(ref)):.1e})")  # fmt: skip
    print(f"  mean LiDu {ref.mean():.2f}")
    if args.memory:
        peaks = {}
        for users in (10_000, 100_000):
            cmd = [sys.executable, __file__, "--memory-users", str(users), "--items", str(args.items),
                   "--k", str(args.k), "--grid", str(args.memory_grid or args.grid),
                   "--chunk-size", str(args.chunk_size),
                   "--mean-spread", str(args.mean_spread), "--std-scale", str(args.std_scale)]  # fmt: skip
            out = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            peaks[users] = json.loads(out)
            print(f"  peak RSS, {users:>7} users: {peaks[users]['peak_rss_mib']:.0f} MiB "
                  f"({peaks[users]['seconds']:.0f} s)")  # fmt: skip
        print(
            f"  memory ratio 100k / 10k: {peaks[100_000]['peak_rss_mib'] / peaks[10_000]['peak_rss_mib']:.2f}"
        )


if __name__ == "__main__":
    main()
