"""SLoRB (Sparse Low-Rank Boosting): a few extra dense parameters that give back part of what pruning removed.

For a sparse kernel ``W`` of shape ``(d, out)`` (Flax layout ``(in, out)``), mask ``M`` and a divisor ``k`` of
``d``, the inputs are cut into ``d / k`` blocks of ``k`` consecutive features and the layer computes

    y = x · (M ⊙ W) + b + (x · Xᵀ) · S,        X[g, j] = 1 if j // k == g else 0      (X: (d/k, d))

``S`` is stored here in kernel layout ``(d/k, out)`` (the paper's ``Sᵀ``), initialised from pruned weights:

    "mean":   S[g, o] = (1/k) · Σ_{j in block g} W[j, o] · (1 − M[j, o])
    "sum":    the same without the 1/k
    "xavier": Glorot-uniform with fan-in d/k and fan-out out (needs a PRNG key)

With the fixed block indicator, ``x · Xᵀ`` is a reshape-and-sum over blocks (:func:`block_project`), never a
``(d/k) × d`` matmul. ``X`` may be made trainable (then it is a real ``(d/k, d)`` parameter initialised to the
indicator). With ``k = 16`` SLoRB adds ``1/16`` of the layer's weights (12.5% of the 2:4 non-zeros).

SLoRB parameters live in their own pytree, nested like the model's params but keyed by module path:
``{"block_0": {"attn": {"q": {"S": (d/k, out)[, "X": (d/k, d)]}}}}``. :func:`apply_with_slorb` runs any Flax
model with the SLoRB term added to the output of every ``nn.Dense`` that has an entry, through
``flax.linen.intercept_methods``, so it works for GPT-2, LLaMA and user models alike.

A training run's trainable pytree is ``{"model": model_params}`` plus ``"slorb": slorb_params`` when SLoRB is
on; :func:`trainable_params`, :func:`trainable_masks` and :func:`split_trainable` own that layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.sparsify import get_path, key_path, path_str, set_path

__all__ = [
    "SLORB_INITS",
    "apply_with_slorb",
    "block_project",
    "block_projection_matrix",
    "fold_slorb",
    "slorb_delta",
    "slorb_init",
    "slorb_init_tree",
    "slorb_intercept",
    "slorb_layer",
    "split_trainable",
    "trainable_masks",
    "trainable_params",
]

SLORB_INITS = ("mean", "sum", "xavier")


def _check_k(d: int, k: int, name: str = "layer") -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"SLoRB block size k must be a positive int, got {k!r}")
    if d % k:
        raise ValueError(f"SLoRB: k={k} does not divide the input dimension {d} of {name}")


def block_project(x: jax.Array, k: int) -> jax.Array:
    """``x · Xᵀ`` for the block indicator ``X``: sums of ``k`` consecutive features.

    ``x (..., d) -> (..., d/k)``.
    """
    _check_k(x.shape[-1], k, "x")
    return x.reshape(*x.shape[:-1], x.shape[-1] // k, k).sum(axis=-1)


def block_projection_matrix(d: int, k: int, dtype: Any = jnp.float32) -> jax.Array:
    """The explicit ``(d/k, d)`` indicator ``X[g, j] = 1 iff j // k == g`` (for tests and trainable ``X``)."""
    _check_k(d, k, "X")
    return (jnp.arange(d)[None, :] // k == jnp.arange(d // k)[:, None]).astype(dtype)


def slorb_init(
    w: jax.Array,
    mask: jax.Array,
    k: int,
    init: str = "mean",
    key: jax.Array | None = None,
) -> jax.Array:
    """Initial ``S`` of shape ``(d/k, out)`` for a kernel ``w (d, out)`` with bool ``mask (d, out)``.

    ``"mean"``/``"sum"``: ``S[g, o] = c · Σ_{j in block g} w[j, o] · (1 − mask[j, o])`` with ``c = 1/k`` or 1;
    ``"xavier"``: Glorot-uniform (``key`` required).
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D (in, out) kernel, got shape {w.shape}")
    if jnp.shape(mask) != w.shape:
        raise ValueError(f"mask shape {jnp.shape(mask)} must equal w shape {w.shape}")
    if init not in SLORB_INITS:
        raise ValueError(f"init must be one of {SLORB_INITS}, got {init!r}")
    d, out = w.shape
    _check_k(d, k, "w")
    if init == "xavier":
        if key is None:
            raise ValueError("slorb_init(init='xavier') needs a PRNG key")
        return nn.initializers.glorot_uniform()(key, (d // k, out), w.dtype)
    pruned = jnp.where(mask, jnp.zeros_like(w), w)
    s = pruned.reshape(d // k, k, out).sum(axis=1)
    return s / k if init == "mean" else s


def slorb_delta(x: jax.Array, s: jax.Array, proj: jax.Array | None = None) -> jax.Array:
    """The SLoRB term ``(x · Xᵀ) · S``. ``x (..., d)``, ``S (d/k, out)``, optional trainable ``X (d/k, d)``.

    Without ``proj`` the block indicator is used via :func:`block_project` (``k = d / S.shape[0]``).
    """
    d, g = x.shape[-1], s.shape[0]
    if proj is not None:
        if proj.shape != (g, d):
            raise ValueError(f"SLoRB projection X must have shape ({g}, {d}), got {proj.shape}")
        z = x @ proj.T.astype(x.dtype)
    else:
        if g < 1 or d % g:
            raise ValueError(f"SLoRB: S has {g} rows, which does not divide the input dimension {d}")
        z = block_project(x, d // g)
    return z @ s.astype(x.dtype)


def slorb_layer(
    x: jax.Array,
    w: jax.Array,
    mask: jax.Array,
    s: jax.Array,
    bias: jax.Array | None = None,
    proj: jax.Array | None = None,
) -> jax.Array:
    """A SLoRB-augmented linear layer ``y = x·(M ⊙ W) + b + (x·Xᵀ)·S``. ``x (..., d) -> (..., out)``."""
    y = x @ jnp.where(mask, w, jnp.zeros_like(w))
    if bias is not None:
        y = y + bias
    return y + slorb_delta(x, s, proj)


def slorb_init_tree(
    params: Any,
    masks: Any,
    k: int = 16,
    init: str = "mean",
    key: jax.Array | None = None,
    trainable_projection: bool = False,
) -> dict[str, Any]:
    """SLoRB parameters for every sparse kernel (non-``None`` mask) of ``params``.

    Returns a nested dict keyed by module path (the kernel's path without its final ``kernel``) with ``"S"``
    and, if ``trainable_projection``, ``"X"`` initialised to the block indicator. Raises ``ValueError`` naming
    the layer when ``k`` does not divide its input dimension.
    """
    if init == "xavier" and key is None:
        raise ValueError("slorb_init_tree(init='xavier') needs a PRNG key")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    mk_leaves = treedef.flatten_up_to(masks)
    out: dict[str, Any] = {}
    i = 0
    for (p, w), mk in zip(flat, mk_leaves, strict=True):
        if mk is None:
            continue
        path = key_path(p)
        if path[-1] != "kernel":
            raise ValueError(f"SLoRB expects masked leaves named 'kernel', got {path_str(path)}")
        _check_k(w.shape[0], k, path_str(path))
        sub = None if key is None else jax.random.fold_in(key, i)
        i += 1
        entry = {"S": slorb_init(w, mk, k, init, sub)}
        if trainable_projection:
            entry["X"] = block_projection_matrix(w.shape[0], k, w.dtype)
        node = out
        for c in path[:-2]:
            node = node.setdefault(c, {})
        node[path[-2]] = entry
    if not out:
        raise ValueError("slorb_init_tree: masks has no sparse kernel")
    return out


def _lookup(tree: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    try:  # most modules have no SLoRB entry: a missing path is the common case, not an error
        node = get_path(tree, path)
    except (KeyError, TypeError):
        return None
    return node if isinstance(node, dict) and "S" in node else None


@contextlib.contextmanager
def slorb_intercept(slorb_params: dict[str, Any]) -> Iterator[None]:
    """Context manager: inside it, every ``nn.Dense`` whose module path has an entry in ``slorb_params``
    returns ``dense(x) + (x·Xᵀ)·S``. Use around ``model.apply`` (inside the traced function, so gradients flow
    to ``S`` and ``X``)."""

    def hook(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        mod = context.module
        if isinstance(mod, nn.Dense) and context.method_name == "__call__":
            entry = _lookup(slorb_params, tuple(mod.path))
            if entry is not None:
                y = y + slorb_delta(args[0], entry["S"], entry.get("X")).astype(y.dtype)
        return y

    with nn.intercept_methods(hook):
        yield


def apply_with_slorb(
    model: nn.Module, params: Any, slorb_params: dict[str, Any] | None, *args: Any, **kwargs: Any
) -> Any:
    """``model.apply({"params": params}, *args, **kwargs)`` with SLoRB terms on the sparse Dense layers.

    ``params`` should already be masked (:func:`ast_jax.sparsify.masked_params`). With ``slorb_params`` empty
    or ``None`` this is a plain apply.
    """
    if not slorb_params:
        return model.apply({"params": params}, *args, **kwargs)
    with slorb_intercept(slorb_params):
        return model.apply({"params": params}, *args, **kwargs)


def fold_slorb(params: Any, slorb_params: dict[str, Any] | None) -> Any:
    """Params of a plain model computing the same function: every kernel with a SLoRB entry becomes

        W' = M ⊙ W + Xᵀ · S        (d, out)

    (with ``X`` the block indicator unless the entry has a trainable ``"X"``), since
    ``x·(M ⊙ W) + (x·Xᵀ)·S = x·W'``. ``params`` must already be hard-masked. The folded kernels are dense:
    folding trades the N:M structure for a model that any program runs (``W'`` has no zero in a block
    where ``S`` is non-zero). Other leaves are returned unchanged.
    """
    if not slorb_params:
        return params
    out = params
    for path, leaf in jax.tree_util.tree_flatten_with_path(slorb_params)[0]:
        kp = key_path(path)
        if kp[-1] != "S":
            continue
        module = kp[:-1]
        entry = get_path(slorb_params, module)
        kernel = get_path(params, (*module, "kernel"))
        d = kernel.shape[0]
        proj = entry.get("X")
        if proj is None:
            proj = block_projection_matrix(d, d // leaf.shape[0], jnp.float32)
        delta = proj.T.astype(jnp.float32) @ jnp.asarray(leaf, jnp.float32)
        folded = jnp.asarray(kernel, jnp.float32) + delta
        out = set_path(out, (*module, "kernel"), folded.astype(kernel.dtype))
    return out


def trainable_params(model_params: Any, slorb_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trainable pytree of a run: ``{"model": model_params}``, plus ``"slorb": slorb_params`` when they
    are given and not empty. Optimizers, the training step and checkpoints see this layout."""
    out = {"model": model_params}
    if slorb_params:
        out["slorb"] = slorb_params
    return out


def trainable_masks(model_masks: Any, slorb_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Masks with the structure of :func:`trainable_params` (e.g. ``initial_masks`` of
    :func:`ast_jax.optim.sparse_adamw`): ``model_masks``, and ``None`` at every SLoRB leaf (``S`` and ``X``
    are dense)."""
    none = jax.tree_util.tree_map(lambda _: None, slorb_params) if slorb_params else None
    return trainable_params(model_masks, none)


def split_trainable(params: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """Inverse of :func:`trainable_params`: ``(model_params, slorb_params or None)``."""
    if not isinstance(params, dict) or "model" not in params or set(params) - {"model", "slorb"}:
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f'trainable params must be {{"model": ...[, "slorb": ...]}}, got {keys}')
    return params["model"], params.get("slorb")
