"""Matrix factorisation recommenders: BPR-MF (with optional dropout for MC dropout) and a Bayesian MF with a
mean-field Gaussian posterior over the factors, whose score mean and variance are analytic.

Both follow the `RecModel` contract, so `lidu_jax.training.fit` trains an ensemble over seeds, a
bootstrap over interaction weights, or a snapshot run of either of them with one `jax.vmap`.

Score model: ``s_ui = <p_u, q_i> + b_i`` with user factors ``p_u`` (d,), item factors ``q_i`` (d,), item
bias ``b_i``. Training objective (BPR, Rendle et al. 2009), for a training pair (u, i) of weight ``w_ui`` and
a uniformly sampled negative item j:
``L = -sum w_ui log sigmoid(s_ui - s_uj) / B + l2 * (|p_u|^2 + |q_i|^2 + |q_j|^2)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lidu_jax.models.base import RecModel, check_lr
from lidu_jax.types import InteractionSplit

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MFConfig:
    """Configuration of BPR-MF.

    Attributes:
      dim: latent dimension d.
      lr: Adam learning rate.
      l2: L2 penalty on the factors of each sampled triple.
      batch_size: interactions per minibatch.
      init_scale: std of the Gaussian initialisation of the factors.
      dropout: dropout rate on the user factors (training and, with a key, scoring: MC dropout). 0 = off.
    """

    dim: int = 32
    lr: float = 0.01
    l2: float = 1e-4
    batch_size: int = 1024
    init_scale: float = 0.1
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class BayesianMFConfig:
    """Configuration of the variational Bayesian MF (mean-field Gaussian posterior over all factors).

    Attributes:
      dim: latent dimension d.
      lr: Adam learning rate.
      prior_std: std of the isotropic Gaussian prior on every factor entry.
      batch_size: interactions per minibatch.
      init_scale: std of the initial posterior means.
      init_std: initial posterior std of every factor entry.
      kl_weight: multiplier of the KL term (1 = the evidence lower bound).
    """

    dim: int = 32
    lr: float = 0.01
    prior_std: float = 1.0
    batch_size: int = 1024
    init_scale: float = 0.1
    init_std: float = 0.05
    kl_weight: float = 1.0


class MFState(NamedTuple):
    """Training state of one model: parameters and Adam state."""

    params: PyTree
    opt_state: PyTree


def _check_split(split: InteractionSplit) -> tuple[jax.Array, jax.Array]:
    users = np.asarray(split.train_users)
    items = np.asarray(split.train_items)
    if users.ndim != 1 or users.shape != items.shape or users.size == 0:
        raise ValueError("split: train_users and train_items must be equal-length non-empty 1-D arrays")
    if users.min() < 0 or users.max() >= split.n_users or items.min() < 0 or items.max() >= split.n_items:
        raise ValueError("split: train ids out of range [0, n_users) / [0, n_items)")
    return jnp.asarray(users, jnp.int32), jnp.asarray(items, jnp.int32)


def _epoch_batches(key: jax.Array, weights: jax.Array, n_train: int, batch_size: int):
    """A shuffled epoch as ``(n_batches, batch)`` indices and weights; padding rows get weight 0."""
    n_batches = max(1, math.ceil(n_train / batch_size))
    perm = jax.random.permutation(key, n_train)
    pad = n_batches * batch_size - n_train
    idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)])
    w = jnp.concatenate([weights[perm], jnp.zeros((pad,), weights.dtype)])
    return idx.reshape(n_batches, batch_size), w.reshape(n_batches, batch_size)


def _check_weights(weights: jax.Array, n_train: int) -> None:
    if weights.shape != (n_train,):
        raise ValueError(f"weights must have shape ({n_train},), got {weights.shape}")


def _bpr_epoch(grad_fn, opt, state, key, weights, train_u, train_i, n_items: int, batch_size: int):
    """One weighted pass of minibatch BPR over the training pairs: shuffled batches, one uniform negative per
    pair, one PRNG key per batch for the loss's own randomness (dropout or posterior draws).

    ``grad_fn(params, u, i, j, w, key) -> (loss, grads)``; returns ``(state, mean batch loss)``.
    """
    n_train = int(train_u.shape[0])
    _check_weights(weights, n_train)
    kperm, kneg, kbatch = jax.random.split(key, 3)
    idx, w = _epoch_batches(kperm, weights, n_train, batch_size)
    neg = jax.random.randint(kneg, idx.shape, 0, n_items)
    batch_keys = jax.random.split(kbatch, idx.shape[0])

    def step(st: MFState, batch):
        b_idx, b_w, b_neg, b_key = batch
        loss, grads = grad_fn(st.params, train_u[b_idx], train_i[b_idx], b_neg, b_w, b_key)
        updates, opt_state = opt.update(grads, st.opt_state, st.params)
        return MFState(optax.apply_updates(st.params, updates), opt_state), loss

    state, losses = jax.lax.scan(step, state, (idx, w, neg, batch_keys))
    return state, jnp.mean(losses)


def make_bpr_mf(split: InteractionSplit, config: MFConfig = MFConfig()) -> RecModel:
    """BPR-MF bound to ``split``: ``s_ui = <p_u, q_i> + b_i``.

    With ``config.dropout > 0``, user factors pass through inverted dropout during training, and
    ``score(params, users, key)`` with a key samples a dropout mask (MC dropout); ``key=None`` is the
    deterministic forward pass.
    """
    if config.dim < 1 or config.batch_size < 1 or not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config: need dim >= 1, batch_size >= 1 and 0 <= dropout < 1, got {config}")
    check_lr(config.lr)
    train_u, train_i = _check_split(split)
    n_train, n_users, n_items = int(train_u.shape[0]), split.n_users, split.n_items
    batch_size = min(config.batch_size, n_train)
    opt = optax.adam(config.lr)

    def init(key: jax.Array) -> MFState:
        ku, ki = jax.random.split(key)
        params = {
            "user": config.init_scale * jax.random.normal(ku, (n_users, config.dim)),
            "item": config.init_scale * jax.random.normal(ki, (n_items, config.dim)),
            "item_bias": jnp.zeros((n_items,)),
        }
        return MFState(params, opt.init(params))

    def user_factors(params: PyTree, users: jax.Array, key: jax.Array | None) -> jax.Array:
        p = params["user"][users]
        if key is None or config.dropout == 0.0:
            return p
        keep = jax.random.bernoulli(key, 1.0 - config.dropout, p.shape)
        return jnp.where(keep, p / (1.0 - config.dropout), 0.0)

    def loss_fn(params, u, i, j, w, key):
        p = user_factors(params, u, key if config.dropout > 0 else None)
        qi, qj = params["item"][i], params["item"][j]
        diff = jnp.sum(p * (qi - qj), -1) + params["item_bias"][i] - params["item_bias"][j]
        reg = jnp.sum(params["user"][u] ** 2 + qi**2 + qj**2, -1)
        return jnp.sum(w * (-jax.nn.log_sigmoid(diff) + config.l2 * reg)) / batch_size

    grad_fn = jax.value_and_grad(loss_fn)

    def train_epoch(state: MFState, key: jax.Array, weights: jax.Array) -> tuple[MFState, jax.Array]:
        return _bpr_epoch(grad_fn, opt, state, key, weights, train_u, train_i, n_items, batch_size)

    def params_of(state: MFState) -> PyTree:
        return state.params

    def score(params: PyTree, users: jax.Array, key: jax.Array | None = None) -> jax.Array:
        p = user_factors(params, users, key)
        return p @ params["item"].T + params["item_bias"][None, :]

    return RecModel(init, train_epoch, params_of, score, "BPR-MF")


def _softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


def make_bayesian_mf(split: InteractionSplit, config: BayesianMFConfig = BayesianMFConfig()) -> RecModel:
    """Variational Bayesian BPR-MF: ``q(P, Q) = prod N(mu, diag(softplus(rho)^2))`` over all user and item
    factors, prior ``N(0, prior_std^2 I)``, trained by maximising the reparameterised evidence lower bound
    ``E_q[sum w log sigmoid(s_ui - s_uj)] * n_train / B - kl_weight * KL(q || p)`` (per-batch estimate,
    divided by ``n_train`` for scale).

    ``score(params, users, None)`` is the posterior mean score; with a key it draws one posterior sample
    of the factors. `bayesian_mf_moments` gives the analytic score mean and std.
    """
    if config.dim < 1 or config.batch_size < 1 or config.prior_std <= 0 or config.init_std <= 0:
        raise ValueError(f"config: need dim, batch_size >= 1 and prior_std, init_std > 0, got {config}")
    check_lr(config.lr)
    train_u, train_i = _check_split(split)
    n_train, n_users, n_items = int(train_u.shape[0]), split.n_users, split.n_items
    batch_size = min(config.batch_size, n_train)
    opt = optax.adam(config.lr)
    rho0 = _softplus_inv(config.init_std)

    def init(key: jax.Array) -> MFState:
        ku, ki = jax.random.split(key)
        params = {
            "user_mu": config.init_scale * jax.random.normal(ku, (n_users, config.dim)),
            "user_rho": jnp.full((n_users, config.dim), rho0),
            "item_mu": config.init_scale * jax.random.normal(ki, (n_items, config.dim)),
            "item_rho": jnp.full((n_items, config.dim), rho0),
        }
        return MFState(params, opt.init(params))

    def kl(mu, rho):
        # KL(N(mu, s^2) || N(0, p^2)) summed over entries.
        s = jax.nn.softplus(rho)
        p2 = config.prior_std**2
        return 0.5 * jnp.sum((s**2 + mu**2) / p2 - 1.0 - 2.0 * jnp.log(s) + math.log(p2))

    def loss_fn(params, u, i, j, w, key):
        ku, ki, kj = jax.random.split(key, 3)

        def draw(k, mu, rho, rows):
            return mu[rows] + jax.nn.softplus(rho[rows]) * jax.random.normal(k, (rows.shape[0], config.dim))

        p = draw(ku, params["user_mu"], params["user_rho"], u)
        qi = draw(ki, params["item_mu"], params["item_rho"], i)
        qj = draw(kj, params["item_mu"], params["item_rho"], j)
        nll = -jnp.sum(w * jax.nn.log_sigmoid(jnp.sum(p * (qi - qj), -1))) / batch_size
        total_kl = kl(params["user_mu"], params["user_rho"]) + kl(params["item_mu"], params["item_rho"])
        return nll + config.kl_weight * total_kl / n_train

    grad_fn = jax.value_and_grad(loss_fn)

    def train_epoch(state: MFState, key: jax.Array, weights: jax.Array) -> tuple[MFState, jax.Array]:
        return _bpr_epoch(grad_fn, opt, state, key, weights, train_u, train_i, n_items, batch_size)

    def params_of(state: MFState) -> PyTree:
        return state.params

    def score(params: PyTree, users: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if key is None:
            return params["user_mu"][users] @ params["item_mu"].T
        ku, ki = jax.random.split(key)
        su = jax.nn.softplus(params["user_rho"][users])
        p = params["user_mu"][users] + su * jax.random.normal(ku, su.shape)
        q = params["item_mu"] + jax.nn.softplus(params["item_rho"]) * jax.random.normal(
            ki, params["item_mu"].shape
        )
        return p @ q.T

    return RecModel(init, train_epoch, params_of, score, "BayesMF")


def bayesian_mf_moments(params: PyTree, users: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Analytic posterior mean and std of ``s_ui = <p_u, q_i>`` under independent Gaussian factors.

    With ``p_u ~ N(a, diag(s^2))`` and ``q_i ~ N(b, diag(t^2))`` independent:
    ``E[s] = sum_d a_d b_d`` and ``Var[s] = sum_d (a_d^2 t_d^2 + b_d^2 s_d^2 + s_d^2 t_d^2)``.

    Args:
      params: `make_bayesian_mf` parameters (one model, no seed axis).
      users: ``(B,)`` int user ids.

    Returns:
      ``(mean, std)``, each ``(B, n_items)`` float32.
    """
    a, b = params["user_mu"][users], params["item_mu"]
    s2 = jax.nn.softplus(params["user_rho"][users]) ** 2
    t2 = jax.nn.softplus(params["item_rho"]) ** 2
    mean = a @ b.T
    var = (a**2) @ t2.T + s2 @ (b**2).T + s2 @ t2.T
    return mean, jnp.sqrt(var)
