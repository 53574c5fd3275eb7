"""The per-family scorers of the dynamics protocol (`lidu_jax.study_dynamics`) that take a changed user
history: SASRec re-run on the changed input sequences, LightGCN re-propagated on a per-user graph; MF and
MLP score from the user embedding alone, so their scores do not change (`_history_scores`).

Each rebuilt scorer must first reproduce the trained model's own scores, so a change is never confused with
a rebuilding error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax.models.base import RecModel
from lidu_jax.models.lightgcn import LightGCN, LightGCNConfig, edge_norm
from lidu_jax.models.sasrec import SASRec
from lidu_jax.study_dynamics_users import _Users, _visible_sequences
from lidu_jax.types import InteractionSplit

__all__: list[str] = []


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
