"""The per-cell machinery of the real-data LiDu study (`lidu_jax.study`): what one cell computes.

Loading the data set and building the recommender a `RealDataStudyConfig` names; training the score
distribution of its source (a `Scorer`: users -> per-item score mean, std and samples); every estimator (the
LiDu variants and the label-free baselines) and NDCG@K / Recall@K per user, chunk by chunk; and the optional
extras, the training dynamics and the sweeps over the list length and the candidate-set size. Running a cell,
its tables and files, the grid and the command line are `lidu_jax.study`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lidu_jax import baselines, datasets, distributions, metrics
from lidu_jax.agreement import list_self_agreement
from lidu_jax.correlated import lidu_correlated
from lidu_jax.estimators import lidu
from lidu_jax.models.base import RecModel
from lidu_jax.models.lightgcn import LightGCNConfig, make_lightgcn
from lidu_jax.models.mf import BayesianMFConfig, MFConfig, make_bayesian_mf, make_bpr_mf
from lidu_jax.models.mlp import MLPConfig, make_mlp
from lidu_jax.models.sasrec import SASRecConfig, make_sasrec
from lidu_jax.samples import sample_moments
from lidu_jax.study_config import DATASETS, RealDataStudyConfig
from lidu_jax.training import bootstrap_weights, check_finite_scores, fit, flatten_snapshots
from lidu_jax.types import InteractionSplit

__all__ = [
    "LIDU_VARIANTS",
    "Scorer",
    "build_source",
    "dynamics_summary",
    "estimate_all",
    "load_data",
    "make_model",
    "run_sweeps",
    "score_stacked",
]


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
    cfg = _override(SASRecConfig(), config, dropout=dropout or 0.2, pack=config.sasrec_pack)
    return make_sasrec(split, cfg)


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
    "LiDu correlated (ours)",
    "LiDu self-agreement (ours)",
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
    if "agreement" in variants:
        # our addition (lidu_jax.agreement): the expected share of the list's items each draw reproduces
        out["LiDu self-agreement (ours)"] = np.asarray(
            list_self_agreement(mean, std, k, key=jax.random.fold_in(key, 19), candidates=cand, chunk_size=b)[
                0
            ]
        )
    if "correlated" in variants and samples is not None and samples.shape[0] >= 2:
        # our addition (lidu_jax.correlated): the members' joint moves, correlations shrunk by half; one
        # orthogonal block of 2(M - 1) draws per user: about 2(M - 1) exact grids (10.9x the exact estimator's
        # time measured with M = 5 on Beauty's catalogue, benchmarks/bench_lidu_correlated_cost.py)
        out["LiDu correlated (ours)"] = np.asarray(
            lidu_correlated(
                samples, k, key=jax.random.fold_in(key, 17), candidates=cand, shrinkage=0.5,
                n_draws=2 * (samples.shape[0] - 1), grid_size=g, chunk_size=b,
            )[0]
        )  # fmt: skip
    out.update(
        baselines.all_baselines(
            mean,
            std,
            samples,
            rankings,
            candidates=cand,
            activity=split.user_activity()[users],
            item_popularity=split.item_popularity(),
            profile=~np.asarray(cand),  # the user's training items (NDCG excludes them from the list)
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
