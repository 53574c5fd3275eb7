"""The population of the models protocol (`lidu_jax.study_models`): which models it holds, how each
training run is done, and what is measured on each model.

`POPULATIONS` is the table: per family three vmapped seed-ensemble training runs (`TrainingRun`), whose
snapshot epochs are the six models of the family (`PopulationModel`); `population` expands it. `_train`
runs one of them, `_evaluate` measures one model (every estimator, NDCG/Recall and the spread diagnostics)
and `_rescaled_lidu` gives its `SCALE_FREE` LiDu (the rescaling is explained in `lidu_jax.study_models`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax.estimators import lidu
from lidu_jax.models.base import RecModel
from lidu_jax.models.lightgcn import LightGCNConfig, make_lightgcn
from lidu_jax.models.mf import MFConfig, make_bpr_mf
from lidu_jax.models.mlp import MLPConfig, make_mlp
from lidu_jax.models.sasrec import SASRecConfig, make_sasrec
from lidu_jax.samples import sample_moments
from lidu_jax.study_cells import estimate_all, score_stacked
from lidu_jax.study_config import MODELS, RealDataStudyConfig
from lidu_jax.training import FitState, fit
from lidu_jax.types import InteractionSplit

__all__ = [
    "CHECKPOINT_SECONDS",
    "DIAGNOSTICS",
    "FAMILY_BASE",
    "POPULATIONS",
    "SCALE_FREE",
    "FamilyPlan",
    "PopulationModel",
    "TrainingRun",
    "population",
]

SCALE_FREE = "LiDu at common spread ratio"
# The label-free diagnostics of each model (`_evaluate` gives the spreads; training the loss and epochs).
DIAGNOSTICS = ("ensemble_spread", "item_spread", "spread_ratio", "train_loss", "epochs")

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


# ---------------------------------------------------------------------------------------- training


def _make(split: InteractionSplit, run: TrainingRun, config: RealDataStudyConfig) -> RecModel:
    cfg = dataclasses.replace(FAMILY_BASE[run.family], dim=run.dim, **dict(run.overrides))
    if run.family == "sasrec":
        cfg = dataclasses.replace(cfg, pack=config.sasrec_pack)
    return _MAKERS[run.family](split, cfg)


# Seconds of training between two saves of an unfinished run's state (`RunCheckpoints.save_partial`): an
# interruption loses at most this much training.
CHECKPOINT_SECONDS = 600.0


def _train(
    model: RecModel,
    split: InteractionSplit,
    run: TrainingRun,
    config: RealDataStudyConfig,
    key: jax.Array,
    *,
    resume_from: tuple[FitState, dict[int, float]] | None = None,
    checkpoint: Callable[[RecModel, FitState, dict[int, float]], None] | None = None,
) -> tuple[list[Any], list[float]]:
    """``(stacked params per snapshot, mean training loss at each snapshot epoch)`` of ``model`` (`_make` of
    ``run``) trained as ``run`` says.

    ``resume_from`` = ``(state, losses so far)`` of a saved unfinished run continues it (`fit`'s
    ``resume_from``); ``checkpoint(model, state, losses so far)`` is called every `CHECKPOINT_SECONDS`.
    """
    epochs = [e for e, _ in run.snapshots]
    losses: dict[int, float] = dict(resume_from[1]) if resume_from is not None else {}

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
        resume_from=None if resume_from is None else resume_from[0],
        checkpoint=None if checkpoint is None else (lambda st: checkpoint(model, st, dict(losses))),
        checkpoint_seconds=CHECKPOINT_SECONDS,
    )
    params = [jax.tree.map(lambda x, s=s: x[s], snaps) for s in range(len(epochs))]
    return params, [losses[e] for e in epochs]


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
