"""Checkpoint loading: tiny GGUF files and tiny Hugging Face GPT-2 safetensors written by the tests
themselves, the GGUF Q/K permutation against llama.cpp's adjacent-pair RoPE, the GGUF BPE tokenizer."""

from __future__ import annotations

import functools
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ast_jax.models.gpt2 import GPT2
from ast_jax.models.llama import Llama, LlamaConfig
from ast_jax.models.loading import (
    CheckpointMismatchError,
    llama_config_from_gguf,
    load_gpt2_safetensors,
    load_llama_gguf,
    unpermute_qk,
)
from ast_jax.tokenizer import encode, tokenizer_from_gguf, tokenizer_from_metadata

CFG = LlamaConfig.tiny(
    vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, rope_base=300.0
)


def _to_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter, by index: HF row h·hd + j·hd/2 + i is stored at GGUF row h·hd + 2i + j."""
    rows = w.shape[0]
    hd = rows // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for j in range(2):
            for i in range(hd // 2):
                out[h * hd + 2 * i + j] = w[h * hd + j * hd // 2 + i]
    return out


def _hf_weights(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face / GGUF ``(out, in)`` layout, keyed by GGUF tensor name."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    r = lambda *s: rng.normal(scale=0.2, size=s).astype(np.float32)
    w = {"token_embd.weight": r(cfg.vocab_size, d), "output_norm.weight": 1 + r(d)}
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        w |= {
            b + "attn_norm.weight": 1 + r(d),
            b + "ffn_norm.weight": 1 + r(d),
            b + "attn_q.weight": r(cfg.n_heads * hd, d),
            b + "attn_k.weight": r(cfg.n_kv_heads * hd, d),
            b + "attn_v.weight": r(cfg.n_kv_heads * hd, d),
            b + "attn_output.weight": r(d, cfg.n_heads * hd),
            b + "ffn_gate.weight": r(f, d),
            b + "ffn_up.weight": r(f, d),
            b + "ffn_down.weight": r(d, f),
        }
    return w


def _write_gguf(
    path, cfg: LlamaConfig, hf: dict[str, np.ndarray], *, quant: tuple[str, ...] = (), tokenizer=None
):
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (
        ("llama.block_count", cfg.n_layers),
        ("llama.embedding_length", cfg.d_model),
        ("llama.feed_forward_length", cfg.d_ff),
        ("llama.attention.head_count", cfg.n_heads),
        ("llama.attention.head_count_kv", cfg.n_kv_heads),
        ("llama.context_length", cfg.max_len),
        ("llama.vocab_size", cfg.vocab_size),
    ):
        writer.add_uint32(key, value)
    writer.add_float32("llama.rope.freq_base", cfg.rope_base)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    if tokenizer is not None:
        tokens, merges, types, pre = tokenizer
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", pre)
        writer.add_array("tokenizer.ggml.tokens", tokens)
        writer.add_array("tokenizer.ggml.merges", merges)
        writer.add_array("tokenizer.ggml.token_type", types)
    for name, value in hf.items():
        if name.endswith("attn_q.weight"):
            value = _to_gguf_rows(value, cfg.n_heads)
        elif name.endswith("attn_k.weight"):
            value = _to_gguf_rows(value, cfg.n_kv_heads)
        if name in quant:
            writer.add_tensor(
                name,
                gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_permutation_matches_llama_cpp_adjacent_pair_rope():
    # llama.cpp rotates adjacent pairs (2i, 2i+1) by frequency i; HF rotates (i, i + hd/2). With the GGUF row
    # order, adjacent-pair RoPE must give the same q·k scores as rotate-half RoPE on the HF rows.
    rng = np.random.default_rng(1)
    n_heads, hd, d, base = 2, 8, 6, 100.0
    wq, wk = rng.normal(size=(n_heads * hd, d)), rng.normal(size=(n_heads * hd, d))
    x = rng.normal(size=(5, d))
    ang = np.arange(5)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]  # (T, 1, hd/2)

    def rope_half(v):
        a, b = v[..., : hd // 2], v[..., hd // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    def rope_adjacent(v):
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out

    heads = lambda w: (x @ w.T).reshape(5, n_heads, hd)
    s_hf = np.einsum("qhd,khd->hqk", rope_half(heads(wq)), rope_half(heads(wk)))
    gq, gk = _to_gguf_rows(wq, n_heads), _to_gguf_rows(wk, n_heads)
    s_cpp = np.einsum("qhd,khd->hqk", rope_adjacent(heads(gq)), rope_adjacent(heads(gk)))
    np.testing.assert_allclose(s_cpp, s_hf, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(unpermute_qk(gq, n_heads), wq)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    hf = _hf_weights(CFG)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_gguf(path, CFG, hf, quant=("blk.1.ffn_up.weight",))
    return path, hf


def test_load_tiny_gguf_into_llama(tiny_gguf):
    path, hf = tiny_gguf
    cfg = llama_config_from_gguf(path)
    assert cfg == CFG

    cfg, params = load_llama_gguf(path)
    lay = params["layers_0"]
    np.testing.assert_array_equal(np.asarray(lay["attn"]["q_proj"]["kernel"]), hf["blk.0.attn_q.weight"].T)
    np.testing.assert_array_equal(np.asarray(lay["attn"]["k_proj"]["kernel"]), hf["blk.0.attn_k.weight"].T)
    np.testing.assert_array_equal(
        np.asarray(lay["mlp"]["down_proj"]["kernel"]), hf["blk.0.ffn_down.weight"].T
    )
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), hf["token_embd.weight"])
    np.testing.assert_array_equal(np.asarray(lay["attn_norm"]["scale"]), hf["blk.0.attn_norm.weight"])
    q8 = np.asarray(params["layers_1"]["mlp"]["up_proj"]["kernel"])  # stored as Q8_0: 8-bit blocks of 32
    np.testing.assert_allclose(
        q8, hf["blk.1.ffn_up.weight"].T, atol=0.01 * np.abs(hf["blk.1.ffn_up.weight"]).max()
    )
    assert not np.array_equal(q8, hf["blk.1.ffn_up.weight"].T)
    # bfloat16 params on request
    _, p16 = load_llama_gguf(path, dtype=jnp.bfloat16)
    assert p16["layers_0"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    # the loaded tree is exactly the tree Llama.init builds
    ref = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(params)


def test_gguf_mismatches_are_named(tmp_path):
    hf = _hf_weights(CFG)
    del hf["blk.1.ffn_down.weight"]
    hf["blk.0.attn_v.weight"] = hf["blk.0.attn_v.weight"][:8]
    hf["blk.0.extra.weight"] = np.zeros(4, np.float32)
    path = tmp_path / "bad.gguf"
    _write_gguf(path, CFG, hf)
    with pytest.raises(CheckpointMismatchError) as err:
        load_llama_gguf(path)
    msg = str(err.value)
    assert "blk.1.ffn_down.weight" in msg and "blk.0.extra.weight" in msg
    assert "shape mismatch for blk.0.attn_v.weight: expected (16, 32), found (8, 32)" in msg
    assert err.value.report.missing == ("blk.1.ffn_down.weight",)
    with pytest.raises(ValueError, match="not found"):
        load_llama_gguf(tmp_path / "absent.gguf")


# --------------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes map to themselves, the rest to 256, 257..."""

    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _tiny_vocab():
    alphabet = _byte_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "Ġthe m", "2 0", "Ġ 2"]
    tokens = ["<|endoftext|>", "<|im_start|>", *alphabet]
    for mg in merges:
        tokens.append(mg.replace(" ", ""))
    types = [3, 3] + [1] * (len(tokens) - 2)
    return tokens, merges, types


def test_tokenizer_rebuilt_from_metadata():
    tokens, merges, types = _tiny_vocab()
    tok = tokenizer_from_metadata(tokens, merges, types, pre="smollm")
    text = "the theme 2024<|im_start|>é!"
    ids = encode(tok, text)
    pieces = [tokens[i] for i in ids]
    # 'the' at the start has no space: t, he; ' theme' is one merged token; digits are split one by one
    # (smollm pre-tokenizer) so the '2 0' merge never applies; the special token is matched whole;
    # 'é' is two bytes, two byte-level symbols
    assert pieces == ["t", "he", "Ġthem", "e", "Ġ", "2", "0", "2", "4", "<|im_start|>", "Ã", "©", "!"]
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == text
    # the plain GPT-2 pre-tokenizer keeps digit runs together, so the merges apply
    gpt2 = tokenizer_from_metadata(tokens, merges, types, pre="gpt2")
    assert [tokens[i] for i in encode(gpt2, " 2024")] == ["Ġ", "20", "2", "4"]  # rank('2 0') < rank('Ġ 2')
    with pytest.raises(ValueError, match="pre-tokenizer 'llama-bpe'"):
        tokenizer_from_metadata(tokens, merges, types, pre="llama-bpe")


def test_tokenizer_from_gguf_file(tmp_path):
    tokens, merges, types = _tiny_vocab()
    cfg = LlamaConfig.tiny(vocab_size=len(tokens), n_layers=1)
    path = tmp_path / "tok.gguf"
    _write_gguf(path, cfg, _hf_weights(cfg), tokenizer=(tokens, merges, types, "smollm"))
    tok = tokenizer_from_gguf(path)
    assert [tokens[i] for i in encode(tok, " theme")] == ["Ġthem", "e"]


# --------------------------------------------------------------------------------------------------------
# GPT-2 safetensors
# --------------------------------------------------------------------------------------------------------

HF_GPT2 = {
    "vocab_size": 30,
    "n_positions": 16,
    "n_embd": 16,
    "n_layer": 2,
    "n_head": 2,
    "n_inner": None,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "tie_word_embeddings": True,
}


def _gpt2_tensors(cfg: dict, prefix: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, v, p = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    r = lambda *s: rng.normal(scale=0.3, size=s).astype(np.float32)
    t = {
        prefix + "wte.weight": r(v, d),
        prefix + "wpe.weight": r(p, d),
        prefix + "ln_f.weight": 1 + r(d),
        prefix + "ln_f.bias": r(d),
    }
    for i in range(cfg["n_layer"]):
        h = f"{prefix}h.{i}."
        t |= {
            h + "ln_1.weight": 1 + r(d),
            h + "ln_1.bias": r(d),
            h + "ln_2.weight": 1 + r(d),
            h + "ln_2.bias": r(d),
            h + "attn.c_attn.weight": r(d, 3 * d),
            h + "attn.c_attn.bias": r(3 * d),
            h + "attn.c_proj.weight": r(d, d),
            h + "attn.c_proj.bias": r(d),
            h + "mlp.c_fc.weight": r(d, 4 * d),
            h + "mlp.c_fc.bias": r(4 * d),
            h + "mlp.c_proj.weight": r(4 * d, d),
            h + "mlp.c_proj.bias": r(d),
            h + "attn.bias": np.tril(np.ones((1, 1, p, p), np.float32)),
        }  # old checkpoints' mask buffer
    return t


def _np_gpt2(t: dict[str, np.ndarray], tokens: np.ndarray, cfg: dict, prefix: str) -> np.ndarray:
    """GPT-2 forward in NumPy on Hugging Face tensors (Conv1D: y = x W + b with W (in, out))."""
    d, nh = cfg["n_embd"], cfg["n_head"]
    hd, T = d // nh, tokens.shape[1]
    g = lambda k: t[prefix + k].astype(np.float64)

    def ln(x, k):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg["layer_norm_epsilon"]) * g(k + ".weight") + g(k + ".bias")

    x = g("wte.weight")[tokens] + g("wpe.weight")[:T][None]
    for i in range(cfg["n_layer"]):
        h = f"h.{i}."
        qkv = ln(x, h + "ln_1") @ g(h + "attn.c_attn.weight") + g(h + "attn.c_attn.bias")
        q, k, v = (qkv[..., j * d : (j + 1) * d].reshape(*tokens.shape, nh, hd) for j in range(3))
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(*tokens.shape, d)
        x = x + o @ g(h + "attn.c_proj.weight") + g(h + "attn.c_proj.bias")
        a = ln(x, h + "ln_2") @ g(h + "mlp.c_fc.weight") + g(h + "mlp.c_fc.bias")
        a = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))  # gelu_new
        x = x + a @ g(h + "mlp.c_proj.weight") + g(h + "mlp.c_proj.bias")
    return ln(x, "ln_f") @ g("wte.weight").T


@functools.cache
def _gpt2_apply(cfg):  # one compilation shared by the parametrised cases
    return jax.jit(lambda p, x: GPT2(cfg).apply({"params": p}, x))


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_gpt2_safetensors_logits_match_numpy(tmp_path, prefix):
    tensors = _gpt2_tensors(HF_GPT2, prefix)
    if prefix:  # GPT2LMHeadModel checkpoints may carry the tied head explicitly
        tensors["lm_head.weight"] = tensors[prefix + "wte.weight"].copy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(HF_GPT2))
    cfg, params = load_gpt2_safetensors(tmp_path)
    assert (cfg.d_model, cfg.n_layer, cfg.max_len, cfg.vocab_size) == (16, 2, 16, 30)
    tokens = np.random.default_rng(5).integers(0, 30, size=(2, 11))
    logits = _gpt2_apply(cfg)(params, tokens)
    np.testing.assert_allclose(
        np.asarray(logits), _np_gpt2(tensors, tokens, HF_GPT2, prefix), rtol=1e-4, atol=1e-4
    )


def test_gpt2_mismatches_are_named(tmp_path):
    tensors = _gpt2_tensors(HF_GPT2, "transformer.")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((16, 8), np.float32)
    tensors["transformer.h.0.adapter.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(HF_GPT2))
    with pytest.raises(CheckpointMismatchError) as err:
        load_gpt2_safetensors(tmp_path)
    rep = err.value.report
    assert rep.missing == ("transformer.h.1.mlp.c_fc.bias",)
    assert rep.unexpected == ("transformer.h.0.adapter.weight",)
    assert rep.mismatched == (("transformer.h.0.attn.c_proj.weight", (16, 16), (16, 8)),)
    (tmp_path / "config.json").write_text(json.dumps({**HF_GPT2, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        load_gpt2_safetensors(tmp_path)
