"""The selection statistics of the models protocol (`lidu_jax.study_models`), across models: how well mean
uncertainty ranks them (`kendall_tau`, with `bootstrap_tau` over models) and what choosing the least
uncertain one costs (`selection_regret`, against `random_choice_regret`); `selection_table` is one row of
each per estimator. Every input is one number per model, ``(M,)``; pure NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lidu_jax import evaluation

__all__ = [
    "bootstrap_tau",
    "kendall_tau",
    "random_choice_regret",
    "selection_regret",
    "selection_table",
]


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
    return evaluation.kendall_or_nan(-u, p)


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
