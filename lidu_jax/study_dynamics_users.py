"""The users of the dynamics protocol (`lidu_jax.study_dynamics`), the changes made to their histories,
and what is measured on them.

`_pick_users` draws the evaluation users and, once, the items each change hides or adds (`_Users`), so every
family is compared on the same changes; `_visible_sequences` and `_candidates` give what a model sees and may
recommend under a change (`HIDE_MEANS` / `ADD_MEANS` / `CANDIDATES_MEAN` say what that means per family).
`_per_user` measures LiDu, NDCG@K and the std baselines per user from an ensemble's scores, and `compare`
summarises one change from the measurements before and after it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import evaluation, metrics
from lidu_jax.estimators import lidu
from lidu_jax.samples import sample_moments
from lidu_jax.study_config import RealDataStudyConfig
from lidu_jax.types import InteractionSplit

if TYPE_CHECKING:  # study_dynamics, where the settings live, imports this module
    from lidu_jax.study_dynamics import DynamicsSettings

__all__ = ["ADD_MEANS", "CANDIDATES_MEAN", "CHANGES", "HIDE_MEANS", "compare"]

CHANGES = ("hide", "add", "candidates_<c>")

_FIXED_USER = (
    "{name} scores a user from its trained user embedding, which no inference-time input changes: "
    "{verb}, and its scores (so its score distribution) are exactly those of the unchanged model"
)
HIDE_MEANS = {
    "bpr": _FIXED_USER.format(
        name="BPR-MF", verb="hiding only returns the hidden items to the candidate set"
    ),
    "mlp": _FIXED_USER.format(
        name="NeuMF (mlp)", verb="hiding only returns the hidden items to the candidate set"
    ),
    "lightgcn": "the user's edges to the hidden items are removed from the propagation graph (degrees "
    "renormalised, every layer recomputed: one full propagation per user and ensemble member), and the "
    "hidden items return to the candidate set",
    "sasrec": "the hidden items are removed from the user's input sequence (the rest keep their order; the "
    "model sees the last max_len of them), and they return to the candidate set",
}
ADD_MEANS = {
    "bpr": _FIXED_USER.format(name="BPR-MF", verb="added items only leave the candidate set"),
    "mlp": _FIXED_USER.format(name="NeuMF (mlp)", verb="added items only leave the candidate set"),
    "lightgcn": "an edge from the user to each added item joins the propagation graph (degrees "
    "renormalised, one full propagation per user and ensemble member), and the added items leave the "
    "candidate set",
    "sasrec": "the added items are inserted at uniformly random positions of the user's input sequence "
    "(the model sees the last max_len items), and they leave the candidate set",
}
CANDIDATES_MEAN = (
    "the candidates shrink to the user's top-K list plus c-K other non-training items drawn uniformly; the "
    "scores and the list are unchanged, so NDCG@K is unchanged by construction and only the competition "
    "below the list (hence LiDu) changes"
)


# -------------------------------------------------------------------------------------- correlations


def _tau(x: np.ndarray, y: np.ndarray) -> float | None:
    """Kendall tau-b of ``x`` vs ``y``; None when it is undefined (fewer than 2 points, a constant side)."""
    tau = evaluation.kendall_or_nan(x, y)
    return None if math.isnan(tau) else tau  # None, not NaN: the JSON and the tables say "n/a"


def _rho(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rho of ``x`` vs ``y``; None when it is undefined."""
    rho = evaluation.spearman_or_nan(x, y)
    return None if math.isnan(rho) else rho


# ------------------------------------------------------------------------------------------ users, changes


@dataclasses.dataclass(frozen=True)
class _Users:
    """The evaluation users and their seeded history changes (shared by every family, so the families are
    compared on the same users, the same hidden items and the same added items).

    ``profile[u]``: training items in time order (id order without time); ``hidden[u]`` a subset of it;
    ``added[u]`` items outside the profile and the held-out items; ``add_at[u]`` the positions of the
    profile before which each added item is inserted (sorted, for `np.insert`). ``train``, ``test``,
    ``hidden_mask`` and ``added_mask`` are ``(U, n_items)`` bool.
    """

    ids: np.ndarray
    profile: list[np.ndarray]
    hidden: list[np.ndarray]
    added: list[np.ndarray]
    add_at: list[np.ndarray]
    train: np.ndarray
    test: np.ndarray
    hidden_mask: np.ndarray
    added_mask: np.ndarray


def _pick_users(split: InteractionSplit, config: RealDataStudyConfig, s: DynamicsSettings) -> _Users:
    users = np.unique(split.test_users)
    rng = np.random.default_rng([config.seed, 0])
    if users.size > config.dynamics_users:
        users = np.sort(rng.choice(users, config.dynamics_users, replace=False))
    train, test = split.train_matrix()[users], split.test_matrix()[users]
    profile, hidden, added, add_at = [], [], [], []
    hide_rng, add_rng = np.random.default_rng([config.seed, 1]), np.random.default_rng([config.seed, 2])
    for row, u in enumerate(users):
        if split.train_sequences is not None:
            prof = np.asarray(split.train_sequences[u], np.int64)
        else:
            prof = np.flatnonzero(train[row]).astype(np.int64)
        n = prof.size
        n_hide = min(max(n - 1, 0), int(s.hide_fraction * n + 0.5))  # at least one item stays visible
        hidden.append(np.sort(hide_rng.choice(prof, n_hide, replace=False)) if n_hide else prof[:0])
        pool = np.flatnonzero(~train[row] & ~test[row])
        n_add = min(pool.size, max(1, int(s.add_fraction * n + 0.5)))
        added.append(add_rng.choice(pool, n_add, replace=False).astype(np.int64))
        add_at.append(np.sort(add_rng.integers(0, n + 1, n_add)))
        profile.append(prof)
    hidden_mask = np.zeros_like(train)
    added_mask = np.zeros_like(train)
    for row in range(users.size):
        hidden_mask[row, hidden[row]] = True
        added_mask[row, added[row]] = True
    return _Users(users, profile, hidden, added, add_at, train, test, hidden_mask, added_mask)


def _visible_sequences(us: _Users, change: str) -> list[np.ndarray]:
    """Each user's visible history in time order under ``change`` ("base", "hide" or "add")."""
    if change == "base":
        return us.profile
    if change == "hide":
        return [p[~np.isin(p, h)] for p, h in zip(us.profile, us.hidden, strict=True)]
    return [np.insert(p, at, a) for p, at, a in zip(us.profile, us.add_at, us.added, strict=True)]


def _candidates(us: _Users, change: str) -> np.ndarray:
    """``(U, n_items)`` bool: what may be recommended under ``change`` (never the visible history)."""
    if change == "hide":
        return ~us.train | us.hidden_mask
    if change == "add":
        return ~us.train & ~us.added_mask
    return ~us.train


# ------------------------------------------------------------------------------------ per-user evaluation


@functools.partial(jax.jit, static_argnums=3)
def _moments_ndcg(scores: jax.Array, cand: jax.Array, test: jax.Array, k: int):
    """``(mean (U, n), std (U, n), NDCG@k (U,))`` of ``(M, U, n)`` scores, in one compiled program (the same
    arithmetic as the study's eager `sample_moments` and `metrics.ndcg_at_k`)."""
    mean, std = sample_moments(scores)
    return mean, std, metrics.ndcg_at_k(mean, test, k, candidates=cand)


def _per_user(scores: jax.Array, cand: np.ndarray, test: np.ndarray, config: RealDataStudyConfig) -> dict:
    """Per user from ``(M, U, n)`` scores and ``(U, n)`` candidates: exact LiDu ``(U,)``, NDCG@K ``(U,)``,
    top-K list ``(U, K)``, mean ensemble std over the candidates ``(U,)``, mean std of the top-K ``(U,)``
    and the ensemble-mean scores ``(U, n)``."""
    c = jnp.asarray(cand, bool)
    mean, std, ndcg = _moments_ndcg(scores, c, jnp.asarray(test, bool), config.k)
    size = max(1, min(config.chunk, mean.shape[0]))
    # Eager, not inside the jit above: only then does `lidu` prune the items far below each list.
    val, top = lidu(mean, std, config.k, candidates=c, grid_size=config.grid_size, chunk_size=size)
    std_np, cand_np, top = np.asarray(std, np.float64), np.asarray(cand, bool), np.asarray(top)
    return {
        "lidu": np.asarray(val, np.float64),
        "ndcg": np.asarray(ndcg, np.float64),
        "top": top,
        "mean_std": (std_np * cand_np).sum(1) / np.maximum(cand_np.sum(1), 1),
        "top_k_std": np.take_along_axis(std_np, top, axis=1).mean(1),
        "mean": np.asarray(mean),
    }


def compare(before: dict, after: dict, what: str) -> dict[str, Any]:
    """Summary of one inference-time change from the per-user results of `_per_user` before and after.

    ``kendall_tau_delta`` / ``spearman_delta``: across users, ``-ΔLiDu`` vs ``ΔNDCG`` (Δ = after - before;
    positive = LiDu falls where NDCG rises); None when ΔNDCG (or ΔLiDu) is the same for every user.
    ``kendall_tau_sign``: Kendall tau-b of ``sign(-ΔLiDu)`` vs ``sign(ΔNDCG)`` over all users (zeros tie).
    ``sign_agreement``: over the ``n_ndcg_changed`` users with ``ΔNDCG != 0``, the fraction with
    ``sign(-ΔLiDu) == sign(ΔNDCG)`` (None when no user's NDCG moved). ``kendall_tau_before`` / ``_after``:
    the per-user level correlation ``-LiDu`` vs ``NDCG`` on the same users. ``frac_lists_changed``: users
    whose top-K list differs; ``mean_abs_score_change``: mean ``|Δ ensemble-mean score|`` over items and
    users (0 = the model's scores did not move, only the candidate set did).
    """
    d_lidu = after["lidu"] - before["lidu"]
    d_ndcg = after["ndcg"] - before["ndcg"]
    moved = d_ndcg != 0
    agree = np.sign(-d_lidu[moved]) == np.sign(d_ndcg[moved])
    return {
        "what": what,
        "n_users": int(d_lidu.size),
        "mean_lidu_before": float(before["lidu"].mean()),
        "mean_lidu_after": float(after["lidu"].mean()),
        "mean_ndcg_before": float(before["ndcg"].mean()),
        "mean_ndcg_after": float(after["ndcg"].mean()),
        "kendall_tau_delta": _tau(-d_lidu, d_ndcg),
        "spearman_delta": _rho(-d_lidu, d_ndcg),
        "kendall_tau_sign": _tau(np.sign(-d_lidu), np.sign(d_ndcg)),
        "sign_agreement": float(agree.mean()) if moved.any() else None,
        "n_ndcg_changed": int(moved.sum()),
        "kendall_tau_before": _tau(-before["lidu"], before["ndcg"]),
        "kendall_tau_after": _tau(-after["lidu"], after["ndcg"]),
        "frac_lists_changed": float(np.mean(np.any(before["top"] != after["top"], axis=1))),
        "mean_abs_score_change": float(np.mean(np.abs(after["mean"] - before["mean"]))),
    }


def _shrunk_candidates(
    top: np.ndarray, cand: np.ndarray, size: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """``(U, n)`` bool: each user's top-``k`` list ``top (U, k)`` plus ``size - k`` other candidates of
    ``cand (U, n)`` drawn uniformly (all of them when it has fewer)."""
    keys = np.where(cand, rng.random(cand.shape), np.inf)
    rows = np.arange(cand.shape[0])[:, None]
    keys[rows, top] = -1.0  # the list is always kept
    pick = np.argsort(keys, axis=1)[:, :size]
    mask = np.zeros(cand.shape, bool)
    mask[rows, pick] = True
    return mask & cand
