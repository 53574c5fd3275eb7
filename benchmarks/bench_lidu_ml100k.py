"""Must-show 4 of issue 3: a 5-seed BPR-MF ensemble on MovieLens-100K plus exact LiDu for every user.

    python benchmarks/bench_lidu_ml100k.py [--epochs 20] [--seeds 5] [--grid-size 256]

Prints the wall-clock time of each stage (data, training with compilation, scoring, LiDu), the total, and
the share of the total spent in LiDu. Target: total under 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import datasets, metrics
from lidu_jax.estimators import lidu, sample_moments
from lidu_jax.models.mf import MFConfig, make_bpr_mf
from lidu_jax.training import fit, score_users


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--grid-size", type=int, default=256)
    args = p.parse_args()

    t0 = time.perf_counter()
    split = datasets.movielens_100k()  # all ratings as positives, 5-core, leave-last-out by timestamp
    t1 = time.perf_counter()
    model = make_bpr_mf(split, MFConfig(dim=32, lr=0.005, batch_size=2048))
    keys = jax.random.split(jax.random.key(0), args.seeds)
    params, _ = fit(model, keys, jnp.ones((args.seeds, split.train_users.size)), args.epochs, progress=False)
    jax.block_until_ready(params)
    t2 = time.perf_counter()
    users = np.arange(split.n_users)
    scores = score_users(model, params, users)  # (seeds, users, items)
    mean, std = sample_moments(scores)
    train = jnp.asarray(split.train_matrix())
    jax.block_until_ready(std)
    t3 = time.perf_counter()
    values, _ = lidu(mean, std, args.k, candidates=~train, grid_size=args.grid_size)
    values = np.asarray(values)
    t4 = time.perf_counter()
    ndcg = np.asarray(metrics.ndcg_at_k(mean, jnp.asarray(split.test_matrix()), args.k, exclude=train))

    total = t4 - t0
    print(
        f"MovieLens-100K: {split.n_users} users x {split.n_items} items, {split.train_users.size} train pairs"
    )
    print(f"data            {t1 - t0:7.2f} s")
    print(
        f"train {args.seeds}x{args.epochs} ep  {t2 - t1:7.2f} s  (BPR-MF, vmap over seeds, incl. compilation)"
    )
    print(f"score + moments {t3 - t2:7.2f} s")
    print(f"LiDu exact      {t4 - t3:7.2f} s  ({split.n_users} users, K={args.k}, grid {args.grid_size})")
    print(f"total           {total:7.2f} s  (LiDu share {100 * (t4 - t3) / total:.1f}%)")
    print(
        f"mean NDCG@{args.k} {ndcg.mean():.4f}, mean LiDu {values.mean():.2f}, "
        f"finite: {np.isfinite(values).all()}"
    )
    print("under 2 minutes:", total < 120)


if __name__ == "__main__":
    main()
