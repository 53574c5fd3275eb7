"""NeuMF-style recommender (He et al., 2017) with dropout, as a `RecModel`; MC dropout samples its scores.

Two branches share nothing but the output layer:

    GMF:  g_ui = p_u * q_i                                   (elementwise, dim d)
    MLP:  h_ui = MLP([p'_u ; q'_i])  with ReLU and dropout   (hidden sizes ``hidden``)
    s_ui = <w_g, g_ui> + <w_m, h_ui> + b + b_i        (b_i: item bias, learns popularity fast)

The first MLP layer is split into a user part and an item part, ``W [p'; q'] = W_u p' + W_i q'``, so scoring
the full catalogue for one user costs one ``(n_items, h)`` activation, never a ``(n_items, 2d)`` concat;
and the GMF term for all items is one matrix product ``(p_u * w_g) Q^T``. Trained with BPR. Dropout stays
on in ``score(params, users, key)`` when a key is given (MC dropout), with an independent mask per
(user, item) pair, derived from ``fold_in(key, user)`` so a user's draw does not depend on its batch.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lidu_jax.models._bpr import TrainState, bpr_pair_loss, make_bpr_epoch
from lidu_jax.models.base import RecModel, check_lr
from lidu_jax.types import InteractionSplit

__all__ = ["MLPConfig", "NeuMF", "make_mlp"]


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Hyperparameters of `make_mlp`.

    Attributes:
      dim: embedding size of each branch. hidden: MLP layer widths. dropout: rate on every hidden layer
      (training and MC dropout). lr: Adam learning rate. l2: BPR weight decay on the batch embeddings.
      batch_size: training pairs per step. score_chunk: users scored per vectorised chunk in ``score``.
    """

    dim: int = 32
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.2
    lr: float = 3e-3
    l2: float = 1e-4
    batch_size: int = 4096
    init_scale: float = 0.1
    score_chunk: int = 16


class NeuMF(nn.Module):
    """``__call__(users (B,), items (B, N), deterministic) -> (B, N)`` scores of chosen items;
    ``all_items(user (), deterministic) -> (n_items,)`` scores of the full catalogue for one user."""

    n_users: int
    n_items: int
    dim: int
    hidden: tuple[int, ...]
    dropout: float
    init_scale: float = 0.1

    def setup(self):
        init = nn.initializers.normal(self.init_scale)
        self.p_gmf = self.param("p_gmf", init, (self.n_users, self.dim))
        self.q_gmf = self.param("q_gmf", init, (self.n_items, self.dim))
        self.p_mlp = self.param("p_mlp", init, (self.n_users, self.dim))
        self.q_mlp = self.param("q_mlp", init, (self.n_items, self.dim))
        self.item_bias = self.param("item_bias", nn.initializers.zeros, (self.n_items,))
        self.first_u = nn.Dense(self.hidden[0], name="first_user")
        self.first_i = nn.Dense(self.hidden[0], use_bias=False, name="first_item")
        self.deep = [nn.Dense(h, name=f"hidden_{k + 1}") for k, h in enumerate(self.hidden[1:])]
        self.w_gmf = nn.Dense(1, use_bias=False, name="out_gmf")
        self.w_mlp = nn.Dense(1, name="out_mlp")
        self.drop = nn.Dropout(self.dropout)

    def _tower(self, h: jax.Array, deterministic: bool) -> jax.Array:
        h = self.drop(nn.relu(h), deterministic=deterministic)
        for layer in self.deep:
            h = self.drop(nn.relu(layer(h)), deterministic=deterministic)
        return self.w_mlp(h)[..., 0]

    def __call__(self, users: jax.Array, items: jax.Array, deterministic: bool = True) -> jax.Array:
        gmf = self.w_gmf(self.p_gmf[users][:, None, :] * self.q_gmf[items])[..., 0]
        h = self.first_u(self.p_mlp[users])[:, None, :] + self.first_i(self.q_mlp[items])
        return gmf + self._tower(h, deterministic) + self.item_bias[items]

    def all_items(self, user: jax.Array, deterministic: bool = True) -> jax.Array:
        gmf = self.w_gmf(self.p_gmf[user][None, :] * self.q_gmf)[..., 0]
        h = self.first_u(self.p_mlp[user])[None, :] + self.first_i(self.q_mlp)
        return gmf + self._tower(h, deterministic) + self.item_bias

    def embeddings(self, users: jax.Array, items: jax.Array) -> jax.Array:
        """Squared L2 norm of the embeddings of ``users (B,)`` and ``items (B, N)`` (for weight decay)."""
        return (
            jnp.sum(self.p_gmf[users] ** 2)
            + jnp.sum(self.p_mlp[users] ** 2)
            + jnp.sum(self.q_gmf[items] ** 2)
            + jnp.sum(self.q_mlp[items] ** 2)
        )


def make_mlp(split: InteractionSplit, config: MLPConfig = MLPConfig()) -> RecModel:
    """NeuMF-style model on ``split``; see the module docstring for the equations."""
    if not config.hidden or min(config.hidden) < 1 or config.dim < 1:
        raise ValueError(f"config: dim and hidden sizes must be >= 1, got {config.dim}, {config.hidden}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config.dropout must be in [0, 1), got {config.dropout}")
    check_lr(config.lr)
    module = NeuMF(
        split.n_users, split.n_items, config.dim, tuple(config.hidden), config.dropout, config.init_scale
    )
    optimizer = optax.adam(config.lr)

    def init(key: jax.Array) -> TrainState:
        params = module.init(key, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2), jnp.int32))
        return TrainState(params, optimizer.init(params))

    def batch_loss(params, users, pos, neg, w, key, all_weights):
        del all_weights
        s = module.apply(params, users, jnp.stack([pos, neg], 1), deterministic=False, rngs={"dropout": key})
        reg = module.apply(params, users, jnp.stack([pos, neg], 1), method=NeuMF.embeddings)
        return bpr_pair_loss(s[:, 0], s[:, 1], w) + config.l2 * reg / users.shape[0]

    train_epoch = make_bpr_epoch(
        batch_loss,
        optimizer,
        split.train_users,
        split.train_items,
        split.n_users,
        split.n_items,
        config.batch_size,
    )

    def params(state: TrainState):
        return state.params

    def score(params, users: jax.Array, key: jax.Array | None = None) -> jax.Array:
        users = jnp.asarray(users, jnp.int32)
        if key is None:
            one = lambda u: module.apply(params, u, method=NeuMF.all_items)
        else:
            one = lambda u: module.apply(
                params,
                u,
                deterministic=False,
                rngs={"dropout": jax.random.fold_in(key, u)},
                method=NeuMF.all_items,
            )
        return jax.lax.map(one, users, batch_size=config.score_chunk)

    return RecModel(init=init, train_epoch=train_epoch, params=params, score=score, name="mlp")
