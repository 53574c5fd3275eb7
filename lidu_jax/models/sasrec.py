"""SASRec-style causal transformer (Kang & McAuley, 2018) as a `RecModel`, for time-ordered data.

A user's training history ``(i_1, ..., i_n)`` (last ``max_len`` items, left-padded with 0) is embedded as
``x_t = sqrt(d) E[i_t] + P[t]`` and passed through pre-LayerNorm blocks of causal self-attention and a
position-wise ReLU MLP (dropout after each). The output ``h_t`` predicts the next item with
``s_t(j) = <h_t, E[j]> + b_j`` (shared item embeddings, item bias ``b_j``). Training: at every position t,
binary cross-entropy on the true next item ``i_{t+1}`` against one uniformly sampled negative ``j``,

    L = -sum_t w_t [log sigma(s_t(i_{t+1})) + log(1 - sigma(s_t(j)))] / #positions,

where ``w_t`` is the weight of the training interaction ``(u, i_{t+1})`` (bootstrap multiplicity). Scoring:
``score(u, j) = <h_n, E[j]> + b_j`` from the user's full training history; with a key, dropout stays on
(MC dropout).

Packed training (``SASRecConfig.pack``): on sparse data most of a left-padded row is padding (Amazon
Beauty: 7 of 50 positions are real on average), and every position costs the same. Packing puts several
users' sequences side by side in one row of ``max_len``; attention stays within a user (the segment mask
``seg_s == seg_t``) and each token keeps the position index it has in its own left-padded row, so the
hidden state of every real token is the unpacked one (up to float summation order) and so is the loss.
What changes is which users share a batch: the users of a row are always in the same batch.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lidu_jax.models._bpr import TrainState, make_negative_sampler
from lidu_jax.models.base import RecModel, check_lr
from lidu_jax.types import InteractionSplit

__all__ = ["SASRec", "SASRecConfig", "make_sasrec"]


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """Hyperparameters of `make_sasrec`.

    Attributes:
      max_len: history length seen by the model (longer histories keep their last ``max_len`` items).
      dim: model width. n_blocks: transformer blocks. n_heads: attention heads (must divide ``dim``).
      dropout: rate on embeddings, attention weights, residual branches (training and MC dropout).
      lr: Adam learning rate. l2: weight decay (AdamW-style, decoupled). batch_size: users per step.
      pack: train on packed rows (module docstring): an epoch has the same number of steps, each a batch
        of whole rows holding ``batch_size`` users on average. It pays when histories are much shorter than
        ``max_len``; it changes the training batches (hence the random draws), not the model or the loss.
    """

    max_len: int = 50
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    lr: float = 1e-3
    l2: float = 0.0
    batch_size: int = 128
    pack: bool = False


class SASRec(nn.Module):
    """``__call__(seq (B, L) int, deterministic) -> (B, L, dim)`` hidden states (item ids shifted by +1,
    0 = padding); ``item_table()`` -> ``(n_items, dim)`` output embeddings (padding row dropped) and
    ``(n_items,)`` item biases."""

    n_items: int
    max_len: int
    dim: int
    n_blocks: int
    n_heads: int
    dropout: float

    def setup(self):
        self.item_emb = nn.Embed(self.n_items + 1, self.dim, embedding_init=nn.initializers.normal(0.02))
        self.pos_emb = nn.Embed(self.max_len, self.dim, embedding_init=nn.initializers.normal(0.02))
        self.attn = [
            nn.MultiHeadDotProductAttention(
                num_heads=self.n_heads, qkv_features=self.dim, dropout_rate=self.dropout, name=f"attn_{b}"
            )
            for b in range(self.n_blocks)
        ]
        self.ln_attn = [nn.LayerNorm(name=f"ln_attn_{b}") for b in range(self.n_blocks)]
        self.ln_ffn = [nn.LayerNorm(name=f"ln_ffn_{b}") for b in range(self.n_blocks)]
        self.ffn_in = [nn.Dense(self.dim, name=f"ffn_in_{b}") for b in range(self.n_blocks)]
        self.ffn_out = [nn.Dense(self.dim, name=f"ffn_out_{b}") for b in range(self.n_blocks)]
        self.ln_final = nn.LayerNorm()
        self.item_bias = self.param("item_bias", nn.initializers.zeros, (self.n_items,))
        self.drop = nn.Dropout(self.dropout)

    def __call__(
        self,
        seq: jax.Array,
        deterministic: bool = True,
        positions: jax.Array | None = None,
        segments: jax.Array | None = None,
    ) -> jax.Array:
        """``(B, L)`` item ids (+1, 0 = padding) -> ``(B, L, dim)``. A packed row also passes ``positions``
        ``(B, L)`` (each token's index in its own left-padded row) and ``segments`` ``(B, L)`` (which
        sequence of the row a token belongs to, 1-based; 0 = padding); by default one sequence per row."""
        if segments is None:
            segments = (seq > 0).astype(jnp.int32)
        if positions is None:
            positions = jnp.arange(seq.shape[-1])
        real = (segments > 0)[..., None].astype(jnp.float32)
        x = self.item_emb(seq) * math.sqrt(self.dim) + self.pos_emb(positions)
        x = self.drop(x, deterministic=deterministic) * real
        # Query t may attend to key s <= t of its own sequence that is not padding.
        mask = (
            nn.make_causal_mask(seq)
            * nn.make_attention_mask(segments, segments, pairwise_fn=jnp.equal)
            * nn.make_attention_mask(jnp.ones_like(seq), segments > 0)
        )
        for b in range(self.n_blocks):
            h = self.ln_attn[b](x)
            x = x + self.drop(
                self.attn[b](h, h, mask=mask, deterministic=deterministic), deterministic=deterministic
            )
            h = self.ln_ffn[b](x)
            h = self.ffn_out[b](self.drop(nn.relu(self.ffn_in[b](h)), deterministic=deterministic))
            x = (x + self.drop(h, deterministic=deterministic)) * real
        return self.ln_final(x)

    def item_table(self) -> tuple[jax.Array, jax.Array]:
        return self.item_emb.embedding[1:], self.item_bias


def _sequence_arrays(split: InteractionSplit, max_len: int) -> tuple[np.ndarray, ...]:
    """Left-padded ``(U, L)`` training inputs, targets, target rows (index into the train arrays, -1 = none)
    and scoring inputs, with item ids shifted by +1."""
    if split.train_sequences is None:
        raise ValueError(f"split {split.name!r} has no train_sequences: SASRec needs time-ordered data")
    n_users, n_items = split.n_users, split.n_items
    if len(split.train_sequences) != n_users:
        raise ValueError(f"split.train_sequences has {len(split.train_sequences)} users, expected {n_users}")
    codes = split.train_users.astype(np.int64) * n_items + split.train_items
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    inputs = np.zeros((n_users, max_len), np.int32)
    targets = np.zeros((n_users, max_len), np.int32)
    rows = np.full((n_users, max_len), -1, np.int64)
    score_in = np.zeros((n_users, max_len), np.int32)
    for u, s in enumerate(split.train_sequences):
        s = np.asarray(s, np.int64)
        if s.size:
            tail = s[-max_len:]
            score_in[u, max_len - tail.size :] = tail + 1
        if s.size < 2:
            continue
        src, tgt = s[:-1][-max_len:], s[1:][-max_len:]
        n = tgt.size
        inputs[u, max_len - n :] = src + 1
        targets[u, max_len - n :] = tgt + 1
        pos = np.searchsorted(sorted_codes, u * n_items + tgt)
        found = (pos < sorted_codes.size) & (
            sorted_codes[np.minimum(pos, sorted_codes.size - 1)] == u * n_items + tgt
        )
        if not found.all():
            raise ValueError(
                f"split.train_sequences[{u}] has items that are not training interactions of user {u}"
            )
        rows[u, max_len - n :] = order[pos]
    return inputs, targets, rows, score_in


# Packings drawn once per model; each epoch trains on one of them, so the users sharing a row (hence a
# batch) change from epoch to epoch without packing on every epoch.
_N_PACKINGS = 4


def _pack(targets: np.ndarray, n_packings: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-fit packings of the users' training sequences into rows of ``L = targets.shape[1]``.

    Args:
      targets: ``(U, L)`` left-padded next-item targets of `_sequence_arrays`; user u has
        ``n_u = #(targets[u] > 0)`` training positions (users with none are left out).
      n_packings: P, each packing from its own random user order (``numpy`` generator of ``seed``).

    Returns:
      ``(user, column, segment)``, each ``(P, R, L)`` int32 with R the most rows any packing needs: the
      user and column of ``targets`` whose token sits at each place (user -1 = padding) and its 1-based
      segment in the row (0 = padding). A user's tokens fill the last n_u columns of its own row, so the
      column ``L - n_u + j`` is also the token's position index.
    """
    n_users, length = targets.shape
    counts = np.count_nonzero(targets > 0, axis=1)
    rng = np.random.default_rng(seed)
    packings = []
    for _ in range(n_packings):
        placed = []  # (user, row, offset, segment)
        row, used, seg = 0, 0, 0
        for u in rng.permutation(n_users):
            n = int(counts[u])
            if n == 0:
                continue
            if used + n > length:
                row, used, seg = row + 1, 0, 0
            seg += 1
            placed.append((u, row, used, seg))
            used += n
        packings.append((placed, row + 1 if placed else 0))
    n_rows = max(1, max(r for _, r in packings))
    user = np.full((n_packings, n_rows, length), -1, np.int32)
    column = np.zeros_like(user)
    segment = np.zeros_like(user)
    for p, (placed, _) in enumerate(packings):
        for u, row, offset, seg in placed:
            n = int(counts[u])
            user[p, row, offset : offset + n] = u
            column[p, row, offset : offset + n] = np.arange(length - n, length)
            segment[p, row, offset : offset + n] = seg
    return user, column, segment


def make_sasrec(split: InteractionSplit, config: SASRecConfig = SASRecConfig()) -> RecModel:
    """SASRec on ``split`` (needs ``split.train_sequences``); see the module docstring for the equations."""
    if config.n_heads < 1 or config.dim % config.n_heads:
        raise ValueError(f"config.n_heads={config.n_heads} must be >= 1 and divide config.dim={config.dim}")
    if config.max_len < 2 or config.batch_size < 1:
        raise ValueError(
            f"config: need max_len >= 2 and batch_size >= 1, got {config.max_len}, {config.batch_size}"
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config.dropout must be in [0, 1), got {config.dropout}")
    check_lr(config.lr)
    inputs, targets, rows, score_in = _sequence_arrays(split, config.max_len)
    module = SASRec(
        split.n_items, config.max_len, config.dim, config.n_blocks, config.n_heads, config.dropout
    )
    optimizer = optax.adamw(config.lr, weight_decay=config.l2) if config.l2 > 0 else optax.adam(config.lr)
    n_users = split.n_users
    n_batches = -(-n_users // config.batch_size)
    total = n_batches * config.batch_size
    inputs_j, targets_j, score_in_j = jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(score_in)
    rows_j = jnp.asarray(np.maximum(rows, 0), jnp.int32)
    has_row = jnp.asarray(rows >= 0, jnp.float32)
    sample_neg = make_negative_sampler(split.train_users, split.train_items, split.n_users, split.n_items)

    def init(key: jax.Array) -> TrainState:
        params = module.init(key, jnp.zeros((1, config.max_len), jnp.int32))
        return TrainState(params, optimizer.init(params))

    def batch_loss(params, seq, tgt, neg, w, key, positions=None, segments=None):
        h = module.apply(params, seq, False, positions, segments, rngs={"dropout": key})
        table, bias = module.apply(params, method=SASRec.item_table)
        s_pos = jnp.sum(h * table[tgt - 1], -1) + bias[tgt - 1]
        s_neg = jnp.sum(h * table[neg], -1) + bias[neg]
        nll = -(jax.nn.log_sigmoid(s_pos) + jax.nn.log_sigmoid(-s_neg))
        return jnp.sum(w * nll) / jnp.maximum(jnp.sum(tgt > 0), 1)

    def update(state: TrainState, batches, key: jax.Array) -> tuple[TrainState, jax.Array]:
        def step(st: TrainState, batch):
            args, k = batch
            loss, grads = jax.value_and_grad(batch_loss)(st.params, *args[:4], k, *args[4:])
            updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
            return TrainState(optax.apply_updates(st.params, updates), opt_state), loss

        n = batches[0].shape[0]
        state, losses = jax.lax.scan(step, state, (batches, jax.random.split(key, n)))
        return state, jnp.mean(losses)

    def train_epoch_padded(state: TrainState, key: jax.Array, weights: jax.Array):
        k_perm, k_neg, k_step = jax.random.split(key, 3)
        users = jnp.take(jax.random.permutation(k_perm, n_users), jnp.arange(total) % n_users)
        valid = (jnp.arange(total) < n_users).astype(jnp.float32)[:, None]
        w = jnp.asarray(weights, jnp.float32)[rows_j[users]] * has_row[users] * valid
        neg = sample_neg(k_neg, jnp.broadcast_to(users[:, None], (total, config.max_len)))
        shape = (n_batches, config.batch_size, config.max_len)
        batches = (
            inputs_j[users].reshape(shape),
            targets_j[users].reshape(shape),
            neg.reshape(shape),
            w.reshape(shape),
        )
        return update(state, batches, k_step)

    train_epoch = train_epoch_padded
    if config.pack:
        p_user, p_col, p_seg = (jnp.asarray(a) for a in _pack(targets, _N_PACKINGS))
        n_rows = p_user.shape[1]
        # As many steps as unpacked, each on ``batch_size`` users on average.
        rows_per_batch = -(-n_rows // n_batches)
        total_rows = n_batches * rows_per_batch

        def train_epoch_packed(state: TrainState, key: jax.Array, weights: jax.Array):
            k_pick, k_perm, k_neg, k_step = jax.random.split(key, 4)
            pick = jax.random.randint(k_pick, (), 0, _N_PACKINGS)
            order = jnp.take(jax.random.permutation(k_perm, n_rows), jnp.arange(total_rows) % n_rows)
            valid = (jnp.arange(total_rows) < n_rows).astype(jnp.float32)[:, None]
            placed, cols, segs = p_user[pick][order], p_col[pick][order], p_seg[pick][order]
            real = placed >= 0
            users = jnp.maximum(placed, 0)  # padding reads user 0's arrays, then is zeroed or weighted 0
            seq = jnp.where(real, inputs_j[users, cols], 0)
            tgt = jnp.where(real, targets_j[users, cols], 0)
            w = jnp.asarray(weights, jnp.float32)[rows_j[users, cols]] * has_row[users, cols] * real * valid
            neg = sample_neg(k_neg, users)
            shape = (n_batches, rows_per_batch, config.max_len)
            batches = tuple(a.reshape(shape) for a in (seq, tgt, neg, w, cols, segs))
            return update(state, batches, k_step)

        train_epoch = train_epoch_packed

    def params(state: TrainState):
        return state.params

    def score(params, users: jax.Array, key: jax.Array | None = None) -> jax.Array:
        seq = score_in_j[jnp.asarray(users, jnp.int32)]
        if key is None:
            h = module.apply(params, seq)
        else:
            h = module.apply(params, seq, deterministic=False, rngs={"dropout": key})
        table, bias = module.apply(params, method=SASRec.item_table)
        return h[:, -1] @ table.T + bias

    return RecModel(init=init, train_epoch=train_epoch, params=params, score=score, name="sasrec")
