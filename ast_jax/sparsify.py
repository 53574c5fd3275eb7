"""Which kernels of a Flax params pytree are sparse, their masks, and the masked forward pass.

Masks are pytrees with the structure of the params: a ``bool`` array of the kernel's shape at every sparse
kernel and ``None`` everywhere else (embeddings, LM head, norms, biases). ``None`` is an empty pytree node in
JAX, so a mask tree shards, checkpoints and jits like any other pytree.

The default rule (:func:`default_sparse_filter`) makes every 2-D ``kernel`` under a module whose name starts
with ``block`` or ``layers`` sparse, which covers our GPT-2 (``block_3/attn/q/kernel``) and LLaMA
(``layers_3/mlp/up/kernel``) models and most user models with the same naming; pass any
``sparse_filter(path, leaf) -> bool`` to override it. This filter is the one rule: training
(:mod:`ast_jax.optim`), one-shot pruning (:mod:`ast_jax.oneshot`) and export select the same kernels.

Pytree paths are tuples of strings (:func:`key_path`, :func:`path_str`, :func:`get_path`,
:func:`set_path`), the one set of path helpers of ``ast_jax``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.masks import nm_mask, validate_nm, wanda_scores

__all__ = [
    "SparseFilter",
    "apply_masks",
    "collect_input_norms",
    "compute_masks",
    "count_params",
    "default_sparse_filter",
    "get_path",
    "is_strict_nm",
    "key_path",
    "masked_params",
    "path_str",
    "set_path",
    "sparse_paths",
    "straight_through",
    "strict_nm_report",
    "validate_sparse_params",
    "wanda_masks",
]

Path = tuple[str, ...]
SparseFilter = Callable[[Path, Any], bool]

_SPARSE_PREFIXES = ("block", "layers")
# Components that never hold a sparse kernel even when nested inside a block (safety net for user models).
_NEVER_SPARSE = ("embed", "wte", "wpe", "lm_head", "norm", "ln")


def key_path(jax_path: Iterable[Any]) -> Path:
    """A ``jax.tree_util`` key path as a tuple of strings, e.g. ``('block_0', 'attn', 'q', 'kernel')``."""
    out = []
    for k in jax_path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        else:  # FlattenedIndexKey and friends
            out.append(str(k))
    return tuple(out)


def path_str(path: Path) -> str:
    """``('block_0', 'attn', 'q', 'kernel') -> 'block_0/attn/q/kernel'`` (for messages and reports)."""
    return "/".join(path)


def default_sparse_filter(path: Path, leaf: Any) -> bool:
    """True for 2-D ``kernel`` leaves under a module path component starting with ``block`` or ``layers``.

    Never true for embeddings, the LM head, norms or biases (their names or their rank rule them out).
    """
    if not path or path[-1] != "kernel" or getattr(leaf, "ndim", 0) != 2:
        return False
    modules = path[:-1]
    if any(c.lower().startswith(_NEVER_SPARSE) for c in modules):
        return False
    return any(c.startswith(_SPARSE_PREFIXES) for c in modules)


def sparse_paths(params: Any, sparse_filter: SparseFilter | None = None) -> list[Path]:
    """Paths of the sparse leaves of ``params`` in pytree order."""
    f = default_sparse_filter if sparse_filter is None else sparse_filter
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [key_path(p) for p, x in leaves if f(key_path(p), x)]


def get_path(tree: Any, path: Path) -> Any:
    """The subtree of a nested-mapping pytree at ``path``."""
    for c in path:
        tree = tree[c]
    return tree


def set_path(tree: Any, path: Path, value: Any) -> Any:
    """``tree`` with ``value`` at ``path``, functionally: only the mappings along ``path`` are copied (as
    ``dict``), every other subtree is shared with ``tree``."""
    if not path:
        return value
    new = dict(tree)
    new[path[0]] = set_path(tree[path[0]], path[1:], value)
    return new


def validate_sparse_params(
    params: Any, n: int = 2, m: int = 4, sparse_filter: SparseFilter | None = None
) -> list[Path]:
    """Check that every sparse kernel can be split into n:m groups along its input axis; return their paths.

    Raises ``ValueError`` naming the first layer whose input dimension (axis 0 of a Flax ``(in, out)``
    kernel) is not a multiple of ``m``, and when no leaf is selected at all (almost always a filter mistake).
    """
    validate_nm(n, m)
    paths = sparse_paths(params, sparse_filter)
    if not paths:
        raise ValueError(
            "sparse_filter selected no kernel in params; the default looks for 2-D 'kernel' leaves under "
            "modules named 'block*' or 'layers*' — pass sparse_filter=... for other naming"
        )
    for p in paths:
        w = get_path(params, p)
        if w.ndim != 2:
            raise ValueError(
                f"sparse layer {path_str(p)} must be a 2-D (in, out) kernel, got shape {w.shape}"
            )
        if w.shape[0] % m:
            raise ValueError(
                f"sparse layer {path_str(p)}: input dimension {w.shape[0]} (kernel shape {w.shape}) is not a "
                f"multiple of m={m}"
            )
    return paths


def _map_sparse(fn: Callable[[Path, jax.Array], Any], params: Any, sparse_filter: SparseFilter | None) -> Any:
    f = default_sparse_filter if sparse_filter is None else sparse_filter

    def leaf(p, x):
        kp = key_path(p)
        return fn(kp, x) if f(kp, x) else None

    return jax.tree_util.tree_map_with_path(leaf, params)


def compute_masks(
    params: Any,
    n: int = 2,
    m: int = 4,
    *,
    sparse_filter: SparseFilter | None = None,
    scores: Any = None,
) -> Any:
    """N:M masks for every sparse kernel of ``params`` (``None`` elsewhere).

    ``scores`` (optional) is a pytree with the structure of ``params`` (or of the masks) holding the score of
    each sparse kernel (e.g. Wanda scores); by default the score is ``|W|``. Groups run along axis 0.
    """
    validate_sparse_params(params, n, m, sparse_filter)
    if scores is None:
        return _map_sparse(lambda p, w: nm_mask(w, n, m, axis=0), params, sparse_filter)
    return _map_sparse(
        lambda p, w: nm_mask(w, n, m, axis=0, scores=get_path(scores, p)), params, sparse_filter
    )


def wanda_masks(
    params: Any,
    input_norms: Any,
    n: int = 2,
    m: int = 4,
    *,
    sparse_filter: SparseFilter | None = None,
) -> Any:
    """Wanda N:M masks: keep the ``n`` largest ``|W_jo| * ||X_j||`` per group (``input_norms`` from
    :func:`collect_input_norms`, a pytree with the structure of the masks holding ``(in,)`` vectors)."""
    validate_sparse_params(params, n, m, sparse_filter)

    def one(p, w):
        norms = get_path(input_norms, p)
        if norms is None:
            raise ValueError(f"input_norms has no entry for sparse layer {path_str(p)}")
        return nm_mask(w, n, m, axis=0, scores=wanda_scores(w, norms))

    return _map_sparse(one, params, sparse_filter)


def _zip_masks(fn: Callable[[jax.Array, jax.Array], jax.Array], params: Any, masks: Any) -> Any:
    """Apply ``fn(w, mask)`` where the mask is not ``None``; other params pass through unchanged."""
    return jax.tree_util.tree_map(
        lambda mk, w: w if mk is None else fn(w, mk), masks, params, is_leaf=lambda x: x is None
    )


def straight_through(w: jax.Array, mask: jax.Array) -> jax.Array:
    """``mask * w`` in the forward pass, identity in the backward pass.

    Written as ``w + stop_gradient(mask*w - w)``: the value is exact (``w + (0 - w) == 0`` and
    ``w + (w - w) == w`` in floating point) and d/dw is the identity, so the gradient with respect to the
    dense ``w`` equals the gradient with respect to the masked weight at every position, masked or not.
    """
    return w + jax.lax.stop_gradient(jnp.where(mask, w, jnp.zeros_like(w)) - w)


def masked_params(params: Any, masks: Any, *, straight_through_grad: bool = True) -> Any:
    """Params for the forward pass: sparse kernels multiplied by their masks, everything else unchanged.

    With ``straight_through_grad=True`` (the AST default) the backward pass is straight-through:
    ``d loss / d W == d loss / d (m(W) * W)`` elementwise. With ``False`` it is a plain product whose gradient
    is zero at masked positions.
    """
    if masks is None:
        return params
    if straight_through_grad:
        return _zip_masks(straight_through, params, masks)
    return _zip_masks(lambda w, mk: w * mk.astype(w.dtype), params, masks)


def apply_masks(params: Any, masks: Any) -> Any:
    """Hard-prune: zero the masked-out weights (for evaluation, export and the strict n:m check)."""
    return masked_params(params, masks, straight_through_grad=False)


def collect_input_norms(
    model: nn.Module,
    params: Any,
    batches: Iterable[Any],
    *,
    sparse_filter: SparseFilter | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Input-feature L2 norms ``||X_j||_2`` of every sparse ``nn.Dense`` layer over calibration batches.

    Runs ``model.apply({"params": params}, batch, **apply_kwargs)`` for each batch with a
    ``flax.linen.intercept_methods`` hook that accumulates ``sum over tokens of x_j**2`` at the input of each
    ``nn.Dense`` whose kernel is sparse. Returns a pytree with the structure of the masks: an ``(in,)``
    float32 vector per sparse kernel, ``None`` elsewhere. Works for any Flax model built from ``nn.Dense``.
    """
    kw = dict(apply_kwargs or {})
    paths = set(sparse_paths(params, sparse_filter))
    if not paths:
        raise ValueError("collect_input_norms: sparse_filter selected no kernel in params")

    def sums_fn(p, batch):
        sums: dict[Path, jax.Array] = {}

        def hook(next_fun, args, kwargs, context):
            mod = context.module
            if isinstance(mod, nn.Dense) and context.method_name == "__call__":
                kp = (*tuple(mod.path), "kernel")
                if kp in paths:
                    x = jnp.asarray(args[0], jnp.float32)
                    s = jnp.sum(x.reshape(-1, x.shape[-1]) ** 2, axis=0)
                    sums[kp] = sums[kp] + s if kp in sums else s
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(hook):
            model.apply({"params": p}, batch, **kw)
        return sums

    sums_jit = jax.jit(sums_fn)
    total: dict[Path, jax.Array] | None = None
    n_batches = 0
    for batch in batches:
        s = sums_jit(params, batch)
        total = s if total is None else {k: total[k] + s[k] for k in total}
        n_batches += 1
    if total is None:
        raise ValueError("collect_input_norms: batches is empty")
    missing = paths - set(total)
    if missing:
        names = ", ".join(sorted(path_str(p) for p in missing))
        raise ValueError(f"collect_input_norms: these sparse kernels were never called as nn.Dense: {names}")
    return _map_sparse(lambda p, w: jnp.sqrt(total[p]), params, sparse_filter)


def strict_nm_report(
    params: Any,
    n: int = 2,
    m: int = 4,
    *,
    masks: Any = None,
    sparse_filter: SparseFilter | None = None,
) -> dict[str, bool]:
    """Per sparse layer: does it hold at most ``n`` non-zeros in every group of ``m`` (axis 0)?

    With ``masks`` given, a layer also fails if any weight outside its mask is non-zero or if its mask does
    not keep exactly ``n`` per group. Computed on the host with NumPy (a final check).
    """
    validate_nm(n, m)
    report = {}
    for p in sparse_paths(params, sparse_filter):
        w = np.asarray(get_path(params, p))
        ok = w.shape[0] % m == 0
        if ok:
            nz = (w != 0).reshape(w.shape[0] // m, m, *w.shape[1:]).sum(axis=1)
            ok = bool(np.all(nz <= n))
        if ok and masks is not None:
            mk = np.asarray(get_path(masks, p))
            ok = bool(np.all(w[~mk] == 0)) and bool(np.all(mk.reshape(w.shape[0] // m, m, -1).sum(1) == n))
        report[path_str(p)] = ok
    return report


def is_strict_nm(
    params: Any,
    n: int = 2,
    m: int = 4,
    *,
    masks: Any = None,
    sparse_filter: SparseFilter | None = None,
) -> bool:
    """True iff every sparse kernel passes :func:`strict_nm_report` (and there is at least one)."""
    report = strict_nm_report(params, n, m, masks=masks, sparse_filter=sparse_filter)
    return bool(report) and all(report.values())


def count_params(params: Any, masks: Any = None) -> dict[str, int]:
    """Parameter counts (Python ints): ``total`` (all leaves), ``sparse`` (entries of masked kernels) and
    ``nonzero_after_mask`` (total minus the masked-out entries)."""
    total = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    if masks is None:
        return {"total": total, "sparse": 0, "nonzero_after_mask": total}
    mk = [np.asarray(x) for x in jax.tree_util.tree_leaves(masks)]
    sparse = int(sum(x.size for x in mk))
    kept = int(sum(x.sum() for x in mk))
    return {"total": total, "sparse": sparse, "nonzero_after_mask": total - sparse + kept}
