"""One-shot N:M pruning of pretrained models: magnitude, Wanda and SparseGPT, layer by layer, in JAX.

Layer level (pure, jittable functions on a Flax kernel ``w`` of shape ``(in, out)``; groups of ``m``
consecutive inputs per output column, ``n`` kept):

* :func:`magnitude_prune` — keep the ``n`` largest ``|w|``.
* :func:`wanda_prune` — keep the ``n`` largest ``|w_jo|·||X_j||₂`` (Sun et al., 2023); weights unchanged.
* :func:`sparsegpt_prune` — SparseGPT (Frantar & Alistarh, 2023): an approximate layer-wise OBS solver that
  prunes column by column (input feature by feature) and updates the not-yet-visited columns to compensate,
  using the Hessian ``H = XᵀX`` of the layer's reconstruction loss ``||XW − XŴ||²``. Runs on all output
  columns at once (they are independent given ``H``).

Model level: :func:`prune_model` walks the blocks of a model in order, feeds calibration sequences through
the already-pruned earlier blocks, gathers the input statistics of every ``nn.Dense`` of the current block
(``XᵀX`` or ``||X_j||²``) with ``flax.linen.intercept_methods``, prunes the block's kernels and moves on. It
returns pruned params and the masks pytree (bool at sparse kernels, ``None`` elsewhere) that
:mod:`ast_jax.optim` takes as AST's initial masks.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.masks import nm_mask, validate_nm, wanda_scores
from ast_jax.sparsify import (
    SparseFilter,
    default_sparse_filter,
    get_path,
    path_str,
    set_path,
    validate_sparse_params,
)

__all__ = [
    "METHODS",
    "BlockwiseModel",
    "LayerStats",
    "OneShotConfig",
    "accumulate_stats",
    "gpt2_blockwise",
    "init_stats",
    "llama_blockwise",
    "magnitude_prune",
    "prune_model",
    "reconstruction_error",
    "sparsegpt_prune",
    "wanda_prune",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------------------
# Layer level
# ---------------------------------------------------------------------------------------------------------


def _check_kernel(w: jax.Array, m: int, name: str = "w") -> None:
    if w.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (in, out) kernel, got shape {w.shape}")
    if w.shape[0] % m:
        raise ValueError(f"{name}: input dimension {w.shape[0]} (shape {w.shape}) is not a multiple of m={m}")


@functools.partial(jax.jit, static_argnames=("n", "m"))
def magnitude_prune(w: jax.Array, n: int = 2, m: int = 4) -> tuple[jax.Array, jax.Array]:
    """Magnitude N:M pruning of ``w`` (in, out): ``mask = nm_mask(|w|)``; returns ``(w ⊙ mask, mask)``."""
    _check_kernel(w, m)
    mask = nm_mask(w, n, m, axis=0)
    return jnp.where(mask, w, 0).astype(w.dtype), mask


@functools.partial(jax.jit, static_argnames=("n", "m"))
def wanda_prune(w: jax.Array, input_norms: jax.Array, n: int = 2, m: int = 4) -> tuple[jax.Array, jax.Array]:
    """Wanda N:M pruning of ``w`` (in, out) with ``input_norms = ||X_j||₂`` (in,).

    Score ``S_jo = |w_jo|·||X_j||₂``, kept: the ``n`` largest scores per group of ``m`` inputs of each output.
    Returns ``(w ⊙ mask, mask)``; kept weights are not changed.
    """
    _check_kernel(w, m)
    mask = nm_mask(w, n, m, axis=0, scores=wanda_scores(w, input_norms))
    return jnp.where(mask, w, 0).astype(w.dtype), mask


@functools.partial(jax.jit, static_argnames=("n", "m", "blocksize"))
def sparsegpt_prune(
    w: jax.Array,
    hessian: jax.Array,
    n: int = 2,
    m: int = 4,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT N:M pruning of ``w`` (in, out) given ``hessian = XᵀX`` (in, in) of the layer's inputs X.

    Minimises ``||X w − X ŵ||²`` approximately. With ``H ← H + damp·mean(diag H)·I`` and ``U`` the upper
    Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), input rows ``j = 0, 1, ...`` of the kernel are visited in
    order:

    * at the start of each group of ``m`` rows, keep in every output column the ``n`` rows with the largest
      ``w_jo² / U_jj²`` (the OBS saliency; ties to the lower index);
    * ``q_j = w_j ⊙ mask_j``; ``e_j = (w_j − q_j) / U_jj``; every later row ``k > j`` gets
      ``w_k ← w_k − U_jk · e_j`` (the optimal compensation for removing row ``j``'s pruned weights).

    Rows are processed in blocks of ``blocksize`` ("lazy batch updates"): inside a group the updates are
    applied row by row to the group, to the rest of the block once per group (a rank-m matmul) and to the
    rest of the kernel once per block (one matmul). Features that never fire
    (``H_jj = 0``) are pruned to zero. All output columns are processed at once. Returns ``(ŵ, mask)``, ``ŵ``
    in ``w.dtype`` with exactly zero pruned entries.
    """
    validate_nm(n, m)
    _check_kernel(w, m)
    d_in, d_out = w.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"hessian must have shape ({d_in}, {d_in}) for w {w.shape}, got {hessian.shape}")
    if blocksize < m or blocksize % m:
        raise ValueError(f"blocksize={blocksize} must be a positive multiple of m={m}")
    blocksize = min(blocksize, -(-d_in // m) * m)

    # Rows of the Flax kernel (in, out) are the "columns" of the SparseGPT paper; each row is contiguous.
    wk = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(hessian, jnp.float32)
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    wk = jnp.where(dead[:, None], 0.0, wk)
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(d_in, dtype=jnp.float32)

    # Pad the input axis to whole blocks: zero weights and an identity Hessian there, so padding neither
    # receives nor sends compensation.
    d_pad = -(-d_in // blocksize) * blocksize
    if d_pad != d_in:
        wk = jnp.pad(wk, ((0, d_pad - d_in), (0, 0)))
        h = jnp.pad(h, ((0, d_pad - d_in), (0, d_pad - d_in)))
        h = h + jnp.diag((jnp.arange(d_pad) >= d_in).astype(jnp.float32))

    # Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) without forming H⁻¹: with J the index reversal,
    # H = R Rᵀ where R = J·chol(J H J)·J is upper triangular, so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ (one Cholesky and
    # one triangular inverse instead of two Cholesky factorisations and a full inverse).
    r = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    u = jax.scipy.linalg.solve_triangular(r, jnp.eye(d_pad, dtype=jnp.float32), lower=False)
    u = jnp.triu(u)  # exact zeros below the diagonal (the batched updates rely on that)

    mm = functools.partial(jnp.matmul, precision=_HIGHEST)

    def block_step(b: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        wk, keep_all = carry
        i1 = b * blocksize
        w1 = jax.lax.dynamic_slice(wk, (i1, 0), (blocksize, d_out))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (blocksize, blocksize))

        def group_step(g: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            w1, err1, keep1 = carry
            r0 = g * m
            wg = jax.lax.dynamic_slice(w1, (r0, 0), (m, d_out))
            ug = jax.lax.dynamic_slice(u1, (r0, 0), (m, blocksize))  # the group's rows of U (block part)
            ugg = jax.lax.dynamic_slice(ug, (0, r0), (m, m))  # upper triangular m x m
            keep = nm_mask(wg, n, m, axis=0, scores=(wg / jnp.diagonal(ugg)[:, None]) ** 2)  # (m, out)
            # The m rows of a group one after the other (m is 4 or 8: unrolled), updating only the group...
            errs = []
            for j in range(m):
                qj = jnp.where(keep[j], wg[j], 0.0)
                ej = (wg[j] - qj) / ugg[j, j]
                wg = wg - ugg[j][:, None] * ej[None, :]  # rows >= j only (ugg is upper triangular)
                wg = wg.at[j].set(qj)
                errs.append(ej)
            eg = jnp.stack(errs)  # (m, out)
            # ...then the rest of the block in one rank-m update (rows above the group get zero: U is upper
            # triangular); the group's own rows are then overwritten with their pruned values.
            w1 = w1 - mm(ug.T, eg)
            w1 = jax.lax.dynamic_update_slice(w1, wg, (r0, 0))
            err1 = jax.lax.dynamic_update_slice(err1, eg, (r0, 0))
            keep1 = jax.lax.dynamic_update_slice(keep1, keep, (r0, 0))
            return w1, err1, keep1

        zeros = jnp.zeros((blocksize, d_out), jnp.float32)
        keep0 = jnp.zeros((blocksize, d_out), bool)
        q1, err1, keep1 = jax.lax.fori_loop(0, blocksize // m, group_step, (w1, zeros, keep0))
        # Lazy batch update of every later row at once: U's rows of this block are zero left of the block,
        # and the block itself is overwritten with q1 just after, so one matmul over the full height is exact.
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (blocksize, d_pad))
        wk = wk - mm(u_rows.T, err1)
        wk = jax.lax.dynamic_update_slice(wk, q1, (i1, 0))
        keep_all = jax.lax.dynamic_update_slice(keep_all, keep1, (i1, 0))
        return wk, keep_all

    keep_all = jnp.zeros((d_pad, d_out), bool)
    wk, keep_all = jax.lax.fori_loop(0, d_pad // blocksize, block_step, (wk, keep_all))
    mask = keep_all[:d_in]
    return jnp.where(mask, wk[:d_in], 0.0).astype(w.dtype), mask


def reconstruction_error(w: jax.Array, w_hat: jax.Array, hessian: jax.Array) -> jax.Array:
    """``||X w − X ŵ||²_F = tr((w − ŵ)ᵀ H (w − ŵ))`` with ``H = XᵀX``; ``w, ŵ`` (in, out), ``H`` (in, in)."""
    delta = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
    return jnp.sum(delta * jnp.matmul(hessian.astype(jnp.float32), delta, precision=_HIGHEST))


# ---------------------------------------------------------------------------------------------------------
# Calibration statistics
# ---------------------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class LayerStats:
    """Calibration statistics of one layer's inputs ``X`` (rows = tokens).

    ``xtx``: ``XᵀX`` (in, in), or ``None`` when only norms are needed; ``sq``: ``Σ_t x_tj²`` (in,), so
    ``||X_j||₂ = sqrt(sq_j)``; ``count``: number of rows seen.
    """

    xtx: jax.Array | None
    sq: jax.Array
    count: jax.Array

    def tree_flatten(self) -> tuple[tuple[Any, ...], None]:
        return (self.xtx, self.sq, self.count), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[Any, ...]) -> LayerStats:
        return cls(*children)


def init_stats(d_in: int, *, hessian: bool) -> LayerStats:
    """Empty statistics of a layer with ``d_in`` inputs (``hessian=False``: only the squared norms)."""
    return LayerStats(
        jnp.zeros((d_in, d_in), jnp.float32) if hessian else None,
        jnp.zeros((d_in,), jnp.float32),
        jnp.zeros((), jnp.float32),
    )


def accumulate_stats(stats: LayerStats, x: jax.Array) -> LayerStats:
    """Add inputs ``x`` (..., in) to the statistics: ``XᵀX += xᵀx`` (float32, full precision) and ``Σx²``."""
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    xtx = None if stats.xtx is None else stats.xtx + jnp.matmul(x.T, x, precision=_HIGHEST)
    return LayerStats(xtx, stats.sq + jnp.sum(x * x, axis=0), stats.count + x.shape[0])


# ---------------------------------------------------------------------------------------------------------
# Model level
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockwiseModel:
    """How to run a decoder one block at a time (what sequential pruning needs).

    ``embed(params, tokens (B, T)) -> h (B, T, D)``; ``block_names[i]`` is the key of block ``i`` in
    ``params``; ``block(block_params, h) -> h`` applies one block (a Flax ``apply`` whose ``nn.Dense`` calls
    are seen by ``flax.linen.intercept_methods``).
    """

    embed: Callable[[Any, jax.Array], jax.Array]
    block_names: tuple[str, ...]
    block: Callable[[Any, jax.Array], jax.Array]


@functools.cache
def llama_blockwise(cfg: Any) -> BlockwiseModel:
    """:class:`BlockwiseModel` of :class:`ast_jax.models.llama.Llama` with config ``cfg``."""
    from ast_jax.models.llama import Llama, LlamaBlock

    model, block = Llama(cfg), LlamaBlock(cfg)
    return BlockwiseModel(
        embed=lambda p, t: model.apply({"params": p}, t, method="embed_tokens"),
        block_names=tuple(f"layers_{i}" for i in range(cfg.n_layers)),
        block=lambda bp, h: block.apply({"params": bp}, h),
    )


@functools.cache
def gpt2_blockwise(cfg: Any) -> BlockwiseModel:
    """:class:`BlockwiseModel` of :class:`ast_jax.models.gpt2.GPT2` (token + position embeddings)."""

    from ast_jax.models.gpt2 import Block

    block = Block(cfg)

    def embed(p: Any, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][jnp.arange(t)][None]
        return x.astype(cfg.dtype)

    return BlockwiseModel(
        embed=embed,
        block_names=tuple(f"block_{i}" for i in range(cfg.n_layer)),
        block=lambda bp, h: block.apply({"params": bp}, h),
    )


def blockwise_for(model: Any) -> BlockwiseModel:
    """The :class:`BlockwiseModel` of one of our decoders (``Llama`` or ``GPT2``), by its type."""
    from ast_jax.models.gpt2 import GPT2
    from ast_jax.models.llama import Llama

    if isinstance(model, GPT2):
        return gpt2_blockwise(model.cfg)
    if isinstance(model, Llama):
        return llama_blockwise(model.cfg)
    raise TypeError(f"no block-by-block runner for {type(model).__name__}; expected Llama or GPT2")


@dataclasses.dataclass(frozen=True)
class OneShotConfig:
    """Settings of :func:`prune_model`.

    Attributes:
      method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
      n, m: keep ``n`` of every ``m`` consecutive inputs (2:4 by default).
      blocksize: SparseGPT's lazy-update block (columns per block).
      damp: SparseGPT's dampening, as a fraction of the mean Hessian diagonal (1% as in the paper).
      chunk: calibration sequences per forward pass (memory/speed trade-off; results do not depend on it).
    """

    method: str = "sparsegpt"
    n: int = 2
    m: int = 4
    blocksize: int = 128
    damp: float = 0.01
    chunk: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"OneShotConfig.method must be one of {METHODS}, got {self.method!r}")
        validate_nm(self.n, self.m)
        if self.blocksize < self.m or self.blocksize % self.m:
            raise ValueError(f"OneShotConfig.blocksize={self.blocksize} must be a multiple of m={self.m}")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"OneShotConfig.damp must be in [0, 1), got {self.damp}")
        if self.chunk < 1:
            raise ValueError(f"OneShotConfig.chunk must be >= 1, got {self.chunk}")


def _capture_inputs(block_fn: Callable[[Any, jax.Array], jax.Array], bp: Any, h: jax.Array):
    """Run one block, recording the input of every ``nn.Dense`` call: returns ``(h_out, {path: x}, groups)``.

    ``groups`` lists the Dense paths that received the very same input array (q/k/v, gate/up), so their
    statistics are computed once and SparseGPT can prune them together.
    """
    inputs: dict[tuple[str, ...], jax.Array] = {}
    by_id: dict[int, list[tuple[str, ...]]] = {}

    def hook(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Dense) and context.method_name == "__call__":
            path = tuple(mod.path)
            inputs[path] = args[0]
            by_id.setdefault(id(args[0]), []).append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(hook):
        out = block_fn(bp, h)
    return out, inputs, [tuple(g) for g in by_id.values()]


@functools.cache
def _compiled_embed(blockwise: BlockwiseModel) -> Callable[..., Any]:
    return jax.jit(blockwise.embed)


@functools.cache
def _compiled(blockwise: BlockwiseModel) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted statistics step and block forward of a model, cached so repeated prunings compile once."""

    @jax.jit
    def stats_step(stats: dict, bp: Any, hc: jax.Array) -> dict:
        _, inputs, groups = _capture_inputs(blockwise.block, bp, hc)
        return {g: accumulate_stats(stats[g], inputs[g[0]]) for g in groups}

    return stats_step, jax.jit(blockwise.block)


def _dense_groups(blockwise: BlockwiseModel, bp: Any, hc: jax.Array) -> list[tuple[tuple[str, ...], ...]]:
    """Input-sharing groups of the block's Dense layers, found by tracing shapes only."""
    box = []

    def trace(b: Any, x: jax.Array) -> jax.Array:
        out, _, groups = _capture_inputs(blockwise.block, b, x)
        box.append(groups)
        return out

    jax.eval_shape(trace, bp, hc)
    return box[0]


def prune_model(
    blockwise: BlockwiseModel,
    params: Any,
    calib_tokens: Any,
    config: OneShotConfig = OneShotConfig(),
    *,
    sparse_filter: SparseFilter | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """One-shot N:M pruning of every sparse kernel of a decoder, block by block (sequential calibration).

    Args:
      blockwise: how to run the model block by block (:func:`llama_blockwise`, :func:`gpt2_blockwise`).
      params: the model's params pytree (not modified).
      calib_tokens: int array ``(N, T)`` of calibration sequences (ignored by ``"magnitude"``).
      config: method, n:m, SparseGPT settings.
      sparse_filter: ``(path, leaf) -> bool`` selecting sparse kernels (default:
        :func:`ast_jax.sparsify.default_sparse_filter`); only ``nn.Dense`` kernels inside the blocks can be
        pruned here.
      progress: optional callback receiving a line of text after each block.

    Block ``i``'s statistics are gathered on the outputs of blocks ``0..i−1`` *already pruned*; within a block
    every layer sees the dense block's inputs (the SparseGPT/Wanda reference protocol).

    Returns:
      ``(pruned_params, masks, info)``: masks is a pytree like ``params`` with a bool array at each pruned
      kernel and ``None`` elsewhere; ``info`` has ``wall_s``, ``tokens`` and, for SparseGPT, the relative
      reconstruction error ``||XW − XŴ||² / ||XW||²`` of every pruned layer (``rel_error``).
    """
    flt = default_sparse_filter if sparse_filter is None else sparse_filter
    n, m = config.n, config.m
    # The kernels are exactly those the sparsify filter selects (the rule AST training uses), in pytree order.
    sparse = validate_sparse_params(params, n, m, flt)
    for name in blockwise.block_names:
        if name not in params:
            raise ValueError(f"params has no block {name!r}")
    outside = sorted(path_str(p) for p in sparse if p[0] not in set(blockwise.block_names))
    if outside:
        raise ValueError(f"sparse kernels outside the model's blocks cannot be pruned one-shot: {outside}")
    # per block: the module path of each sparse kernel inside it, e.g. ("attn", "q_proj")
    block_kernels = {b: [p[1:-1] for p in sparse if p[0] == b] for b in blockwise.block_names}

    t0 = time.perf_counter()
    need_calib = config.method != "magnitude"
    h = None
    n_tokens = 0
    if need_calib:
        calib_tokens = jnp.asarray(calib_tokens, jnp.int32)
        if calib_tokens.ndim != 2 or calib_tokens.shape[0] < 1:
            raise ValueError(f"calib_tokens must have shape (N, T) with N >= 1, got {calib_tokens.shape}")
        n_tokens = int(calib_tokens.size)
        embed = _compiled_embed(blockwise)
        h = [
            embed(params, calib_tokens[i : i + config.chunk])
            for i in range(0, len(calib_tokens), config.chunk)
        ]

    use_hessian = config.method == "sparsegpt"
    stats_step, block_apply = _compiled(blockwise)

    new_params = params
    masks = jax.tree_util.tree_map(lambda x: None, params)
    rel_error: dict[str, float] = {}
    for name in blockwise.block_names:
        bp = params[name]
        kernels = block_kernels[name]
        if need_calib:
            all_groups = _dense_groups(blockwise, bp, h[0])
            stats = {
                g: init_stats(get_path(bp, (*g[0], "kernel")).shape[0], hessian=use_hessian)
                for g in all_groups
            }
            for hc in h:
                stats = stats_step(stats, bp, hc)
            # Keep the sparse members of each input-sharing group (q/k/v, gate/up are pruned side by side).
            groups, group_stats = [], {}
            for g in all_groups:
                members = tuple(k for k in g if k in kernels)
                if members:
                    groups.append(members)
                    group_stats[members] = stats[g]
            stats = group_stats
            missed = sorted(path_str((name, *k)) for k in set(kernels) - {k for g in groups for k in g})
            if missed:
                raise ValueError(f"sparse kernels never called as nn.Dense in their block: {missed}")
        else:
            groups = [(k,) for k in kernels]
            stats = {}

        for g in groups:
            ws = [get_path(bp, (*k, "kernel")) for k in g]
            widths = [w.shape[1] for w in ws]
            w = jnp.concatenate(ws, axis=1) if len(ws) > 1 else ws[0]  # same input: prune side by side
            if config.method == "magnitude":
                w_hat, mask = magnitude_prune(w, n, m)
            elif config.method == "wanda":
                w_hat, mask = wanda_prune(w, jnp.sqrt(stats[g].sq), n, m)
            else:
                hess = stats[g].xtx
                w_hat, mask = sparsegpt_prune(w, hess, n, m, blocksize=config.blocksize, damp=config.damp)
                denom = jnp.sum(
                    w.astype(jnp.float32) * jnp.matmul(hess, w.astype(jnp.float32), precision=_HIGHEST)
                )
                err = float(reconstruction_error(w, w_hat, hess) / jnp.maximum(denom, 1e-30))
                for k in g:
                    rel_error[path_str((name, *k))] = err
            offsets = np.cumsum([0, *widths])
            for k, a, b in zip(g, offsets[:-1], offsets[1:], strict=True):
                new_params = set_path(new_params, (name, *k, "kernel"), w_hat[:, a:b])
                masks = set_path(masks, (name, *k, "kernel"), mask[:, a:b])
        if need_calib:
            bp_pruned = new_params[name]
            h = [block_apply(bp_pruned, hc) for hc in h]
        if progress is not None:
            progress(
                f"{name}: pruned {len(kernels)} kernels ({config.method}) at {time.perf_counter() - t0:.1f}s"
            )
    if h is not None:
        jax.block_until_ready(h)
    info = {"method": config.method, "wall_s": time.perf_counter() - t0, "tokens": n_tokens}
    if rel_error:
        info["rel_error"] = rel_error
    return new_params, masks, info
