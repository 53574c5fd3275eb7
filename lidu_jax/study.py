"""The real-data LiDu study: does LiDu track per-user ranking quality on real data, better than label-free
baselines, with popular recommenders? (issue 3; the maths in ``docs/maths-lidu.md``)

    python -m lidu_jax.study --data ml-100k --model bpr --source ensemble --json runs/ml100k_bpr.json
    python -m lidu_jax.study --all --out-dir runs/lidu_study        # the grid of docs/results-lidu.md

One cell = one dataset x one recommender x one distribution source:

1. load the data (`lidu_jax.datasets`; leave-last-out by default, so each user has exactly one held-out item
   and NDCG is not confounded by how many items a user holds out);
2. train what the source needs (``ensemble``: ``n_models`` seeds at once with `jax.vmap`; ``bootstrap``:
   ``n_models`` multinomial resamples; ``snapshot``: the last ``n_models`` epochs of one run;
   ``mc_dropout``: ``n_samples`` dropout passes of one model; ``bayesian``: Bayesian MF's analytic posterior);
3. per user, from the per-item score mean/std (and samples): LiDu (exact grid; unordered set; top-3;
   sequential and pairwise approximations) and every label-free baseline of `lidu_jax.baselines`;
4. per user, NDCG@K and Recall@K of the list ranked by the mean score (training items excluded);
5. Kendall tau / Spearman / C-index of ``-uncertainty`` vs each metric with paired bootstrap 95% intervals
   (`lidu_jax.evaluation`).

Optional extras: ``--dynamics`` tracks mean LiDu and mean NDCG@K over training epochs (plot + their
correlation across checkpoints); ``--sweeps`` recomputes LiDu for several list lengths K and for random
candidate subsets of several sizes. Users are processed in chunks, so memory is bounded by
``n_models * chunk * n_items`` scores; ``--max-eval-users`` evaluates a seeded random subset of users on large
data (the exact estimator itself is never approximated: it prunes only items that provably cannot matter).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lidu_jax import baselines, datasets, distributions, evaluation, metrics
from lidu_jax._cli import config_parser, option, run_cli
from lidu_jax.estimators import lidu
from lidu_jax.models.base import RecModel
from lidu_jax.models.lightgcn import LightGCNConfig, make_lightgcn
from lidu_jax.models.mf import BayesianMFConfig, MFConfig, make_bayesian_mf, make_bpr_mf
from lidu_jax.models.mlp import MLPConfig, make_mlp
from lidu_jax.models.popularity import make_popularity
from lidu_jax.models.sasrec import SASRecConfig, make_sasrec
from lidu_jax.samples import sample_moments
from lidu_jax.training import (
    TrainingFailedError,
    bootstrap_weights,
    check_finite_scores,
    fit,
    flatten_snapshots,
)
from lidu_jax.types import InteractionSplit

__all__ = [
    "DATASETS",
    "MODELS",
    "SOURCES",
    "RealDataStudyConfig",
    "load_data",
    "main",
    "make_model",
    "run",
    "run_all",
    "score_stacked",
]

DATASETS = ("ml-100k", "lastfm", "beauty")
MODELS = ("bpr", "lightgcn", "mlp", "sasrec")
SOURCES = ("ensemble", "bootstrap", "snapshot", "mc_dropout", "bayesian")
LIDU_VARIANT_FLAGS = ("exact", "unordered", "top3", "sequential", "pairwise")
SPLITS = ("leave_last_out", "random")
_SEED_MAX = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class RealDataStudyConfig:
    """Settings of one study run; each field is the command-line flag ``--field-name`` (its help text says
    what it is, its unit and its valid range). Values are checked on construction: an impossible value is a
    ``ValueError`` naming the flag."""

    data: str = option(
        "ml-100k",
        f"data set: one of {', '.join(DATASETS)} (located as in lidu_jax.datasets), or the path of an "
        "interaction file (table 'user item [rating [timestamp]]' or one 'user item1 item2 ...' line per "
        "user)",
    )
    model: str = option(
        "bpr",
        f"recommender: one of {', '.join(MODELS)} (bpr = BPR-MF, mlp = NeuMF-style, sasrec = sequential)",
    )
    source: str = option(
        "ensemble",
        f"where the per-item score distribution comes from: one of {', '.join(SOURCES)} (mc_dropout needs "
        "bpr, mlp or sasrec; bayesian is Bayesian MF and needs --model bpr)",
    )
    all: bool = option(
        False,
        "run the whole grid (every data set x every model) with --source, BPR cells with --dynamics and "
        "--sweeps; --data and --model are then ignored",
    )
    split: str = option(
        "leave_last_out",
        f"held-out items: one of {', '.join(SPLITS)} (leave_last_out = each user's latest interaction; "
        "random = a seeded 20%% of each user's items)",
    )
    min_rating: float | None = option(
        None, "implicit-feedback threshold: keep ratings >= this (none = every interaction is a positive)"
    )
    k_core: int = option(
        5, "k-core filter: users and items with fewer interactions are dropped (>= 0; 0 = off)"
    )
    n_models: int = option(
        5, "distribution size: ensemble members, bootstrap copies or last-epoch snapshots (>= 2)"
    )
    n_samples: int = option(10, "MC-dropout passes / Bayesian posterior draws (>= 2)")
    dropout: float = option(0.2, "dropout rate of the mc_dropout model, in [0, 1)")
    epochs: int = option(20, "training epochs (>= 1; >= --n-models for --source snapshot)")
    dim: int = option(0, "embedding width of the model (>= 0; 0 = the model's default)")
    lr: float = option(0.0, "Adam learning rate (finite, > 0; 0 = the model's default)")
    batch_size: int = option(0, "training batch size (>= 0; 0 = the model's default)")
    k: int = option(10, "list length K of LiDu, NDCG@K and Recall@K (>= 1, < the number of items)")
    grid_size: int = option(256, "grid cells of the exact LiDu estimator (>= 8)")
    lidu_variants: str = option(
        "exact,unordered,top3,sequential,pairwise",
        f"comma-separated LiDu variants besides the exact one, a subset of {','.join(LIDU_VARIANT_FLAGS)}",
    )
    max_eval_users: int = option(
        0, "evaluate a seeded random subset of this many users (>= 0; 0 = every user with a held-out item)"
    )
    chunk: int = option(256, "users per scoring / estimation chunk; bounds memory (>= 1)")
    n_boot: int = option(200, "bootstrap resamples over users for the 95%% intervals (>= 1)")
    dynamics: bool = option(
        False, "track mean LiDu and mean NDCG@K during training (needs --source ensemble or bootstrap)"
    )
    dynamics_every: int = option(2, "with --dynamics: log every this many epochs (>= 1)")
    dynamics_users: int = option(500, "users scored for --dynamics and --sweeps (>= 1)")
    sweeps: bool = option(False, "also compute LiDu for the list lengths --sweep-ks and candidate sizes")
    sweep_ks: str = option("1,3,5,10,20", "with --sweeps: comma-separated list lengths K (each >= 1)")
    sweep_candidates: str = option(
        "100,300,1000,0",
        "with --sweeps: comma-separated candidate-set sizes (each > --k; 0 = all non-training items)",
    )
    seed: int = option(0, f"seed of training, sampling and the user subset (0 .. {_SEED_MAX})")
    out_dir: str = option("runs/lidu_study", "directory for the tables, plots and JSON (created if missing)")
    json: str | None = option(
        None, "JSON path of a single run (none = <out-dir>/<data>_<model>_<source>.json)"
    )
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        _check(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int_list(config: RealDataStudyConfig, name: str) -> list[int]:
    text = getattr(config, name)
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{_flag(name)} must be comma-separated integers, got {text!r}") from None


def _check(config: RealDataStudyConfig) -> None:
    """ValueError naming the flag of the first impossible setting of ``config``."""
    c = config
    for name, choices in (("model", MODELS), ("source", SOURCES), ("split", SPLITS)):
        if getattr(c, name) not in choices:
            raise ValueError(f"{_flag(name)} must be one of {', '.join(choices)}, got {getattr(c, name)!r}")
    if not c.all and c.data not in DATASETS and not os.path.isfile(c.data):
        raise ValueError(
            f"--data must be one of {', '.join(DATASETS)} or an existing interaction file, got {c.data!r}"
        )
    if c.source == "bayesian" and c.model != "bpr":
        raise ValueError("--source bayesian is Bayesian MF: use it with --model bpr")
    if c.source == "mc_dropout" and c.model == "lightgcn":
        raise ValueError("--source mc_dropout needs a model with dropout (bpr, mlp, sasrec), not lightgcn")
    for name, low in (
        ("k_core", 0), ("n_models", 2), ("n_samples", 2), ("epochs", 1), ("dim", 0), ("batch_size", 0),
        ("k", 1), ("grid_size", 8), ("max_eval_users", 0), ("chunk", 1), ("n_boot", 1),
        ("dynamics_every", 1), ("dynamics_users", 1),
    ):  # fmt: skip
        v = getattr(c, name)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise ValueError(f"{_flag(name)} must be an integer >= {low}, got {v!r}")
    if not (isinstance(c.seed, numbers.Integral) and 0 <= c.seed <= _SEED_MAX):
        raise ValueError(f"--seed must be an integer in [0, {_SEED_MAX}], got {c.seed!r}")
    if c.source == "snapshot" and c.n_models > c.epochs:
        raise ValueError(f"--source snapshot: --n-models={c.n_models} must be <= --epochs={c.epochs}")
    if not (math.isfinite(c.lr) and c.lr >= 0):
        raise ValueError(f"--lr must be finite and > 0 (or 0 for the model's default), got {c.lr}")
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {c.dropout}")
    if c.min_rating is not None and not math.isfinite(c.min_rating):
        raise ValueError(f"--min-rating must be finite (or none), got {c.min_rating}")
    bad = {v.strip() for v in c.lidu_variants.split(",")} - set(LIDU_VARIANT_FLAGS) - {""}
    if bad:
        raise ValueError(
            f"--lidu-variants must be a subset of {','.join(LIDU_VARIANT_FLAGS)}, got {sorted(bad)}"
        )
    ks = _int_list(c, "sweep_ks")
    if not ks or min(ks) < 1:
        raise ValueError(f"--sweep-ks must be one or more list lengths >= 1, got {c.sweep_ks!r}")
    sizes = _int_list(c, "sweep_candidates")
    if (c.sweeps or c.all) and (not sizes or min(sizes) < 0 or any(0 < s <= c.k for s in sizes)):
        raise ValueError(
            f"--sweep-candidates must be sizes > --k={c.k} (or 0 = all items), got {c.sweep_candidates!r}"
        )
    if c.dynamics and c.source not in ("ensemble", "bootstrap"):
        raise ValueError("--dynamics needs a stacked source: --source ensemble or bootstrap")
    if not c.out_dir or (os.path.exists(c.out_dir) and not os.path.isdir(c.out_dir)):
        raise ValueError(f"--out-dir must be a directory (it is created if missing), got {c.out_dir!r}")
    if c.json is not None and (not c.json or os.path.isdir(c.json)):
        raise ValueError(f"--json must be a file path, got {c.json!r}")


# ------------------------------------------------------------------------------------------ data, models


def load_data(config: RealDataStudyConfig) -> InteractionSplit:
    """The `InteractionSplit` named by ``config.data`` (a known name or a file path)."""
    load = datasets.LoadConfig(
        min_rating=config.min_rating, k_user=config.k_core, k_item=config.k_core, split=config.split, seed=0
    )
    if config.data == "ml-100k":
        return datasets.movielens_100k(config=load)
    if config.data == "lastfm":
        return datasets.lastfm(config=load)
    if config.data == "beauty":
        return datasets.beauty(config=load)
    if os.path.isfile(config.data):
        return datasets.load_interactions(config.data, load, name=Path(config.data).stem)
    raise ValueError(f"data must be one of {DATASETS} or an existing file, got {config.data!r}")


def _override(cfg, config: RealDataStudyConfig, **extra):
    fields = {f.name for f in dataclasses.fields(cfg)}
    upd = {n: v for n, v in (("dim", config.dim), ("lr", config.lr), ("batch_size", config.batch_size)) if v}
    upd.update({n: v for n, v in extra.items() if n in fields})
    return dataclasses.replace(cfg, **{n: v for n, v in upd.items() if n in fields})


def make_model(split: InteractionSplit, config: RealDataStudyConfig, *, dropout: float = 0.0) -> RecModel:
    """The recommender named by ``config.model`` with the study's defaults (``dropout`` for MC dropout)."""
    if config.model == "bpr":
        return make_bpr_mf(
            split, _override(MFConfig(dim=32, lr=0.005, batch_size=2048), config, dropout=dropout)
        )
    if config.model == "lightgcn":
        return make_lightgcn(split, _override(LightGCNConfig(dim=64, lr=0.01, batch_size=4096), config))
    if config.model == "mlp":
        return make_mlp(split, _override(MLPConfig(lr=3e-3), config, dropout=dropout or 0.1))
    if split.train_sequences is None:
        raise ValueError(f"model 'sasrec' needs time-ordered data; {split.name!r} has no order")
    return make_sasrec(split, _override(SASRecConfig(), config, dropout=dropout or 0.2))


# ----------------------------------------------------------------------------------------- score sources

# A source is "scores(users (B,)) -> (mean (B, n), std (B, n), samples (S, B, n) or None)".
Scorer = Callable[[np.ndarray], tuple[jax.Array, jax.Array, jax.Array | None]]


@functools.lru_cache(maxsize=16)
def _jitted_scores(model: RecModel):
    """``(stacked params, users (B,)) -> (M, B, n_items)`` deterministic scores, jitted once per model.

    `training.score_users` builds a new jitted lambda on every call, so calling it once per chunk and once
    per dynamics checkpoint recompiled the same program each time; this cache compiles it once per shape.
    """
    return jax.jit(jax.vmap(lambda p, u: model.score(p, u, None), in_axes=(0, None)))


def score_stacked(
    model: RecModel, params, users: np.ndarray, chunk: int, *, when: str = "after training"
) -> jax.Array:
    """``(M, U, n_items)`` full-catalogue scores of stacked ``params`` for ``users (U,)``, ``chunk`` users
    per call (the last chunk padded, so every call has the same shape and reuses one compilation).

    NaN/inf scores are a `TrainingFailedError` (``when`` says at which point of training, for its message).
    """
    users = np.asarray(users)
    fn = _jitted_scores(model)
    out = []
    for start in range(0, users.size, chunk):
        u = users[start : start + chunk]
        n_real = u.size
        if n_real < chunk and users.size > chunk:
            u = np.concatenate([u, np.full(chunk - n_real, u[-1], u.dtype)])
        s = fn(params, jnp.asarray(u, jnp.int32))[:, :n_real]
        check_finite_scores(s, model.name, when=when)
        out.append(s)
    return jnp.concatenate(out, axis=1)


def _stacked_scorer(model: RecModel, params, chunk: int) -> Scorer:
    def scores(users):
        s = score_stacked(model, params, users, chunk)
        m, sd = sample_moments(s)
        return m, sd, s

    return scores


def build_source(
    split: InteractionSplit,
    config: RealDataStudyConfig,
    key: jax.Array,
    make_callback: Callable | None = None,
) -> tuple[Scorer, RecModel, Any]:
    """Train what ``config.source`` needs; returns ``(scorer, model, stacked params or None)``.

    ``make_callback(model)`` (optional) gives a `fit` callback for the ensemble / bootstrap training.
    """
    n_train = int(split.train_users.shape[0])
    m, ep, pb = config.n_models, config.epochs, config.progress
    keys = jax.random.split(key, m)
    if config.source == "ensemble":
        model = make_model(split, config)
        cb = make_callback(model) if make_callback else None
        params, _ = fit(model, keys, jnp.ones((m, n_train)), ep, progress=pb, callback=cb)
        return _stacked_scorer(model, params, config.chunk), model, params
    if config.source == "bootstrap":
        model = make_model(split, config)
        w = bootstrap_weights(jax.random.fold_in(key, 7), m, n_train)
        cb = make_callback(model) if make_callback else None
        params, _ = fit(model, keys, w, ep, progress=pb, callback=cb)
        return _stacked_scorer(model, params, config.chunk), model, params
    if config.source == "snapshot":
        model = make_model(split, config)
        snaps = tuple(range(ep - m + 1, ep + 1))
        _, stacked = fit(model, keys[:1], jnp.ones((1, n_train)), ep, snapshot_epochs=snaps, progress=pb)
        params = flatten_snapshots(stacked)
        return _stacked_scorer(model, params, config.chunk), model, params
    if config.source == "mc_dropout":
        model = make_model(split, config, dropout=config.dropout)
        params, _ = fit(model, keys[:1], jnp.ones((1, n_train)), ep, progress=pb)
        one = jax.tree.map(lambda x: x[0], params)

        def scores(users):
            s = distributions.mc_dropout_samples(
                model, one, users, jax.random.fold_in(key, 11), n_samples=config.n_samples, chunk=config.chunk
            )
            mean, sd = sample_moments(s)
            return mean, sd, s

        return scores, model, None
    # bayesian
    model = make_bayesian_mf(split, _override(BayesianMFConfig(dim=32, lr=0.005, batch_size=2048), config))
    params, _ = fit(model, keys[:1], jnp.ones((1, n_train)), ep, progress=pb)
    one = jax.tree.map(lambda x: x[0], params)

    def scores(users):
        mean, sd = distributions.bayesian_gaussian(model, one, users, chunk=config.chunk)
        draws = distributions.mc_dropout_samples(
            model, one, users, jax.random.fold_in(key, 13), n_samples=config.n_samples, chunk=config.chunk
        )
        return mean, sd, draws

    return scores, model, None


# ------------------------------------------------------------------------------------------- estimators

LIDU_VARIANTS = (
    "LiDu",
    "LiDu unordered set",
    "LiDu top-3",
    "LiDu sequential approx.",
    "LiDu pairwise approx.",
)


def _chunk_estimates(
    mean, std, samples, cand, users, split: InteractionSplit, config: RealDataStudyConfig, key
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every estimator for one chunk of users (higher = more uncertain) and the top-K lists by mean."""
    k, g, b = config.k, config.grid_size, mean.shape[0]
    kw = dict(candidates=cand, grid_size=g, chunk_size=b)
    out: dict[str, np.ndarray] = {}
    val, rankings = lidu(mean, std, k, **kw)
    out["LiDu"] = np.asarray(val)
    variants = {v.strip() for v in config.lidu_variants.split(",")}
    if "unordered" in variants:
        out["LiDu unordered set"] = np.asarray(lidu(mean, std, k, ordered=False, **kw)[0])
    if "top3" in variants:
        out["LiDu top-3"] = np.asarray(lidu(mean, std, min(3, k), **kw)[0])
    if "sequential" in variants:
        out["LiDu sequential approx."] = np.asarray(lidu(mean, std, k, method="sequential", **kw)[0])
    if "pairwise" in variants:
        out["LiDu pairwise approx."] = np.asarray(lidu(mean, std, k, method="pairwise", **kw)[0])
    out.update(
        baselines.all_baselines(
            mean,
            std,
            samples,
            rankings,
            candidates=cand,
            activity=split.user_activity()[users],
            item_popularity=split.item_popularity(),
            key=key,
        )
    )
    return {n: np.asarray(v, np.float64) for n, v in out.items()}, np.asarray(rankings)


def _pad(users: np.ndarray, size: int) -> np.ndarray:
    return users if users.size == size else np.concatenate([users, np.full(size - users.size, users[-1])])


def estimate_all(
    scorer: Scorer, split: InteractionSplit, users: np.ndarray, config: RealDataStudyConfig, key: jax.Array
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-user uncertainties of every estimator and per-user NDCG@K / Recall@K, chunk by chunk.

    Returns ``(uncertainties name -> (U,), performance {"ndcg": (U,), "recall": (U,)})``.
    """
    train, test = split.train_matrix(), split.test_matrix()
    unc: dict[str, list[np.ndarray]] = {}
    perf: dict[str, list[np.ndarray]] = {"ndcg": [], "recall": []}
    size = min(config.chunk, users.size)
    for c, start in enumerate(range(0, users.size, size)):
        real = users[start : start + size]
        u = _pad(real, size)  # one compiled shape for every chunk
        mean, std, samples = scorer(u)
        cand = jnp.asarray(~train[u])  # True = may be recommended (not a training item)
        est, _ = _chunk_estimates(mean, std, samples, cand, u, split, config, jax.random.fold_in(key, c))
        for n, v in est.items():
            unc.setdefault(n, []).append(v[: real.size])
        rel = jnp.asarray(test[u])
        perf["ndcg"].append(np.asarray(metrics.ndcg_at_k(mean, rel, config.k, candidates=cand))[: real.size])
        perf["recall"].append(
            np.asarray(metrics.recall_at_k(mean, rel, config.k, candidates=cand))[: real.size]
        )
    return {n: np.concatenate(v) for n, v in unc.items()}, {n: np.concatenate(v) for n, v in perf.items()}


# ------------------------------------------------------------------------------------ dynamics, sweeps


def _dynamics_callback(
    model: RecModel, split: InteractionSplit, config: RealDataStudyConfig, users: np.ndarray, log
):
    """``fit`` callback: mean LiDu (ensemble spread of the stacked copies) and mean NDCG@K on ``users``."""
    train, test = split.train_matrix()[users], split.test_matrix()[users]
    cand, rel = jnp.asarray(~train), jnp.asarray(test)

    def callback(epoch: int, params, losses) -> None:
        if epoch % config.dynamics_every and epoch != config.epochs:
            return
        s = score_stacked(model, params, users, users.size, when=f"after epoch {epoch}")
        mean, std = sample_moments(s)
        val, _ = lidu(mean, std, config.k, candidates=cand, grid_size=config.grid_size, chunk_size=users.size)
        ndcg = metrics.ndcg_at_k(mean, rel, config.k, candidates=cand)
        log.append(
            {
                "epoch": epoch,
                "mean_lidu": float(np.mean(np.asarray(val))),
                "mean_ndcg": float(jnp.mean(ndcg)),
                "loss": float(jnp.mean(losses)),
            }
        )

    return callback


def dynamics_summary(log: list[dict[str, float]], model: str, n_users: int) -> dict[str, Any]:
    """Correlation of mean LiDu and mean NDCG@K across the logged checkpoints of one training run."""
    lid = np.array([r["mean_lidu"] for r in log])
    nd = np.array([r["mean_ndcg"] for r in log])
    return {
        "model": model,
        "n_users": n_users,
        "log": log,
        "kendall_tau_neg_lidu_vs_ndcg": float(stats.kendalltau(-lid, nd).statistic) if lid.size > 1 else None,
        "spearman_neg_lidu_vs_ndcg": float(stats.spearmanr(-lid, nd).statistic) if lid.size > 2 else None,
    }


def run_sweeps(
    scorer: Scorer, split: InteractionSplit, config: RealDataStudyConfig, users: np.ndarray, key
) -> dict:
    """LiDu's mean and its Kendall tau with NDCG@10 as the list length K and the candidate-set size vary.

    Candidate subsets: for size c, each user's candidates are its top-K items plus ``c - K`` others drawn
    uniformly from its non-training items (``0`` = all non-training items), so the list itself is unchanged
    and only the competition below it shrinks.
    """
    train, test = split.train_matrix()[users], split.test_matrix()[users]
    mean, std, _ = scorer(users)
    cand_all = jnp.asarray(~train)
    rel = jnp.asarray(test)
    ndcg = np.asarray(metrics.ndcg_at_k(mean, rel, 10, candidates=cand_all))
    g, b = config.grid_size, users.size
    out: dict[str, list] = {"k": [], "candidates": []}
    for k in [int(x) for x in config.sweep_ks.split(",") if x.strip()]:
        val, _ = lidu(mean, std, k, candidates=cand_all, grid_size=g, chunk_size=b)
        v = np.asarray(val, np.float64)
        out["k"].append(
            {"k": k, "mean_lidu": float(v.mean()), "kendall_tau": float(stats.kendalltau(-v, ndcg).statistic)}
        )
    top = np.asarray(metrics.top_k_items(mean, config.k, candidates=cand_all))
    rng = np.random.default_rng(config.seed)
    for c in [int(x) for x in config.sweep_candidates.split(",") if x.strip()]:
        if c == 0:
            cand = cand_all
        else:
            if c <= config.k:
                raise ValueError(f"sweep_candidates sizes must exceed k={config.k}, got {c}")
            keys = np.where(np.asarray(cand_all), rng.random(cand_all.shape), np.inf)
            keys[np.arange(b)[:, None], top] = -1.0  # the list is always a candidate
            pick = np.argsort(keys, axis=1)[:, :c]
            mask = np.zeros(cand_all.shape, bool)
            mask[np.arange(b)[:, None], pick] = True
            cand = jnp.asarray(mask & np.asarray(cand_all))
        val, _ = lidu(mean, std, config.k, candidates=cand, grid_size=g, chunk_size=b)
        v = np.asarray(val, np.float64)
        out["candidates"].append(
            {
                "size": c or int(split.n_items),
                "mean_lidu": float(v.mean()),
                "kendall_tau": float(stats.kendalltau(-v, ndcg).statistic),
            }
        )
    return out


# --------------------------------------------------------------------------------------------------- run


def _eval_users(split: InteractionSplit, config: RealDataStudyConfig) -> np.ndarray:
    users = np.unique(split.test_users)  # users with a held-out item
    if config.max_eval_users and config.max_eval_users < users.size:
        rng = np.random.default_rng(config.seed)
        users = np.sort(rng.choice(users, config.max_eval_users, replace=False))
    return users


def _cell_name(config: RealDataStudyConfig, split: InteractionSplit) -> str:
    return f"{split.name}_{config.model}_{config.source}"


def run(
    config: RealDataStudyConfig = RealDataStudyConfig(), *, split: InteractionSplit | None = None
) -> dict[str, Any]:
    """One cell of the study. Prints the tables; writes ``<out_dir>/<data>_<model>_<source>.{json,txt,png}``.

    Returns the JSON payload: ``{"estimators": <-uncertainty vs NDCG@K>, "recall": {"estimators": ...},
    "mean_ndcg", "mean_recall", "dataset", "model", "source", "n_users", "seconds", ["dynamics"],
    ["sweeps"]}``.

    Raises:
      ValueError: missing or malformed data, or ``k`` not below the number of items.
      lidu_jax.training.TrainingFailedError: the training diverged (NaN/inf parameters or scores); raised
        before any estimator sees the scores, its message naming the cell, the seed and the learning rate.
    """
    t0 = time.perf_counter()  # the config was validated when it was built (RealDataStudyConfig.__post_init__)
    split = load_data(config) if split is None else split
    if config.model == "sasrec" and split.train_sequences is None:
        raise ValueError(f"model 'sasrec' needs time-ordered data; {split.name!r} has no order")
    if config.k >= split.n_items:
        raise ValueError(f"--k={config.k} must be < the number of items ({split.n_items}) of {split.name}")
    key = jax.random.key(config.seed)
    users = _eval_users(split, config)
    dyn_log: list[dict[str, float]] = []
    dyn_users = users[: min(users.size, config.dynamics_users)]
    make_cb = None
    if config.dynamics:
        make_cb = lambda model: _dynamics_callback(model, split, config, dyn_users, dyn_log)
    t_train = time.perf_counter()
    try:  # training, and the scores the estimators get: a diverged run fails here, never in an estimator
        scorer, _, _ = build_source(split, config, jax.random.fold_in(key, 1), make_cb)
        t_est = time.perf_counter()
        unc, perf = estimate_all(scorer, split, users, config, jax.random.fold_in(key, 2))
    except TrainingFailedError as e:
        lr = config.lr or "the model's default"
        copies = ""
        if config.source in ("ensemble", "bootstrap"):
            copies = f"; copy m is the m-th of the --n-models {config.n_models} keys split from the seed"
        raise TrainingFailedError(
            f"{e} [study cell {_cell_name(config, split)}: --seed {config.seed}, --lr {lr}, "
            f"--epochs {config.epochs}{copies}]",
            model=e.model,
            members=e.members,
        ) from e
    t_eval = time.perf_counter()
    res_ndcg = evaluation.evaluate_estimators(
        unc, perf["ndcg"], n_boot=config.n_boot, seed=config.seed, reference="LiDu"
    )
    res_rec = evaluation.evaluate_estimators(
        unc, perf["recall"], n_boot=config.n_boot, seed=config.seed, reference="LiDu"
    )
    pop = make_popularity(split)
    pop_params = jax.vmap(pop.params)(jax.vmap(pop.init)(jax.random.split(key, 1)))
    pop_scores = score_stacked(pop, pop_params, users, config.chunk)[0]
    cand, rel = jnp.asarray(~split.train_matrix()[users]), jnp.asarray(split.test_matrix()[users])
    pop_ndcg = float(jnp.mean(metrics.ndcg_at_k(pop_scores, rel, config.k, candidates=cand)))
    name = _cell_name(config, split)
    title = (
        f"{split.name} / {config.model} / {config.source} "
        f"({config.n_models} models, {config.epochs} epochs): "
        f"{users.size} users, mean NDCG@{config.k} {perf['ndcg'].mean():.4f} (most-popular {pop_ndcg:.4f})"
    )
    table = evaluation.format_table(res_ndcg, title=f"{title}\n-uncertainty vs NDCG@{config.k}")
    table_rec = evaluation.format_table(res_rec, title=f"-uncertainty vs Recall@{config.k}")
    print("\n" + table + "\n\n" + table_rec, flush=True)
    result: dict[str, Any] = {
        "estimators": res_ndcg["estimators"],
        "n_boot": config.n_boot,
        "level": res_ndcg["level"],
        "reference": "LiDu",
        "metric": f"NDCG@{config.k}",
        "recall": res_rec,
        "dataset": split.name,
        "model": config.model,
        "source": config.source,
        "n_users": int(users.size),
        "n_items": int(split.n_items),
        "mean_ndcg": float(perf["ndcg"].mean()),
        "mean_recall": float(perf["recall"].mean()),
        "most_popular_ndcg": pop_ndcg,
        "mean_lidu": float(unc["LiDu"].mean()),
        "timing_s": {
            "train": round(t_est - t_train, 1),  # includes the dynamics callback when on
            "estimators_and_metrics": round(t_eval - t_est, 1),
        },
    }
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.sweeps:
        sub = users[: min(users.size, config.dynamics_users)]
        result["sweeps"] = run_sweeps(scorer, split, config, sub, jax.random.fold_in(key, 3))
        print("sweeps:", json.dumps(result["sweeps"]), flush=True)
    if config.dynamics:
        result["dynamics"] = dynamics_summary(dyn_log, config.model, int(dyn_users.size))
        _plot_dynamics(result["dynamics"], out_dir / f"{split.name}_dynamics.png", split.name, config)
        print(
            "dynamics:", json.dumps({k: v for k, v in result["dynamics"].items() if k != "log"}), flush=True
        )
    evaluation.plot_binned(
        {n: unc[n] for n in evaluation.PLOTTED if n in unc},
        perf["ndcg"],
        out_dir / f"{name}.png",
        ylabel=f"NDCG@{config.k}",
        title=title[:80],
    )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / f"{name}.txt").write_text(table + "\n\n" + table_rec + "\n")
    evaluation.write_json(result, config.json or out_dir / f"{name}.json", config=dataclasses.asdict(config))
    print(f"{name}: {result['seconds']} s", flush=True)
    return result


def _plot_dynamics(dyn: dict, path: Path, name: str, config: RealDataStudyConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in dyn["log"]]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    ax.plot(ep, [r["mean_lidu"] for r in dyn["log"]], "o-", color="C0", label="mean LiDu")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean LiDu (-log P of top-K)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(ep, [r["mean_ndcg"] for r in dyn["log"]], "s--", color="C1", label=f"mean NDCG@{config.k}")
    ax2.set_ylabel(f"mean NDCG@{config.k}", color="C1")
    ax.set_title(f"{name}: {dyn['model']} x{config.n_models}, training dynamics")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_all(config: RealDataStudyConfig = RealDataStudyConfig()) -> dict[str, Any]:
    """The grid ``DATASETS x MODELS`` with ``config.source``; BPR cells also run dynamics and sweeps.

    Writes every cell's files, ``summary.json`` and ``summary.md`` (the tables of ``docs/results-lidu.md``)
    in ``out_dir``, including the correlation of mean LiDu and mean NDCG@K across models per dataset.
    """
    cells: dict[str, Any] = {}
    for data in DATASETS:
        split = load_data(dataclasses.replace(config, data=data))
        for model in MODELS:
            try:  # building the cell's config checks it: e.g. a source that this model cannot provide
                cfg = dataclasses.replace(config, data=data, model=model, all=False, json=None)
                if model == "bpr":
                    stacked = config.source in ("ensemble", "bootstrap")  # what --dynamics needs
                    cfg = dataclasses.replace(cfg, dynamics=stacked, sweeps=True)
                if data == "beauty" and not cfg.max_eval_users:
                    cfg = dataclasses.replace(cfg, max_eval_users=2000)
                cells[f"{data}/{model}"] = run(cfg, split=split)
            except ValueError as e:
                print(f"skip {data}/{model}: {e}")
    summary = summarise(cells, config)
    out = Path(config.out_dir)
    (out / "summary.md").write_text(summary["markdown"])
    evaluation.write_json(summary, out / "summary.json")
    print(summary["markdown"])
    return summary


def summarise(cells: dict[str, Any], config: RealDataStudyConfig) -> dict[str, Any]:
    """Markdown table over cells (LiDu vs the best baseline, NDCG and Recall) and across-model correlation."""
    lines = [
        f"| dataset | model | users | NDCG@{config.k} (pop.) | LiDu tau vs NDCG [95% CI] "
        "| best baseline (tau) | LiDu >= all baselines | LiDu tau vs Recall | best baseline vs Recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    wins = {}
    for name, res in cells.items():
        data, model = name.split("/")
        row = [data, model, str(res["n_users"]), f"{res['mean_ndcg']:.4f} ({res['most_popular_ndcg']:.4f})"]
        for est in (res["estimators"], res["recall"]["estimators"]):
            lt = est["LiDu"]
            best, win = evaluation.best_baseline(est)
            if est is res["estimators"]:
                wins[name] = win
                row += [
                    f"{lt['kendall_tau']:+.3f} [{lt['ci'][0]:+.3f}, {lt['ci'][1]:+.3f}]",
                    f"{best} ({est[best]['kendall_tau']:+.3f})",
                    "yes" if win else "no",
                ]
            else:
                row += [f"{lt['kendall_tau']:+.3f}", f"{best} ({est[best]['kendall_tau']:+.3f})"]
        lines.append("| " + " | ".join(row) + " |")
    across = {}
    for data in DATASETS:
        pts = [(c["mean_lidu"], c["mean_ndcg"]) for n, c in cells.items() if n.startswith(data + "/")]
        if len(pts) >= 3:
            a = np.array(pts)
            across[data] = {
                "n_models": len(pts),
                "kendall_tau_neg_lidu_vs_ndcg": float(stats.kendalltau(-a[:, 0], a[:, 1]).statistic),
            }
    lines += [
        "",
        "Across models (per dataset): Kendall tau of -mean LiDu vs mean NDCG@K: "
        + ", ".join(
            f"{d} {v['kendall_tau_neg_lidu_vs_ndcg']:+.2f} (n={v['n_models']})" for d, v in across.items()
        ),
    ]
    return {
        "cells": cells,
        "lidu_beats_all_baselines": wins,
        "across_models": across,
        "markdown": "\n".join(lines) + "\n",
    }


def _parser() -> argparse.ArgumentParser:
    return config_parser(
        RealDataStudyConfig,
        "python -m lidu_jax.study",
        "The real-data LiDu study: one data set x recommender x score-distribution source (or --all for "
        "the grid); per-user LiDu and label-free baselines against NDCG@K and Recall@K, with bootstrap "
        "intervals.",
    )


def _body(config: RealDataStudyConfig) -> None:
    if config.all:
        run_all(config)
    else:
        run(config)


def main(argv: list[str] | None = None) -> int:
    """CLI: flags -> `RealDataStudyConfig` -> `run` (or `run_all` with ``--all``); returns the exit status.

    A rejected flag value, a missing or malformed data file is one ``error:`` line on stderr and status 2; a
    diverged training run (`TrainingFailedError`) is one line and status 3. Use `run` for the results.
    """
    return run_cli(_parser(), lambda values: RealDataStudyConfig(**values), _body, argv)


def __getattr__(name: str) -> Any:
    # ``StudyConfig`` was the name of this class and of the other study's config until issue 13 gave them
    # distinct names; old imports keep working, with a warning.
    if name == "StudyConfig":
        message = f"{__name__}.StudyConfig is deprecated; use RealDataStudyConfig"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return RealDataStudyConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
