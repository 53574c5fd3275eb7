"""Batched autoregressive generation with a static-shape KV cache for the ``ast_jax`` decoders.

``generate(model, params, prompts, ...)`` right-pads the prompts to a common length ``P``, prefills the cache
with one forward pass, then decodes one token per step inside a jitted ``jax.lax.while_loop``. The cache has
``P + max_new_tokens`` slots and slot ``j`` always holds position ``j`` of its row, so a row of length ``n``
writes its first new token at slot ``n`` (overwriting padding) and never attends past its own position: each
row's tokens are those of its own unpadded run. Every shape is static, so one compiled program serves the
whole generation.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.models.gpt2 import GPT2Config, KVCache
from ast_jax.models.llama import LlamaConfig

__all__ = ["GenerateOutput", "KVCache", "generate", "generate_stream", "init_cache", "sample_logits"]


class GenerateOutput(NamedTuple):
    """``tokens`` (B, max_new_tokens) int32, entries after a row's EOS are ``eos_id``; ``lengths`` (B,) int32,
    the number of generated tokens of each row (its EOS included)."""

    tokens: jax.Array
    lengths: jax.Array


def _cache_dims(model: nn.Module) -> tuple[int, int, int, Any, int]:
    """(n_layers, n_kv_heads, head_dim, dtype, max_len) of a GPT2 or Llama module."""
    cfg = model.cfg
    if isinstance(cfg, GPT2Config):
        return cfg.n_layer, cfg.n_head, cfg.d_model // cfg.n_head, cfg.dtype, cfg.max_len
    if isinstance(cfg, LlamaConfig):
        return cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.dtype, cfg.max_len
    raise TypeError(f"generate supports GPT2 and Llama models, got config {type(cfg).__name__}")


def init_cache(model: nn.Module, batch: int, slots: int) -> KVCache:
    """An empty cache for ``model``: per layer k, v (batch, slots, n_kv_heads, head_dim); pos (batch,) = 0."""
    n_layers, n_kv, hd, dtype, _ = _cache_dims(model)
    zeros = tuple(jnp.zeros((batch, slots, n_kv, hd), dtype) for _ in range(n_layers))
    return KVCache(zeros, zeros, jnp.zeros((batch,), jnp.int32))


def sample_logits(
    logits: jax.Array,
    key: jax.Array | None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Next tokens (B,) int32 from logits (B, V): argmax when ``temperature <= 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest and the smallest nucleus of
    probability ``>= top_p``."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token when the mass strictly before it is < top_p: the top token is always kept.
        before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def _generate(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,
    lengths: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
) -> GenerateOutput:
    b, p = tokens.shape
    variables = {"params": params}
    cache = init_cache(model, b, p + max_new_tokens)
    # Prefill: right padding under a causal mask means real tokens never see pads; the next-token logits of
    # row i are at its last real token, and its next write position is its own length.
    logits, cache = model.apply(variables, tokens, cache=cache)
    last = logits[jnp.arange(b), lengths - 1]
    cache = cache._replace(pos=lengths)
    key, sub = jax.random.split(key)
    first = sample_logits(last, sub, temperature, top_k, top_p)
    fill = jnp.int32(0 if eos_id is None else eos_id)
    out = jnp.full((b, max_new_tokens), fill, jnp.int32)

    def cond(state: tuple) -> jax.Array:
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, tok, cache, out, done, n_gen, key = state
        tok = jnp.where(done, fill, tok)
        out = out.at[:, step].set(tok)
        n_gen = n_gen + (~done).astype(jnp.int32)
        if eos_id is not None:
            done = done | (tok == eos_id)
        # Finished rows keep decoding (static shapes); their outputs are masked to ``fill`` above.
        logits, cache = model.apply(variables, tok[:, None], cache=cache)
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits[:, 0], sub, temperature, top_k, top_p)
        return step + 1, nxt, cache, out, done, n_gen, key

    state = (jnp.int32(0), first, cache, out, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), key)
    _, _, _, out, _, n_gen, _ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(out, n_gen)


def _check_decoding(
    model: nn.Module,
    longest: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    key: jax.Array | None,
) -> None:
    """The argument checks shared by :func:`generate` and :func:`generate_stream`, before any tracing."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature > 0.0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a jax.random key")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    max_len = _cache_dims(model)[4]
    if longest + max_new_tokens > max_len:
        raise ValueError(
            f"longest prompt {longest} + max_new_tokens {max_new_tokens} exceeds the model max_len {max_len}"
        )


def generate(
    model: nn.Module,
    params: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    key: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens after each prompt with a KV cache.

    Args:
      model: a :class:`~ast_jax.models.gpt2.GPT2` or :class:`~ast_jax.models.llama.Llama` module.
      params: its parameters (the ``"params"`` collection).
      prompts: B token-id sequences of possibly different (non-zero) lengths, or an int array (B, P).
      max_new_tokens: N, tokens generated per row; ``max(len) + N`` must not exceed the model's ``max_len``.
      temperature: ``<= 0`` decodes greedily (argmax); otherwise samples from ``softmax(logits / T)``.
      top_k: keep only the ``top_k`` most likely tokens when sampling.
      top_p: nucleus sampling, keep the smallest set of tokens of probability ``>= top_p``.
      eos_id: a row stops after emitting it (its later entries are ``eos_id``); decoding ends when all rows
        stopped. ``None``: always N tokens.
      key: ``jax.random`` key, required when sampling; a fixed key gives the same tokens.
      mesh: run data-parallel on this ``(data, fsdp)`` mesh (:func:`ast_jax.sharding.make_mesh`): the batch
        (prompts, cache, outputs) is split over all its devices, B must be a multiple of their number;
        params already sharded on the mesh (e.g. FSDP from training) keep their sharding, others are
        replicated. Every row's tokens equal the unsharded run's.

    Returns:
      :class:`GenerateOutput` with ``tokens`` (B, N) int32 and ``lengths`` (B,) int32.
    """
    rows = [np.asarray(r, np.int32).reshape(-1) for r in prompts]
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError("generate needs at least one prompt and every prompt must be non-empty")
    lengths = np.array([r.size for r in rows], np.int32)
    p = int(lengths.max())
    _check_decoding(model, p, max_new_tokens, temperature, top_k, top_p, key)
    padded = np.zeros((len(rows), p), np.int32)
    for i, r in enumerate(rows):
        padded[i, : r.size] = r
    tokens, lens = jnp.asarray(padded), jnp.asarray(lengths)
    if mesh is not None:
        tokens, lens, params = _on_mesh(mesh, padded, lengths, params)
    return _generate(
        model,
        params,
        tokens,
        lens,
        jax.random.key(0) if key is None else key,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
    )


def _on_mesh(mesh: jax.sharding.Mesh, padded: np.ndarray, lengths: np.ndarray, params: Any) -> tuple:
    """Batch arrays split over every device of ``mesh``; params replicated unless already on the mesh."""
    from ast_jax import sharding as shd

    if padded.shape[0] % mesh.devices.size:
        raise ValueError(
            f"generate on a mesh of {mesh.devices.size} devices needs a batch that is a multiple of it, "
            f"got {padded.shape[0]} prompts"
        )
    bsh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)

    def place(x: Any) -> Any:
        sh = getattr(x, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
            return x
        return shd.host_to_global(np.asarray(x), rep)

    return (
        shd.host_to_global(padded, bsh),
        shd.host_to_global(lengths, bsh),
        jax.tree.map(place, params),
    )


@functools.partial(jax.jit, static_argnames=("model", "slots"))
def _prefill(model: nn.Module, params: Any, tokens: jax.Array, *, slots: int) -> tuple[jax.Array, KVCache]:
    cache = init_cache(model, tokens.shape[0], slots)
    logits, cache = model.apply({"params": params}, tokens, cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnums=(2,))
def _decode_one(model: nn.Module, params: Any, cache: KVCache, tok: jax.Array) -> tuple[jax.Array, KVCache]:
    logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
    return logits[:, 0], cache


def generate_stream(
    model: nn.Module,
    params: Any,
    prompt: Sequence[int] | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    key: jax.Array | None = None,
) -> Iterator[int]:
    """Yield the tokens of one prompt as they are decoded (for printing text while it is produced).

    The same decoding as :func:`generate` for a batch of one (greedy gives the same tokens), but one jitted
    step per token driven from Python, so each token reaches the caller as soon as it exists; the cache
    (``len(prompt) + max_new_tokens`` slots) is donated from step to step. Stops after ``eos_id`` (yielded).
    """
    row = np.asarray(prompt, np.int32).reshape(-1)
    if row.size == 0:
        raise ValueError("generate_stream needs a non-empty prompt")
    _check_decoding(model, row.size, max_new_tokens, temperature, top_k, top_p, key)
    key = jax.random.key(0) if key is None else key
    last, cache = _prefill(model, params, jnp.asarray(row[None]), slots=int(row.size + max_new_tokens))
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = sample_logits(last, sub, temperature, top_k, top_p)
        value = int(tok[0])
        yield value
        if value == eos_id or i == max_new_tokens - 1:
            return
        last, cache = _decode_one(model, params, cache, tok)
