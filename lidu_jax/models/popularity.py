"""Most-popular recommender as a `RecModel`: every user gets the items ranked by training popularity.

``s_ui = log(1 + sum_{(v, i) in train} w_vi)`` -- the (weighted) number of training interactions of item i,
the same for every user. It is the sanity floor every learned model must beat, and with bootstrap weights it
is a (trivial) distribution source too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lidu_jax.models._bpr import TrainState
from lidu_jax.models.base import RecModel
from lidu_jax.types import InteractionSplit

__all__ = ["make_popularity"]


def make_popularity(split: InteractionSplit) -> RecModel:
    """Most-popular baseline on ``split``; ``train_epoch`` recounts the items under the given weights."""
    items = jnp.asarray(split.train_items, jnp.int32)
    n_items = split.n_items

    def count(weights: jax.Array) -> jax.Array:
        return jnp.log1p(jax.ops.segment_sum(jnp.asarray(weights, jnp.float32), items, n_items))

    def init(key: jax.Array) -> TrainState:
        del key
        return TrainState({"log_count": count(jnp.ones(items.shape, jnp.float32))}, ())

    def train_epoch(state: TrainState, key: jax.Array, weights: jax.Array) -> tuple[TrainState, jax.Array]:
        del key
        return TrainState({"log_count": count(weights)}, state.opt_state), jnp.zeros((), jnp.float32)

    def params(state: TrainState):
        return state.params

    def score(params, users: jax.Array, key: jax.Array | None = None) -> jax.Array:
        del key
        return jnp.broadcast_to(params["log_count"], (users.shape[0], n_items))

    return RecModel(init=init, train_epoch=train_epoch, params=params, score=score, name="popularity")
