"""AST's optimizer assembled from optax pieces: ``sparse_adamw`` and its ablation variants.

The pieces: :func:`ast_jax.mask_state.with_nm_masks` (the state that owns the N:M masks and refreshes them,
through :func:`refresh_masks` after ``optax.apply_updates``, from the weights actually in use), the SR-STE
update pieces of :mod:`ast_jax.srste`, and optax's own weight decay and learning rate. For a sparse kernel
``W`` with mask ``M``, gradient ``g`` (straight-through, dense) and ``λ(t) = λ_max · min(t / T0, 1)`` at step
``t = count + 1``, ``sparse_adamw(lr)`` (``variant="annealing"``) is::

    with_nm_masks(chain(scale_by_srste_adam(annealing_schedule(λ_max, T0)),  m on g; u = m + λ(t)(1 − M)W;
                        add_decayed_weights(wd, mask=decay_mask()),          v on u²; + wd·W (matrices only)
                        scale_by_learning_rate(lr)),                         × (−lr)
                  n=2, m=4, refresh_every=mask_every)

and every other parameter gets plain AdamW (:func:`dense_adamw`). Variants (``variant=``):

- ``"annealing"`` — the above (AST).
- ``"static"`` — constant ``λ = λ_max`` (static SR-STE, decoupled).
- ``"coupled"`` — classic SR-STE: ``add_srste_decay(λ)`` (``g ← g + λ(t)(1 − M)W``) before a plain Adam;
  ``ramp_steps=0`` for the constant-λ original.
- ``"ste"`` — adaptive masks, no decay: plain AdamW on the straight-through gradient.
- ``"fixed"`` — masks never refreshed; ``mask_updates()`` zeroes the gradient before Adam and the update after
  the learning rate at masked-out entries, so they never move: fixed-mask retraining.
- ``"gmp"`` — gradual magnitude pruning, the pieces of ``"fixed"`` with a keep-count schedule: masks start
  dense and every ``mask_every`` updates keep :func:`gmp_keep` entries per group of ``m`` (``m`` down to
  ``n``, cubic over ``ramp_steps``), chosen by magnitude among the entries still kept. Pruned weights never
  come back: frozen, masked in the forward pass, zeroed by :func:`ast_jax.step.final_params`.

GMP in a training loop (replaces ``GMPState``/``gmp_keep``/``_gmp_masks``/``make_gmp_step``, whose
``optax.adamw`` also decayed biases and norms; the dense controls use :func:`dense_adamw`)::

    tx = sparse_adamw(lr, variant="gmp", ramp_steps=gmp_ramp_steps, mask_every=10, weight_decay=0.1)
    state = init_train_state(teacher, tx)              # masks start dense (m of m kept)
    step = jax.jit(make_train_step(model, teacher, tx, loss_cfg), donate_argnums=0)

Any other keep-count schedule is ``with_nm_masks(inner, keep_schedule=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ast_jax.mask_state import (
    MaskConfig,
    NMMaskState,
    get_masks,
    get_sparse_state,
    mask_stats,
    refresh_masks,
    with_nm_masks,
)
from ast_jax.masks import validate_nm
from ast_jax.sparsify import SparseFilter, key_path
from ast_jax.srste import (
    ScalarOrSchedule,
    add_srste_decay,
    annealing_decay,
    annealing_schedule,
    check_betas,
    check_number,
    mask_updates,
    scale_by_srste_adam,
)

__all__ = [
    "VARIANTS",
    "MaskConfig",
    "NMMaskState",
    "SparseAdamWState",
    "annealing_decay",
    "decay_mask",
    "dense_adamw",
    "get_masks",
    "get_sparse_state",
    "gmp_keep",
    "gpt2_recipe_schedule",
    "mask_stats",
    "refresh_masks",
    "sparse_adamw",
    "with_nm_masks",
]

VARIANTS = ("annealing", "static", "coupled", "ste", "fixed", "gmp")

# The old name (ast_jax/__init__.py still exports it): the state sparse_adamw returns, masks and flips inside.
SparseAdamWState = NMMaskState


def gmp_keep(count: jax.Array | int, n: int, m: int, ramp_steps: jax.Array | int) -> jax.Array:
    """Entries kept per group after ``count`` updates: ``m − round((m − n)·(1 − (1 − min(c / R, 1))³))``.

    The cubic gradual-pruning schedule (Zhu & Gupta 2017) on the keep count: ``m`` at ``c = 0``, ``n`` from
    ``c = R = ramp_steps`` on (``R <= 1``: from the first update on). int32 scalar, jittable in every
    argument.
    """
    frac = jnp.clip(jnp.asarray(count, jnp.float32) / jnp.maximum(ramp_steps, 1), 0.0, 1.0)
    pruned = jnp.round((m - n) * (1.0 - (1.0 - frac) ** 3)).astype(jnp.int32)
    return m - pruned


def decay_mask(decay_filter: SparseFilter | None = None) -> Callable[[Any], Any]:
    """``params -> bool pytree`` for ``optax.add_decayed_weights(mask=...)`` (or ``optax.adamw``).

    Default: decay matrices only (``ndim >= 2``), never biases or norm scales, as nanoGPT (the base of the
    public AST code) does. optax calls the mask on the params at ``init`` and on the updates at ``update``,
    so ``decay_filter(path, leaf)`` must depend only on the path and the leaf's shape.
    """

    def one(path: Any, leaf: Any) -> bool:
        if decay_filter is None:
            return getattr(leaf, "ndim", 0) >= 2
        return bool(decay_filter(key_path(path), leaf))

    return lambda tree: jax.tree_util.tree_map_with_path(one, tree)


def _decay_and_lr(
    learning_rate: ScalarOrSchedule, weight_decay: float, decay_filter: SparseFilter | None
) -> list[optax.GradientTransformation]:
    return [
        optax.add_decayed_weights(weight_decay, mask=decay_mask(decay_filter)),
        optax.scale_by_learning_rate(learning_rate),
    ]


def dense_adamw(
    learning_rate: ScalarOrSchedule,
    *,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay_filter: SparseFilter | None = None,
) -> optax.GradientTransformation:
    """The AdamW that :func:`sparse_adamw` applies to dense leaves, for dense runs (teacher, dense controls):

        chain(scale_by_srste_adam(None), add_decayed_weights(wd, mask=decay_mask(decay_filter)),
              scale_by_learning_rate(lr))

    ``W ← W − lr·[m̂ / (sqrt(v̂) + ε) + wd·W]`` with the decay on matrices only. ``optax.adamw`` is the same
    up to rounding order, but decays every leaf unless given a mask.
    """
    check_number("learning_rate", learning_rate)
    check_number("weight_decay", weight_decay)
    return optax.chain(
        scale_by_srste_adam(None, b1, b2, eps), *_decay_and_lr(learning_rate, weight_decay, decay_filter)
    )


def sparse_adamw(
    learning_rate: ScalarOrSchedule,
    *,
    max_decay: float = 1e-4,
    ramp_steps: int = 10_000,
    mask_every: int = 10,
    n: int = 2,
    m: int = 4,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    variant: str = "annealing",
    sparse_filter: SparseFilter | None = None,
    initial_masks: Any = None,
    decay_filter: SparseFilter | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with N:M masks and (Annealing) SR-STE decay: the chain of the module docstring in one call.

    Args:
      learning_rate: a float (finite, >= 0) or an optax schedule ``count -> lr``.
      max_decay, ramp_steps: λ_max and T0 of :func:`annealing_decay`; for ``"gmp"``, ``ramp_steps`` is the
        number of updates over which the keep count falls from ``m`` to ``n`` (:func:`gmp_keep`).
      mask_every: refresh the masks after every ``mask_every``-th update (ignored by ``"fixed"``).
      n, m: keep ``n`` of every ``m`` consecutive input rows of each sparse ``(in, out)`` kernel.
      weight_decay: decoupled weight decay, applied to leaves selected by :func:`decay_mask` of
        ``decay_filter`` (default: ndim >= 2).
      variant: one of :data:`VARIANTS` (module docstring).
      sparse_filter, initial_masks: see :func:`with_nm_masks` (``initial_masks`` not with ``"gmp"``).

    Returns a transformation whose state is an :class:`NMMaskState`; call :func:`refresh_masks` after
    ``optax.apply_updates`` (:func:`ast_jax.step.make_train_step` does). Invalid settings raise
    ``ValueError`` here: a negative, NaN or infinite learning rate, decay, weight decay or ``eps``;
    ``b1``/``b2`` outside ``[0, 1)``; ``initial_masks`` that are not N:M. (Values only known inside ``jit``,
    such as those of ``optax.inject_hyperparams``, are checked where they are concrete.)

    With ``optax.inject_hyperparams`` pass ``static_args=("n", "m", "mask_every", "variant")``; ``n`` and
    ``m`` fix array shapes and must stay Python ints.
    """
    validate_nm(n, m)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(mask_every, int) or mask_every < 1:
        raise ValueError(f"mask_every must be a positive int, got {mask_every!r}")
    check_number("learning_rate", learning_rate)
    check_betas(b1, b2)
    check_number("eps", eps)
    check_number("weight_decay", weight_decay)
    annealing_decay(0, max_decay, ramp_steps)  # validates both

    plain = scale_by_srste_adam(None, b1, b2, eps)
    if variant == "annealing":
        core = [scale_by_srste_adam(annealing_schedule(max_decay, ramp_steps), b1, b2, eps)]
    elif variant == "static":
        core = [scale_by_srste_adam(max_decay, b1, b2, eps)]
    elif variant == "coupled":
        core = [add_srste_decay(annealing_schedule(max_decay, ramp_steps)), plain]
    elif variant == "ste":
        core = [plain]
    else:  # "fixed", "gmp": masked-out entries get neither gradient nor update
        core = [mask_updates(), plain]
    inner = optax.chain(
        *core,
        *_decay_and_lr(learning_rate, weight_decay, decay_filter),
        *([mask_updates()] if variant in ("fixed", "gmp") else []),
    )
    keep = None
    if variant == "gmp":
        keep = lambda count: gmp_keep(count, n, m, ramp_steps)
    return with_nm_masks(
        inner,
        n=n,
        m=m,
        refresh_every=None if variant == "fixed" else mask_every,
        keep_schedule=keep,
        sparse_filter=sparse_filter,
        initial_masks=initial_masks,
    )


def gpt2_recipe_schedule(
    peak_lr: float = 2e-4,
    final_lr: float = 2e-5,
    warmup_steps: int = 2000,
    cosine_end_step: int = 38000,
    total_steps: int = 40000,
) -> optax.Schedule:
    """The public AST GPT-2 recipe: linear warm-up 0 → ``peak_lr`` over ``warmup_steps``, cosine decay to
    ``final_lr`` at ``cosine_end_step``, then linear to 0 at ``total_steps`` (and 0 after)."""
    if not 0 <= warmup_steps < cosine_end_step <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps < cosine_end_step <= total_steps, got "
            f"{warmup_steps}, {cosine_end_step}, {total_steps}"
        )
    if peak_lr <= 0 or final_lr < 0:
        raise ValueError(f"need peak_lr > 0 and final_lr >= 0, got {peak_lr}, {final_lr}")
    warm = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    cos = optax.cosine_decay_schedule(peak_lr, cosine_end_step - warmup_steps, alpha=final_lr / peak_lr)
    tail = optax.linear_schedule(final_lr, 0.0, max(total_steps - cosine_end_step, 1))
    return optax.join_schedules([warm, cos, tail], [warmup_steps, cosine_end_step])
