"""Must-show 4 of issue 3: a 5-seed BPR-MF ensemble on MovieLens-100K plus exact LiDu for every user.

    python benchmarks/bench_lidu_ml100k.py [--epochs 20] [--seeds 5] [--grid-size 256]

Prints the wall-clock time of each stage (data, training with compilation, scoring, LiDu), the total, and
the share of the total spent in LiDu. Target: total under 2 minutes on a 2-core CPU.

The machine's load average is printed before and after, and next to each wall time the process CPU time
(all threads): on a shared machine the wall time grows with the other jobs' load, while the CPU time is
roughly what the stage costs on an idle one (an upper bound for the wall time there when the work uses at
least one core). Nothing is compiled twice: one jitted epoch for all seeds, one scoring call and one LiDu
chunk for all 943 users.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import datasets, lidu, metrics, sample_moments
from lidu_jax.models.mf import MFConfig, make_bpr_mf
from lidu_jax.training import fit, score_users


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--grid-size", type=int, default=256)
    args = p.parse_args()

    load0 = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    split = datasets.movielens_100k()  # all ratings as positives, 5-core, leave-last-out by timestamp
    c1, t1 = time.process_time(), time.perf_counter()
    model = make_bpr_mf(split, MFConfig(dim=32, lr=0.005, batch_size=2048))
    keys = jax.random.split(jax.random.key(0), args.seeds)
    params, _ = fit(model, keys, jnp.ones((args.seeds, split.train_users.size)), args.epochs, progress=False)
    jax.block_until_ready(params)
    c2, t2 = time.process_time(), time.perf_counter()
    users = np.arange(split.n_users)
    scores = score_users(model, params, users)  # (seeds, users, items)
    mean, std = sample_moments(scores)
    train = jnp.asarray(split.train_matrix())
    jax.block_until_ready(std)
    c3, t3 = time.process_time(), time.perf_counter()
    values, _ = lidu(mean, std, args.k, candidates=~train, grid_size=args.grid_size)
    values = np.asarray(values)
    c4, t4 = time.process_time(), time.perf_counter()
    ndcg = np.asarray(metrics.ndcg_at_k(mean, jnp.asarray(split.test_matrix()), args.k, candidates=~train))

    total = t4 - t0
    print(
        f"MovieLens-100K: {split.n_users} users x {split.n_items} items, {split.train_users.size} train pairs"
    )
    print(
        f"stage             wall       CPU   "
        f"(load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end)"
    )
    print(f"data            {t1 - t0:7.2f} s {c1 - c0:7.2f} s")
    print(
        f"train {args.seeds}x{args.epochs} ep  {t2 - t1:7.2f} s {c2 - c1:7.2f} s  "
        "(BPR-MF, vmap over seeds, incl. compilation)"
    )
    print(f"score + moments {t3 - t2:7.2f} s {c3 - c2:7.2f} s")
    print(
        f"LiDu exact      {t4 - t3:7.2f} s {c4 - c3:7.2f} s  "
        f"({split.n_users} users, K={args.k}, grid {args.grid_size}, incl. compilation)"
    )
    print(
        f"total           {total:7.2f} s {c4 - c0:7.2f} s  "
        f"(LiDu share of wall {100 * (t4 - t3) / total:.1f}%, "
        f"of CPU {100 * (c4 - c3) / max(c4 - c0, 1e-9):.1f}%)"
    )
    print(
        f"mean NDCG@{args.k} {ndcg.mean():.4f}, mean LiDu {values.mean():.2f}, "
        f"finite: {np.isfinite(values).all()}"
    )
    print(f"under 2 minutes: wall {total < 120}, CPU {c4 - c0 < 120}")


if __name__ == "__main__":
    main()
