"""A LLaMA-style decoder in Flax Linen: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU.

The module follows the ``ast_jax`` model contract, so masking, the sparse optimizer, SLoRB, sharding and
checkpointing apply to it unchanged:

* ``Llama(config).apply({"params": p}, tokens)`` with ``tokens`` of shape ``(B, T)`` int32 returns logits
  ``(B, T, V)`` (float32); with ``return_hidden=True`` it returns ``(logits, hidden)`` where ``hidden`` is a
  tuple of ``n_layers + 1`` arrays ``(B, T, D)``: the embedding output and the residual stream after each
  block (before the final norm), as in :mod:`ast_jax.models.gpt2`.
* Every linear layer inside a block is a plain ``nn.Dense`` (no bias) with kernel ``(in, out)`` under a path
  ``layers_<i>/...``: ``attn/{q_proj,k_proj,v_proj,o_proj}`` and ``mlp/{gate_proj,up_proj,down_proj}``.
  Embedding, final norm and (untied) LM head live outside the blocks and are therefore dense by default.

Rotary embeddings use the "rotate half" convention (the first and second halves of each head dimension form
the rotated pairs), which is the layout of Hugging Face LLaMA checkpoints. GGUF files store Q/K rows permuted
for llama.cpp's adjacent-pair convention; :mod:`ast_jax.models.loading` undoes that permutation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.models.gpt2 import KVCache, cached_attention_mask, write_cache

__all__ = ["Llama", "LlamaBlock", "LlamaConfig", "RopeScaling", "apply_rope", "rope_inv_freq", "rope_tables"]

_ROPE_SCALING_KINDS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaled rotary frequencies for context extension (hashable, so configs stay usable as static args).

    Attributes:
      kind: ``"linear"`` (position interpolation: every frequency divided by ``factor``) or ``"llama3"`` (the
        Llama-3.1 rule: wavelengths longer than ``original_max_len / low_freq_factor`` are divided by
        ``factor``, shorter than ``original_max_len / high_freq_factor`` are kept, and the band in between is
        interpolated linearly in ``original_max_len / wavelength``).
      factor: the scale factor (> 0).
      low_freq_factor, high_freq_factor: band edges of ``"llama3"`` (``high_freq_factor > low_freq_factor``).
      original_max_len: the pre-extension context length of ``"llama3"``.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in _ROPE_SCALING_KINDS:
            raise ValueError(f"RopeScaling.kind={self.kind!r}; supported: {list(_ROPE_SCALING_KINDS)}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"RopeScaling high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a LLaMA-style decoder.

    Attributes:
      vocab_size: V, number of token ids.
      d_model: D, width of the residual stream.
      n_layers: number of transformer blocks.
      n_heads: H, query heads; ``head_dim = d_model // n_heads`` unless ``head_dim_override`` is set.
      n_kv_heads: key/value heads (grouped-query attention); must divide ``n_heads``.
      d_ff: hidden width of the SwiGLU MLP.
      max_len: longest sequence the model accepts (rotary tables are computed on the fly, this is a guard).
      rope_base: base θ of the rotary frequencies ``θ^(-2i/head_dim)``.
      norm_eps: ε of RMSNorm.
      tie_embeddings: LM head is the transposed token embedding.
      dtype: computation dtype (``jnp.bfloat16`` for fast GPU runs); norms, softmax and logits stay float32.
      param_dtype: dtype of freshly initialised parameters.
      remat: gradient checkpointing of every block (recompute activations in the backward pass).
      init_std: standard deviation of the normal initialiser of every weight matrix.
      head_dim_override: per-head width when it is not ``d_model // n_heads`` (Mistral-Nemo, Qwen3, ...);
        q/k/v then project to ``n_heads·head_dim`` / ``n_kv_heads·head_dim`` and ``o_proj`` back to D.
      attn_bias: q/k/v projections carry a bias (Qwen2); ``o_proj`` never does.
      rope_scaling: :class:`RopeScaling` of the rotary frequencies, ``None`` for plain RoPE.
      sliding_window: W, each query attends to itself and the ``W - 1`` tokens before it (Mistral);
        ``None``: full causal attention.
    """

    vocab_size: int = 49152
    d_model: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    d_ff: int = 1536
    max_len: int = 8192
    rope_base: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    init_std: float = 0.02
    head_dim_override: int | None = None
    attn_bias: bool = False
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        for name in ("head_dim_override", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"LlamaConfig.{name} must be None or a positive int, got {value!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"LlamaConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}"
            )
        if self.head_dim_override is None and self.d_model % self.n_heads:
            raise ValueError(
                f"LlamaConfig.d_model={self.d_model} is not a multiple of n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(grouped-query attention shares each key/value head among n_heads // n_kv_heads queries)"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rope_base > 1.0:
            raise ValueError(f"LlamaConfig.rope_base must be > 1, got {self.rope_base}")
        if not self.norm_eps > 0.0:
            raise ValueError(f"LlamaConfig.norm_eps must be > 0, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        if self.head_dim_override is not None:
            return self.head_dim_override
        return self.d_model // self.n_heads

    @classmethod
    def smollm2_135m(cls, **overrides: Any) -> LlamaConfig:
        """SmolLM2-135M: 30 layers, D=576, 9 heads, 3 KV heads, MLP 1536, RoPE base 1e5, tied embeddings."""
        base = dict(
            vocab_size=49152,
            d_model=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            d_ff=1536,
            max_len=8192,
            rope_base=100000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A few-thousand-parameter model for tests and CPU smoke runs."""
        base = dict(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_ff=64,
            max_len=128,
            rope_base=1e4,
        )
        base.update(overrides)
        return cls(**base)


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Rotary frequencies ``ω_i`` (head_dim // 2,) float32: ``ω_i = base^(-2i / head_dim)``, then rescaled.

    ``"linear"``: ``ω_i / factor``. ``"llama3"``: with wavelength ``λ_i = 2π / ω_i``,
    ``L = original_max_len``, ``s_i = (L / λ_i − low) / (high − low)``: ``ω_i / factor`` where
    ``λ_i > L / low``, ``ω_i`` where ``λ_i < L / high``, and ``(1 − s_i) ω_i / factor + s_i ω_i`` in between.
    """
    inv = float(base) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None and scaling.kind == "linear":
        inv = inv / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        wavelen = 2 * np.pi / inv
        ctx, low, high = scaling.original_max_len, scaling.low_freq_factor, scaling.high_freq_factor
        smooth = (ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / scaling.factor + smooth * inv
        inv = np.where(
            wavelen > ctx / low, inv / scaling.factor, np.where(wavelen < ctx / high, inv, blended)
        )
    return inv.astype(np.float32)


def rope_tables(
    positions: jax.Array, head_dim: int, base: float, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for integer ``positions`` (T,) or (B, T): ``cos, sin`` of shape ``(..., head_dim // 2)``.

    Angle of position ``p`` and frequency ``i``: ``p · ω_i`` with ``ω_i = base^(-2i / head_dim)``,
    ``i = 0 .. head_dim/2 - 1``, rescaled by ``scaling`` (see :func:`rope_inv_freq`).
    """
    if scaling is not None:
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(
            rope_inv_freq(head_dim, base, scaling)
        )
        return jnp.cos(angles), jnp.sin(angles)
    # Kept as it was before scaling existed, so unscaled models stay bitwise identical.
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` of shape ``(B, T, heads, head_dim)`` by the rotary tables ``(T, head_dim // 2)``
    (shared by all rows) or ``(B, T, head_dim // 2)`` (per-row positions, as in cached decoding).

    With ``x = [x1, x2]`` split into halves: ``out = [x1·cos − x2·sin, x2·cos + x1·sin]`` (rotate-half
    convention), computed in float32 and cast back to ``x.dtype``.
    """
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    # A (T, hd/2) table broadcasts over rows; a (B, T, hd/2) table is per row.
    c = cos[None, :, None, :] if cos.ndim == 2 else cos[:, :, None, :]
    s = sin[None, :, None, :] if sin.ndim == 2 else sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x², -1) + ε) · scale``, computed in float32; parameter ``scale`` (D,)."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def _dense(cfg: LlamaConfig, features: int, name: str, bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.init_std),
        name=name,
    )


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings.

    ``q = x Wq`` (B, T, H, hd), ``k = x Wk``, ``v = x Wv`` (B, T, Hkv, hd); query head ``h`` attends with
    key/value head ``h // (H / Hkv)``; ``softmax(q kᵀ / sqrt(hd) + causal) v`` is projected
    back by ``Wo`` (H·hd, D).
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        layer_cache: tuple[jax.Array, jax.Array] | None = None,
        positions: Any = None,
    ) -> Any:
        """x (B, T, D) -> (B, T, D). With ``layer_cache`` (k, v) of shape (B, S, Hkv, hd) and ``positions``
        (B, T) the keys/values are written at those slots and ``(y, (k, v))`` is returned."""
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        bias = cfg.attn_bias
        q = _dense(cfg, cfg.n_heads * hd, "q_proj", bias)(x).reshape(b, t, cfg.n_heads, hd)
        k = _dense(cfg, cfg.n_kv_heads * hd, "k_proj", bias)(x).reshape(b, t, cfg.n_kv_heads, hd)
        v = _dense(cfg, cfg.n_kv_heads * hd, "v_proj", bias)(x).reshape(b, t, cfg.n_kv_heads, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if layer_cache is not None:
            k_all, v_all = write_cache(*layer_cache, k, v, positions)
            mask = cached_attention_mask(positions, k_all.shape[1])
            if cfg.sliding_window is not None:
                slots = jnp.arange(k_all.shape[1])[None, None, None, :]
                mask = mask & (slots > positions[:, None, :, None] - cfg.sliding_window)
            out = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask=mask)
            return _dense(cfg, cfg.d_model, "o_proj")(out.reshape(b, t, cfg.n_heads * hd)), (k_all, v_all)
        # jax.nn.dot_product_attention handles GQA (Hkv | H) and the causal mask, and can dispatch to a fused
        # kernel on GPU; softmax is computed in float32 internally for low-precision inputs.
        if cfg.sliding_window is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            # Key j is visible to query i iff i - W < j <= i (the query itself counts in the window).
            window = (cfg.sliding_window - 1, 0)
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window)
        return _dense(cfg, cfg.d_model, "o_proj")(out.reshape(b, t, cfg.n_heads * hd))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(x W_gate) ⊙ (x W_up))`` with ``W_gate, W_up`` (D, F) and ``W_down`` (F, D)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        gate = _dense(cfg, cfg.d_ff, "gate_proj")(x)
        up = _dense(cfg, cfg.d_ff, "up_proj")(x)
        return _dense(cfg, cfg.d_model, "down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """Pre-norm block: ``h = x + Attn(RMSNorm(x))``; ``out = h + MLP(RMSNorm(h))``. Shapes ``(B, T, D)``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, layer_cache: tuple[jax.Array, jax.Array] | None = None, positions: Any = None
    ) -> Any:
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        if layer_cache is not None:
            # Cached decoding: rows sit at their own positions (B, T), so the rotary tables are per row.
            cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
            a, new_cache = Attention(cfg, name="attn")(norm("attn_norm")(x), cos, sin, layer_cache, positions)
            h = x + a
            return h + MLP(cfg, name="mlp")(norm("mlp_norm")(h)), new_cache
        cos, sin = rope_tables(jnp.arange(x.shape[1]), cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
        h = x + Attention(cfg, name="attn")(norm("attn_norm")(x), cos, sin)
        return h + MLP(cfg, name="mlp")(norm("mlp_norm")(h))


class Llama(nn.Module):
    """LLaMA-style decoder-only language model (see the module docstring for the contract).

    ``tokens`` (B, T) int32 -> logits (B, T, V) float32; ``return_hidden=True`` also returns the tuple of the
    embedding output and the ``n_layers`` block outputs, ``n_layers + 1`` arrays (B, T, D).
    ``logits = RMSNorm(h_L) Eᵀ`` when embeddings are tied.
    With ``cache`` (a :class:`~ast_jax.models.gpt2.KVCache`): the tokens sit at positions
    ``cache.pos[b] + t``; returns ``(logits (B, T, V), new_cache)`` with their keys/values written and
    ``pos`` advanced by ``T``.

    """

    cfg: LlamaConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(cfg.init_std),
        )
        block_cls = nn.remat(LlamaBlock) if cfg.remat else LlamaBlock
        # A list attribute in setup names the children layers_0 ... layers_{L-1}: the contract's path prefix.
        self.layers = [block_cls(cfg) for _ in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=nn.initializers.normal(cfg.init_std),
            )

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings ``(B, T, D)`` in the computation dtype."""
        return self.embed(tokens)

    def head(self, h: jax.Array) -> jax.Array:
        """Final norm and LM head: ``(B, T, D)`` -> float32 logits ``(B, T, V)``."""
        h = self.final_norm(h)
        logits = self.embed.attend(h) if self.cfg.tie_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, return_hidden: bool = False, cache: KVCache | None = None) -> Any:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, T), got {tokens.shape}")
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds LlamaConfig.max_len={self.cfg.max_len}"
            )
        if cache is not None:
            if return_hidden:
                raise ValueError("return_hidden is not supported together with a KV cache")
            positions = cache.pos[:, None] + jnp.arange(tokens.shape[1])[None]  # (B, T) per-row positions
            h = self.embed_tokens(tokens)
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                h, (k, v) = layer(h, (cache.k[i], cache.v[i]), positions)
                ks.append(k)
                vs.append(v)
            return self.head(h), KVCache(tuple(ks), tuple(vs), cache.pos + tokens.shape[1])
        h = self.embed_tokens(tokens)
        hidden = [h]
        for layer in self.layers:
            h = layer(h)
            hidden.append(h)
        logits = self.head(h)
        return (logits, tuple(hidden)) if return_hidden else logits
