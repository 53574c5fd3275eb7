"""Distillation and language-modelling losses (logits in float32; all losses are means over tokens).

Shapes: logits ``(..., T, V)`` (any leading batch dims), targets ``(..., T)`` int, optional ``weights``
``(..., T)`` (1 = token counts, 0 = padding). The mixed AST loss is
``L = w_kl * L_KL + w_ce * CE + w_hidden * L_hidden``
(public GPT-2 recipe: ``w_kl = 0.67, w_ce = 0.33``, T = 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "LossConfig",
    "cross_entropy_loss",
    "distill_loss",
    "hidden_mse_loss",
    "kl_distill_loss",
    "reverse_kl_distill_loss",
]


def _token_mean(x: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(x)
    w = jnp.asarray(weights, jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _check_pair(a: jax.Array, b: jax.Array, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} shape {a.shape} must equal {names[1]} shape {b.shape}")
    if a.ndim < 1:
        raise ValueError(f"{names[0]} must have a vocabulary axis, got shape {a.shape}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def kl_distill_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 2.0,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Forward KL distillation ``T² · mean_tokens KL(p_t || p_s)``, ``p = softmax(z / T)`` over the last axis.

    ``KL(p_t || p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v))``; the ``T²`` factor keeps gradient magnitudes
    comparable across temperatures (Hinton et al.). The teacher should already be under ``stop_gradient``.
    """
    _check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    _check_temperature(temperature)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return temperature**2 * _token_mean(kl, weights)


def reverse_kl_distill_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 2.0,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Reverse KL ``T² · mean_tokens KL(p_s || p_t)`` (mode-seeking), same conventions as forward KL."""
    _check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    _check_temperature(temperature)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_ps) * (log_ps - log_pt), axis=-1)
    return temperature**2 * _token_mean(kl, weights)


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Next-token cross-entropy ``mean_tokens −log softmax(z)[target]``.

    ``logits (..., T, V)`` at position ``t`` predict ``targets[..., t]``
    (the caller shifts: for a token stream ``x``, ``inputs = x[:, :-1]`` and ``targets = x[:, 1:]``).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {targets.shape} must equal logits shape without the vocab axis {logits.shape}"
        )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _token_mean(nll, weights)


def hidden_mse_loss(
    student_hidden: Sequence[jax.Array],
    teacher_hidden: Sequence[jax.Array],
    layers: Sequence[int] | None = None,
    eps: float = 1e-8,
) -> jax.Array:
    """Layer-wise hidden-state MSE normalised by the teacher's power, averaged over the chosen layers:

    ``L_hidden = mean_l  Σ (h_s^l − h_t^l)² / (Σ (h_t^l)² + eps)``

    ``student_hidden``/``teacher_hidden`` are sequences of ``(B, T, D)`` arrays (``return_hidden=True``);
    ``layers`` selects indices (default: all but the embedding output at index 0).
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}")
    idx = list(range(1, len(teacher_hidden))) if layers is None else list(layers)
    if not idx:
        raise ValueError("hidden_mse_loss: no layers selected")
    terms = []
    for i in idx:
        hs = student_hidden[i].astype(jnp.float32)
        ht = teacher_hidden[i].astype(jnp.float32)
        _check_pair(hs, ht, (f"student_hidden[{i}]", f"teacher_hidden[{i}]"))
        terms.append(jnp.sum((hs - ht) ** 2) / (jnp.sum(ht**2) + eps))
    return jnp.mean(jnp.stack(terms))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the mixed loss. ``kl_kind`` is ``"forward"`` (AST) or ``"reverse"``.

    ``w_kl = 0`` and ``w_ce = 1`` is plain language-model training (no teacher forward is needed).
    ``w_hidden > 0`` adds :func:`hidden_mse_loss` (the paper found it hurts; provided for the ablation).
    """

    w_kl: float = 0.67
    w_ce: float = 0.33
    w_hidden: float = 0.0
    temperature: float = 2.0
    kl_kind: str = "forward"

    def __post_init__(self) -> None:
        for name in ("w_kl", "w_ce", "w_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.w_kl == 0 and self.w_ce == 0 and self.w_hidden == 0:
            raise ValueError("LossConfig: all loss weights are zero")
        _check_temperature(self.temperature)
        if self.kl_kind not in ("forward", "reverse"):
            raise ValueError(f"LossConfig.kl_kind must be 'forward' or 'reverse', got {self.kl_kind!r}")

    @property
    def needs_teacher(self) -> bool:
        return self.w_kl > 0 or self.w_hidden > 0


def distill_loss(
    student_logits: jax.Array,
    targets: jax.Array,
    cfg: LossConfig,
    teacher_logits: jax.Array | None = None,
    student_hidden: Sequence[jax.Array] | None = None,
    teacher_hidden: Sequence[jax.Array] | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mixed AST loss ``w_kl·L_KL + w_ce·CE + w_hidden·L_hidden``; returns ``(loss, parts)``.

    ``parts`` holds ``ce`` (always), ``kl`` and ``hidden`` when their weights are non-zero.
    """
    parts = {"ce": cross_entropy_loss(student_logits, targets, weights)}
    loss = cfg.w_ce * parts["ce"]
    if cfg.w_kl > 0:
        if teacher_logits is None:
            raise ValueError("distill_loss: w_kl > 0 needs teacher_logits")
        kl_fn = kl_distill_loss if cfg.kl_kind == "forward" else reverse_kl_distill_loss
        parts["kl"] = kl_fn(student_logits, teacher_logits, cfg.temperature, weights)
        loss = loss + cfg.w_kl * parts["kl"]
    if cfg.w_hidden > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("distill_loss: w_hidden > 0 needs student_hidden and teacher_hidden")
        parts["hidden"] = hidden_mse_loss(student_hidden, teacher_hidden)
        loss = loss + cfg.w_hidden * parts["hidden"]
    return loss, parts
