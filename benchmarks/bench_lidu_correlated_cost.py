"""What the correlated variant costs against exact LiDu, at the grid's settings, measured side by side.

    python benchmarks/bench_lidu_correlated_cost.py                      # Beauty-sized catalogue
    python benchmarks/bench_lidu_correlated_cost.py --items 1349 --json out.json

Both estimators run on the same synthetic members' scores (``M`` members x ``U`` users x ``I`` items, a
shared user-item signal plus member noise that moves items together) with the grid study's settings
(`lidu_jax.study_cells`): K = 10, grid 256, and for `lidu_jax.lidu_correlated` shrinkage 0.5 and one
orthogonal block of ``2 (M - 1)`` draws per user. Each is compiled first, then timed ``--repeats`` times in
alternation (the machine's load moves both alike); the ratio of the medians is the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import lidu, lidu_correlated, sample_moments


def members(n_members: int, n_users: int, n_items: int, seed: int = 0) -> np.ndarray:
    """``(M, U, I)`` float32 scores: a user-item signal, an item factor shared by the members' deviations
    (so items move together), and independent noise."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(1, n_users, n_items))
    factor = rng.normal(size=(n_members, 1, 1)) * rng.normal(size=(1, 1, n_items))
    noise = 0.3 * rng.normal(size=(n_members, n_users, n_items))
    return (signal + 0.5 * factor + noise).astype(np.float32)


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--users", type=int, default=256)
    p.add_argument("--items", type=int, default=12101, help="Beauty's catalogue by default")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--grid", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    s = jnp.asarray(members(a.members, a.users, a.items))
    key = jax.random.key(0)

    def exact():
        mean, std = sample_moments(s)
        return lidu(mean, std, a.k, grid_size=a.grid, chunk_size=a.users)[0]

    def correlated():
        return lidu_correlated(
            s, a.k, key=key, shrinkage=0.5, n_draws=2 * (a.members - 1), grid_size=a.grid, chunk_size=a.users
        )[0]

    first = {"exact": _time(exact), "correlated": _time(correlated)}  # includes compilation
    runs: dict[str, list[float]] = {"exact": [], "correlated": []}
    for _ in range(a.repeats):
        runs["exact"].append(_time(exact))
        runs["correlated"].append(_time(correlated))
    med = {n: statistics.median(v) for n, v in runs.items()}
    out = {
        "members": a.members, "users": a.users, "items": a.items, "k": a.k, "grid": a.grid,
        "n_draws": 2 * (a.members - 1), "first_call_s": first, "runs_s": runs, "median_s": med,
        "ratio_correlated_over_exact": med["correlated"] / med["exact"],
    }  # fmt: skip
    print(
        f"{a.users} users x {a.items} items, M={a.members}, K={a.k}, grid {a.grid}: exact "
        f"{med['exact']:.2f} s, correlated ({out['n_draws']} draws) {med['correlated']:.2f} s, ratio "
        f"{out['ratio_correlated_over_exact']:.1f}x (medians of {a.repeats}, alternated)"
    )
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
