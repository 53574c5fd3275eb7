"""The distillation training step (pure; the caller jits it, with or without shardings) and perplexity.

One step, for student params ``W`` (dense, kept by the optimizer), masks ``M`` (in the optimizer state) and
optional SLoRB parameters ``S``:

    logits_s = student(x; M ⊙ W [+ SLoRB S])        (straight-through: d/dW = d/d(M ⊙ W))
    logits_t = stop_gradient(teacher(x))            (only when the loss needs it)
    L = w_kl · T² · KL(p_t || p_s) + w_ce · CE(logits_s, y) [+ w_hidden · L_hidden]
    u, opt_state ← tx.update(∇L, opt_state, (W, S));   (W, S) ← (W, S) + u
    opt_state ← refresh_masks(opt_state, (W, S))    (M = m(W) of the weights just written, when due)

With a dense optimizer (e.g. ``optax.adamw``) there are no masks and the same function is the plain dense
step, so the sparse machinery's cost can be measured against exactly the same loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ast_jax.distill import LossConfig, cross_entropy_loss, distill_loss
from ast_jax.optim import get_masks, mask_stats, refresh_masks
from ast_jax.slorb import apply_with_slorb, split_trainable, trainable_params
from ast_jax.sparsify import apply_masks, masked_params

__all__ = [
    "StepFn",
    "TrainState",
    "TrainingDivergedError",
    "evaluate_perplexity",
    "final_params",
    "init_train_state",
    "make_train_step",
]


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue exactly.

    ``params`` is the trainable pytree of :func:`ast_jax.slorb.trainable_params`; ``opt_state`` holds the
    masks (for sparse optimizers); ``step`` (int32) counts updates; ``data_position`` (int32) is the index of
    the next training batch (see :func:`ast_jax.data.batch_at`). There is no PRNG key: nothing in the step is
    random (no dropout; batches come from ``data_position``), so the state holds none.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    data_position: jax.Array


StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


class TrainingDivergedError(FloatingPointError):
    """Training diverged (non-finite or exploding loss, non-finite params or optimizer state).

    Raised by the training loops of ``ast_jax`` before the bad state is saved or used; ``exit_code`` is the
    process exit status the command lines report it with.
    """

    exit_code = 3


def init_train_state(
    model_params: Any,
    tx: optax.GradientTransformation,
    *,
    slorb_params: Any = None,
    data_position: int = 0,
) -> TrainState:
    """A fresh :class:`TrainState`: ``params = trainable_params(model_params, slorb_params)`` (copies),
    ``opt_state = tx.init(params)`` (masks from the current weights for ``sparse_adamw``).

    The state shares no buffer with the caller's arrays or with itself, so a jitted step can donate it
    (``donate_argnums=0``) while the caller keeps ``model_params`` (e.g. the teacher).
    """
    params = jax.tree_util.tree_map(jnp.copy, trainable_params(model_params, slorb_params))
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        data_position=jnp.asarray(data_position, jnp.int32),
    )


def _forward(model: nn.Module, trainable: Any, inputs: jax.Array, return_hidden: bool) -> Any:
    model_params, slorb_params = split_trainable(trainable)
    return apply_with_slorb(model, model_params, slorb_params, inputs, return_hidden=return_hidden)


def make_train_step(
    model: nn.Module,
    teacher_params: Any,
    tx: optax.GradientTransformation,
    loss_cfg: LossConfig = LossConfig(),
    *,
    teacher_model: nn.Module | None = None,
    straight_through: bool = True,
    skip_nonfinite: bool = True,
) -> StepFn:
    """Build ``step(state, batch, teacher_params=None) -> (state, metrics)``, a pure function to ``jax.jit``.

    Args:
      model: the student (any Flax model following the ``ast_jax`` model contract).
      teacher_params: the frozen dense teacher's params (may be ``None`` when the loss needs no teacher, or
        when they are passed to each call, e.g. to shard them with ``in_shardings``).
      tx: the optimizer; with :func:`ast_jax.optim.sparse_adamw` (or any chain holding
        :func:`ast_jax.optim.with_nm_masks`) the forward pass uses its masks, and they are refreshed from the
        updated weights by :func:`ast_jax.optim.refresh_masks`.
      loss_cfg: loss weights (:class:`ast_jax.distill.LossConfig`).
      teacher_model: the teacher's module if it differs from ``model`` (default: same architecture).
      straight_through: gradient of masked weights is straight-through (AST); ``False`` masks it.
      skip_nonfinite: if the loss or gradient is NaN/inf, return the input state unchanged
        (``metrics["finite"]`` is then ``False`` and the caller should stop).

    ``batch`` is ``{"inputs": (B, T) int32, "targets": (B, T) int32}``. ``metrics`` holds ``loss``, ``ce``,
    ``kl``/``hidden`` when used, ``grad_norm``, ``finite`` and, for sparse optimizers, λ and flip statistics.
    """
    teacher = model if teacher_model is None else teacher_model
    closed_teacher = teacher_params

    def step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any = None):
        tp = closed_teacher if teacher_params is None else teacher_params
        if loss_cfg.needs_teacher and tp is None:
            raise ValueError("make_train_step: the loss needs a teacher but teacher_params is None")
        inputs, targets = batch["inputs"], batch["targets"]
        need_hidden = loss_cfg.w_hidden > 0
        masks = get_masks(state.opt_state)

        t_logits = t_hidden = None
        if loss_cfg.needs_teacher:
            t_out = teacher.apply({"params": jax.lax.stop_gradient(tp)}, inputs, return_hidden=need_hidden)
            t_logits, t_hidden = t_out if need_hidden else (t_out, None)
            t_logits = jax.lax.stop_gradient(t_logits)
            t_hidden = jax.lax.stop_gradient(t_hidden)

        def loss_fn(trainable):
            fwd = masked_params(trainable, masks, straight_through_grad=straight_through)
            out = _forward(model, fwd, inputs, need_hidden)
            s_logits, s_hidden = out if need_hidden else (out, None)
            return distill_loss(s_logits, targets, loss_cfg, t_logits, s_hidden, t_hidden)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The masks of the next forward pass come from the weights just written, whatever tx chained after
        # the sparse pieces did to the update.
        opt_state = refresh_masks(opt_state, params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            params, opt_state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
        new_state = state.replace(
            params=params,
            opt_state=opt_state,
            step=state.step + finite.astype(jnp.int32),
            data_position=state.data_position + 1,
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **parts, **mask_stats(opt_state)}
        return new_state, metrics

    return step


def final_params(state: TrainState) -> tuple[Any, Any]:
    """``(model_params, slorb_params)`` with the masks applied for good (masked-out weights exactly zero).

    ``slorb_params`` is ``None`` when SLoRB is off. This is what evaluation and export should use.
    """
    masks = get_masks(state.opt_state)
    params = state.params if masks is None else apply_masks(state.params, masks)
    return split_trainable(params)


def _nll_sums(model: nn.Module, params: Any, slorb: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = apply_with_slorb(model, params, slorb, batch["inputs"])
    n = batch["targets"].size
    return cross_entropy_loss(logits, batch["targets"]) * n


@functools.lru_cache(maxsize=8)
def _nll_sums_jit(compiler_options: tuple[tuple[str, Any], ...] = ()) -> Callable:
    # One jitted evaluator per set of compiler options, reused across calls (the model is a static argument).
    return jax.jit(_nll_sums, static_argnums=0, compiler_options=dict(compiler_options) or None)


def evaluate_perplexity(
    model: nn.Module,
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    slorb_params: Any = None,
    compiler_options: dict[str, Any] | None = None,
) -> float:
    """Token-level perplexity ``exp(Σ NLL / #tokens)`` of ``model`` over ``batches`` (e.g.
    :func:`ast_jax.data.eval_batches` on held-out text).
    Pass hard-masked ``params`` (:func:`final_params`). ``compiler_options`` go to ``jax.jit``."""
    fn = _nll_sums_jit(tuple(sorted((compiler_options or {}).items())))
    total, count = 0.0, 0
    for batch in batches:
        total += float(fn(model, params, slorb_params or None, batch))
        count += int(np.asarray(batch["targets"]).size)
    if count == 0:
        raise ValueError("evaluate_perplexity: no evaluation tokens")
    nll = total / count
    if not np.isfinite(nll):
        raise ValueError(f"evaluate_perplexity: mean NLL is not finite ({nll})")
    return float(np.exp(nll))
