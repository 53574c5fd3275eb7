"""The contract every recommender in `lidu_jax.models` follows.

A recommender is a bundle of pure functions, so an ensemble over seeds is `jax.vmap` over PRNG keys, a
bootstrap is `jax.vmap` over per-interaction weights, and snapshots are just the states after late epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any


class RecModel(NamedTuple):
    """Pure functions of one recommender bound to one `InteractionSplit` and one config.

    Attributes:
      init: ``init(key) -> state``; the training state pytree (params + optimizer state).
      train_epoch: ``train_epoch(state, key, weights) -> (state, loss)``; one pass over the training
        interactions. ``weights`` is ``(n_train,)`` float32, the multiplicity of each training
        interaction (all ones normally, multinomial counts for a bootstrap). Pure, jittable and
        vmappable over ``(state, key, weights)``.
      params: ``params(state) -> params``; the model parameters inside a state.
      score: ``score(params, users, key) -> (B, n_items)`` float32 scores of the full catalogue for
        ``users`` of shape ``(B,)`` int32. ``key`` is ``None`` for a deterministic forward pass, or a
        PRNG key to sample stochastic layers (MC dropout). Training items are NOT masked here.
      name: short model name for tables.
    """

    init: Callable[[jax.Array], PyTree]
    train_epoch: Callable[[PyTree, jax.Array, jax.Array], tuple[PyTree, jax.Array]]
    params: Callable[[PyTree], PyTree]
    score: Callable[[PyTree, jax.Array, jax.Array | None], jax.Array]
    name: str


def check_lr(lr: float) -> None:
    """ValueError unless the learning rate ``lr`` is finite and > 0 (a NaN or negative rate would train to
    garbage without any error)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"config.lr must be finite and > 0, got {lr!r}")
