"""The optimizer state that owns the N:M masks: :func:`with_nm_masks` wraps any optax transformation.

Following jaxpruner, the wrapper's state (:class:`NMMaskState`) holds the masks, the masks at initialisation,
flip counts, the refresh schedule and the inner transformation's state, so masks jit, shard and checkpoint
with the rest of the optimizer state. The inner chain receives the current masks as the extra argument
``masks=`` (the pieces of :mod:`ast_jax.srste`); the forward pass reads them with :func:`get_masks` and
:func:`ast_jax.sparsify.masked_params`.

Masks are refreshed from the weights actually in use. ``update`` only counts and marks a refresh as due; the
training step calls :func:`refresh_masks` with the params ``optax.apply_updates`` wrote
(:func:`ast_jax.step.make_train_step` does)::

    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    opt_state = refresh_masks(opt_state, params)   # M = m(W) when due (every refresh_every updates)

so whatever a transform chained after the sparse pieces does to the update, the masks agree with the weights
written. A refresh keeps the ``n`` largest ``|W|`` of every group of ``m`` input rows; with a
``keep_schedule`` (gradual pruning) it keeps the scheduled count among the entries still kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ast_jax.masks import nm_mask, tree_flip_count, tree_size, validate_nm
from ast_jax.sparsify import (
    SparseFilter,
    compute_masks,
    default_sparse_filter,
    key_path,
    path_str,
    validate_sparse_params,
)
from ast_jax.srste import AddSrsteDecayState, ScaleBySrsteAdamState

__all__ = [
    "MaskConfig",
    "NMMaskState",
    "get_masks",
    "get_sparse_state",
    "mask_stats",
    "refresh_masks",
    "with_nm_masks",
]

KeepSchedule = Callable[[jax.Array], jax.Array]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """What :func:`refresh_masks` needs besides the state's arrays: a static pytree node (no leaves, compared
    by value), so it is neither traced nor checkpointed and two wrappers built alike give equal trees."""

    n: int  # kept entries per group once fully sparse
    m: int  # group size along the input axis
    gradual: bool  # keep count from the state's ``keep``, choosing only among entries still kept


class NMMaskState(NamedTuple):
    """State of :func:`with_nm_masks`. ``masks``/``init_masks`` have the params' structure with ``None`` at
    dense leaves; flip counts are totals over the sparse kernels."""

    count: jax.Array  # int32 (), updates done so far
    masks: Any  # current bool masks (None at dense leaves)
    init_masks: Any  # masks at initialisation (flips are also counted against these)
    refresh_due: jax.Array  # bool (), set by update when the schedule asks for a refresh, cleared by refresh
    keep: jax.Array  # int32 (), entries per group of m the next refresh keeps
    flips_prev: jax.Array  # int32 (), flips at the latest refresh against the mask before it
    flips_init: jax.Array  # int32 (), entries where the current mask differs from the initial mask
    refreshes: jax.Array  # int32 (), mask refreshes done so far
    inner_state: Any  # state of the wrapped transformation
    config: MaskConfig  # static


def _keep_masks(w: jax.Array, prev: jax.Array, keep: jax.Array, cfg: MaskConfig) -> jax.Array:
    """Masks of a refresh for a kernel ``w (in, out)``: ``nm_mask(|w|)`` (the ``n`` largest per group), or
    (gradual) the ``keep`` largest among the entries the bool ``prev (in, out)`` still keeps. ``keep`` is
    traced, so the ``m − n`` candidate masks are all computed and one is selected with ``where``."""
    if not cfg.gradual:
        return nm_mask(w, cfg.n, cfg.m, axis=0)
    scores = jnp.where(prev, jnp.abs(w), -jnp.inf)
    out = prev  # keep >= what prev keeps: nothing more to prune
    for k in range(cfg.n, cfg.m):
        out = jnp.where(keep == k, nm_mask(w, k, cfg.m, axis=0, scores=scores), out)
    return out


def with_nm_masks(
    inner: optax.GradientTransformation,
    *,
    n: int = 2,
    m: int = 4,
    refresh_every: int | None = 10,
    keep_schedule: KeepSchedule | None = None,
    sparse_filter: SparseFilter | None = None,
    initial_masks: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so it runs with N:M masks kept in the optimizer state (jaxpruner's shape).

    ``update(g, state, params)`` returns ``inner.update(g, state.inner_state, params, masks=state.masks)``'s
    updates unchanged; it counts the update and marks a refresh as due every ``refresh_every`` updates.
    :func:`refresh_masks` (after ``optax.apply_updates``) does the refresh from the params in use.

    Args:
      inner: any optax transformation; pieces that take ``masks=`` (:mod:`ast_jax.srste`) get them.
      n, m: keep ``n`` of every ``m`` consecutive input rows of each sparse ``(in, out)`` kernel.
      refresh_every: refresh after every ``refresh_every``-th update; ``None``: never (fixed masks).
      keep_schedule: optional ``count -> int`` entries kept per group after ``count`` updates (e.g.
        :func:`ast_jax.optim.gmp_keep`), between ``n`` and ``m``: gradual pruning. Masks start with
        ``keep_schedule(0)`` kept by magnitude; a refresh keeps ``keep_schedule(count)`` chosen among the
        entries still kept, so pruned weights never come back.
      sparse_filter: ``(path, leaf) -> bool`` choosing the sparse kernels (default
        :func:`ast_jax.sparsify.default_sparse_filter`).
      initial_masks: optional mask pytree (params structure, ``None`` at dense leaves), e.g. from one-shot
        Wanda/SparseGPT; it then also decides which leaves are sparse. Each mask must be N:M: exactly ``n``
        kept entries in every group of ``m`` consecutive input rows. Default: magnitude masks of the params
        given to ``init``. ``init`` copies them (the state owns its buffers, so a step can donate it).
    """
    validate_nm(n, m)
    if refresh_every is not None and (not isinstance(refresh_every, int) or refresh_every < 1):
        raise ValueError(f"refresh_every must be a positive int or None, got {refresh_every!r}")
    if keep_schedule is not None and initial_masks is not None:
        raise ValueError("keep_schedule (gradual pruning) starts from magnitude masks; drop initial_masks")
    if initial_masks is not None:
        _check_nm_masks(initial_masks, n, m)
    cfg = MaskConfig(n=n, m=m, gradual=keep_schedule is not None)
    inner = optax.with_extra_args_support(inner)

    def keep_at(count: jax.Array) -> jax.Array:
        if keep_schedule is None:
            return jnp.asarray(n, jnp.int32)
        return jnp.clip(jnp.asarray(keep_schedule(count), jnp.int32), n, m)

    def init_fn(params: Any) -> NMMaskState:
        if initial_masks is not None:
            masks = _check_initial_masks(params, initial_masks, n, m)
        elif not cfg.gradual:
            masks = compute_masks(params, n, m, sparse_filter=sparse_filter)
        else:  # keep_schedule(0) of m by magnitude (m: all)
            validate_sparse_params(params, n, m, sparse_filter)
            keep0 = keep_at(jnp.zeros((), jnp.int32))
            is_sparse = default_sparse_filter if sparse_filter is None else sparse_filter
            masks = jax.tree_util.tree_map_with_path(
                lambda p, w: (
                    _keep_masks(w, jnp.ones(w.shape, bool), keep0, cfg) if is_sparse(key_path(p), w) else None
                ),
                params,
            )
        # Separate buffers: the same array in two leaves cannot be donated to a jitted step.
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
        zero = lambda: jnp.zeros((), jnp.int32)
        return NMMaskState(
            count=zero(),
            masks=copy(masks),
            init_masks=copy(masks),
            refresh_due=jnp.zeros((), bool),
            keep=keep_at(jnp.zeros((), jnp.int32)),
            flips_prev=zero(),
            flips_init=zero(),
            refreshes=zero(),
            inner_state=inner.init(params),
            config=cfg,
        )

    def update_fn(
        updates: Any, state: NMMaskState, params: Any = None, **extra: Any
    ) -> tuple[Any, NMMaskState]:
        if params is None:
            raise ValueError("with_nm_masks needs params in update(grads, state, params)")
        updates, inner_state = inner.update(updates, state.inner_state, params, masks=state.masks, **extra)
        count = state.count + 1
        due = jnp.zeros((), bool) if refresh_every is None else count % refresh_every == 0
        new_state = state._replace(
            count=count, refresh_due=state.refresh_due | due, keep=keep_at(count), inner_state=inner_state
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _refresh_one(state: NMMaskState, params: Any) -> NMMaskState:
    treedef = jax.tree_util.tree_structure(params)
    w_leaves = treedef.flatten_up_to(params)
    mk_leaves = treedef.flatten_up_to(state.masks)

    def refresh(_: Any) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
        new = treedef.unflatten(
            [
                None if mk is None else _keep_masks(w, mk, state.keep, state.config)
                for w, mk in zip(w_leaves, mk_leaves, strict=True)
            ]
        )
        return (
            new,
            tree_flip_count(state.masks, new),
            tree_flip_count(state.init_masks, new),
            state.refreshes + 1,
        )

    def keep(_: Any) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
        return state.masks, state.flips_prev, state.flips_init, state.refreshes

    masks, flips_prev, flips_init, refreshes = jax.lax.cond(state.refresh_due, refresh, keep, None)
    return state._replace(
        masks=masks,
        refresh_due=jnp.zeros((), bool),
        flips_prev=flips_prev,
        flips_init=flips_init,
        refreshes=refreshes,
    )


def refresh_masks(opt_state: Any, params: Any) -> Any:
    """Refresh the masks of every :class:`NMMaskState` inside ``opt_state`` whose refresh is due.

    ``params`` are the weights now in use (after ``optax.apply_updates``), with the structure of the masks'
    params. A due refresh recomputes each sparse kernel's mask from ``|W|`` (keeping ``n`` per group, or the
    scheduled keep count among the entries still kept), counts flips against the previous and the initial
    masks, and clears ``refresh_due``; otherwise the state comes back unchanged, so a second call is a no-op.
    Pure and jittable (``lax.cond`` on the traced flag); states without masks pass through.
    """
    is_mask_state = lambda x: isinstance(x, NMMaskState)
    return jax.tree_util.tree_map(
        lambda s: _refresh_one(s, params) if is_mask_state(s) else s, opt_state, is_leaf=is_mask_state
    )


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


def get_sparse_state(opt_state: Any) -> NMMaskState | None:
    """The :class:`NMMaskState` inside any optax state (chains, ``inject_hyperparams``), or ``None``."""
    found = [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, NMMaskState))
        if isinstance(s, NMMaskState)
    ]
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} N:M mask states; expected at most one")
    return found[0] if found else None


def get_masks(opt_state: Any) -> Any:
    """Current masks (params structure, ``None`` at dense leaves) of an optax state; ``None`` if dense."""
    s = get_sparse_state(opt_state)
    return None if s is None else s.masks


def mask_stats(opt_state: Any) -> dict[str, jax.Array]:
    """Scalars to log: ``decay`` (λ of the last update, 0 without an SR-STE piece), ``flips_prev``/
    ``flips_init`` (counts), ``flip_rate_prev``/``flip_rate_init`` (counts / number of sparse weights),
    ``refreshes``, and ``keep`` (entries per group) under gradual pruning. Empty dict if dense."""
    s = get_sparse_state(opt_state)
    if s is None:
        return {}
    pieces = (ScaleBySrsteAdamState, AddSrsteDecayState)
    decays = [
        x.decay
        for x in jax.tree_util.tree_leaves(s.inner_state, is_leaf=lambda x: isinstance(x, pieces))
        if isinstance(x, pieces)
    ]
    # At most one piece decays (the plain Adam after add_srste_decay reports 0), so the sum is that λ.
    decay = sum(decays, jnp.zeros((), jnp.float32))
    size = max(tree_size(s.masks), 1)
    stats = {
        "decay": decay,
        "flips_prev": s.flips_prev,
        "flips_init": s.flips_init,
        "flip_rate_prev": s.flips_prev.astype(jnp.float32) / size,
        "flip_rate_init": s.flips_init.astype(jnp.float32) / size,
        "refreshes": s.refreshes,
    }
    if s.config.gradual:
        stats["keep"] = s.keep
    return stats
