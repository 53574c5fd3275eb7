"""Model-level selection with LiDu: can mean uncertainty pick a good recommender before any user engages?
(the ``models`` protocol of `lidu_jax.study`)

    python -m lidu_jax.study --protocol models --data ml-100k --out-dir runs/models
    python -m lidu_jax.study --protocol models --data ml-100k --population small     # a tiny population

For one data set the protocol

1. trains the population of `POPULATIONS` (a table below): per family (bpr, lightgcn, mlp, sasrec; sasrec
   only on time-ordered data, otherwise the skip and its reason are recorded) three training runs -- small
   dim, large dim, large dim with strong regularisation -- whose snapshots give under-trained ("few"
   epochs), normally trained and over-trained ("many" epochs) models, six models per family. Every model is
   a deep ensemble of the same ``--n-models`` seeds (default 3, trained at once with `jax.vmap`), because
   mean LiDu depends on the ensemble size;
2. per model, every per-user estimator of `lidu_jax.study_cells.estimate_all` (LiDu exact and pairwise by
   default, and the label-free baselines) on the evaluation users (the ``--max-eval-users`` rule of the user
   protocol), and the mean over users of each, of NDCG@K and of Recall@K;
3. per estimator, across the models: the Kendall tau of ``-mean uncertainty`` and mean NDCG@K with a
   bootstrap interval over models, and the selection regret of choosing the model with the lowest mean
   uncertainty (`kendall_tau`, `selection_regret`, `bootstrap_tau`); the same within each family; and two
   reference rows, a uniformly random choice and the oracle;
4. label-free diagnostics per model (ensemble spread, item spread, their ratio, training loss, epochs) and a
   scale-free LiDu (below);
5. writes ``<out_dir>/models_<data>.json``, ``models_<data>.md`` and ``models_<data>.png`` (skipped, with the
   reason in the JSON, when matplotlib is missing). While it runs, each finished training run is saved in
   ``<out_dir>/models_<data>.ckpt/`` (`lidu_jax.study_models_checkpoint`): after an interruption the same
   command with ``--resume`` restores the finished runs and trains only the rest; a run still training is
   saved every ten minutes and continued from its last saved epoch.

The scale-free LiDu ("LiDu at common spread ratio"), chosen before any result was seen. A quick check on
nine ML-100K configurations found mean LiDu anti-correlated with mean NDCG across families. LiDu is
``-log P`` of the consensus list under per-item Gaussians; it is unchanged by rescaling a user's scores
(mean and std together), so its level is set by the noise-to-signal ratio of the ensemble: how far its
members disagree (``std``) relative to how far the item means lie apart. The disagreement level of an
ensemble of seeds is largely a property of the family and its training (initial scale, dropout, graph
smoothing, width, how far training has moved the members from their random starts) rather than of its
error, so mean LiDu compared across families measures partly that "temperature". The principled label-free
correction is to compare every model at the same temperature: model m's stds are multiplied by one scalar
``c_m = rho* / rho_m``, where ``rho_m = mean ensemble spread / mean item spread`` (the diagnostics below) and
``rho*`` is the median ``rho`` of the population (so the rescaling is as small as possible on average).
What remains is how decisively each model's list stands out given a common amount of disagreement, and how
the model distributes its disagreement over items. One scalar per model keeps the users' relative order
within a model; neither NDCG nor Recall enters it.

Rejected alternatives (reasoning, recorded so the choice is auditable): the ratio to the uniform list
surprisal ``log(n_c! / (n_c - K)!)`` is scale-free across catalogue sizes but, with the same users and
candidates for every model of a population, it only reweights users and cannot change the model ranking
much; the ratio to the same ensemble's LiDu of a random list lives in the extreme tail (``log P`` of
-10^2..-10^4 on ML-100K), where the exact grid estimator is slow (~20x) and the exact and pairwise values
disagree by tens of percent, so the reference is numerically meaningless; "LiDu per unit of ensemble
spread" divides a dimensionless number by a score-scale one, so it is not scale-free at all.

Diagnostics per model, all label-free and on the evaluation users' candidates (non-training items):
``ensemble_spread`` = mean over users and candidates of the std across members (the std LiDu sees);
``item_spread`` = mean over users of the std across candidates of the mean score; ``spread_ratio`` = their
ratio (``rho``); ``train_loss`` = the members' mean training loss in the model's last epoch (the family's
own objective, BPR for bpr/lightgcn/mlp and binary cross-entropy for sasrec, with its regulariser: comparable
within a family only); ``epochs``. Their Kendall tau with mean NDCG and with mean LiDu across models (and
within families) is reported, to see which of them carries the anti-correlation.

The per-family model settings are those of the user protocol (`lidu_jax.study_cells.make_model`) except for
what the population table varies. An sasrec "epoch" is one pass over the users (batches of histories), not
over the interactions, so its epoch counts are larger.

Where the code is: this module is the protocol (its option checks and `run_models_protocol`); the population
table, training and per-model measurements are `lidu_jax.study_models_population`, the statistics across
models `lidu_jax.study_models_selection`, the Markdown tables and plot `lidu_jax.study_models_report`. Their
public names are importable from here as well.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lidu_jax import evaluation
from lidu_jax.models.base import RecModel
from lidu_jax.study_cells import load_data
from lidu_jax.study_config import MODELS, RealDataStudyConfig
from lidu_jax.study_models_checkpoint import RunCheckpoints

# check_models_config and run_models_protocol call `population` and `_train` by their names here, so a test
# that replaces them on this module replaces what the protocol runs.
from lidu_jax.study_models_population import (
    DIAGNOSTICS,
    FAMILY_BASE,
    POPULATIONS,
    SCALE_FREE,
    FamilyPlan,
    PopulationModel,
    TrainingRun,
    _evaluate,
    _make,
    _rescaled_lidu,
    _train,
    population,
)
from lidu_jax.study_models_report import _plot, markdown
from lidu_jax.study_models_selection import (
    bootstrap_tau,
    kendall_tau,
    random_choice_regret,
    selection_regret,
    selection_table,
)
from lidu_jax.training import failure_context
from lidu_jax.types import InteractionSplit

__all__ = [
    "DIAGNOSTICS",
    "FAMILY_BASE",
    "POPULATIONS",
    "SCALE_FREE",
    "FamilyPlan",
    "PopulationModel",
    "TrainingRun",
    "bootstrap_tau",
    "check_models_config",
    "kendall_tau",
    "markdown",
    "population",
    "random_choice_regret",
    "run_models_protocol",
    "selection_regret",
    "selection_table",
]

MIN_MODELS = 3  # a Kendall tau across fewer models is +-1 or undefined


def _families(config: RealDataStudyConfig) -> list[str]:
    return [f.strip() for f in config.population_families.split(",") if f.strip()]


def check_models_config(config: RealDataStudyConfig) -> None:
    """ValueError naming the flag of the first setting the models protocol cannot use (called when the config
    is built, so before any data is loaded or any model trained).

    The population table sets each model's dim, learning rate, batch size and epochs, and every model is a
    seed ensemble, so ``--dim``, ``--lr``, ``--batch-size``, ``--source`` other than ensemble, ``--all``,
    ``--dynamics``, ``--sweeps`` and ``--json`` are rejected rather than silently ignored (``--model`` and
    ``--epochs`` cannot be told from their defaults and are ignored).
    """
    c = config
    if c.source != "ensemble":
        raise ValueError(
            f"--protocol models trains seed ensembles: --source must be ensemble, got {c.source!r}"
        )
    for flag, value in (("--all", c.all), ("--dynamics", c.dynamics), ("--sweeps", c.sweeps)):
        if value:
            raise ValueError(f"{flag} is a user-protocol option; it does not apply to --protocol models")
    for flag, value in (("--dim", c.dim), ("--lr", c.lr), ("--batch-size", c.batch_size)):
        if value:
            raise ValueError(f"{flag} is set per model by the population table of --protocol models")
    if c.json is not None:
        raise ValueError("--protocol models writes <out-dir>/models_<data>.json; use --out-dir, not --json")
    families = _families(c)
    if not families or len(set(families)) != len(families):
        raise ValueError(
            f"--population-families must be distinct names from {','.join(MODELS)}, "
            f"got {c.population_families!r}"
        )
    _, models = population(c.population, families)
    if len(models) < MIN_MODELS:
        raise ValueError(
            f"--protocol models needs >= {MIN_MODELS} models for a Kendall tau; "
            f"--population {c.population} with {c.population_families!r} has {len(models)}"
        )


# ------------------------------------------------------------------------------------------ protocol


def _diagnostic_taus(rows: list[dict[str, Any]], idx: np.ndarray) -> dict[str, dict[str, float]]:
    """Kendall tau (raw sign) of each diagnostic with mean NDCG and with mean LiDu over models ``idx``."""
    ndcg = np.array([rows[i]["mean_ndcg"] for i in idx])
    lid = np.array([rows[i]["means"]["LiDu"] for i in idx])
    out = {}
    for d in DIAGNOSTICS:
        v = np.array([rows[i]["diagnostics"][d] for i in idx], np.float64)
        # kendall_tau correlates -first with second: pass -v to get the plain tau of v
        out[d] = {"tau_vs_ndcg": kendall_tau(-v, ndcg), "tau_vs_mean_lidu": kendall_tau(-v, lid)}
    return out


def run_models_protocol(config: RealDataStudyConfig, *, split: InteractionSplit | None = None) -> dict:
    """The models protocol on ``config.data`` (see the module docstring); returns the JSON payload.

    Args:
      config: the study settings (checked by `check_models_config` when built); used: ``data`` and its
        loading flags, ``population``, ``population_families``, ``n_models`` (ensemble size of every model),
        ``k``, ``grid_size``, ``lidu_variants``, ``max_eval_users``, ``chunk``, ``n_boot``, ``seed``,
        ``out_dir``, ``progress``, ``resume``.
      split: the data, already loaded (``config.data`` is then only its label).

    Returns:
      ``{"protocol": "models", "dataset", "n_users", "n_items", "k", "n_models", "population",
      "skipped_families", "models", "selection", "within_family", "diagnostics_tau", "scale_free", "seconds",
      "files", "config"}``. ``models`` has one row per model: its `PopulationModel` fields, ``mean_ndcg``,
      ``mean_recall``, ``means`` (estimator -> mean uncertainty) and ``diagnostics``; ``selection[estimator]``
      is a `selection_table` row over all models; ``within_family[family][estimator]`` the same within a
      family (``kendall_tau``/``ci`` None below 3 models); ``diagnostics_tau`` (``"all"`` and per family) is
      `_diagnostic_taus`. Non-finite numbers are written as null.

    Raises:
      ValueError: fewer than 3 models after dropping sasrec from unordered data, ``k`` not below the
        number of items, ``--resume`` without a checkpoint or with one of other settings, or a checkpoint
        of an interrupted run without ``--resume`` (all before any training).
      lidu_jax.training.TrainingFailedError: an ensemble diverged (the message names the model).
    """
    t0 = time.perf_counter()
    from lidu_jax.study import _eval_users  # the user protocol's subset rule; study imports this lazily

    split = load_data(config) if split is None else split
    if config.k >= split.n_items:
        raise ValueError(f"--k={config.k} must be < the number of items ({split.n_items}) of {split.name}")
    families, skipped = [], {}
    for f in _families(config):
        if f == "sasrec" and split.train_sequences is None:
            skipped[f] = f"sasrec needs time-ordered data; {split.name!r} has no order"
        else:
            families.append(f)
    runs, pop = population(config.population, families)
    if len(pop) < MIN_MODELS:
        raise ValueError(
            f"--protocol models needs >= {MIN_MODELS} models for a Kendall tau; {split.name} leaves "
            f"{len(pop)} ({'; '.join(skipped.values())})"
        )
    users = _eval_users(split, config)
    out = Path(config.out_dir)
    ckpt = RunCheckpoints(out, split, users, config)
    done = set(ckpt.open(config.resume, len(runs)))
    key = jax.random.key(config.seed)
    rows: list[dict[str, Any]] = []
    trained: list[tuple[RecModel, Any]] = []
    for r, run in enumerate(runs):
        if r in done:
            model = _make(split, run, config)
            run_rows, run_params = ckpt.load(r, run, model, config.n_models)
            rows.extend(run_rows)
            trained.extend((model, p) for p in run_params)
            if config.progress:
                print(f"run {r} ({', '.join(row['name'] for row in run_rows)}): restored", flush=True)
            continue
        first = len(rows)
        t_run = time.perf_counter()
        context = (
            f"--protocol models run {run.family} dim {run.dim} {run.regularisation} regularisation, "
            f"--seed {config.seed}"
        )
        model = _make(split, run, config)
        partial = ckpt.load_partial(r, run, model, config.n_models) if config.resume else None
        before = 0.0 if partial is None else partial[2]  # training seconds of the earlier sittings

        def save_partial(model, state, losses, r=r, run=run, t_run=t_run, before=before) -> None:
            ckpt.save_partial(r, run, model, state, losses, before + time.perf_counter() - t_run)

        with failure_context(context):
            params, losses = _train(
                model,
                split,
                run,
                config,
                jax.random.fold_in(key, r),
                resume_from=None if partial is None else partial[:2],
                checkpoint=save_partial,
            )
        t_train = before + time.perf_counter() - t_run
        for (epoch, _), p, loss in zip(run.snapshots, params, losses, strict=True):
            (pm,) = [m for m in pop if m.run == r and m.epochs == epoch]
            t_eval = time.perf_counter()
            k_eval = jax.random.fold_in(key, 10_000 + len(rows))
            means, perf, diag = _evaluate(model, p, split, users, config, k_eval)
            diag.update(train_loss=loss, epochs=float(epoch))
            rows.append(
                {
                    **dataclasses.asdict(pm),
                    "mean_ndcg": perf["ndcg"],
                    "mean_recall": perf["recall"],
                    "means": means,
                    "diagnostics": diag,
                    "seconds": {
                        "train_run": round(t_train, 1),
                        "evaluate": round(time.perf_counter() - t_eval, 1),
                    },
                }
            )
            trained.append((model, p))
            if config.progress:
                print(
                    f"{pm.name}: NDCG@{config.k} {perf['ndcg']:.4f}, mean LiDu {means['LiDu']:.3f}, "
                    f"spread ratio {diag['spread_ratio']:.3f}",
                    flush=True,
                )
        ckpt.save(r, run, model, rows[first:], params)
    # The common temperature needs every model's spread ratio, hence this second pass.
    ratios = np.array([row["diagnostics"]["spread_ratio"] for row in rows])
    target = float(np.nanmedian(ratios))
    for row, (model, p), rho in zip(rows, trained, ratios, strict=True):
        factor = target / rho if np.isfinite(rho) and rho > 0 else 1.0
        row["means"][SCALE_FREE] = _rescaled_lidu(model, p, split, users, config, factor)
        row["diagnostics"]["temperature_factor"] = factor

    names = [row["name"] for row in rows]
    ndcg = np.array([row["mean_ndcg"] for row in rows])
    recall = np.array([row["mean_recall"] for row in rows])
    estimators = list(rows[0]["means"])
    means = {e: np.array([row["means"][e] for row in rows]) for e in estimators}
    selection = selection_table(means, ndcg, recall, names, n_boot=config.n_boot, seed=config.seed)
    within: dict[str, Any] = {}
    diag_tau: dict[str, Any] = {"all": _diagnostic_taus(rows, np.arange(len(rows)))}
    for f in families:
        idx = np.array([i for i, row in enumerate(rows) if row["family"] == f])
        sub = selection_table(
            {e: v[idx] for e, v in means.items()}, ndcg[idx], recall[idx], [names[i] for i in idx],
            n_boot=config.n_boot, seed=config.seed,
        )  # fmt: skip
        if idx.size < MIN_MODELS:
            for row in sub.values():
                row["kendall_tau"], row["ci"] = None, None
        within[f] = sub
        diag_tau[f] = _diagnostic_taus(rows, idx)

    out.mkdir(parents=True, exist_ok=True)
    stem = f"models_{split.name}"
    result: dict[str, Any] = {
        "protocol": "models",
        "dataset": split.name,
        "n_users": int(users.size),
        "n_items": int(split.n_items),
        "k": config.k,
        "n_models": config.n_models,
        "n_boot": config.n_boot,
        "population": {
            "name": config.population,
            "families": families,
            "table": {f: dataclasses.asdict(POPULATIONS[config.population][f]) for f in families},
            "family_base": {f: dataclasses.asdict(FAMILY_BASE[f]) for f in families},
            "runs": [dataclasses.asdict(r) for r in runs],
        },
        "skipped_families": skipped,
        "models": rows,
        "selection": selection,
        "within_family": within,
        "diagnostics_tau": diag_tau,
        "scale_free": {"estimator": SCALE_FREE, "target_spread_ratio": target},
    }
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md")}
    try:
        _plot(result, out / f"{stem}.png")
        files["plot"] = str(out / f"{stem}.png")
    except ImportError as e:
        files["plot"] = None
        result["plot_skipped"] = f"matplotlib is not importable: {e}"
    result["files"] = files
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / f"{stem}.md").write_text(markdown(result))
    evaluation.write_json(
        evaluation.json_safe(result), out / f"{stem}.json", config=dataclasses.asdict(config)
    )
    if not config.keep_checkpoint:
        ckpt.remove()  # the result holds everything the runs gave
    if config.progress:
        print(markdown(result), flush=True)
    return result
