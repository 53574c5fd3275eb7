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

Two more protocols share these flags: ``--protocol models`` (model selection by mean uncertainty across a
population of recommenders, `lidu_jax.study_models`) and ``--protocol dynamics`` (`lidu_jax.study_dynamics`).

This module runs cells, writes their tables and plots, runs the grid and is the command line; the settings are
`lidu_jax.study_config` and the per-cell machinery (data, models, score sources, estimators, dynamics, sweeps)
is `lidu_jax.study_cells`. Their public names are importable from here as well.
"""

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lidu_jax import evaluation, metrics
from lidu_jax._cli import config_parser, run_cli
from lidu_jax.models.popularity import make_popularity
from lidu_jax.study_cells import LIDU_VARIANTS as LIDU_VARIANTS
from lidu_jax.study_cells import Scorer as Scorer
from lidu_jax.study_cells import (
    _dynamics_callback,
    build_source,
    dynamics_summary,
    estimate_all,
    load_data,
    run_sweeps,
    score_stacked,
)
from lidu_jax.study_cells import make_model as make_model
from lidu_jax.study_config import DATASETS, MODELS, RealDataStudyConfig
from lidu_jax.study_config import LIDU_VARIANT_FLAGS as LIDU_VARIANT_FLAGS
from lidu_jax.study_config import SOURCES as SOURCES
from lidu_jax.study_config import SPLITS as SPLITS
from lidu_jax.training import failure_context
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
    lr = config.lr or "the model's default"
    copies = ""
    if config.source in ("ensemble", "bootstrap"):
        copies = f"; copy m is the m-th of the --n-models {config.n_models} keys split from the seed"
    context = (
        f"study cell {_cell_name(config, split)}: --seed {config.seed}, --lr {lr}, "
        f"--epochs {config.epochs}{copies}"
    )
    t_train = time.perf_counter()
    # Training, and the scores the estimators get: a diverged run fails here, never in an estimator.
    with failure_context(context):
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
    # The other protocols live in their own modules, imported only when chosen.
    if config.protocol == "models":
        from lidu_jax.study_models import run_models_protocol

        run_models_protocol(config)
    elif config.protocol == "dynamics":
        from lidu_jax.study_dynamics import run_dynamics_protocol

        run_dynamics_protocol(config)
    elif config.all:
        run_all(config)
    else:
        run(config)


def main(argv: list[str] | None = None) -> int:
    """CLI: flags -> `RealDataStudyConfig` -> `run` (or `run_all` with ``--all``; with ``--protocol models``
    `lidu_jax.study_models.run_models_protocol`, with ``--protocol dynamics``
    `lidu_jax.study_dynamics.run_dynamics_protocol`); returns the exit status.

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
