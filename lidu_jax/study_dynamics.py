"""Does LiDu reveal a recommender's inner state through training and inference? (the dynamics protocol)

    python -m lidu_jax.study --protocol dynamics --data ml-100k --epochs 20 --out-dir runs/dynamics

`run_dynamics_protocol` takes one data set (``config.data``) and, for every family of
`lidu_jax.study_config.MODELS` (bpr, lightgcn, mlp, sasrec; sasrec only on time-ordered data, otherwise the
reason is recorded):

1. **Training.** An ensemble of ``config.n_models`` seeds, trained at once with `jax.vmap` exactly as the
   study's ``--source ensemble`` cell (`lidu_jax.study_cells.build_source`), for ``config.epochs`` epochs
   (>= 10). After every epoch, on a seeded subset of ``config.dynamics_users`` users with a held-out item:
   mean LiDu (exact grid estimator, ``-log P`` of each user's top-K list), mean NDCG@K, the mean ensemble
   std over the candidates, the mean std of the top-K items and the mean training loss. Across the
   checkpoints: Kendall tau and Spearman rho of ``-mean LiDu`` vs ``mean NDCG@K`` (and of ``-baseline`` vs
   ``mean NDCG@K`` for the two std baselines).
2. **Inference.** On each final ensemble, per user, three changes to what the model sees or may
   recommend, each compared with the unchanged model on the same users (see `CHANGES` and
   `HIDE_MEANS` / `ADD_MEANS` for what each means per family):

   * ``hide``: a seeded ``hide_fraction`` of the user's training items is taken out of its history;
   * ``add``: ``add_fraction * |profile|`` random items (uniform over the items that are neither training
     nor held-out items of the user) are added to its history;
   * ``candidates_<c>``: the candidate set shrinks to the user's top-K list plus ``c - K`` other
     non-training items drawn uniformly (as in `lidu_jax.study_cells.run_sweeps`).

   The visible history is always excluded from the candidates and NDCG@K is always against the held-out
   test item. Per change: mean LiDu and mean NDCG@K before and after, and across users the Kendall tau /
   Spearman rho of ``-ΔLiDu`` vs ``ΔNDCG`` (positive = LiDu falls where NDCG rises: they agree), the Kendall
   tau of ``sign(-ΔLiDu)`` vs ``sign(ΔNDCG)``, and the sign agreement rate over the users whose NDCG moved.
3. **Files.** ``<out_dir>/dynamics_<data>.json`` (the returned dict), ``dynamics_<data>.md`` (two tables)
   and ``dynamics_<data>.png`` (mean LiDu and mean NDCG vs epoch per family, and a bar panel of the
   inference-change correlations; skipped, with the reason in the JSON, when matplotlib is missing).

Its own settings are the ``dynamics_*`` options of `RealDataStudyConfig` (read with ``getattr(config,
name, default)``, so a config class without them still runs): ``dynamics_hide_fraction`` (0.5),
``dynamics_add_fraction`` (0.5), ``dynamics_candidates`` ("100,1000") and ``dynamics_families``
("bpr,lightgcn,mlp,sasrec").
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lidu_jax import evaluation, metrics
from lidu_jax.estimators import lidu
from lidu_jax.models.base import RecModel
from lidu_jax.models.lightgcn import LightGCN, LightGCNConfig, edge_norm
from lidu_jax.models.sasrec import SASRec
from lidu_jax.samples import sample_moments
from lidu_jax.study_cells import build_source, load_data, score_stacked
from lidu_jax.study_config import MODELS, RealDataStudyConfig
from lidu_jax.training import TrainingFailedError
from lidu_jax.types import InteractionSplit

__all__ = [
    "ADD_MEANS",
    "CANDIDATES_MEAN",
    "CHANGES",
    "DEFAULTS",
    "HIDE_MEANS",
    "DynamicsSettings",
    "compare",
    "dynamics_settings",
    "markdown",
    "run_dynamics_protocol",
]

MIN_EPOCHS = 10
CHANGES = ("hide", "add", "candidates_<c>")
DEFAULTS: dict[str, Any] = {
    "dynamics_hide_fraction": 0.5,
    "dynamics_add_fraction": 0.5,
    "dynamics_candidates": "100,1000",
    "dynamics_families": ",".join(MODELS),
}

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


# ------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class DynamicsSettings:
    """The protocol's own settings, checked: ``hide_fraction`` in (0, 1), ``add_fraction`` in (0, 1],
    ``candidate_sizes`` each > ``k``, ``families`` a non-empty subset of `MODELS` in their order."""

    hide_fraction: float
    add_fraction: float
    candidate_sizes: tuple[int, ...]
    families: tuple[str, ...]


def _option(config: RealDataStudyConfig, name: str) -> Any:
    return getattr(config, name, DEFAULTS[name])


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def dynamics_settings(config: RealDataStudyConfig) -> DynamicsSettings:
    """The checked protocol settings of ``config``; a ``ValueError`` naming the flag on a bad one.

    Checked before any data is loaded or model trained: ``--epochs >= 10`` (one checkpoint per epoch, at
    least 10), ``--dynamics-users >= 2`` (correlations over users), the fractions, the candidate sizes
    (> ``--k``) and the family names.
    """
    if config.epochs < MIN_EPOCHS:
        raise ValueError(
            f"--epochs must be >= {MIN_EPOCHS} for the dynamics protocol (one checkpoint per epoch, at "
            f"least {MIN_EPOCHS}), got {config.epochs}"
        )
    if config.dynamics_users < 2:
        raise ValueError(
            f"--dynamics-users must be >= 2 for per-user correlations, got {config.dynamics_users}"
        )
    hide = _option(config, "dynamics_hide_fraction")
    if isinstance(hide, bool) or not isinstance(hide, int | float) or not 0.0 < hide < 1.0:
        raise ValueError(f"--dynamics-hide-fraction must be in (0, 1), got {hide!r}")
    add = _option(config, "dynamics_add_fraction")
    if isinstance(add, bool) or not isinstance(add, int | float) or not 0.0 < add <= 1.0:
        raise ValueError(f"--dynamics-add-fraction must be in (0, 1], got {add!r}")
    sizes = _int_list(_option(config, "dynamics_candidates"), "--dynamics-candidates")
    if not sizes or any(c <= config.k for c in sizes):
        raise ValueError(
            f"--dynamics-candidates must be one or more sizes > --k={config.k}, "
            f"got {_option(config, 'dynamics_candidates')!r}"
        )
    names = [f.strip() for f in str(_option(config, "dynamics_families")).split(",") if f.strip()]
    bad = sorted(set(names) - set(MODELS))
    if not names or bad:
        raise ValueError(
            f"--dynamics-families must be a non-empty subset of {','.join(MODELS)}, got "
            f"{_option(config, 'dynamics_families')!r}"
        )
    families = tuple(m for m in MODELS if m in names)
    return DynamicsSettings(float(hide), float(add), tuple(dict.fromkeys(sizes)), families)


# -------------------------------------------------------------------------------------- correlations


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _tau(x: np.ndarray, y: np.ndarray) -> float | None:
    """Kendall tau-b of ``x`` vs ``y``; None when it is undefined (fewer than 2 points, a constant side)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite(stats.kendalltau(x, y).statistic)


def _rho(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rho of ``x`` vs ``y``; None when it is undefined."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite(stats.spearmanr(x, y).statistic)


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


# ------------------------------------------------------------------------------ per-family history scorers


def _chunked(fn, users: np.ndarray, extra: tuple[np.ndarray, ...], chunk: int) -> jax.Array:
    """``fn(users (B,), *extra rows (B, ...)) -> (M, B, n)`` over ``chunk``-user calls, the last one padded
    so one compiled shape serves every call; returns ``(M, U, n)``."""
    out = []
    size = min(chunk, users.size)
    for start in range(0, users.size, size):
        sl = slice(start, start + size)
        rows = [users[sl], *(e[sl] for e in extra)]
        real = rows[0].shape[0]
        if real < size:
            rows = [np.concatenate([r, np.repeat(r[-1:], size - real, axis=0)]) for r in rows]
        out.append(fn(*(jnp.asarray(r) for r in rows))[:, :real])
    return jnp.concatenate(out, axis=1)


def _sasrec_module(params) -> SASRec:
    """The `SASRec` module of trained (stacked) ``params``, its sizes read off the parameter shapes."""
    p = params["params"]
    n_items_1, dim = p["item_emb"]["embedding"].shape[-2:]
    n_blocks = sum(1 for name in p if name.startswith("attn_"))
    return SASRec(
        n_items=int(n_items_1) - 1,
        max_len=int(p["pos_emb"]["embedding"].shape[-2]),
        dim=int(dim),
        n_blocks=n_blocks,
        n_heads=int(p["attn_0"]["query"]["kernel"].shape[-2]),
        dropout=0.0,  # deterministic scoring never applies it
    )


def _sasrec_scorer(params, chunk: int):
    """``scores(users, sequences) -> (M, U, n_items)``: SASRec's deterministic scores from the given input
    sequences (item ids in time order; the last ``max_len`` are fed, left-padded, ids shifted by +1 as in
    training)."""
    module = _sasrec_module(params)

    def per_model(p, seq):
        h = module.apply(p, seq)
        table, bias = module.apply(p, method=SASRec.item_table)
        return h[:, -1] @ table.T + bias

    fn = jax.jit(jax.vmap(per_model, in_axes=(0, None)))

    def scores(users: np.ndarray, seqs: list[np.ndarray]) -> jax.Array:
        arr = np.zeros((len(seqs), module.max_len), np.int32)
        for row, s in enumerate(seqs):
            tail = np.asarray(s[-module.max_len :], np.int64)
            if tail.size:
                arr[row, module.max_len - tail.size :] = tail + 1
        return _chunked(lambda _u, seq: fn(params, seq), users, (arr,), chunk)

    return scores


def _lightgcn_layers(model: RecModel, params, split: InteractionSplit, users: np.ndarray, base) -> LightGCN:
    """The `LightGCN` module whose full-graph propagation reproduces ``model.score`` on ``users``.

    The layer count is not in the parameters; the study's default is tried first, then 0..6. A
    ``RuntimeError`` when none reproduces the scores: the counterfactual graphs would then not be this
    model's.
    """
    p = params["params"]
    dim = int(p["user"].shape[-1])
    eu = jnp.asarray(split.train_users, jnp.int32)
    ei = jnp.asarray(split.train_items, jnp.int32)
    norm = edge_norm(eu, ei, jnp.ones(eu.shape), split.n_users, split.n_items)
    u = jnp.asarray(users[: min(8, users.size)], jnp.int32)
    want = np.asarray(base[:, : u.shape[0]])
    for n_layers in dict.fromkeys([LightGCNConfig().n_layers, *range(7)]):
        module = LightGCN(split.n_users, split.n_items, dim, n_layers)

        def one(q, module=module):
            a, b = module.apply(q, eu, ei, norm)
            return a[u] @ b.T

        got = np.asarray(jax.vmap(one)(params))
        if np.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max()))):
            return module
    raise RuntimeError("could not rebuild the LightGCN propagation that reproduces the model's scores")


def _lightgcn_scorer(module: LightGCN, params, split: InteractionSplit):
    """``scores(users, drop (U, H), add (U, A), add_ok (U, A)) -> (M, U, n_items)``: per user, LightGCN's
    scores on the training graph without the edges ``drop`` (indices into the training interactions;
    ``n_train`` = none) and with an edge to each item ``add[u, a]`` where ``add_ok``. Each user gets its own
    full propagation (degrees renormalised, every layer recomputed), one after the other (`jax.lax.map`),
    since a propagation holds ``n_edges * dim`` floats."""
    n_users, n_items = split.n_users, split.n_items
    eu = jnp.asarray(split.train_users, jnp.int32)
    ei = jnp.asarray(split.train_items, jnp.int32)
    n_edges = int(eu.shape[0])

    def one(p, u, drop, add, add_ok):
        keep = jnp.ones((n_edges,), jnp.float32).at[drop].set(0.0, mode="drop")
        edge_u = jnp.concatenate([eu, jnp.full(add.shape, u, jnp.int32)])
        edge_i = jnp.concatenate([ei, add])
        w = jnp.concatenate([keep, add_ok.astype(jnp.float32)])
        e_user, e_item = module.apply(p, edge_u, edge_i, edge_norm(edge_u, edge_i, w, n_users, n_items))
        return e_user[u] @ e_item.T

    def per_model(p, users, drop, add, add_ok):
        return jax.lax.map(lambda row: one(p, *row), (users, drop, add, add_ok))

    fn = jax.jit(jax.vmap(per_model, in_axes=(0, None, None, None, None)))

    def scores(users: np.ndarray, drop: np.ndarray, add: np.ndarray, add_ok: np.ndarray) -> jax.Array:
        return fn(
            params,
            jnp.asarray(users, jnp.int32),
            jnp.asarray(drop, jnp.int32),
            jnp.asarray(add, jnp.int32),
            jnp.asarray(add_ok, bool),
        )

    return scores


def _edge_changes(split: InteractionSplit, us: _Users, change: str) -> tuple[np.ndarray, ...]:
    """``(drop (U, H), add (U, A), add_ok (U, A))`` for `_lightgcn_scorer`; the same H and A for every
    change, so one compilation serves them all."""
    n_edges = int(split.train_users.shape[0])
    codes = split.train_users.astype(np.int64) * split.n_items + split.train_items
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    h = max(1, max(x.size for x in us.hidden))
    a = max(1, max(x.size for x in us.added))
    drop = np.full((us.ids.size, h), n_edges, np.int64)
    add = np.zeros((us.ids.size, a), np.int64)
    add_ok = np.zeros((us.ids.size, a), bool)
    for row, u in enumerate(us.ids):
        if change == "hide" and us.hidden[row].size:
            pos = np.searchsorted(sorted_codes, int(u) * split.n_items + us.hidden[row])
            drop[row, : pos.size] = order[pos]
        if change == "add":
            add[row, : us.added[row].size] = us.added[row]
            add_ok[row, : us.added[row].size] = True
    return drop, add, add_ok


def _history_scores(
    family: str,
    model: RecModel,
    params,
    split: InteractionSplit,
    us: _Users,
    base: jax.Array,
    chunk: int,
) -> dict[str, jax.Array]:
    """``{"hide": (M, U, n), "add": (M, U, n)}``: the ensemble's scores with the changed histories.

    MF and MLP score from the user's embedding alone, so their scores are ``base`` itself. SASRec and
    LightGCN are re-run; the rebuilt scorer must reproduce ``base`` on the unchanged history first (a
    ``RuntimeError`` otherwise), so a change is never confused with a rebuilding error.
    """
    tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, float(jnp.abs(base).max())))
    if family == "sasrec":
        fn = _sasrec_scorer(params, chunk)
        again = fn(us.ids, _visible_sequences(us, "base"))
        if not np.allclose(np.asarray(again), np.asarray(base), **tol):
            raise RuntimeError("the rebuilt SASRec does not reproduce the model's scores")
        return {c: fn(us.ids, _visible_sequences(us, c)) for c in ("hide", "add")}
    if family == "lightgcn":
        module = _lightgcn_layers(model, params, split, us.ids, base)
        fn = _lightgcn_scorer(module, params, split)
        n_chk = min(4, us.ids.size)
        out = {}
        for change in ("hide", "add"):
            drop, add, add_ok = _edge_changes(split, us, change)
            # A few unchanged rows ride along in the same call (same compiled shape for both changes):
            # they must give the model's own scores, or the per-user graphs are not this model's.
            ids = np.concatenate([us.ids, us.ids[:n_chk]])
            drop = np.concatenate([drop, np.full_like(drop[:n_chk], split.train_users.shape[0])])
            add = np.concatenate([add, np.zeros_like(add[:n_chk])])
            add_ok = np.concatenate([add_ok, np.zeros_like(add_ok[:n_chk])])
            s = fn(ids, drop, add, add_ok)
            if not np.allclose(np.asarray(s[:, us.ids.size :]), np.asarray(base[:, :n_chk]), **tol):
                raise RuntimeError("the per-user LightGCN graphs do not reproduce the model's scores")
            out[change] = s[:, : us.ids.size]
        return out
    return {"hide": base, "add": base}


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


# ------------------------------------------------------------------------------------------ one family


def _trajectory(log: list[dict[str, float]]) -> dict[str, Any]:
    """Correlations across checkpoints of ``-mean LiDu`` (and of each ``-baseline``) with mean NDCG@K."""
    nd = np.array([r["mean_ndcg"] for r in log])
    out: dict[str, Any] = {"n_checkpoints": len(log), "log": log}
    lid = np.array([r["mean_lidu"] for r in log])
    out["kendall_tau_neg_lidu_vs_ndcg"] = _tau(-lid, nd)
    out["spearman_neg_lidu_vs_ndcg"] = _rho(-lid, nd)
    out["baselines"] = {}
    for name in ("mean_std", "mean_top_k_std"):
        v = np.array([r[name] for r in log])
        out["baselines"][name] = {
            "kendall_tau_neg_vs_ndcg": _tau(-v, nd),
            "spearman_neg_vs_ndcg": _rho(-v, nd),
        }
    return out


def _run_family(
    family: str,
    split: InteractionSplit,
    config: RealDataStudyConfig,
    s: DynamicsSettings,
    us: _Users,
    key: jax.Array,
) -> dict[str, Any]:
    cfg = dataclasses.replace(
        config, model=family, source="ensemble", dynamics=False, sweeps=False, json=None
    )
    base_cand = _candidates(us, "base")
    log: list[dict[str, float]] = []

    def make_callback(model: RecModel):
        def callback(epoch: int, params, losses) -> None:
            scores = score_stacked(model, params, us.ids, config.chunk, when=f"after epoch {epoch}")
            r = _per_user(scores, base_cand, us.test, config)
            log.append(
                {
                    "epoch": epoch,
                    "mean_lidu": float(r["lidu"].mean()),
                    "mean_ndcg": float(r["ndcg"].mean()),
                    "mean_std": float(r["mean_std"].mean()),
                    "mean_top_k_std": float(r["top_k_std"].mean()),
                    "loss": float(jnp.mean(losses)),
                }
            )

        return callback

    t0 = time.perf_counter()
    try:
        _, model, params = build_source(split, cfg, jax.random.fold_in(key, 1), make_callback)
    except TrainingFailedError as e:
        raise TrainingFailedError(
            f"{e} [dynamics protocol {split.name}/{family}: --seed {config.seed}, "
            f"--lr {config.lr or 'the model default'}, --epochs {config.epochs}]",
            model=e.model,
            members=e.members,
        ) from e
    t1 = time.perf_counter()
    base_scores = score_stacked(model, params, us.ids, config.chunk)
    before = _per_user(base_scores, base_cand, us.test, config)
    changed = _history_scores(family, model, params, split, us, base_scores, config.chunk)
    inference: dict[str, Any] = {}
    for change, means in (("hide", HIDE_MEANS), ("add", ADD_MEANS)):
        after = _per_user(changed[change], _candidates(us, change), us.test, config)
        inference[change] = compare(before, after, means[family])
    rng = np.random.default_rng([config.seed, 3])
    for size in s.candidate_sizes:
        used = min(size, split.n_items)
        cand = _shrunk_candidates(before["top"], base_cand, used, config.k, rng)
        after = _per_user(base_scores, cand, us.test, config)
        row = compare(before, after, CANDIDATES_MEAN)
        inference[f"candidates_{size}"] = {"size": size, "size_used": used, **row}
    t2 = time.perf_counter()
    return {
        "model": model.name,
        "training": _trajectory(log),
        "inference": inference,
        "seconds": {"train_with_checkpoints": round(t1 - t0, 1), "inference_changes": round(t2 - t1, 1)},
    }


# ------------------------------------------------------------------------------------------ the protocol


def run_dynamics_protocol(config: RealDataStudyConfig, *, split: InteractionSplit | None = None) -> dict:
    """The dynamics protocol on ``config.data`` (see the module docstring); returns the JSON payload.

    Args:
      config: the study settings; used: ``data`` (and its loading flags), ``n_models``, ``epochs`` (>= 10),
        ``dim``, ``lr``, ``batch_size``, ``k``, ``grid_size``, ``dynamics_users`` (>= 2), ``chunk``,
        ``seed``, ``out_dir``, ``progress``, and the optional ``dynamics_*`` settings of `DEFAULTS`.
        ``model``, ``source`` and the other extras are ignored: every family is trained as an ensemble.
      split: the data, already loaded (``config.data`` is then only its label).

    Returns:
      ``{"dataset", "n_users", "n_items", "k", "n_models", "epochs", "seed", "settings", "families",
      "seconds", "files", "config"}``. ``families[f]`` is ``{"skipped": reason}`` or ``{"model",
      "training", "inference", "seconds"}``: ``training`` has ``n_checkpoints``, ``log`` (one row per
      epoch: ``epoch, mean_lidu, mean_ndcg, mean_std, mean_top_k_std, loss``),
      ``kendall_tau_neg_lidu_vs_ndcg``, ``spearman_neg_lidu_vs_ndcg`` and ``baselines[name]``;
      ``inference[change]`` (``hide``, ``add``, ``candidates_<c>``) is `compare`'s summary.

    Raises:
      ValueError: a bad protocol setting (before any data is loaded), or ``k`` not below the number of
        items (before any training).
      lidu_jax.training.TrainingFailedError: an ensemble diverged.
    """
    t0 = time.perf_counter()
    s = dynamics_settings(config)
    split = load_data(config) if split is None else split
    if config.k >= split.n_items:
        raise ValueError(f"--k={config.k} must be < the number of items ({split.n_items}) of {split.name}")
    us = _pick_users(split, config, s)
    if us.ids.size < 2:
        raise ValueError(f"{split.name} has {us.ids.size} user(s) with a held-out item; need >= 2")
    key = jax.random.key(config.seed)
    families: dict[str, Any] = {}
    for family in s.families:
        if family == "sasrec" and split.train_sequences is None:
            families[family] = {"skipped": f"sasrec needs time-ordered data; {split.name!r} has no order"}
            continue
        families[family] = _run_family(family, split, config, s, us, key)
        if config.progress:
            print(f"dynamics {split.name}/{family}: {families[family]['seconds']}", flush=True)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dynamics_{split.name}"
    result: dict[str, Any] = {
        "dataset": split.name,
        "n_users": int(us.ids.size),
        "n_items": int(split.n_items),
        "k": config.k,
        "n_models": config.n_models,
        "epochs": config.epochs,
        "seed": config.seed,
        "settings": dataclasses.asdict(s),
        "families": families,
    }
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md")}
    try:
        _plot(result, out / f"{stem}.png")
        files["plot"] = str(out / f"{stem}.png")
    except ImportError as e:
        files["plot"] = None
        result["plot_skipped"] = f"matplotlib is not importable: {e}"
    result["files"] = files
    (out / f"{stem}.md").write_text(markdown(result))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    config_dict = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    config_dict.update({n: _option(config, n) for n in DEFAULTS})
    result["config"] = config_dict
    evaluation.write_json(evaluation.json_safe(result), out / f"{stem}.json")
    print(f"dynamics {split.name}: {result['seconds']} s; wrote {', '.join(f for f in files.values() if f)}")
    return result


# ------------------------------------------------------------------------------------------ tables, plot


def _fmt(v: float | None, sign: bool = True) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if sign else f"{v:.4f}"


def markdown(result: dict[str, Any]) -> str:
    """The two tables of ``dynamics_<data>.md``: training trajectories and inference-time changes."""
    k = result["k"]
    lines = [
        f"# LiDu dynamics on {result['dataset']} ({result['n_models']}-model ensembles, {result['epochs']} "
        f"epochs, {result['n_users']} users, K={k})",
        "",
        "## Training: across checkpoints (one per epoch)",
        "",
        f"| family | checkpoints | mean LiDu first → last | mean NDCG@{k} first → last | τ(−LiDu, NDCG) "
        "| ρ(−LiDu, NDCG) | τ(−top-K std, NDCG) | τ(−mean std, NDCG) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam, res in result["families"].items():
        if "skipped" in res:
            lines.append(f"| {fam} | skipped: {res['skipped']} | | | | | | |")
            continue
        tr = res["training"]
        first, last = tr["log"][0], tr["log"][-1]
        b = tr["baselines"]
        lines.append(
            f"| {fam} | {tr['n_checkpoints']} | {first['mean_lidu']:.2f} → {last['mean_lidu']:.2f} "
            f"| {first['mean_ndcg']:.4f} → {last['mean_ndcg']:.4f} "
            f"| {_fmt(tr['kendall_tau_neg_lidu_vs_ndcg'])} | {_fmt(tr['spearman_neg_lidu_vs_ndcg'])} "
            f"| {_fmt(b['mean_top_k_std']['kendall_tau_neg_vs_ndcg'])} "
            f"| {_fmt(b['mean_std']['kendall_tau_neg_vs_ndcg'])} |"
        )
    lines += [
        "",
        "## Inference-time changes (per user, final ensemble)",
        "",
        f"| family | change | mean LiDu before → after | mean NDCG@{k} before → after | τ(−ΔLiDu, ΔNDCG) "
        "| τ(signs) | sign agreement (users whose NDCG moved) | lists changed | scores moved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fam, res in result["families"].items():
        for change, r in res.get("inference", {}).items():
            agree = "n/a" if r["sign_agreement"] is None else f"{r['sign_agreement']:.2f}"
            lines.append(
                f"| {fam} | {change} | {r['mean_lidu_before']:.2f} → {r['mean_lidu_after']:.2f} "
                f"| {r['mean_ndcg_before']:.4f} → {r['mean_ndcg_after']:.4f} "
                f"| {_fmt(r['kendall_tau_delta'])} | {_fmt(r['kendall_tau_sign'])} "
                f"| {agree} ({r['n_ndcg_changed']}) | {r['frac_lists_changed']:.2f} "
                f"| {'yes' if r['mean_abs_score_change'] > 0 else 'no'} |"
            )
    lines += [
        "",
        "What each change means per family:",
        "",
        *[f"- hide, {f}: {HIDE_MEANS[f]}" for f in result["families"] if f in HIDE_MEANS],
        *[f"- add, {f}: {ADD_MEANS[f]}" for f in result["families"] if f in ADD_MEANS],
        f"- candidates_<c>: {CANDIDATES_MEAN}",
    ]
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    """Mean LiDu and mean NDCG@K vs epoch, one panel per trained family, and a bar panel of
    ``τ(−ΔLiDu, ΔNDCG)`` and ``τ(signs)`` per family and history change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {f: r for f, r in result["families"].items() if "skipped" not in r}
    n_panels = len(trained) + 1
    n_cols = min(3, n_panels)
    n_rows = -(-n_panels // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.6 * n_rows), squeeze=False)
    flat = list(axes.ravel())
    k = result["k"]
    for ax, (fam, res) in zip(flat, trained.items(), strict=False):
        log = res["training"]["log"]
        ep = [r["epoch"] for r in log]
        ax.plot(ep, [r["mean_lidu"] for r in log], "o-", color="C0", ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean LiDu", color="C0")
        twin = ax.twinx()
        twin.plot(ep, [r["mean_ndcg"] for r in log], "s--", color="C1", ms=3)
        twin.set_ylabel(f"mean NDCG@{k}", color="C1")
        ax.set_title(f"{fam}: τ(−LiDu, NDCG) {_fmt(res['training']['kendall_tau_neg_lidu_vs_ndcg'])}")
    ax = flat[len(trained)]
    labels, delta, sign = [], [], []
    for fam, res in trained.items():
        for change in ("hide", "add"):
            r = res["inference"][change]
            labels.append(f"{fam}\n{change}")
            delta.append(r["kendall_tau_delta"] or 0.0)
            sign.append(r["kendall_tau_sign"] or 0.0)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, delta, 0.4, label="τ(−ΔLiDu, ΔNDCG)")
    ax.bar(x + 0.2, sign, 0.4, label="τ(signs)")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xticks(x, labels, fontsize=7, rotation=45, ha="right")
    ax.set_title("inference-time changes (n/a shown as 0)")
    ax.legend(fontsize=7)
    for extra in flat[len(trained) + 1 :]:
        extra.axis("off")
    fig.suptitle(f"{result['dataset']}: LiDu through training and inference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
