"""The real-data LiDu study: does LiDu track per-user ranking quality on real data, better than label-free
baselines, with popular recommenders? (issue 3; definitions in ``docs/lidu.md``)

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
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lidu_jax import baselines, datasets, distributions, evaluation, metrics
from lidu_jax._cli import config_parser
from lidu_jax.estimators import lidu, sample_moments
from lidu_jax.models.base import RecModel
from lidu_jax.models.lightgcn import LightGCNConfig, make_lightgcn
from lidu_jax.models.mf import BayesianMFConfig, MFConfig, bayesian_mf_moments, make_bayesian_mf, make_bpr_mf
from lidu_jax.models.mlp import MLPConfig, make_mlp
from lidu_jax.models.popularity import make_popularity
from lidu_jax.models.sasrec import SASRecConfig, make_sasrec
from lidu_jax.training import bootstrap_weights, fit, flatten_snapshots
from lidu_jax.types import InteractionSplit

__all__ = [
    "DATASETS",
    "MODELS",
    "SOURCES",
    "StudyConfig",
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


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Settings of one study run; each field is the command-line flag ``--field-name``.

    Attributes:
      data: ``ml-100k``, ``lastfm``, ``beauty`` or a path to any interaction file
        (`datasets.read_interactions`).
      model: ``bpr`` (BPR-MF), ``lightgcn``, ``mlp`` (NeuMF-style) or ``sasrec``.
      source: ``ensemble``, ``bootstrap``, ``snapshot``, ``mc_dropout`` (bpr/mlp/sasrec) or ``bayesian``
        (bpr only).
      all: run the grid ``DATASETS x MODELS`` with ``source`` (plus dynamics and sweeps on BPR per dataset).
      split: ``leave_last_out`` or ``random``; min_rating: implicit threshold (None = every interaction).
      k_core: user/item k-core of the data.
      n_models: ensemble / bootstrap / snapshot size (distinct seeds for the ensemble).
      n_samples: MC-dropout passes. dropout: dropout rate of the MC-dropout model.
      epochs: training epochs. dim, lr, batch_size: model overrides (0 = the model's default).
      k: list length K of LiDu, NDCG@K and Recall@K. grid_size: cells of the exact estimator.
      lidu_variants: comma-separated subset of exact, unordered, top3, sequential, pairwise.
      max_eval_users: evaluate a seeded random subset of this many users (0 = all).
      chunk: users per scoring/estimation chunk.
      n_boot: bootstrap resamples over users.
      dynamics: track mean LiDu and mean NDCG@K every ``dynamics_every`` epochs on ``dynamics_users`` users.
      sweeps: LiDu for K in ``sweep_ks`` and for random candidate subsets of sizes ``sweep_candidates``.
      seed: seed of training, sampling and the user subset.
      out_dir: where tables, plots and JSON go. json: JSON path of a single run (default: in out_dir).
      progress: progress bars.
    """

    data: str = "ml-100k"
    model: str = "bpr"
    source: str = "ensemble"
    all: bool = False
    split: str = "leave_last_out"
    min_rating: float | None = None
    k_core: int = 5
    n_models: int = 5
    n_samples: int = 10
    dropout: float = 0.2
    epochs: int = 20
    dim: int = 0
    lr: float = 0.0
    batch_size: int = 0
    k: int = 10
    grid_size: int = 256
    lidu_variants: str = "exact,unordered,top3,sequential,pairwise"
    max_eval_users: int = 0
    chunk: int = 256
    n_boot: int = 200
    dynamics: bool = False
    dynamics_every: int = 2
    dynamics_users: int = 500
    sweeps: bool = False
    sweep_ks: str = "1,3,5,10,20"
    sweep_candidates: str = "100,300,1000,0"
    seed: int = 0
    out_dir: str = "runs/lidu_study"
    json: str | None = None
    progress: bool = True


def _check(config: StudyConfig) -> None:
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {config.model!r}")
    if config.source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {config.source!r}")
    if config.source == "bayesian" and config.model != "bpr":
        raise ValueError("source 'bayesian' is Bayesian MF: use it with --model bpr")
    if config.source == "mc_dropout" and config.model == "lightgcn":
        raise ValueError("source 'mc_dropout' needs a model with dropout (bpr, mlp, sasrec), not lightgcn")
    if config.n_models < 2 or config.n_samples < 2:
        raise ValueError(f"n_models and n_samples must be >= 2, got {config.n_models}, {config.n_samples}")
    if config.source == "snapshot" and config.n_models > config.epochs:
        raise ValueError(f"snapshot source: n_models={config.n_models} must be <= epochs={config.epochs}")
    if config.epochs < 1 or config.k < 1 or config.chunk < 1 or config.n_boot < 1 or config.grid_size < 8:
        raise ValueError(f"need epochs, k, chunk, n_boot >= 1 and grid_size >= 8, got {config}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    bad = {v.strip() for v in config.lidu_variants.split(",")} - set(LIDU_VARIANT_FLAGS) - {""}
    if bad:
        raise ValueError(f"lidu_variants must be a subset of {LIDU_VARIANT_FLAGS}, got {sorted(bad)}")


# ------------------------------------------------------------------------------------------ data, models


def load_data(config: StudyConfig) -> InteractionSplit:
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


def _override(cfg, config: StudyConfig, **extra):
    fields = {f.name for f in dataclasses.fields(cfg)}
    upd = {n: v for n, v in (("dim", config.dim), ("lr", config.lr), ("batch_size", config.batch_size)) if v}
    upd.update({n: v for n, v in extra.items() if n in fields})
    return dataclasses.replace(cfg, **{n: v for n, v in upd.items() if n in fields})


def make_model(split: InteractionSplit, config: StudyConfig, *, dropout: float = 0.0) -> RecModel:
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


def score_stacked(model: RecModel, params, users: np.ndarray, chunk: int) -> jax.Array:
    """``(M, U, n_items)`` full-catalogue scores of stacked ``params`` for ``users (U,)``, ``chunk`` users
    per call (the last chunk padded, so every call has the same shape and reuses one compilation)."""
    users = np.asarray(users)
    fn = _jitted_scores(model)
    out = []
    for start in range(0, users.size, chunk):
        u = users[start : start + chunk]
        n_real = u.size
        if n_real < chunk and users.size > chunk:
            u = np.concatenate([u, np.full(chunk - n_real, u[-1], u.dtype)])
        out.append(fn(params, jnp.asarray(u, jnp.int32))[:, :n_real])
    return jnp.concatenate(out, axis=1)


def _stacked_scorer(model: RecModel, params, chunk: int) -> Scorer:
    def scores(users):
        s = score_stacked(model, params, users, chunk)
        m, sd = sample_moments(s)
        return m, sd, s

    return scores


def build_source(
    split: InteractionSplit, config: StudyConfig, key: jax.Array, make_callback: Callable | None = None
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
                model, one, users, config.n_samples, jax.random.fold_in(key, 11), chunk=config.chunk
            )
            mean, sd = sample_moments(s)
            return mean, sd, s

        return scores, model, None
    # bayesian
    model = make_bayesian_mf(split, _override(BayesianMFConfig(dim=32, lr=0.005, batch_size=2048), config))
    params, _ = fit(model, keys[:1], jnp.ones((1, n_train)), ep, progress=pb)
    one = jax.tree.map(lambda x: x[0], params)
    moments = jax.jit(bayesian_mf_moments)

    def scores(users):
        mean, sd = moments(one, jnp.asarray(users, jnp.int32))
        draws = distributions.mc_dropout_samples(
            model, one, users, config.n_samples, jax.random.fold_in(key, 13), chunk=config.chunk
        )
        return mean, jnp.maximum(sd, 1e-6), draws

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
    mean, std, samples, cand, users, split: InteractionSplit, config: StudyConfig, key
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
    scorer: Scorer, split: InteractionSplit, users: np.ndarray, config: StudyConfig, key: jax.Array
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
        cand = jnp.asarray(~train[u])
        est, _ = _chunk_estimates(mean, std, samples, cand, u, split, config, jax.random.fold_in(key, c))
        for n, v in est.items():
            unc.setdefault(n, []).append(v[: real.size])
        rel, excl = jnp.asarray(test[u]), jnp.asarray(train[u])
        perf["ndcg"].append(np.asarray(metrics.ndcg_at_k(mean, rel, config.k, exclude=excl))[: real.size])
        perf["recall"].append(np.asarray(metrics.recall_at_k(mean, rel, config.k, exclude=excl))[: real.size])
    return {n: np.concatenate(v) for n, v in unc.items()}, {n: np.concatenate(v) for n, v in perf.items()}


# ------------------------------------------------------------------------------------ dynamics, sweeps


def _dynamics_callback(model: RecModel, split: InteractionSplit, config: StudyConfig, users: np.ndarray, log):
    """``fit`` callback: mean LiDu (ensemble spread of the stacked copies) and mean NDCG@K on ``users``."""
    train, test = split.train_matrix()[users], split.test_matrix()[users]
    cand, rel, excl = jnp.asarray(~train), jnp.asarray(test), jnp.asarray(train)

    def callback(epoch: int, params, losses) -> None:
        if epoch % config.dynamics_every and epoch != config.epochs:
            return
        s = score_stacked(model, params, users, users.size)
        mean, std = sample_moments(s)
        val, _ = lidu(mean, std, config.k, candidates=cand, grid_size=config.grid_size, chunk_size=users.size)
        ndcg = metrics.ndcg_at_k(mean, rel, config.k, exclude=excl)
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


def run_sweeps(scorer: Scorer, split: InteractionSplit, config: StudyConfig, users: np.ndarray, key) -> dict:
    """LiDu's mean and its Kendall tau with NDCG@10 as the list length K and the candidate-set size vary.

    Candidate subsets: for size c, each user's candidates are its top-K items plus ``c - K`` others drawn
    uniformly from its non-training items (``0`` = all non-training items), so the list itself is unchanged
    and only the competition below it shrinks.
    """
    train, test = split.train_matrix()[users], split.test_matrix()[users]
    mean, std, _ = scorer(users)
    cand_all = jnp.asarray(~train)
    rel, excl = jnp.asarray(test), jnp.asarray(train)
    ndcg = np.asarray(metrics.ndcg_at_k(mean, rel, 10, exclude=excl))
    g, b = config.grid_size, users.size
    out: dict[str, list] = {"k": [], "candidates": []}
    for k in [int(x) for x in config.sweep_ks.split(",") if x.strip()]:
        val, _ = lidu(mean, std, k, candidates=cand_all, grid_size=g, chunk_size=b)
        v = np.asarray(val, np.float64)
        out["k"].append(
            {"k": k, "mean_lidu": float(v.mean()), "kendall_tau": float(stats.kendalltau(-v, ndcg).statistic)}
        )
    top = np.asarray(metrics.top_k_items(mean, config.k, excl))
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


def _eval_users(split: InteractionSplit, config: StudyConfig) -> np.ndarray:
    users = np.unique(split.test_users)  # users with a held-out item
    if config.max_eval_users and config.max_eval_users < users.size:
        rng = np.random.default_rng(config.seed)
        users = np.sort(rng.choice(users, config.max_eval_users, replace=False))
    return users


def _cell_name(config: StudyConfig, split: InteractionSplit) -> str:
    return f"{split.name}_{config.model}_{config.source}"


def run(config: StudyConfig = StudyConfig(), *, split: InteractionSplit | None = None) -> dict[str, Any]:
    """One cell of the study. Prints the tables; writes ``<out_dir>/<data>_<model>_<source>.{json,txt,png}``.

    Returns the JSON payload: ``{"estimators": <-uncertainty vs NDCG@K>, "recall": {"estimators": ...},
    "mean_ndcg", "mean_recall", "dataset", "model", "source", "n_users", "seconds", ["dynamics"],
    ["sweeps"]}``.
    """
    _check(config)
    t0 = time.perf_counter()
    split = load_data(config) if split is None else split
    if config.model == "sasrec" and split.train_sequences is None:
        raise ValueError(f"model 'sasrec' needs time-ordered data; {split.name!r} has no order")
    if config.k >= split.n_items:
        raise ValueError(f"k={config.k} must be < n_items={split.n_items}")
    key = jax.random.key(config.seed)
    users = _eval_users(split, config)
    dyn_log: list[dict[str, float]] = []
    dyn_users = users[: min(users.size, config.dynamics_users)]
    make_cb = None
    if config.dynamics:
        if config.source not in ("ensemble", "bootstrap"):
            raise ValueError("dynamics needs a stacked source (ensemble or bootstrap)")
        make_cb = lambda model: _dynamics_callback(model, split, config, dyn_users, dyn_log)
    t_train = time.perf_counter()
    scorer, _, _ = build_source(split, config, jax.random.fold_in(key, 1), make_cb)
    t_est = time.perf_counter()
    unc, perf = estimate_all(scorer, split, users, config, jax.random.fold_in(key, 2))
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
    excl, rel = jnp.asarray(split.train_matrix()[users]), jnp.asarray(split.test_matrix()[users])
    pop_ndcg = float(jnp.mean(metrics.ndcg_at_k(pop_scores, rel, config.k, exclude=excl)))
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
    shown = [
        n for n in ("LiDu", "sampled top-K instability", "mean std of top-K", "user activity") if n in unc
    ]
    evaluation.plot_binned(
        {n: unc[n] for n in shown},
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


def _plot_dynamics(dyn: dict, path: Path, name: str, config: StudyConfig) -> None:
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


def run_all(config: StudyConfig = StudyConfig()) -> dict[str, Any]:
    """The grid ``DATASETS x MODELS`` with ``config.source``; BPR cells also run dynamics and sweeps.

    Writes every cell's files, ``summary.json`` and ``summary.md`` (the tables of ``docs/results-lidu.md``)
    in ``out_dir``, including the correlation of mean LiDu and mean NDCG@K across models per dataset.
    """
    cells: dict[str, Any] = {}
    for data in DATASETS:
        split = load_data(dataclasses.replace(config, data=data))
        for model in MODELS:
            cfg = dataclasses.replace(config, data=data, model=model, all=False, json=None)
            if model == "bpr":
                cfg = dataclasses.replace(cfg, dynamics=True, sweeps=True)
            if data == "beauty" and not cfg.max_eval_users:
                cfg = dataclasses.replace(cfg, max_eval_users=2000)
            try:
                cells[f"{data}/{model}"] = run(cfg, split=split)
            except ValueError as e:  # e.g. a source that this model cannot provide
                print(f"skip {data}/{model}: {e}")
    summary = summarise(cells, config)
    out = Path(config.out_dir)
    (out / "summary.md").write_text(summary["markdown"])
    evaluation.write_json(summary, out / "summary.json")
    print(summary["markdown"])
    return summary


def summarise(cells: dict[str, Any], config: StudyConfig) -> dict[str, Any]:
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
            base = {n: r for n, r in est.items() if not n.startswith("LiDu")}
            best = max(base, key=lambda n: base[n]["kendall_tau"])
            win = all(lt["kendall_tau"] >= r["kendall_tau"] for r in base.values())
            if est is res["estimators"]:
                wins[name] = win
                row += [
                    f"{lt['kendall_tau']:+.3f} [{lt['ci'][0]:+.3f}, {lt['ci'][1]:+.3f}]",
                    f"{best} ({base[best]['kendall_tau']:+.3f})",
                    "yes" if win else "no",
                ]
            else:
                row += [f"{lt['kendall_tau']:+.3f}", f"{best} ({base[best]['kendall_tau']:+.3f})"]
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
    return config_parser(StudyConfig, "python -m lidu_jax.study", __doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: flags -> `StudyConfig` -> `run` (or `run_all` with ``--all``)."""
    config = StudyConfig(**vars(_parser().parse_args(argv)))
    return run_all(config) if config.all else run(config)


if __name__ == "__main__":
    main()
