"""LLaMA-style decoder: NumPy reference forward, RoPE laws, grouped-query attention, causality, contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.models.llama import Llama, LlamaConfig, apply_rope, rope_tables
from ast_jax.sparsify import default_sparse_filter, sparse_paths

CFG = LlamaConfig.tiny(
    vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, rope_base=500.0
)


def _np_forward(p: dict, tokens: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Float64 NumPy LLaMA forward written from the equations (rotate-half RoPE, GQA by repeating K/V)."""
    hd, h_q, h_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    t = tokens.shape[1]
    g = lambda x: np.asarray(x, np.float64)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.norm_eps) * g(scale)

    inv = cfg.rope_base ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # (B, T, H, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        c, s = cos[None, :, None], sin[None, :, None]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    x = g(p["embed"]["embedding"])[tokens]
    for i in range(cfg.n_layers):
        lp = p[f"layers_{i}"]
        a = rms(x, lp["attn_norm"]["scale"])
        b = tokens.shape[0]
        q = rope((a @ g(lp["attn"]["q_proj"]["kernel"])).reshape(b, t, h_q, hd))
        k = rope((a @ g(lp["attn"]["k_proj"]["kernel"])).reshape(b, t, h_kv, hd))
        v = (a @ g(lp["attn"]["v_proj"]["kernel"])).reshape(b, t, h_kv, hd)
        rep = h_q // h_kv
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(b, t, h_q * hd)
        x = x + o @ g(lp["attn"]["o_proj"]["kernel"])
        m = rms(x, lp["mlp_norm"]["scale"])
        gate = m @ g(lp["mlp"]["gate_proj"]["kernel"])
        up = m @ g(lp["mlp"]["up_proj"]["kernel"])
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g(lp["mlp"]["down_proj"]["kernel"])
    x = rms(x, p["final_norm"]["scale"])
    return x @ g(p["embed"]["embedding"]).T


@pytest.fixture(scope="module")
def model_and_params():
    model = Llama(CFG)
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, size=(2, 12)).astype(np.int32)

    @jax.jit  # one compilation for init and perturbation (eager ops each compile on their own)
    def init(tokens):
        params = model.init(jax.random.key(0), tokens)["params"]
        # non-trivial norm scales so a wrong norm placement cannot hide
        return jax.tree_util.tree_map_with_path(
            lambda path, x: (
                x * (1.0 + 0.3 * jax.random.normal(jax.random.key(len(path)), x.shape))
                if path[-1].key == "scale"
                else x
            ),
            params,
        )

    params = init(tokens)

    apply = jax.jit(
        lambda p, t, hidden=False: model.apply({"params": p}, t, return_hidden=hidden), static_argnums=2
    )
    return model, params, np.asarray(tokens), apply


def test_logits_match_numpy_reference_and_contract(model_and_params):
    _, params, tokens, apply = model_and_params
    logits, hidden = apply(params, tokens, True)
    assert logits.shape == (2, 12, CFG.vocab_size) and logits.dtype == jnp.float32
    assert len(hidden) == CFG.n_layers + 1 and all(h.shape == (2, 12, CFG.d_model) for h in hidden)
    np.testing.assert_allclose(np.asarray(logits), _np_forward(params, tokens, CFG), rtol=2e-4, atol=2e-4)
    # the contract: every block linear layer is a 2-D (in, out) kernel selected by the default sparse filter
    paths = {"/".join(p) for p in sparse_paths(params, default_sparse_filter)}
    want = {
        f"layers_{i}/{mod}/{name}/kernel"
        for i in range(CFG.n_layers)
        for mod, names in (
            ("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for name in names
    }
    assert paths == want
    assert params["layers_0"]["attn"]["k_proj"]["kernel"].shape == (32, CFG.n_kv_heads * CFG.head_dim)


def test_causal_masking(model_and_params):
    _, params, tokens, apply = model_and_params
    changed = tokens.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % CFG.vocab_size
    a, b = np.asarray(apply(params, tokens)), np.asarray(apply(params, changed))
    np.testing.assert_array_equal(a[:, :7], b[:, :7])  # the past never sees the future
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads(model_and_params):
    _, params, tokens, apply = model_and_params
    mha_cfg = LlamaConfig(**{**CFG.__dict__, "n_kv_heads": CFG.n_heads})
    rep, hd = CFG.n_heads // CFG.n_kv_heads, CFG.head_dim

    def widen(kernel):  # (D, Hkv·hd) -> (D, H·hd): kv head j serves query heads j·rep .. j·rep+rep-1
        k = kernel.reshape(kernel.shape[0], CFG.n_kv_heads, hd)
        return jnp.repeat(k, rep, axis=1).reshape(kernel.shape[0], CFG.n_heads * hd)

    mha_params = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(CFG.n_layers):
        attn = dict(mha_params[f"layers_{i}"]["attn"])
        for name in ("k_proj", "v_proj"):
            attn[name] = {"kernel": widen(attn[name]["kernel"])}
        mha_params[f"layers_{i}"] = {**mha_params[f"layers_{i}"], "attn": attn}
    mha = jax.jit(lambda p, t: Llama(mha_cfg).apply({"params": p}, t))(mha_params, tokens)
    np.testing.assert_allclose(np.asarray(mha), np.asarray(apply(params, tokens)), rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    cos, sin = rope_tables(jnp.arange(40), 16, 1000.0)

    def score(pq, pk):
        rq = apply_rope(q, cos[pq : pq + 1], sin[pq : pq + 1])
        rk = apply_rope(k, cos[pk : pk + 1], sin[pk : pk + 1])
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(33, 30), rel=1e-4)
    assert score(9, 9) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)  # zero offset: plain dot product
    np.testing.assert_allclose(np.asarray(cos[3, 1]), np.cos(3 * 1000.0 ** (-2 / 16)), rtol=1e-6, atol=1e-7)


def test_remat_and_bfloat16(model_and_params):
    _, params, tokens, apply = model_and_params
    remat = Llama(LlamaConfig(**{**CFG.__dict__, "remat": True}))

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, tokens) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref = grad(params, Llama(CFG))
    g_remat = grad(params, remat)
    for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    bf_model = Llama(LlamaConfig(**{**CFG.__dict__, "dtype": jnp.bfloat16}))
    bf = jax.jit(lambda p, t: bf_model.apply({"params": p}, t))(params, tokens)
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf), np.asarray(apply(params, tokens)), atol=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_kv_heads": 3}, "n_kv_heads=3 must divide"),
        ({"d_model": 30}, "not a multiple of n_heads"),
        ({"d_model": 12, "n_heads": 4, "n_kv_heads": 2}, "head_dim=3 must be even"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.tiny(**kwargs)


def test_smollm2_preset_parameter_count():
    cfg = LlamaConfig.smollm2_135m()
    shapes = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == 134_515_008  # the tensor sizes of the SmolLM2-135M GGUF file, summed
    with pytest.raises(ValueError, match=r"exceeds LlamaConfig\.max_len"):
        Llama(LlamaConfig.tiny(max_len=4)).init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
