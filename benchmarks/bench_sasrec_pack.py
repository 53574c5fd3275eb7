"""SASRec training epoch: left-padded rows against packed rows (`lidu_jax.models.sasrec`, ``pack``), side by
side in one process, on real data.

    python benchmarks/bench_sasrec_pack.py                       # Beauty, d64, 3-seed ensemble, 2 epochs each
    python benchmarks/bench_sasrec_pack.py --data ml-100k --dim 16

Each layout is compiled (first epoch, timed apart) and then timed over ``--epochs`` epochs of a vmapped
``--seeds``-member ensemble, the way `lidu_jax.study` trains it. The figure that matters is the ratio
padded / packed, printed last with the fraction of real tokens in each layout: on a 2-core machine the
absolute seconds move with load, the ratio much less. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import datasets
from lidu_jax.models.sasrec import _N_PACKINGS, SASRecConfig, _pack, _sequence_arrays, make_sasrec
from lidu_jax.training import fit

LOADERS = {"beauty": datasets.beauty, "lastfm": datasets.lastfm, "ml-100k": datasets.movielens_100k}


def _time(split, cfg: SASRecConfig, seeds: int, epochs: int) -> tuple[float, float, float]:
    """``(compile + first epoch s, s per later epoch, final mean loss)`` of one layout."""
    model = make_sasrec(split, cfg)
    keys = jax.random.split(jax.random.key(0), seeds)
    weights = jnp.ones((seeds, int(split.train_users.shape[0])))
    t = time.perf_counter()
    fit(model, keys, weights, 1, progress=False)
    first = time.perf_counter() - t
    losses = []
    t = time.perf_counter()
    fit(model, keys, weights, epochs, progress=False, callback=lambda e, p, loss: losses.append(loss))
    jax.block_until_ready(losses[-1])
    per_epoch = (time.perf_counter() - t) / epochs
    return first, per_epoch, float(np.mean(np.asarray(losses[-1])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="beauty", choices=sorted(LOADERS))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
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
    out = {"data": args.data, "dim": args.dim, "seeds": args.seeds, "epochs": args.epochs}
    out.update(real_fraction_padded=real_padded, real_fraction_packed=real_packed)
    for name, pack in (("padded", False), ("packed", True)):
        first, per_epoch, loss = _time(
            split, SASRecConfig(dim=args.dim, dropout=0.2, pack=pack), args.seeds, args.epochs
        )
        print(
            f"{name}: compile + epoch 1 {first:.1f} s, then {per_epoch:.2f} s/epoch, "
            f"loss after {args.epochs} epochs {loss:.4f}"
        )
        out[name] = {"first_epoch_s": first, "epoch_s": per_epoch, "loss": loss}
    ratio = out["padded"]["epoch_s"] / out["packed"]["epoch_s"]
    out["speedup"] = ratio
    print(f"speed-up padded / packed: {ratio:.2f}x per epoch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
