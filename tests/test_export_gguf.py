"""GGUF export (issue 14): a tiny 2:4-pruned LLaMA written by ``save_gguf`` and read back by our loader
(``load_llama_gguf``, ``tokenizer_from_gguf``) and by ``gguf.GGUFReader``; expected values from NumPy."""

from __future__ import annotations

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ast_jax.tokenizer as tokenizer_module
from ast_jax.data import builtin_corpus
from ast_jax.export_gguf import save_gguf
from ast_jax.models.gpt2 import GPT2Config
from ast_jax.models.llama import Llama, LlamaConfig
from ast_jax.models.loading import llama_config_from_gguf, load_llama_gguf
from ast_jax.oneshot import magnitude_prune
from ast_jax.sparsify import default_sparse_filter, is_strict_nm, key_path
from ast_jax.tokenizer import encode, tokenizer_from_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _pruned(cfg: LlamaConfig, seed: int = 1):
    params = Llama(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]

    def prune(path, leaf):
        return magnitude_prune(leaf, 2, 4)[0] if default_sparse_filter(key_path(path), leaf) else leaf

    # exercise the -0.0 handling: every pruned weight arrives as a negative zero
    params = jax.tree_util.tree_map_with_path(prune, params)
    return jax.tree_util.tree_map(lambda x: jnp.where(x == 0, -0.0, x), params)


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    return {key_path(p): np.asarray(x, np.float32) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([builtin_corpus(max_bytes=20_000)], trainer)
    return tok


@pytest.mark.parametrize("tie", [True, False])
def test_f32_export_reads_back_exactly(tmp_path, tie):
    cfg = LlamaConfig.tiny(tie_embeddings=tie, rope_base=500.0, norm_eps=1e-6)
    params = _pruned(cfg)
    path = save_gguf(tmp_path / "m.gguf", cfg, params, gguf_type="f32")
    cfg2, loaded = load_llama_gguf(path)
    assert cfg2 == cfg
    want, got = _flat(params), _flat(loaded)
    assert want.keys() == got.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg="/".join(p))
    assert is_strict_nm(loaded, 2, 4)
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is (not tie)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.rope.dimension_count"].contents() == cfg.head_dim
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = np.asarray(t.data, np.float32)
        assert not np.signbit(data[data == 0]).any(), t.name
    # the same logits through the loaded params (Q/K permutation undone correctly)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    a = np.asarray(Llama(cfg).apply({"params": params}, tokens))
    b = np.asarray(Llama(cfg2).apply({"params": loaded}, tokens))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_f16_and_q8_0_exports_are_within_their_rounding(tmp_path):
    cfg = LlamaConfig.tiny(tie_embeddings=False)
    params = _pruned(cfg)
    want = _flat(params)

    f16 = tmp_path / "m16.gguf"
    save_gguf(f16, cfg, params, gguf_type="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(f16)).tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    got = _flat(load_llama_gguf(f16)[1])
    for p, w in want.items():
        expected = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[p], expected, err_msg="/".join(p))

    q8 = tmp_path / "m8.gguf"
    save_gguf(q8, cfg, params, gguf_type="q8_0")
    reader = gguf.GGUFReader(str(q8))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    loaded = load_llama_gguf(q8)[1]
    got = _flat(loaded)
    for p, w in want.items():
        if w.ndim == 1:
            np.testing.assert_array_equal(got[p], w)
            continue
        # GGUF rows are the output units; a Q8_0 block is 32 consecutive inputs of one row: here the kernel
        # (in, out) for the linear layers, the embedding row (V, D) for token_embd
        blocks = w if p[0] == "embed" else w.T
        g = got[p] if p[0] == "embed" else got[p].T
        bound = np.repeat(np.abs(blocks.reshape(blocks.shape[0], -1, 32)).max(-1) / 127, 32, axis=1)
        assert np.all(np.abs(g - blocks) <= bound * 1.001 + 1e-12), "/".join(p)
        assert np.all(g[blocks == 0] == 0), "/".join(p)
    assert is_strict_nm(loaded, 2, 4)


def test_byte_level_tokenizer_round_trips(tmp_path, byte_level_tokenizer):
    tok = byte_level_tokenizer
    cfg = LlamaConfig.tiny(vocab_size=416, n_layers=1)  # more rows than tokens: padded vocabulary
    path = save_gguf(tmp_path / "tok.gguf", cfg, _pruned(cfg), tokenizer=tok, name="tiny test")
    reader = gguf.GGUFReader(str(path))
    field = lambda k: reader.fields[k].contents()
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "smollm"
    assert field("general.name") == "tiny test"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == cfg.vocab_size == llama_config_from_gguf(reader).vocab_size
    vocab = tok.get_vocab()
    assert all(tokens[i] == s for s, i in vocab.items())
    assert [types[vocab[s]] for s in SPECIALS] == [3, 3, 3]
    assert types[vocab["a"]] == 1 and types[-1] == 5
    assert field("tokenizer.ggml.bos_token_id") == vocab["<|endoftext|>"]
    assert field("tokenizer.ggml.add_bos_token") is False
    rebuilt = tokenizer_from_gguf(reader)
    text = builtin_corpus(max_bytes=3_000)[1000:2500] + " in 2024, <|im_start|>user\n x=12345 <|im_end|>"
    np.testing.assert_array_equal(encode(rebuilt, text), encode(tok, text))
    assert len(encode(tok, text)) > 100


def test_merge_less_byte_tokenizer_round_trips(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    cfg = LlamaConfig.tiny(vocab_size=256, n_layers=1)
    path = save_gguf(tmp_path / "bytes.gguf", cfg, _pruned(cfg), tokenizer=tok)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.tokens"].contents() == sorted(alphabet)
    assert "tokenizer.ggml.merges" not in reader.fields  # gguf cannot write an empty array


def test_sentencepiece_style_tokenizer_metadata(tmp_path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    pieces = (
        ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "t", "h", "e", "th", "▁th"]
    )
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=[("t", "h"), ("▁", "th")], unk_token="<unk>", byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in ("<unk>", "<s>", "</s>")])
    cfg = LlamaConfig.tiny(vocab_size=len(pieces), n_layers=1)
    path = save_gguf(tmp_path / "spm.gguf", cfg, _pruned(cfg), tokenizer=tok)
    reader = gguf.GGUFReader(str(path))
    field = lambda k: reader.fields[k].contents()
    assert field("tokenizer.ggml.model") == "llama"
    types = field("tokenizer.ggml.token_type")
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and types[259:] == [1] * 6
    scores = field("tokenizer.ggml.scores")
    assert scores[vocab["th"]] > scores[vocab["▁th"]]  # earlier merge, higher priority
    assert field("tokenizer.ggml.add_space_prefix") is True
    assert field("tokenizer.ggml.bos_token_id") == 1 and field("tokenizer.ggml.eos_token_id") == 2
    assert field("tokenizer.ggml.add_bos_token") is True
    assert "tokenizer.ggml.merges" not in reader.fields
    if hasattr(tokenizer_module, "spm_tokenizer_from_metadata"):  # the SentencePiece reader, where present
        rebuilt = tokenizer_from_gguf(reader)
        for text in ("the th", "thé the", "h t"):
            assert rebuilt.encode(text, add_special_tokens=False).ids == tok.encode(text).ids, text


def test_refusals(tmp_path):
    cfg = LlamaConfig.tiny()
    params = _pruned(cfg)
    with pytest.raises(ValueError, match="'q4_k'"):
        save_gguf(tmp_path / "a.gguf", cfg, params, gguf_type="q4_k")
    gcfg = GPT2Config(vocab_size=64, max_len=16, n_layer=1, n_head=2, d_model=32)
    with pytest.raises(ValueError, match="llama architecture only"):
        save_gguf(tmp_path / "b.gguf", gcfg, {})

    @dataclasses.dataclass(frozen=True)
    class Biased(LlamaConfig):  # LlamaConfig gains attn_bias in issue 14; this works with and without it
        attn_bias: bool = True

    with pytest.raises(ValueError, match="Qwen2"):
        save_gguf(tmp_path / "c.gguf", Biased(**{**dataclasses.asdict(cfg), "attn_bias": True}), params)
    with pytest.raises(ValueError, match="SLoRB"):
        save_gguf(tmp_path / "d.gguf", cfg, {"model": params, "slorb": {}})
    with pytest.raises(ValueError, match="tokenizer has"):
        from tokenizers import Tokenizer, models

        big = Tokenizer(models.BPE(vocab={f"t{i}": i for i in range(cfg.vocab_size + 1)}, merges=[]))
        save_gguf(tmp_path / "e.gguf", cfg, params, tokenizer=big)
