"""SASRec training epoch: left-padded rows against packed rows (`lidu_jax.models.sasrec`, ``pack``), side by
side in one process, on real data.

    python benchmarks/bench_sasrec_pack.py                       # Beauty, d64, 3-seed ensemble, 2 epochs each
    python benchmarks/bench_sasrec_pack.py --data ml-100k --dim 16

Each layout is compiled (first epoch, timed apart) and then timed over ``--epochs`` epochs of a vmapped
``--seeds``-member ensemble, the way `lidu_jax.study` trains it. The figure that matters is the ratio
padded / packed, printed last with the fraction of real tokens in each layout: on a 2-core machine the
absolute seconds move with load, the ratio much less. As a check that packing trains the same model, each
layout's NDCG@10 after those epochs (mean over seeds, held-out item among the non-training items) is
measured on the same seeded ``--eval-users`` users. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import datasets, metrics
from lidu_jax.models.sasrec import _N_PACKINGS, SASRecConfig, _pack, _sequence_arrays, make_sasrec
from lidu_jax.training import fit, score_users

LOADERS = {"beauty": datasets.beauty, "lastfm": datasets.lastfm, "ml-100k": datasets.movielens_100k}


def _ndcg(model, params, split, users: np.ndarray) -> float:
    """Mean over seeds and ``users`` of NDCG@10 among each user's non-training items."""
    cand, held = jnp.asarray(~split.train_matrix()[users]), jnp.asarray(split.test_matrix()[users])
    scores = score_users(model, params, users, chunk=512)
    return float(np.mean([float(metrics.ndcg_at_k(s, held, 10, candidates=cand).mean()) for s in scores]))


def _time(split, cfg: SASRecConfig, seeds: int, epochs: int, users: np.ndarray) -> tuple[float, ...]:
    """``(compile + first epoch s, s per later epoch, NDCG@10 on users)`` of one layout."""
    model = make_sasrec(split, cfg)
    keys = jax.random.split(jax.random.key(0), seeds)
    weights = jnp.ones((seeds, int(split.train_users.shape[0])))
    t = time.perf_counter()
    fit(model, keys, weights, 1, progress=False)
    first = time.perf_counter() - t
    t = time.perf_counter()
    params, _ = fit(model, keys, weights, epochs, progress=False)
    jax.block_until_ready(params)
    per_epoch = (time.perf_counter() - t) / epochs
    return first, per_epoch, _ndcg(model, params, split, users)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="beauty", choices=sorted(LOADERS))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eval-users", type=int, default=5000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    split = LOADERS[args.data]()
    cfg = SASRecConfig(dim=args.dim, dropout=0.2)
    _, targets, _, _ = _sequence_arrays(split, cfg.max_len)
    user, _, _ = _pack(targets, _N_PACKINGS)
    n_tokens = int((targets > 0).sum())
    real_padded = n_tokens / targets.size
    real_packed = n_tokens / (user.shape[1] * cfg.max_len)
    print(f"{args.data}: {split.n_users} users, {split.n_items} items, {n_tokens} training positions")
    print(f"real tokens: padded {real_padded:.3f} of {targets.shape[0]} rows, packed {real_packed:.3f} of "
          f"{user.shape[1]} rows")  # fmt: skip
    with_test = np.unique(split.test_users)
    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(with_test, min(args.eval_users, with_test.size), replace=False))
    out = {"data": args.data, "dim": args.dim, "seeds": args.seeds, "epochs": args.epochs}
    out["eval_users"] = int(users.size)
    out.update(real_fraction_padded=real_padded, real_fraction_packed=real_packed)
    for name, pack in (("padded", False), ("packed", True)):
        cfg = SASRecConfig(dim=args.dim, dropout=0.2, pack=pack)
        first, per_epoch, ndcg = _time(split, cfg, args.seeds, args.epochs, users)
        print(
            f"{name}: compile + epoch 1 {first:.1f} s, then {per_epoch:.2f} s/epoch, "
            f"NDCG@10 after {args.epochs} epochs {ndcg:.4f} on {users.size} users"
        )
        out[name] = {"first_epoch_s": first, "epoch_s": per_epoch, "ndcg10": ndcg}
    ratio = out["padded"]["epoch_s"] / out["packed"]["epoch_s"]
    out["speedup"] = ratio
    print(f"speed-up padded / packed: {ratio:.2f}x per epoch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
