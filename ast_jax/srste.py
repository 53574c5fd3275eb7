"""SR-STE update pieces: small optax transforms that read the N:M masks as an extra argument.

Each piece is a pure ``init(params) -> state`` / ``update(updates, state, params, *, masks) -> (updates,
state)`` pair (an ``optax.GradientTransformationExtraArgs``). They run inside
:func:`ast_jax.optim.with_nm_masks`, which owns the masks and hands them to every piece of its inner
``optax.chain`` as ``masks=``: a pytree with the params' structure, a bool ``(in, out)`` array at every sparse
kernel and ``None`` at dense leaves. Learning rate and weight decay are optax's own pieces
(``optax.scale_by_learning_rate``, ``optax.add_decayed_weights``); see :func:`ast_jax.optim.sparse_adamw`.

For a sparse kernel ``W`` with mask ``M`` (1 = kept), gradient ``g`` (straight-through, dense), 0-based update
count ``c``, step ``t = c + 1`` and ``λ = decay_schedule(c)`` (e.g. :func:`annealing_schedule`,
``λ(t) = λ_max · min(t / T0, 1)``):

:func:`scale_by_srste_adam` (Annealing SR-STE with the decay decoupled from the first moment)::

    m ← β1·m + (1 − β1)·g                    (first moment of the loss gradient only)
    u ← m + λ·(1 − M)⊙W                       (pull the masked-out weights toward zero)
    v ← β2·v + (1 − β2)·u²                    (second moment tracks u, not g)
    out = (u / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + ε)

  Dense leaves, and every leaf when ``decay_schedule=None``, get plain Adam (``u = m``, ``v`` on ``g²``).

:func:`add_srste_decay` (classic, coupled SR-STE, before a plain Adam): ``out = g + λ·(1 − M)⊙W``.

:func:`mask_updates` (fixed-mask retraining, gradual pruning): ``out = M ⊙ g`` on sparse leaves.

The authors' PyTorch code computes the decay factor as ``~mask`` on an integer mask, which is a bitwise NOT
(−1/−2), not ``1 − mask``. We implement the intended ``1 − M``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "AddSrsteDecayState",
    "ScaleBySrsteAdamState",
    "add_srste_decay",
    "annealing_decay",
    "annealing_schedule",
    "mask_updates",
    "scale_by_srste_adam",
]

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


def concrete_scalar(x: Any) -> float | None:
    """``x`` as a Python float when it is a known real scalar (not a tracer or schedule), else ``None``."""
    if callable(x) or isinstance(x, jax.core.Tracer):
        return None
    try:
        arr = np.asarray(x)
    except Exception:  # anything numpy cannot read is left to the code that uses it
        return None
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        return None
    return float(arr)


def check_number(name: str, value: Any, *, low: float = 0.0, low_ok: bool = True) -> None:
    """``ValueError`` unless a concrete ``value`` is finite and ``>= low`` (``> low`` without ``low_ok``);
    traced values and schedules are not checked (they are only known inside ``jit``)."""
    x = concrete_scalar(value)
    if x is None:
        return
    if not math.isfinite(x) or x < low or (x == low and not low_ok):
        need = f"{'>=' if low_ok else '>'} {low:g}"
        raise ValueError(f"{name} must be a finite number {need}, got {value!r}")


def check_betas(b1: Any, b2: Any) -> None:
    """``ValueError`` unless concrete ``b1``/``b2`` lie in ``[0, 1)``."""
    for name, val in (("b1", b1), ("b2", b2)):
        x = concrete_scalar(val)
        if x is not None and not 0 <= x < 1:  # also false for NaN
            raise ValueError(f"{name} must be in [0, 1), got {val!r}")


def annealing_decay(step: jax.Array | int, max_decay: float, ramp_steps: int) -> jax.Array:
    """λ(t) = λ_max · min(t / T0, 1): linear ramp over ``ramp_steps`` = T0 steps, then constant.

    ``step`` is the 1-based step ``t``; ``ramp_steps = 0`` gives the constant ``max_decay``. Returns a float32
    scalar (jittable in ``step``). ``ValueError`` for a NaN, infinite or negative ``max_decay`` or
    ``ramp_steps`` (when they are concrete).
    """
    check_number("max_decay", max_decay)
    check_number("ramp_steps", ramp_steps)
    t = jnp.asarray(step, jnp.float32)
    ramp = jnp.asarray(ramp_steps, jnp.float32)
    frac = jnp.where(ramp > 0, jnp.clip(t / jnp.maximum(ramp, 1.0), 0.0, 1.0), 1.0)
    return jnp.asarray(max_decay, jnp.float32) * frac


def annealing_schedule(max_decay: float, ramp_steps: int) -> optax.Schedule:
    """The optax schedule ``c -> λ(c + 1)`` of :func:`annealing_decay`.

    optax schedules receive the 0-based update count ``c``; λ is defined on the 1-based step ``t = c + 1``,
    so the first update already decays by ``λ_max / T0``.
    """
    annealing_decay(0, max_decay, ramp_steps)  # validates both
    return lambda count: annealing_decay(count + 1, max_decay, ramp_steps)


def _decay_at(decay_schedule: ScalarOrSchedule | None, count: jax.Array) -> jax.Array:
    if decay_schedule is None:
        return jnp.zeros((), jnp.float32)
    value = decay_schedule(count) if callable(decay_schedule) else decay_schedule
    return jnp.asarray(value, jnp.float32)


def _check_decay(decay_schedule: ScalarOrSchedule | None) -> None:
    if decay_schedule is not None:
        check_number("decay", decay_schedule)


def _need(name: str, params: Any, masks: Any) -> None:
    if params is None:
        raise ValueError(f"{name} needs params in update(updates, state, params)")
    if masks is None:
        raise ValueError(
            f"{name} needs the N:M masks as update(..., masks=...): run it inside ast_jax.optim.with_nm_masks"
        )


def _off(mk: jax.Array, w: jax.Array) -> jax.Array:
    return 1.0 - mk.astype(w.dtype)  # 1 - M, not the bitwise ~mask of the public code


class ScaleBySrsteAdamState(NamedTuple):
    """State of :func:`scale_by_srste_adam`: Adam's moments and the λ of the last update."""

    count: jax.Array  # int32 (), updates done so far
    mu: Any  # first moments, params-shaped
    nu: Any  # second moments, params-shaped
    decay: jax.Array  # float32 (), λ of the last update (0 without a decay schedule)


def scale_by_srste_adam(
    decay_schedule: ScalarOrSchedule | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Adam whose second moment tracks the SR-STE-decayed first moment on sparse kernels (module docstring).

    Args:
      decay_schedule: λ as a float or an optax schedule ``count -> λ`` (e.g. :func:`annealing_schedule`);
        ``None``: no SR-STE term, plain Adam on every leaf (the STE, coupled and fixed-mask variants). A
        constant ``0.0`` is not the same as ``None``: ``v`` then tracks ``m²`` on sparse kernels.
      b1, b2, eps: Adam's hyper-parameters.

    ``update(g, state, params, masks=...)``: ``g``, ``params`` and the output have the params' structure
    and shapes; ``masks`` is required unless ``decay_schedule`` is ``None``.
    """
    check_betas(b1, b2)
    check_number("eps", eps)
    _check_decay(decay_schedule)

    def init_fn(params: Any) -> ScaleBySrsteAdamState:
        return ScaleBySrsteAdamState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree_util.tree_map(jnp.zeros_like, params),
            nu=jax.tree_util.tree_map(jnp.zeros_like, params),
            decay=jnp.zeros((), jnp.float32),
        )

    def update_fn(
        updates: Any, state: ScaleBySrsteAdamState, params: Any = None, *, masks: Any = None, **extra: Any
    ) -> tuple[Any, ScaleBySrsteAdamState]:
        del extra
        decoupled = decay_schedule is not None
        if decoupled:
            _need("scale_by_srste_adam", params, masks)
        lam = _decay_at(decay_schedule, state.count)
        t = state.count + 1
        tf = t.astype(jnp.float32)
        bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** tf
        bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** tf

        g_leaves, treedef = jax.tree_util.tree_flatten(updates)
        mu_leaves = treedef.flatten_up_to(state.mu)
        nu_leaves = treedef.flatten_up_to(state.nu)
        w_leaves = treedef.flatten_up_to(params) if decoupled else [None] * len(g_leaves)
        mk_leaves = treedef.flatten_up_to(masks) if decoupled else [None] * len(g_leaves)

        out, new_mu, new_nu = [], [], []
        for g, mu, nu, w, mk in zip(g_leaves, mu_leaves, nu_leaves, w_leaves, mk_leaves, strict=True):
            # The association of every product below is that of the original one-piece sparse_adamw, so
            # results stay bitwise identical (optax's scale_by_adam computes (1-b2)*(g*g), not ((1-b2)*g)*g).
            mu = b1 * mu + (1.0 - b1) * g
            if mk is not None:
                u = mu + lam.astype(w.dtype) * _off(mk, w) * w
                nu = b2 * nu + (1.0 - b2) * u * u
            else:
                u = mu
                nu = b2 * nu + (1.0 - b2) * g * g
            out.append((u / bc1) / (jnp.sqrt(nu / bc2) + eps))
            new_mu.append(mu)
            new_nu.append(nu)
        new_state = ScaleBySrsteAdamState(
            count=t, mu=treedef.unflatten(new_mu), nu=treedef.unflatten(new_nu), decay=lam
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AddSrsteDecayState(NamedTuple):
    """State of :func:`add_srste_decay`."""

    count: jax.Array  # int32 (), updates done so far
    decay: jax.Array  # float32 (), λ of the last update


def add_srste_decay(decay_schedule: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Classic (coupled) SR-STE: ``g ← g + λ·(1 − M)⊙W`` on sparse kernels, dense leaves unchanged.

    Chain it before a plain Adam (``scale_by_srste_adam(None)``); λ is a float or a schedule
    ``count -> λ``. ``update(g, state, params, masks=...)`` keeps the params' structure and shapes.
    """
    check_number("decay", decay_schedule)

    def init_fn(params: Any) -> AddSrsteDecayState:
        del params
        return AddSrsteDecayState(count=jnp.zeros((), jnp.int32), decay=jnp.zeros((), jnp.float32))

    def update_fn(
        updates: Any, state: AddSrsteDecayState, params: Any = None, *, masks: Any = None, **extra: Any
    ) -> tuple[Any, AddSrsteDecayState]:
        del extra
        _need("add_srste_decay", params, masks)
        lam = _decay_at(decay_schedule, state.count)

        def one(mk: Any, g: jax.Array, w: jax.Array) -> jax.Array:
            return g if mk is None else g + lam.astype(w.dtype) * _off(mk, w) * w

        out = jax.tree_util.tree_map(one, masks, updates, params, is_leaf=lambda x: x is None)
        return out, AddSrsteDecayState(count=state.count + 1, decay=lam)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mask_updates() -> optax.GradientTransformationExtraArgs:
    """``u ← M ⊙ u`` on sparse kernels (dense leaves unchanged): masked-out weights neither learn nor move.

    Before Adam it masks the gradient (its moments stay zero there), after the learning rate it masks the
    update (so weight decay does not move them either): fixed-mask retraining and gradual pruning.
    """

    def update_fn(
        updates: Any, state: optax.EmptyState, params: Any = None, *, masks: Any = None, **extra: Any
    ) -> tuple[Any, optax.EmptyState]:
        del params, extra
        if masks is None:
            raise ValueError(
                "mask_updates needs the N:M masks as update(..., masks=...): run it inside "
                "ast_jax.optim.with_nm_masks"
            )
        out = jax.tree_util.tree_map(
            lambda mk, u: u if mk is None else u * mk.astype(u.dtype),
            masks,
            updates,
            is_leaf=lambda x: x is None,
        )
        return out, state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
