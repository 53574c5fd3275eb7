"""One jittable BPR epoch over the training interactions, shared by the pairwise models (LightGCN, MLP).

BPR (Rendle et al., 2009) maximises, for a training pair (u, i) and a sampled negative j,
``log sigma(s_ui - s_uj)``. Here each pair's term is multiplied by its weight ``w_ui`` (1 normally, a
multinomial count for a bootstrap), so a weight-2 pair counts twice and a weight-0 pair not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
# loss_fn(params, users (B,), pos (B,), neg (B,), batch_weights (B,), key, all_weights (n_train,)) -> scalar;
# all_weights lets a graph model rebuild its (bootstrap) graph.
PairLoss = Callable[..., jax.Array]


class TrainState(NamedTuple):
    """Parameters and optimizer state of one model (one seed); vmapped, every leaf gets a seed axis."""

    params: PyTree
    opt_state: PyTree


def bpr_pair_loss(pos: jax.Array, neg: jax.Array, weights: jax.Array) -> jax.Array:
    """``-(1/B) sum_b w_b log sigma(pos_b - neg_b)`` for ``(B,)`` score arrays; padding rows have w = 0."""
    return -jnp.sum(weights * jax.nn.log_sigmoid(pos - neg)) / pos.shape[0]


def make_negative_sampler(
    train_users: np.ndarray, train_items: np.ndarray, n_users: int, n_items: int, resample_rounds: int = 1
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Uniform negatives ``j ~ U{0..n_items-1}``, redrawn up to ``resample_rounds`` times where (u, j) is a
    training pair (checked by binary search in the sorted pair codes ``u * n_items + j``).

    Returns ``sample(key, users (B,)) -> (B,) int32``.
    """
    codes = None
    if n_users * n_items < 2**31 - 1:  # int32 codes; skip the rejection step on gigantic catalogues
        codes = jnp.asarray(np.unique(train_users.astype(np.int64) * n_items + train_items), jnp.int32)

    def is_pos(users: jax.Array, items: jax.Array) -> jax.Array:
        q = users * n_items + items
        idx = jnp.clip(jnp.searchsorted(codes, q), 0, codes.shape[0] - 1)
        return codes[idx] == q

    def sample(key: jax.Array, users: jax.Array) -> jax.Array:
        # One draw of all candidate rounds at once (one RNG kernel to compile instead of one per round).
        draws = jax.random.randint(key, (resample_rounds + 1, *users.shape), 0, n_items, jnp.int32)
        neg = draws[0]
        if codes is None:
            return neg
        for r in range(resample_rounds):
            neg = jnp.where(is_pos(users, neg), draws[r + 1], neg)
        return neg

    return sample


def make_bpr_epoch(
    loss_fn: PairLoss,
    optimizer: optax.GradientTransformation,
    train_users: np.ndarray,
    train_items: np.ndarray,
    n_users: int,
    n_items: int,
    batch_size: int,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
    """``train_epoch(state, key, weights (n_train,)) -> (state, mean loss)``: a shuffled pass in
    ``ceil(n_train / batch_size)`` minibatches (the last one padded with zero-weight rows) under `lax.scan`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(train_users.shape[0])
    n_batches = -(-n // batch_size)
    total = n_batches * batch_size
    users = jnp.asarray(train_users, jnp.int32)
    items = jnp.asarray(train_items, jnp.int32)
    sample_neg = make_negative_sampler(train_users, train_items, n_users, n_items)

    def epoch(state: TrainState, key: jax.Array, weights: jax.Array) -> tuple[TrainState, jax.Array]:
        k_perm, k_neg, k_step = jax.random.split(key, 3)
        perm = jnp.take(jax.random.permutation(k_perm, n), jnp.arange(total) % n)
        valid = (jnp.arange(total) < n).astype(jnp.float32)
        u, i = users[perm], items[perm]
        weights = jnp.asarray(weights, jnp.float32)
        w = weights[perm] * valid
        j = sample_neg(k_neg, u)
        shape = (n_batches, batch_size)
        batches = (u.reshape(shape), i.reshape(shape), j.reshape(shape), w.reshape(shape))
        step_keys = jax.random.split(k_step, n_batches)

        def step(st: TrainState, batch):
            (ub, ib, jb, wb), k = batch
            loss, grads = jax.value_and_grad(loss_fn)(st.params, ub, ib, jb, wb, k, weights)
            updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
            return TrainState(optax.apply_updates(st.params, updates), opt_state), loss

        state, losses = jax.lax.scan(step, state, (batches, step_keys))
        return state, jnp.mean(losses)

    return epoch
