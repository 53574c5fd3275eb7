"""LightGCN (He et al., 2020) as a `RecModel`: linear propagation on the normalised user-item graph.

With ``A`` the bipartite adjacency of the training interactions and ``D`` its degrees,
``E^(l+1) = D^{-1/2} A D^{-1/2} E^(l)``; the final embeddings are the layer mean
``E = (1/(L+1)) sum_{l=0..L} E^(l)`` and the score is ``s_ui = <e_u, e_i>``. The sparse product is two
``segment_sum`` scatters over the edge list (users <- items and items <- users), so memory is
O(edges * dim) and everything jits and vmaps. Trained with BPR.

Bootstrap: the per-interaction weights scale the BPR terms, and an interaction with weight 0 also drops out
of the graph (edge present iff weight > 0), so each bootstrap replicate sees its own resampled graph.
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

__all__ = ["LightGCN", "LightGCNConfig", "edge_norm", "make_lightgcn"]


@dataclasses.dataclass(frozen=True)
class LightGCNConfig:
    """Hyperparameters of `make_lightgcn`.

    Attributes:
      dim: embedding size. n_layers: propagation layers L. lr: Adam learning rate.
      l2: BPR weight decay on the layer-0 embeddings of each batch (``l2 * ||e||^2 / B``).
      batch_size: training pairs per step. init_scale: std of the normal initialisation.
    """

    dim: int = 64
    n_layers: int = 2
    lr: float = 5e-3
    l2: float = 1e-4
    batch_size: int = 4096
    init_scale: float = 0.1


def edge_norm(
    edge_u: jax.Array, edge_i: jax.Array, edge_w: jax.Array, n_users: int, n_items: int
) -> jax.Array:
    """``(E,)`` entries of ``D^{-1/2} A D^{-1/2}`` for the edges ``(edge_u, edge_i)`` with ``edge_w > 0``:
    ``1 / sqrt(deg(u_e) deg(i_e))``, degrees counted over those edges; 0 for the other edges."""
    w = (edge_w > 0).astype(jnp.float32)
    deg_u = jax.ops.segment_sum(w, edge_u, n_users)
    deg_i = jax.ops.segment_sum(w, edge_i, n_items)
    # Isolated nodes (degree 0) get norm 0 instead of 0/0.
    return w * jax.lax.rsqrt(jnp.maximum(deg_u[edge_u] * deg_i[edge_i], 1.0))


class LightGCN(nn.Module):
    """Layer-0 embeddings and the propagation; ``__call__(edge_u, edge_i, norm)`` returns the final
    ``(user_emb (U, d), item_emb (I, d))`` on the graph with edges ``(edge_u[e], edge_i[e])`` and normalised
    weights ``norm[e]`` (from `edge_norm`)."""

    n_users: int
    n_items: int
    dim: int
    n_layers: int
    init_scale: float = 0.1

    def setup(self):
        init = nn.initializers.normal(self.init_scale)
        self.user = self.param("user", init, (self.n_users, self.dim))
        self.item = self.param("item", init, (self.n_items, self.dim))

    def __call__(self, edge_u: jax.Array, edge_i: jax.Array, norm: jax.Array) -> tuple[jax.Array, jax.Array]:
        eu, ei = self.user, self.item
        sum_u, sum_i = eu, ei
        for _ in range(self.n_layers):
            eu, ei = (
                jax.ops.segment_sum(norm[:, None] * ei[edge_i], edge_u, self.n_users),
                jax.ops.segment_sum(norm[:, None] * eu[edge_u], edge_i, self.n_items),
            )
            sum_u, sum_i = sum_u + eu, sum_i + ei
        scale = 1.0 / (self.n_layers + 1)
        return sum_u * scale, sum_i * scale

    def layer0(self) -> tuple[jax.Array, jax.Array]:
        return self.user, self.item


def make_lightgcn(split: InteractionSplit, config: LightGCNConfig = LightGCNConfig()) -> RecModel:
    """LightGCN on ``split``'s training interactions; see the module docstring for the equations.

    The graph is fixed by the weights passed to ``train_epoch``; ``score`` uses the full training graph
    (a bootstrap replicate's embeddings are propagated over the full graph at inference, which is the graph
    every replicate is asked to score).
    """
    if config.dim < 1 or config.n_layers < 0:
        raise ValueError(f"config: dim must be >= 1 and n_layers >= 0, got {config.dim}, {config.n_layers}")
    check_lr(config.lr)
    module = LightGCN(split.n_users, split.n_items, config.dim, config.n_layers, config.init_scale)
    edge_u = jnp.asarray(split.train_users, jnp.int32)
    edge_i = jnp.asarray(split.train_items, jnp.int32)
    # The full training graph's normalisation, computed once in NumPy-land so `score` does not re-derive
    # (and XLA does not constant-fold) the degree scatter at every compile.
    full_norm = jax.device_get(
        jax.jit(edge_norm, static_argnums=(3, 4))(
            edge_u, edge_i, jnp.ones(edge_u.shape), split.n_users, split.n_items
        )
    )
    optimizer = optax.adam(config.lr)

    def init(key: jax.Array) -> TrainState:
        params = module.init(key, edge_u, edge_i, jnp.asarray(full_norm))
        return TrainState(params, optimizer.init(params))

    def batch_loss(params, users, pos, neg, w, key, all_weights):
        del key
        norm = edge_norm(edge_u, edge_i, all_weights, split.n_users, split.n_items)  # this replicate's graph
        eu, ei = module.apply(params, edge_u, edge_i, norm)
        u0, i0 = module.apply(params, method=LightGCN.layer0)
        s_pos = jnp.sum(eu[users] * ei[pos], -1)
        s_neg = jnp.sum(eu[users] * ei[neg], -1)
        reg = (jnp.sum(u0[users] ** 2) + jnp.sum(i0[pos] ** 2) + jnp.sum(i0[neg] ** 2)) / users.shape[0]
        return bpr_pair_loss(s_pos, s_neg, w) + config.l2 * reg

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
        del key  # deterministic model
        eu, ei = module.apply(params, edge_u, edge_i, jnp.asarray(full_norm))
        return eu[users] @ ei.T

    return RecModel(init=init, train_epoch=train_epoch, params=params, score=score, name="lightgcn")
