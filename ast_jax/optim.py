"""Annealing SR-STE AdamW (AST's optimizer) and its ablation variants, as one optax transformation.

``sparse_adamw`` keeps the N:M masks in its state (jaxpruner-style), so masks shard, jit and checkpoint with
the rest of the optimizer state. The forward pass reads them with :func:`get_masks` and
:func:`ast_jax.sparsify.masked_params`.

For a sparse kernel ``W`` with mask ``M`` (1 = kept), gradient ``g`` (straight-through, dense), step
``t = count + 1`` and ``λ(t) = λ_max · min(t / T0, 1)``, the ``"annealing"`` variant does

    m ← β1·m + (1 − β1)·g                     (first moment of the loss gradient only)
    u ← m + λ(t)·(1 − M)·W                     (decay of the masked-out weights, decoupled from m)
    v ← β2·v + (1 − β2)·u²                     (second moment tracks u, not g)
    W ← W − lr·[ (u / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + ε) + wd·W ]

and every other parameter gets plain AdamW (``m`` on ``g``, ``v`` on ``g²``). After the update, if ``t`` is a
multiple of ``mask_every``, the masks are recomputed from the updated dense weights (inside the jitted update
via ``lax.cond``) and the flips against the previous and the initial masks are counted.

Variants (``variant=``):

- ``"annealing"`` — the above (AST).
- ``"static"`` — the above with a constant ``λ = λ_max`` (static SR-STE, decoupled).
- ``"coupled"`` — classic SR-STE: ``g ← g + λ(t)·(1 − M)·W`` before a plain AdamW step (use ``ramp_steps=0``
  for the constant-λ original).
- ``"ste"`` — adaptive masks, no decay: plain AdamW on the straight-through gradient.
- ``"fixed"`` — the initial mask is never refreshed and masked-out weights never move (gradient and update
  zeroed there): fixed-mask retraining.

Note on the authors' PyTorch code: it computes the decay factor as ``~mask`` on an integer mask, which is a
bitwise NOT (−1/−2), not ``1 − mask``. We implement the intended ``1 − mask``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ast_jax.masks import nm_mask, tree_flip_count, tree_size, validate_nm
from ast_jax.sparsify import SparseFilter, compute_masks, key_path, path_str

__all__ = [
    "VARIANTS",
    "SparseAdamWState",
    "annealing_decay",
    "get_masks",
    "get_sparse_state",
    "gpt2_recipe_schedule",
    "mask_stats",
    "sparse_adamw",
]

VARIANTS = ("annealing", "static", "coupled", "ste", "fixed")
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class SparseAdamWState(NamedTuple):
    """State of :func:`sparse_adamw`. ``masks``/``init_masks`` have the params' structure with ``None`` at
    dense leaves; ``decay`` is the λ used by the last update; flip counts are totals over sparse kernels."""

    count: jax.Array  # int32 (), updates done so far
    mu: Any  # first moments, params-shaped
    nu: Any  # second moments, params-shaped
    masks: Any  # current bool masks (None at dense leaves)
    init_masks: Any  # masks at initialisation (flips are also counted against these)
    decay: jax.Array  # float32 (), λ(t) of the last update
    flips_prev: jax.Array  # int32 (), flips at the latest refresh against the mask before it
    flips_init: jax.Array  # int32 (), entries where the current mask differs from the initial mask
    refreshes: jax.Array  # int32 (), mask refreshes done so far


def _concrete_scalar(x: Any) -> float | None:
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


def _check_number(name: str, value: Any, *, low: float = 0.0, low_ok: bool = True) -> None:
    """``ValueError`` unless a concrete ``value`` is finite and ``>= low`` (``> low`` without ``low_ok``);
    traced values and schedules are not checked (they are only known inside ``jit``)."""
    x = _concrete_scalar(value)
    if x is None:
        return
    if not math.isfinite(x) or x < low or (x == low and not low_ok):
        need = f"{'>=' if low_ok else '>'} {low:g}"
        raise ValueError(f"{name} must be a finite number {need}, got {value!r}")


def annealing_decay(step: jax.Array | int, max_decay: float, ramp_steps: int) -> jax.Array:
    """λ(t) = λ_max · min(t / T0, 1): linear ramp over ``ramp_steps`` = T0 steps, then constant.

    ``ramp_steps = 0`` gives the constant ``max_decay``. Returns a float32 scalar (jittable in ``step``).
    ``ValueError`` for a NaN, infinite or negative ``max_decay`` or ``ramp_steps`` (when they are concrete).
    """
    _check_number("max_decay", max_decay)
    _check_number("ramp_steps", ramp_steps)
    t = jnp.asarray(step, jnp.float32)
    ramp = jnp.asarray(ramp_steps, jnp.float32)
    frac = jnp.where(ramp > 0, jnp.clip(t / jnp.maximum(ramp, 1.0), 0.0, 1.0), 1.0)
    return jnp.asarray(max_decay, jnp.float32) * frac


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


def _default_decay_filter(path: tuple[str, ...], leaf: Any) -> bool:
    # nanoGPT (the base of the public AST code) decays matrices only, never biases or norm scales.
    return getattr(leaf, "ndim", 0) >= 2


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
) -> optax.GradientTransformation:
    """AdamW with N:M masks and (Annealing) SR-STE decay on the masked-out weights; see the module docstring.

    Args:
      learning_rate: a float (finite, >= 0) or an optax schedule ``count -> lr``.
      max_decay, ramp_steps: λ_max and T0 of :func:`annealing_decay`.
      mask_every: refresh the masks after every ``mask_every``-th update (ignored by ``"fixed"``).
      n, m: keep ``n`` of every ``m`` consecutive input rows of each sparse ``(in, out)`` kernel.
      weight_decay: decoupled weight decay, applied to leaves selected by ``decay_filter`` (default: ndim>=2).
      variant: one of ``"annealing" | "static" | "coupled" | "ste" | "fixed"``.
      sparse_filter: ``(path, leaf) -> bool`` choosing the sparse kernels (default
        :func:`ast_jax.sparsify.default_sparse_filter`).
      initial_masks: optional mask pytree (params structure, ``None`` at dense leaves), e.g. from one-shot
        Wanda/SparseGPT; it then also decides which leaves are sparse. Each mask must be N:M: exactly ``n``
        kept entries in every group of ``m`` consecutive input rows. Default: magnitude masks of the params
        given to ``init``.

    Invalid settings raise ``ValueError`` here, when the transformation is built: a negative, NaN or
    infinite learning rate, decay, weight decay or ``eps``; ``b1``/``b2`` outside ``[0, 1)``;
    ``initial_masks`` that are not N:M. (Values only known inside ``jit``, such as those of
    ``optax.inject_hyperparams``, are checked where they are concrete.)

    With ``optax.inject_hyperparams`` pass ``static_args=("n", "m", "mask_every", "variant")``; ``n`` and
    ``m`` fix array shapes and must stay Python ints.
    """
    validate_nm(n, m)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(mask_every, int) or mask_every < 1:
        raise ValueError(f"mask_every must be a positive int, got {mask_every!r}")
    _check_number("learning_rate", learning_rate)
    for name, val in (("b1", b1), ("b2", b2)):
        x = _concrete_scalar(val)
        if x is not None and not 0 <= x < 1:  # also false for NaN
            raise ValueError(f"{name} must be in [0, 1), got {val!r}")
    _check_number("eps", eps)
    _check_number("weight_decay", weight_decay)
    annealing_decay(0, max_decay, ramp_steps)  # validates both
    if initial_masks is not None:
        _check_nm_masks(initial_masks, n, m)
    decay_filter = _default_decay_filter if decay_filter is None else decay_filter

    def init_fn(params: Any) -> SparseAdamWState:
        if initial_masks is None:
            masks = compute_masks(params, n, m, sparse_filter=sparse_filter)
        else:
            masks = _check_initial_masks(params, initial_masks, n, m)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        z = jnp.zeros((), jnp.int32)
        return SparseAdamWState(
            count=z,
            mu=zeros,
            nu=jax.tree_util.tree_map(jnp.zeros_like, params),
            masks=masks,
            init_masks=masks,
            decay=jnp.zeros((), jnp.float32),
            flips_prev=z,
            flips_init=z,
            refreshes=z,
        )

    def update_fn(updates: Any, state: SparseAdamWState, params: Any = None) -> tuple[Any, SparseAdamWState]:
        if params is None:
            raise ValueError("sparse_adamw needs params in update(grads, state, params)")
        count = state.count
        t = count + 1
        tf = t.astype(jnp.float32)
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        if variant in ("annealing", "coupled"):
            lam = annealing_decay(t, max_decay, ramp_steps)
        elif variant == "static":
            lam = jnp.asarray(max_decay, jnp.float32)
        else:
            lam = jnp.zeros((), jnp.float32)
        bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** tf
        bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** tf

        flat_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        paths = [key_path(p) for p, _ in flat_with_path]
        p_leaves = [x for _, x in flat_with_path]
        g_leaves = treedef.flatten_up_to(updates)
        mu_leaves = treedef.flatten_up_to(state.mu)
        nu_leaves = treedef.flatten_up_to(state.nu)
        mk_leaves = treedef.flatten_up_to(state.masks)

        new_u, new_mu, new_nu = [], [], []
        for path, w, g, mu, nu, mk in zip(
            paths, p_leaves, g_leaves, mu_leaves, nu_leaves, mk_leaves, strict=True
        ):
            wd = weight_decay if decay_filter(path, w) else 0.0
            lam_w = lam.astype(w.dtype)
            if mk is not None:
                off = 1.0 - mk.astype(w.dtype)  # 1 - mask, not the bitwise ~mask of the public code
                if variant == "coupled":
                    g = g + lam_w * off * w
                elif variant == "fixed":
                    g = g * mk.astype(g.dtype)
            mu = b1 * mu + (1.0 - b1) * g
            if mk is not None and variant in ("annealing", "static"):
                # AST.md: the decay joins the first moment after it is updated, and v tracks u² (not g²).
                u = mu + lam_w * off * w
                nu = b2 * nu + (1.0 - b2) * u * u
            else:
                u = mu
                nu = b2 * nu + (1.0 - b2) * g * g
            step = (u / bc1) / (jnp.sqrt(nu / bc2) + eps) + wd * w
            upd = -lr * step
            if mk is not None and variant == "fixed":
                upd = upd * mk.astype(upd.dtype)
            new_u.append(upd.astype(w.dtype))
            new_mu.append(mu)
            new_nu.append(nu)

        updates_out = treedef.unflatten(new_u)
        masks = state.masks
        flips_prev, flips_init, refreshes = state.flips_prev, state.flips_init, state.refreshes
        if variant != "fixed":

            def refresh(_):
                new_masks = []
                for w, upd, mk in zip(p_leaves, new_u, mk_leaves, strict=True):
                    new_masks.append(None if mk is None else nm_mask(w + upd, n, m, axis=0))
                new = treedef.unflatten(new_masks)
                return (
                    new,
                    tree_flip_count(state.masks, new),
                    tree_flip_count(state.init_masks, new),
                    refreshes + 1,
                )

            def keep(_):
                return masks, flips_prev, flips_init, refreshes

            masks, flips_prev, flips_init, refreshes = jax.lax.cond(t % mask_every == 0, refresh, keep, None)

        new_state = SparseAdamWState(
            count=t,
            mu=treedef.unflatten(new_mu),
            nu=treedef.unflatten(new_nu),
            masks=masks,
            init_masks=state.init_masks,
            decay=lam,
            flips_prev=flips_prev,
            flips_init=flips_init,
            refreshes=refreshes,
        )
        return updates_out, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _check_nm_masks(masks: Any, n: int, m: int) -> None:
    """``ValueError`` unless every mask leaf is a 2-D ``(in, out)`` array with exactly ``n`` kept entries in
    each group of ``m`` consecutive input rows (a mask that keeps more would leave the layer denser than N:M
    for the first ``mask_every`` steps, and for good with the ``"fixed"`` variant)."""
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
    for path, mk in flat:
        if mk is None or isinstance(mk, jax.core.Tracer):
            continue
        name = path_str(key_path(path))
        arr = np.asarray(mk)
        if arr.ndim != 2 or arr.shape[0] % m:
            raise ValueError(
                f"initial_masks[{name}] has shape {arr.shape}: need a 2-D (in, out) mask with in a multiple "
                f"of m={m}"
            )
        kept = (arr != 0).reshape(arr.shape[0] // m, m, arr.shape[1]).sum(axis=1)
        wrong = kept != n
        if wrong.any():
            g, c = (int(i[0]) for i in np.nonzero(wrong))
            raise ValueError(
                f"initial_masks[{name}] is not {n}:{m}: {int(wrong.sum())} group(s) of {m} input rows keep "
                f"other than {n} entries (e.g. rows {g * m}..{g * m + m - 1} of column {c} keep {kept[g, c]})"
            )


def _check_initial_masks(params: Any, masks: Any, n: int, m: int) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        mk_leaves = treedef.flatten_up_to(masks)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"initial_masks must have the structure of params (None at dense leaves): {e}"
        ) from e
    out = []
    for (p, w), mk in zip(flat, mk_leaves, strict=True):
        if mk is None:
            out.append(None)
            continue
        name = path_str(key_path(p))
        mk = jnp.asarray(mk)
        if mk.shape != w.shape:
            raise ValueError(f"initial_masks[{name}] has shape {mk.shape}, kernel has {w.shape}")
        if w.ndim != 2 or w.shape[0] % m:
            raise ValueError(
                f"sparse layer {name}: input dimension of kernel {w.shape} is not a multiple of m={m}"
            )
        out.append(mk.astype(bool))
    if all(x is None for x in out):
        raise ValueError("initial_masks has no sparse kernel")
    return treedef.unflatten(out)


def get_sparse_state(opt_state: Any) -> SparseAdamWState | None:
    """The :class:`SparseAdamWState` inside any optax state (chains, ``inject_hyperparams``), or ``None``."""
    found = [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseAdamWState))
        if isinstance(s, SparseAdamWState)
    ]
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} sparse_adamw states; expected at most one")
    return found[0] if found else None


def get_masks(opt_state: Any) -> Any:
    """Current masks (params structure, ``None`` at dense leaves) of an optax state; ``None`` if dense."""
    s = get_sparse_state(opt_state)
    return None if s is None else s.masks


def mask_stats(opt_state: Any) -> dict[str, jax.Array]:
    """Scalars to log: ``decay`` (λ), ``flips_prev``/``flips_init`` (counts), ``flip_rate_prev``/
    ``flip_rate_init`` (counts / number of sparse weights), ``refreshes``. Empty dict if dense."""
    s = get_sparse_state(opt_state)
    if s is None:
        return {}
    size = max(tree_size(s.masks), 1)
    return {
        "decay": s.decay,
        "flips_prev": s.flips_prev,
        "flips_init": s.flips_init,
        "flip_rate_prev": s.flips_prev.astype(jnp.float32) / size,
        "flip_rate_init": s.flips_init.astype(jnp.float32) / size,
        "refreshes": s.refreshes,
    }
