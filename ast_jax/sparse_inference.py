"""Run a model whose N:M sparse kernels stay compressed on the device (no second model definition).

``compress_for_inference(params, n, m, bits=...)`` splits a params tree into the dense remainder and
``{path: NMWeight}`` (the device layout of :mod:`ast_jax.kernels.nm_matmul`). :func:`sparse_intercept` routes
every ``flax.linen.Dense`` whose params hold a compressed kernel through :func:`~ast_jax.kernels.nm_matmul`
(``y = nm_matmul(x, W) + bias``) with ``flax.linen.intercept_methods`` -- the mechanism of
:mod:`ast_jax.slorb` -- so GPT-2, LLaMA and user models work unchanged. The compressed kernels travel *inside*
the params tree (key ``"nm_kernel"`` in place of ``"kernel"``, see :func:`embed_compressed`): they are traced
arguments of the existing jitted :func:`ast_jax.generate.generate` / ``generate_stream`` (not constants baked
into the program), and their static settings (``impl``) are part of the jit cache key.

Typical use::

    dense, weights = compress_for_inference(pruned_params, 2, 4, bits=4)
    out = sparse_generate(model, dense, weights, prompts, max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.export import compress_params
from ast_jax.export_codec import CompressedNM, ExportConfig
from ast_jax.generate import GenerateOutput, generate, generate_stream
from ast_jax.kernels.nm_matmul import NMWeight, nm_matmul, to_kernel_layout
from ast_jax.sparsify import SparseFilter

__all__ = [
    "NM_KEY",
    "compress_for_inference",
    "embed_compressed",
    "sparse_apply",
    "sparse_generate",
    "sparse_generate_stream",
    "sparse_intercept",
]

NM_KEY = "nm_kernel"  # params key of a compressed kernel, next to the Dense's (dense) bias


def compress_for_inference(
    params: Any,
    n: int = 2,
    m: int = 4,
    bits: int | None = None,
    group_size: int = 128,
    *,
    sparse_filter: SparseFilter | None = None,
    block_q: int = 16,
    block_out: int = 64,
    impl: str = "auto",
) -> tuple[dict[str, Any], dict[str, NMWeight]]:
    """Compress every sparse kernel of an (already N:M pruned) params tree into the device layout.

    Returns ``(dense_params, weights)``: ``dense_params`` is the nested params dict without the compressed
    ``.../kernel`` leaves (everything else as ``jnp`` arrays), ``weights`` maps ``"block/.../kernel"`` paths
    to :class:`~ast_jax.kernels.NMWeight`. Which kernels are sparse follows ``sparse_filter`` (default: the
    training rule); each must be ``n:m`` sparse (``compress_nm`` raises otherwise). ``bits`` ``None``/8/4 and
    ``group_size`` are the export's quantisation; ``block_q``, ``block_out``, ``impl`` go to
    :func:`~ast_jax.kernels.to_kernel_layout`.
    """
    cfg = ExportConfig(n=n, m=m, bits=bits, group_size=group_size)
    flat = compress_params(params, cfg, sparse_filter=sparse_filter)
    dense: dict[str, Any] = {}
    weights: dict[str, NMWeight] = {}
    for p, leaf in flat.items():
        if isinstance(leaf, CompressedNM):
            if len(leaf.shape) != 2:
                raise ValueError(f"{p}: the sparse inference path needs 2-D kernels, got shape {leaf.shape}")
            weights[p] = to_kernel_layout(leaf, block_q=block_q, block_out=block_out, impl=impl)
            continue
        node = dense
        *parents, last = p.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = jnp.asarray(leaf)
    return dense, weights


def embed_compressed(
    dense_params: Any, weights: Mapping[str, NMWeight], impl: str | None = None
) -> dict[str, Any]:
    """A params tree with each ``weights[".../kernel"]`` stored as ``.../nm_kernel`` (optionally with ``impl``
    overriding the weight's implementation). Use it under :func:`sparse_intercept`."""

    def copy(node: Any) -> Any:  # fresh nested dicts (the caller's tree is left alone), same arrays
        return {k: copy(v) for k, v in node.items()} if isinstance(node, Mapping) else node

    tree = copy(dense_params)
    for p, w in weights.items():
        *parents, last = p.split("/")
        if last != "kernel":
            raise ValueError(f"{p}: compressed paths must end in '/kernel'")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[NM_KEY] = w if impl is None else w.with_impl(impl)
    return tree


def _dense_call(mod: nn.Dense, x: jax.Array, w: NMWeight) -> jax.Array:
    # Dense semantics: inputs, kernel and bias promoted to mod.dtype (or their common type) before the dot.
    cd = mod.dtype or jnp.result_type(x.dtype, jnp.dtype(w.dtype))
    y = nm_matmul(x.astype(cd), w, out_dtype=cd)
    if mod.use_bias:
        y = y + mod.get_variable("params", "bias").astype(cd)
    return y


@contextlib.contextmanager
def sparse_intercept() -> Iterator[None]:
    """Context manager: every ``nn.Dense.__call__`` whose params hold ``"nm_kernel"`` (an
    :class:`~ast_jax.kernels.NMWeight`) computes ``nm_matmul(x, W) + bias`` instead of reading ``kernel``.

    Active while a function is traced, so it works around ``model.apply`` inside ``jax.jit`` (the existing
    jitted generators included); Dense layers without a compressed kernel run unchanged.
    """

    def hook(next_fun, args, kwargs, context):
        mod = context.module
        if (
            isinstance(mod, nn.Dense)
            and context.method_name == "__call__"
            and args
            and mod.has_variable("params", NM_KEY)
        ):
            return _dense_call(mod, args[0], mod.get_variable("params", NM_KEY))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(hook):
        yield


def sparse_apply(
    model: nn.Module, dense_params: Any, weights: Mapping[str, NMWeight], *args: Any, **kwargs: Any
) -> Any:
    """``model.apply({"params": ...}, *args, **kwargs)`` with the compressed kernels of ``weights``."""
    with sparse_intercept():
        return model.apply({"params": embed_compressed(dense_params, weights)}, *args, **kwargs)


def sparse_generate(
    model: nn.Module,
    dense_params: Any,
    weights: Mapping[str, NMWeight],
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    impl: str | None = None,
    **kwargs: Any,
) -> GenerateOutput:
    """:func:`ast_jax.generate.generate` with the sparse kernels kept compressed (``kwargs`` as there).

    ``impl`` overrides every weight's implementation (``"auto"``, ``"pallas"``, ``"interpret"``,
    ``"reference"``).
    """
    with sparse_intercept():
        return generate(model, embed_compressed(dense_params, weights, impl), prompts, **kwargs)


def sparse_generate_stream(
    model: nn.Module,
    dense_params: Any,
    weights: Mapping[str, NMWeight],
    prompt: Sequence[int] | np.ndarray,
    *,
    impl: str | None = None,
    **kwargs: Any,
) -> Iterator[int]:
    """:func:`ast_jax.generate.generate_stream` with the sparse kernels kept compressed."""
    params = embed_compressed(dense_params, weights, impl)
    stream = generate_stream(model, params, prompt, **kwargs)
    # The generator traces lazily (prefill on the first next(), one decode per step): keep the interceptor
    # active around every resumption, not just around the generator's creation.
    while True:
        with sparse_intercept():
            try:
                tok = next(stream)
            except StopIteration:
                return
        yield tok
