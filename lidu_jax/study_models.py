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
   reason in the JSON, when matplotlib is missing).

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
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lidu_jax import evaluation
from lidu_jax.estimators import lidu
from lidu_jax.models.base import RecModel
from lidu_jax.models.lightgcn import LightGCNConfig, make_lightgcn
from lidu_jax.models.mf import MFConfig, make_bpr_mf
from lidu_jax.models.mlp import MLPConfig, make_mlp
from lidu_jax.models.sasrec import SASRecConfig, make_sasrec
from lidu_jax.samples import sample_moments
from lidu_jax.study_cells import estimate_all, load_data, score_stacked
from lidu_jax.study_config import MODELS, RealDataStudyConfig
from lidu_jax.training import TrainingFailedError, fit
from lidu_jax.types import InteractionSplit

__all__ = [
    "FAMILY_BASE",
    "POPULATIONS",
    "SCALE_FREE",
    "FamilyPlan",
    "PopulationModel",
    "TrainingRun",
    "bootstrap_tau",
    "check_models_config",
    "kendall_tau",
    "population",
    "random_choice_regret",
    "run_models_protocol",
    "selection_regret",
    "selection_table",
]

SCALE_FREE = "LiDu at common spread ratio"
MIN_MODELS = 3  # a Kendall tau across fewer models is +-1 or undefined

# The user protocol's settings of each family (`study_cells.make_model`, ensemble source): the population
# varies only what its table names, so a "normal" model here is the model of a user-protocol cell.
FAMILY_BASE: dict[str, Any] = {
    "bpr": MFConfig(dim=32, lr=0.005, batch_size=2048),
    "lightgcn": LightGCNConfig(dim=64, lr=0.01, batch_size=4096),
    "mlp": MLPConfig(lr=3e-3, dropout=0.1),
    "sasrec": SASRecConfig(dropout=0.2),
}
_MAKERS = {"bpr": make_bpr_mf, "lightgcn": make_lightgcn, "mlp": make_mlp, "sasrec": make_sasrec}


@dataclasses.dataclass(frozen=True)
class FamilyPlan:
    """One family's share of a population: three training runs, six models.

    Attributes:
      dims: ``(small, large)`` embedding widths (the config's ``dim``).
      epochs: ``(few, normal, many)``: under-trained, normally trained, over-trained.
      strong: the config fields and values of "strong regularisation" (each family's own regulariser).
    """

    dims: tuple[int, int]
    epochs: tuple[int, int, int]
    strong: tuple[tuple[str, float], ...]


_L2_STRONG = (("l2", 1e-2),)  # 100x the default l2 of bpr, lightgcn and mlp
_DROPOUT_STRONG = (("dropout", 0.5),)  # sasrec's default weight decay is 0: dropout is its regulariser

# The population table. Per family: run 1 = small dim, default regularisation, snapshots at few and normal
# epochs; run 2 = large dim, default regularisation, snapshots at few, normal and many epochs; run 3 =
# large dim, strong regularisation, normal epochs. "small" is for tests and smoke runs.
POPULATIONS: dict[str, dict[str, FamilyPlan]] = {
    "full": {
        "bpr": FamilyPlan(dims=(8, 64), epochs=(3, 20, 100), strong=_L2_STRONG),
        "lightgcn": FamilyPlan(dims=(16, 64), epochs=(3, 20, 100), strong=_L2_STRONG),
        "mlp": FamilyPlan(dims=(8, 64), epochs=(3, 20, 100), strong=_L2_STRONG),
        "sasrec": FamilyPlan(dims=(16, 64), epochs=(10, 100, 300), strong=_DROPOUT_STRONG),
    },
    "small": {
        "bpr": FamilyPlan(dims=(4, 8), epochs=(1, 2, 3), strong=_L2_STRONG),
        "lightgcn": FamilyPlan(dims=(4, 8), epochs=(1, 2, 3), strong=_L2_STRONG),
        "mlp": FamilyPlan(dims=(4, 8), epochs=(1, 2, 3), strong=_L2_STRONG),
        "sasrec": FamilyPlan(dims=(4, 8), epochs=(1, 2, 3), strong=_DROPOUT_STRONG),
    },
}


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One vmapped ensemble training run; each snapshot epoch is one model of the population.

    Attributes:
      family: one of ``MODELS``. dim: embedding width. regularisation: ``"default"`` or ``"strong"``.
      overrides: model-config fields set besides ``dim`` (the strong regulariser).
      snapshots: ``((epoch, training), ...)`` in increasing epoch; training is under / normal / over.
    """

    family: str
    dim: int
    regularisation: str
    overrides: tuple[tuple[str, float], ...]
    snapshots: tuple[tuple[int, str], ...]


@dataclasses.dataclass(frozen=True)
class PopulationModel:
    """One model of the population: a snapshot of a `TrainingRun` (``run`` indexes the runs)."""

    name: str
    family: str
    dim: int
    epochs: int
    regularisation: str
    training: str
    run: int


def population(name: str, families: Sequence[str]) -> tuple[list[TrainingRun], list[PopulationModel]]:
    """The training runs and models of population ``name`` (``"full"`` or ``"small"``) for ``families``.

    Raises:
      ValueError: an unknown population or family.
    """
    if name not in POPULATIONS:
        raise ValueError(f"--population must be one of {', '.join(POPULATIONS)}, got {name!r}")
    runs: list[TrainingRun] = []
    models: list[PopulationModel] = []
    for family in families:
        if family not in MODELS:
            raise ValueError(f"--population-families must be a subset of {','.join(MODELS)}, got {family!r}")
        plan = POPULATIONS[name][family]
        (small, large), (few, normal, many) = plan.dims, plan.epochs
        for dim, reg, snaps in (
            (small, "default", ((few, "under"), (normal, "normal"))),
            (large, "default", ((few, "under"), (normal, "normal"), (many, "over"))),
            (large, "strong", ((normal, "normal"),)),
        ):
            over = plan.strong if reg == "strong" else ()
            runs.append(TrainingRun(family, dim, reg, over, snaps))
            for epoch, training in snaps:
                tag = "-strong" if reg == "strong" else ""
                models.append(
                    PopulationModel(
                        f"{family}-d{dim}-e{epoch}{tag}", family, dim, epoch, reg, training, len(runs) - 1
                    )
                )
    return runs, models


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


# ------------------------------------------------------------------------------------ tau, regret, boot


def kendall_tau(uncertainty: np.ndarray, performance: np.ndarray) -> float:
    """Kendall tau-b of ``-uncertainty`` and ``performance`` across models (both ``(M,)``).

    +1: the less uncertain a model, the better it performs, for every pair of models. NaN when either array is
    constant (tau-b is undefined).
    """
    u, p = np.asarray(uncertainty, np.float64), np.asarray(performance, np.float64)
    if u.shape != p.shape or u.ndim != 1:
        raise ValueError(
            f"uncertainty and performance must be equal-length 1-D arrays, got {u.shape}, {p.shape}"
        )
    if u.size < 2 or np.ptp(u) == 0 or np.ptp(p) == 0:
        return math.nan
    return float(stats.kendalltau(-u, p).statistic)


def selection_regret(uncertainty: np.ndarray, performance: np.ndarray) -> tuple[float, float, list[int]]:
    """What choosing the least uncertain model costs: ``(regret, regret / best, chosen)``.

    ``regret = max(performance) - mean(performance[chosen])`` where ``chosen`` is the set of models with the
    lowest uncertainty (several when tied: the expected regret of breaking the tie at random). ``regret /
    best`` is NaN when the best performance is not > 0. Inputs are ``(M,)`` per-model means.
    """
    u, p = np.asarray(uncertainty, np.float64), np.asarray(performance, np.float64)
    if u.shape != p.shape or u.ndim != 1 or u.size == 0:
        raise ValueError(
            f"uncertainty and performance must be equal-length 1-D arrays, got {u.shape}, {p.shape}"
        )
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(p))):
        raise ValueError("uncertainty and performance must be finite")
    chosen = np.flatnonzero(u == u.min())
    best = float(p.max())
    regret = best - float(p[chosen].mean())
    return regret, regret / best if best > 0 else math.nan, chosen.tolist()


def random_choice_regret(performance: np.ndarray) -> tuple[float, float]:
    """Expected regret of a uniformly random choice: ``(max(p) - mean(p), that / max(p))`` for ``p (M,)``."""
    p = np.asarray(performance, np.float64)
    regret = float(p.max() - p.mean())
    return regret, regret / float(p.max()) if p.max() > 0 else math.nan


def bootstrap_tau(
    uncertainty: np.ndarray,
    performance: np.ndarray,
    *,
    n_boot: int,
    seed: int = 0,
    level: float = 0.95,
) -> list[float]:
    """Percentile bootstrap interval ``[lo, hi]`` of `kendall_tau` over models.

    Each resample draws M models with replacement (``np.random.default_rng(seed).integers(0, M, (n_boot,
    M))``; duplicated models are ties, which tau-b accounts for); resamples where tau is undefined (a
    constant resample) are left out. ``[nan, nan]`` when no resample gives a tau.
    """
    u, p = np.asarray(uncertainty, np.float64), np.asarray(performance, np.float64)
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    idx = np.random.default_rng(seed).integers(0, u.size, size=(n_boot, u.size))
    taus = np.array([kendall_tau(u[i], p[i]) for i in idx])
    taus = taus[np.isfinite(taus)]
    if taus.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.quantile(taus, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def selection_table(
    means: dict[str, np.ndarray],
    ndcg: np.ndarray,
    recall: np.ndarray,
    names: Sequence[str],
    *,
    n_boot: int,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per estimator (``means[name]`` is ``(M,)`` mean uncertainty per model, higher = more uncertain): the
    Kendall tau with mean NDCG ``(M,)`` and its bootstrap interval, the tau with mean Recall, the chosen
    model(s) and the regret in NDCG; plus the rows ``"random choice"`` (expected regret, tau 0) and
    ``"oracle"`` (regret 0, tau 1)."""
    out: dict[str, dict[str, Any]] = {}
    for est, u in means.items():
        regret, frac, chosen = selection_regret(u, ndcg)
        out[est] = {
            "kendall_tau": kendall_tau(u, ndcg),
            "ci": bootstrap_tau(u, ndcg, n_boot=n_boot, seed=seed),
            "kendall_tau_recall": kendall_tau(u, recall),
            "regret": regret,
            "regret_fraction": frac,
            "chosen": [names[i] for i in chosen],
        }
    regret, frac = random_choice_regret(ndcg)
    out["random choice"] = {
        "kendall_tau": 0.0, "ci": None, "kendall_tau_recall": 0.0, "regret": regret,
        "regret_fraction": frac, "chosen": [],
    }  # fmt: skip
    best = [names[i] for i in np.flatnonzero(ndcg == ndcg.max())]
    out["oracle"] = {
        "kendall_tau": 1.0, "ci": None, "kendall_tau_recall": kendall_tau(-ndcg, recall), "regret": 0.0,
        "regret_fraction": 0.0, "chosen": best,
    }  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------- training


def _make(split: InteractionSplit, run: TrainingRun) -> RecModel:
    cfg = dataclasses.replace(FAMILY_BASE[run.family], dim=run.dim, **dict(run.overrides))
    return _MAKERS[run.family](split, cfg)


def _train(
    split: InteractionSplit, run: TrainingRun, config: RealDataStudyConfig, key: jax.Array
) -> tuple[RecModel, list[Any], list[float]]:
    """``(model, stacked params per snapshot, mean training loss at each snapshot epoch)``."""
    model = _make(split, run)
    epochs = [e for e, _ in run.snapshots]
    losses: dict[int, float] = {}

    def record(epoch: int, params, loss: jax.Array) -> None:
        if epoch in epochs:  # syncing only at snapshot epochs keeps the device queue full in between
            losses[epoch] = float(jnp.mean(loss))

    n_train = int(split.train_users.shape[0])
    keys = jax.random.split(key, config.n_models)
    _, snaps = fit(
        model,
        keys,
        jnp.ones((config.n_models, n_train)),
        max(epochs),
        snapshot_epochs=epochs,
        progress=config.progress,
        callback=record,
    )
    params = [jax.tree.map(lambda x, s=s: x[s], snaps) for s in range(len(epochs))]
    return model, params, [losses[e] for e in epochs]


# --------------------------------------------------------------------------------------- evaluation


def _pad(users: np.ndarray, size: int) -> np.ndarray:
    return users if users.size == size else np.concatenate([users, np.full(size - users.size, users[-1])])


def _evaluate(
    model: RecModel,
    params,
    split: InteractionSplit,
    users: np.ndarray,
    config: RealDataStudyConfig,
    key: jax.Array,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """``(mean of each estimator, {"ndcg", "recall"} means, spread diagnostics)`` of one model on
    ``users``."""
    train = split.train_matrix()
    spread: dict[int, tuple[float, float]] = {}

    def scorer(u: np.ndarray):
        s = score_stacked(model, params, u, config.chunk)
        mean, sd = sample_moments(s)
        cand = jnp.asarray(~train[u])
        n_c = jnp.maximum(cand.sum(1), 1)
        ens = jnp.where(cand, sd, 0.0).sum(1) / n_c
        mu = jnp.where(cand, mean, 0.0).sum(1, keepdims=True) / n_c[:, None]
        item = jnp.sqrt(jnp.where(cand, (mean - mu) ** 2, 0.0).sum(1) / n_c)
        # estimate_all pads its last chunk with repeats of a user: keyed by user, a repeat overwrites itself
        for user, e, i in zip(u.tolist(), np.asarray(ens).tolist(), np.asarray(item).tolist(), strict=True):
            spread[user] = (e, i)
        return mean, sd, s

    unc, perf = estimate_all(scorer, split, users, config, key)
    pairs = np.array([spread[int(u)] for u in users])
    ens, item = float(pairs[:, 0].mean()), float(pairs[:, 1].mean())
    diag = {"ensemble_spread": ens, "item_spread": item, "spread_ratio": ens / item if item > 0 else math.nan}
    return (
        {n: float(np.mean(v)) for n, v in unc.items()},
        {n: float(np.mean(v)) for n, v in perf.items()},
        diag,
    )


def _rescaled_lidu(
    model: RecModel,
    params,
    split: InteractionSplit,
    users: np.ndarray,
    config: RealDataStudyConfig,
    factor: float,
) -> float:
    """Mean exact LiDu of one model with every std multiplied by ``factor`` (its temperature change)."""
    train = split.train_matrix()
    size = min(config.chunk, users.size)
    vals = []
    for start in range(0, users.size, size):
        real = users[start : start + size]
        u = _pad(real, size)  # one compiled shape for every chunk, as in estimate_all
        mean, sd = sample_moments(score_stacked(model, params, u, config.chunk))
        cand = jnp.asarray(~train[u])
        val, _ = lidu(
            mean, sd * factor, config.k, candidates=cand, grid_size=config.grid_size, chunk_size=size
        )
        vals.append(np.asarray(val, np.float64)[: real.size])
    return float(np.concatenate(vals).mean())


# ------------------------------------------------------------------------------------------ protocol


DIAGNOSTICS = ("ensemble_spread", "item_spread", "spread_ratio", "train_loss", "epochs")


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
        ``out_dir``, ``progress``.
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
      ValueError: fewer than 3 models after dropping sasrec from unordered data, or ``k`` not below the
        number of items (both before any training).
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
    key = jax.random.key(config.seed)
    rows: list[dict[str, Any]] = []
    trained: list[tuple[RecModel, Any]] = []
    for r, run in enumerate(runs):
        t_run = time.perf_counter()
        try:
            model, params, losses = _train(split, run, config, jax.random.fold_in(key, r))
        except TrainingFailedError as e:
            raise TrainingFailedError(
                f"{e} [--protocol models run {run.family} dim {run.dim} {run.regularisation} "
                f"regularisation, --seed {config.seed}]",
                model=e.model,
                members=e.members,
            ) from e
        t_train = time.perf_counter() - t_run
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

    out = Path(config.out_dir)
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
    if config.progress:
        print(markdown(result), flush=True)
    return result


# ------------------------------------------------------------------------------------------ tables, plot


def _f(v: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if v is None or not np.isfinite(v) else format(v, fmt)


def _order(table: dict[str, dict[str, Any]]) -> list[str]:
    ref = ("oracle", "random choice")
    est = [e for e in table if e not in ref]
    est.sort(key=lambda e: -(table[e]["kendall_tau"] if _finite(table[e]["kendall_tau"]) else -2.0))
    return [*est, *ref]


def _finite(v: Any) -> bool:
    return v is not None and np.isfinite(v)


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``models_<data>.md``: selection across models, within families, diagnostics, models."""
    k, sel = result["k"], result["selection"]
    lines = [
        f"# Model selection by mean uncertainty on {result['dataset']} ({len(result['models'])} models, "
        f"{result['n_models']}-seed ensembles, {result['n_users']} users, K={k})",
        "",
        f"Kendall tau of -mean uncertainty vs mean NDCG@{k} across models (95% bootstrap interval over "
        f"models, {result['n_boot']} resamples); regret = best mean NDCG@{k} - that of the least uncertain "
        f"model. `{SCALE_FREE}` is the pre-declared scale-free form (every model at the population's "
        f"median spread ratio {result['scale_free']['target_spread_ratio']:.3f}).",
    ]
    if result["skipped_families"]:
        lines += ["", "Skipped: " + "; ".join(f"{f}: {r}" for f, r in result["skipped_families"].items())]
    lines += [
        "",
        f"| estimator | tau vs NDCG@{k} [95% CI] | tau vs Recall@{k} | chosen | regret | regret / best |",
        "|---|---|---|---|---|---|",
    ]
    for e in _order(sel):
        r = sel[e]
        ci = f" [{_f(r['ci'][0])}, {_f(r['ci'][1])}]" if r["ci"] else ""
        tie = len(r["chosen"]) == len(result["models"]) > 1
        chosen = "all (tied)" if tie else ", ".join(r["chosen"]) or "-"
        lines.append(
            f"| {e} | {_f(r['kendall_tau'])}{ci} | {_f(r['kendall_tau_recall'])} | {chosen} "
            f"| {_f(r['regret'], '.4f')} | {_f(r['regret_fraction'], '.1%')} |"
        )
    fams = list(result["within_family"])
    lines += [
        "",
        "## Within each family: tau / regret",
        "",
        "| estimator | " + " | ".join(fams) + " |",
        "|---|" + "---|" * len(fams),
    ]
    for e in _order(sel):
        cells = []
        for f in fams:
            r = result["within_family"][f][e]
            cells.append(f"{_f(r['kendall_tau'])} / {_f(r['regret'], '.4f')}")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Label-free diagnostics: Kendall tau with mean NDCG / with mean LiDu",
        "",
        "| diagnostic | all | " + " | ".join(fams) + " |",
        "|---|---|" + "---|" * len(fams),
    ]
    for d in DIAGNOSTICS:
        cells = [
            f"{_f(result['diagnostics_tau'][g][d]['tau_vs_ndcg'])} / "
            f"{_f(result['diagnostics_tau'][g][d]['tau_vs_mean_lidu'])}"
            for g in ["all", *fams]
        ]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Models",
        "",
        f"| model | family | dim | epochs | regularisation | training | NDCG@{k} | Recall@{k} | mean LiDu "
        f"| {SCALE_FREE} | ensemble spread | item spread | spread ratio | train loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        d = r["diagnostics"]
        lines.append(
            f"| {r['name']} | {r['family']} | {r['dim']} | {r['epochs']} | {r['regularisation']} | "
            f"{r['training']} | {r['mean_ndcg']:.4f} | {r['mean_recall']:.4f} | {r['means']['LiDu']:.3f} | "
            f"{_f(r['means'][SCALE_FREE], '.3f')} | {_f(d['ensemble_spread'], '.4f')} | "
            f"{_f(d['item_spread'], '.4f')} | {_f(d['spread_ratio'], '.4f')} | {_f(d['train_loss'], '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    fams = list(result["within_family"])
    markers = {"under": "v", "normal": "o", "over": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for ax, est in zip(axes, ("LiDu", SCALE_FREE), strict=True):
        labelled = set()
        for r in result["models"]:
            c = fams.index(r["family"])
            ax.scatter(
                r["means"][est],
                r["mean_ndcg"],
                color=f"C{c}",
                marker=markers[r["training"]],
                edgecolors="k" if r["regularisation"] == "strong" else "none",
                label=None if r["family"] in labelled else r["family"],
            )
            labelled.add(r["family"])
        tau = result["selection"][est]["kendall_tau"]
        ax.set_xlabel(f"mean {est}")
        ax.set_ylabel(f"mean NDCG@{k}")
        ax.set_title(f"{result['dataset']}: tau(-{est}, NDCG) = {_f(tau)}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="v under, o normal, ^ over; black edge: strong reg.", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
