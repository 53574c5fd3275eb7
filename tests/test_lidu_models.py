"""LightGCN, NeuMF-style MLP, SASRec and most-popular: equations against NumPy references, and the sanity
check of issue 3 (each trained model beats most-popular on NDCG@10 on a real slice, ensembles via vmap)."""

from __future__ import annotations

import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidu_jax import datasets as D
from lidu_jax import metrics
from lidu_jax.models.lightgcn import LightGCN, LightGCNConfig, edge_norm, make_lightgcn
from lidu_jax.models.mlp import MLPConfig, NeuMF, make_mlp
from lidu_jax.models.popularity import make_popularity
from lidu_jax.models.sasrec import SASRec, SASRecConfig, _pack, _sequence_arrays, make_sasrec
from lidu_jax.training import fit, score_users
from lidu_jax.types import InteractionSplit

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None
needs_ml100k = pytest.mark.skipif(not HAS_RECBOLE, reason="recbole wheel (ships ml-100k.inter) not installed")


def _toy_split() -> InteractionSplit:
    users = np.array([0, 0, 1, 1, 1, 2, 3, 3], np.int32)
    items = np.array([0, 2, 0, 1, 3, 4, 2, 4], np.int32)
    seqs = (np.array([2, 0]), np.array([1, 3, 0]), np.array([4]), np.array([4, 2]))
    return InteractionSplit(4, 5, users, items, np.array([0], np.int32), np.array([1], np.int32), seqs)


# ------------------------------------------------------------------------------------ equations


def test_lightgcn_propagation_matches_dense_reference():
    split = _toy_split()
    edge_u, edge_i = jnp.asarray(split.train_users), jnp.asarray(split.train_items)
    w = jnp.asarray([1, 1, 1, 0, 1, 1, 1, 1.0])  # edge (1, 1) dropped, as in a bootstrap replicate
    module = LightGCN(4, 5, dim=3, n_layers=2)
    norm = edge_norm(edge_u, edge_i, w, 4, 5)
    # Jitted whole (one compilation) rather than run op by op: cheaper on CPU.
    params = jax.jit(module.init)(jax.random.key(0), edge_u, edge_i, norm)
    eu, ei = jax.jit(module.apply)(params, edge_u, edge_i, norm)
    # Dense NumPy reference: symmetric normalised bipartite adjacency, mean of layers 0..2.
    r = np.zeros((4, 5))
    r[np.asarray(split.train_users)[np.asarray(w) > 0], np.asarray(split.train_items)[np.asarray(w) > 0]] = 1
    a = np.block([[np.zeros((4, 4)), r], [r.T, np.zeros((5, 5))]])
    d = a.sum(1)
    a_hat = a / np.sqrt(np.outer(np.maximum(d, 1), np.maximum(d, 1)))
    e0 = np.concatenate([np.asarray(params["params"]["user"]), np.asarray(params["params"]["item"])])
    ref = (e0 + a_hat @ e0 + a_hat @ a_hat @ e0) / 3
    np.testing.assert_allclose(np.asarray(eu), ref[:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ei), ref[4:], rtol=1e-5, atol=1e-6)
    # The RecModel scores are the inner products on the full graph.
    model = make_lightgcn(split, LightGCNConfig(dim=3, n_layers=2))
    full = model.params(model.init(jax.random.key(1)))
    chex.assert_shape(model.score(full, jnp.arange(4), None), (4, 5))


def test_mlp_full_catalogue_path_equals_pair_path_and_mc_dropout():
    split = _toy_split()
    module = NeuMF(4, 5, dim=4, hidden=(6, 3), dropout=0.3)
    model = make_mlp(split, MLPConfig(dim=4, hidden=(6, 3), dropout=0.3, score_chunk=2))
    params = model.params(model.init(jax.random.key(0)))
    users = jnp.arange(4)
    full = model.score(params, users, None)
    pairs = jax.jit(module.apply)(params, users, jnp.broadcast_to(jnp.arange(5), (4, 5)))
    np.testing.assert_allclose(np.asarray(full), np.asarray(pairs), rtol=1e-5, atol=1e-6)
    k = jax.random.key(3, impl="unsafe_rbg")  # cheap to compile; dropout masks derive from it
    score = jax.jit(model.score)
    a, b = score(params, users, k), score(params, users, k)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key, same draw
    assert not np.allclose(np.asarray(a), np.asarray(full))  # dropout is on with a key


def test_sasrec_inputs_and_causality():
    split = _toy_split()
    inputs, targets, rows, score_in = _sequence_arrays(split, 3)
    np.testing.assert_array_equal(inputs[1], [0, 2, 4])  # items 1, 3 shifted by +1, left-padded
    np.testing.assert_array_equal(targets[1], [0, 4, 1])  # next items 3, 0
    np.testing.assert_array_equal(score_in[1], [2, 4, 1])
    # rows point at the training interaction of each target.
    for u in range(4):
        for t in range(3):
            if rows[u, t] >= 0:
                assert (
                    split.train_users[rows[u, t]] == u and split.train_items[rows[u, t]] == targets[u, t] - 1
                )
    module = SASRec(5, 4, dim=8, n_blocks=2, n_heads=2, dropout=0.0)
    seq = jnp.array([[0, 1, 2, 3], [0, 1, 2, 5]])
    params = jax.jit(module.init)(jax.random.key(0), seq)
    h = jax.jit(module.apply)(params, seq)
    # Changing the last item changes only the last position's state (causal attention).
    np.testing.assert_allclose(np.asarray(h[0, :3]), np.asarray(h[1, :3]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(h[0, 3]), np.asarray(h[1, 3]))
    with pytest.raises(ValueError, match="train_sequences"):
        make_sasrec(
            InteractionSplit(4, 5, split.train_users, split.train_items, split.test_users, split.test_items)
        )
    with pytest.raises(ValueError, match="n_heads"):
        make_sasrec(split, SASRecConfig(dim=8, n_heads=3))
    with pytest.raises(ValueError, match="n_heads"):
        make_sasrec(split, SASRecConfig(dim=8, n_heads=0))
    with pytest.raises(ValueError, match=r"config\.lr must be finite and > 0"):
        make_sasrec(split, SASRecConfig(dim=8, n_heads=2, lr=-1e-3))


def _random_sequence_split(n_users: int, n_items: int, max_n: int, seed: int) -> InteractionSplit:
    rng = np.random.default_rng(seed)
    seqs = tuple(rng.permutation(n_items)[: rng.integers(0, max_n + 1)] for _ in range(n_users))
    users = np.concatenate([np.full(len(s), u) for u, s in enumerate(seqs)]).astype(np.int32)
    items = np.concatenate(seqs).astype(np.int32)
    return InteractionSplit(
        n_users, n_items, users, items, np.array([0], np.int32), np.array([1], np.int32), seqs
    )


def test_sasrec_packing_places_each_user_once_and_keeps_every_hidden_state():
    length = 8
    split = _random_sequence_split(n_users=13, n_items=15, max_n=length + 3, seed=0)
    inputs, targets, _, _ = _sequence_arrays(split, length)
    counts = (targets > 0).sum(1)
    user, column, segment = _pack(targets, 3, seed=1)
    assert user.shape == column.shape == segment.shape and user.shape[2] == length
    for p in range(3):
        seen = []
        for r in range(user.shape[1]):
            row_users = [u for u in dict.fromkeys(user[p, r]) if u >= 0]
            seen += row_users
            for seg, u in enumerate(row_users, start=1):
                at = np.flatnonzero(user[p, r] == u)
                # Contiguous, in the order of the user's own row, in one segment of its own.
                np.testing.assert_array_equal(at, np.arange(at[0], at[0] + counts[u]))
                np.testing.assert_array_equal(column[p, r, at], np.arange(length - counts[u], length))
                np.testing.assert_array_equal(segment[p, r, at], seg)
            np.testing.assert_array_equal(segment[p, r, user[p, r] < 0], 0)
        assert sorted(seen) == sorted(np.flatnonzero(counts > 0))  # every user with a target, once
    assert user.shape[1] < int((counts > 0).sum())  # it did pack: fewer rows than users
    # The state of each real token is the one it has in its user's own left-padded row.
    module = SASRec(15, length, dim=8, n_blocks=2, n_heads=2, dropout=0.0)
    params = jax.jit(module.init)(jax.random.key(0), jnp.asarray(inputs))
    apply = jax.jit(module.apply)
    padded = np.asarray(apply(params, jnp.asarray(inputs)))
    real = user[0] >= 0
    seq = np.where(real, inputs[np.maximum(user[0], 0), column[0]], 0)
    packed = np.asarray(
        apply(params, jnp.asarray(seq), True, jnp.asarray(column[0]), jnp.asarray(segment[0]))
    )
    np.testing.assert_allclose(packed[real], padded[user[0][real], column[0][real]], rtol=1e-5, atol=1e-5)
    # Without the segment mask a token would see its row neighbours: the test above can fail.
    mixed = np.asarray(
        apply(params, jnp.asarray(seq), True, jnp.asarray(column[0]), jnp.asarray(real.astype(np.int32)))
    )
    assert not np.allclose(mixed[real], padded[user[0][real], column[0][real]], atol=1e-3)


def test_popularity_scores_are_weighted_counts():
    split = _toy_split()
    model = make_popularity(split)
    w = jnp.asarray([2, 0, 1, 1, 1, 1, 1, 3.0])
    state, _ = model.train_epoch(model.init(jax.random.key(0)), jax.random.key(1), w)
    counts = np.bincount(split.train_items, weights=np.asarray(w), minlength=5)
    s = np.asarray(model.score(model.params(state), jnp.arange(2), None))
    # float32 counts and log1p vs a float64 reference: a few ulp of values ~1.6, whatever the summation order.
    np.testing.assert_allclose(s, np.log1p(np.broadcast_to(counts, (2, 5))), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ training sanity on real data

N_SEEDS = 2


@pytest.fixture(scope="module")
def ml_random():
    if not HAS_RECBOLE:
        pytest.skip("recbole wheel (ships ml-100k.inter) not installed")
    # A 200-user slice of MovieLens-100K (random 20% holdout per user), items with >= 10 interactions.
    return D.movielens_100k(config=D.LoadConfig(split="random", max_users=200, seed=0, k_item=10))


@pytest.fixture(scope="module")
def ml_loo():
    if not HAS_RECBOLE:
        pytest.skip("recbole wheel (ships ml-100k.inter) not installed")
    # 400 users, leave-last-out by timestamp (one held-out item per user).
    return D.movielens_100k(config=D.LoadConfig(split="leave_last_out", max_users=400, seed=0, k_item=10))


def _ndcg_per_seed(model, params, split) -> np.ndarray:
    scores = score_users(model, params, np.arange(split.n_users), chunk=1024)
    train, test = jnp.asarray(split.train_matrix()), jnp.asarray(split.test_matrix())
    return np.array([float(metrics.ndcg_at_k(s, test, 10, candidates=~train).mean()) for s in scores])


def _most_popular_ndcg(split) -> float:
    # Independent of `make_popularity` (tested above): rank every user's non-training items by their
    # training count, a NumPy bincount; nothing to compile.
    counts = np.bincount(split.train_items, minlength=split.n_items).astype(np.float32)
    scores = jnp.broadcast_to(jnp.asarray(counts), (split.n_users, split.n_items))
    train, test = jnp.asarray(split.train_matrix()), jnp.asarray(split.test_matrix())
    return float(metrics.ndcg_at_k(scores, test, 10, candidates=~train).mean())


def _train(model, split, epochs):
    # Counter-based "unsafe_rbg" keys: XLA's RngBitGenerator compiles far faster than threefry, and every
    # key the model derives (negatives, dropout) inherits the implementation. Compilation dominates here.
    keys = jax.random.split(jax.random.key(0, impl="unsafe_rbg"), N_SEEDS)
    weights = jnp.ones((N_SEEDS, split.train_users.shape[0]))
    params, _ = fit(model, keys, weights, epochs, progress=False)
    return params


@needs_ml100k
@pytest.mark.parametrize(
    "kind, epochs",
    [("lightgcn", 8), ("mlp", 6), ("sasrec", 10), ("sasrec-packed", 10)],
)
def test_trained_models_beat_most_popular(kind, epochs, ml_random, ml_loo):
    if kind == "lightgcn":
        split = ml_random
        model = make_lightgcn(split, LightGCNConfig(dim=32, lr=0.02, batch_size=2048))
    elif kind == "mlp":
        split = ml_random
        model = make_mlp(
            split, MLPConfig(dim=16, hidden=(32,), batch_size=512, lr=0.01, dropout=0.2, l2=2e-3)
        )
    else:
        # Sequential model on the time-ordered leave-last-out split it is made for.
        split = ml_loo
        cfg = SASRecConfig(
            dim=32, n_blocks=1, max_len=30, batch_size=32, lr=3e-3, pack=kind == "sasrec-packed"
        )
        model = make_sasrec(split, cfg)
    pop_ndcg = _most_popular_ndcg(split)
    params = _train(model, split, epochs)
    # vmap over seeds gives distinct models.
    leaf = jax.tree.leaves(params)[0]
    assert leaf.shape[0] == N_SEEDS and not np.allclose(np.asarray(leaf[0]), np.asarray(leaf[1]))
    ndcg = _ndcg_per_seed(model, params, split)
    # Clear margin: every seed above most-popular, the ensemble mean at least 20% above it.
    assert np.all(ndcg > 1.1 * pop_ndcg) and ndcg.mean() >= 1.2 * pop_ndcg, (kind, ndcg, pop_ndcg)
