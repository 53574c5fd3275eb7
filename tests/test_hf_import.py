"""Hugging Face model directories into ast_jax (issue 14): ``ast_jax.models.from_pretrained`` and tokenizers.

Every reference comes from ``transformers`` / ``tokenizers`` themselves: tiny random models are built with
``transformers``, saved with ``save_pretrained`` (single file, sharded, bfloat16), and our logits are compared
with theirs on the same tokens; tokenizers are trained with ``tokenizers`` and our ids compared with
``AutoTokenizer``'s. The GGUF SentencePiece tokenizer is checked against the ``tokenizer.json`` built from the
same pieces and scores with ``transformers``' own SentencePiece merge derivation.
"""

import copy
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ast_jax.generate import generate  # noqa: E402
from ast_jax.models import from_pretrained  # noqa: E402
from ast_jax.models.llama import Llama  # noqa: E402
from ast_jax.models.loading import CheckpointMismatchError  # noqa: E402
from ast_jax.tokenizer import (  # noqa: E402
    TextTokenizer,
    encode,
    text_tokenizer_from_gguf,
    tokenizer_from_gguf,
    tokenizer_from_hf_dir,
)

VOCAB = 320
SEQ = 12
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ)).astype(np.int32)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
PARAGRAPH = (
    "Héllo wörld! Ça va? The naïve café serves crème brûlée.\n"
    "日本語のテキスト, 中文 and emoji 🎉🙂 — done.  Two  spaces, tabs\tand <s> literal."
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld, ça va très bien; the café is naïve",
    "crème brûlée and a quick brown fox, the end.",
    "models of language read the text and write the text",
    "two spaces, tabs and more words for the tokenizer to learn",
] * 20


def _randomize(model):
    """transformers initialises biases to 0 and norms to 1; random values make a mis-mapped tensor visible."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name or name.endswith("ln_1.weight") or "ln_" in name else 0.0
            p.copy_(base + 0.15 * torch.randn(p.shape, generator=gen))
    return model


def _hf_model(kind, **overrides):
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    kw = dict(SMALL, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    kw.update(overrides)
    torch.manual_seed(0)
    return _randomize(cls_model(cls_cfg(**kw)).eval())


def _gpt2(**overrides):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, **overrides
    )
    torch.manual_seed(0)
    return _randomize(transformers.GPT2LMHeadModel(cfg).eval())


def _hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _our_logits(path, tokens=TOKENS, **kw):
    model, params, tok, hf_config = from_pretrained(path, **kw)
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens))), model, params, tok, hf_config


CASES = {
    "llama-tied-linear-rope": lambda: _hf_model(
        "llama", tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
    "llama-untied-llama3-rope": lambda: _hf_model(
        "llama",
        tie_word_embeddings=False,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # wavelengths of head_dim 8 straddle 64/4 and 64/1: kept, blended and divided frequencies.
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral-window4-headdim16": lambda: _hf_model("mistral", sliding_window=4, head_dim=16),
    "qwen2-biases-untied": lambda: _hf_model("qwen2", tie_word_embeddings=False),
    "qwen2-biases-tied": lambda: _hf_model("qwen2", tie_word_embeddings=True),
    "gpt2-tied": lambda: _gpt2(),
    "gpt2-untied": lambda: _gpt2(tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = CASES[case]()
    hf.save_pretrained(tmp_path)
    ours, model, params, tok, hf_config = _our_logits(tmp_path)
    assert tok is None
    assert hf_config["architectures"] == [type(hf).__name__]
    assert "_generation_config" in hf_config
    ref = _hf_logits(hf)
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 0.5  # the comparison is not vacuous
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    if case.startswith("mistral"):
        assert model.cfg.sliding_window == 4 and model.cfg.head_dim == 16
    if case.startswith("qwen2"):
        assert "bias" in params["layers_0"]["attn"]["q_proj"]
        assert "bias" not in params["layers_0"]["attn"]["o_proj"]


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_sharded_checkpoint(kind, tmp_path):
    hf = _hf_model("qwen2", tie_word_embeddings=False) if kind == "qwen2" else _gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = _our_logits(tmp_path)[0]
    np.testing.assert_allclose(ours, _hf_logits(hf), rtol=0, atol=1e-4)


def test_bfloat16_checkpoint_loads_into_float32(tmp_path):
    hf = _hf_model("llama", tie_word_embeddings=False)
    # The reference runs the bf16-rounded weights in float32, as we do. Only the parameters are rounded:
    # Module.to(bfloat16) would also round the rotary inv_freq buffer, which the checkpoint does not store.
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    ours, _, params, _, _ = _our_logits(tmp_path)
    assert params["embed"]["embedding"].dtype == jnp.float32
    np.testing.assert_allclose(ours, _hf_logits(ref), rtol=0, atol=1e-4)
    _, _, params16, _, _ = _our_logits(tmp_path, param_dtype=jnp.bfloat16)
    assert params16["embed"]["embedding"].dtype == jnp.bfloat16


GENERATION_CASES = {
    # A window of 4 is shorter than prompt + generation, so the cached path's banded mask is exercised.
    "mistral-window4": lambda: _hf_model("mistral", sliding_window=4),
    # Biases and rescaled rotary tables at per-row positions in the cached path.
    "qwen2-llama3-rope": lambda: _hf_model(
        "qwen2",
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.mark.parametrize("case", sorted(GENERATION_CASES))
def test_cached_greedy_generation_matches_transformers(case, tmp_path):
    hf = GENERATION_CASES[case]()
    hf.save_pretrained(tmp_path)
    model, params, _, _ = from_pretrained(tmp_path)
    prompt = [int(t) for t in TOKENS[0, :5]]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, len(prompt) :].numpy()
    out = generate(model, params, [prompt], max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), ref)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def _write_config(path, **cfg):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_is_named(tmp_path):
    _write_config(tmp_path, architectures=["FalconForCausalLM"], model_type="falcon")
    with pytest.raises(ValueError, match=r"FalconForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        from_pretrained(tmp_path)


def test_unsupported_rope_scaling_is_named(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'yarn'.*'linear'.*'llama3'"):
        from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf_model("qwen2")
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointMismatchError, match=re.escape("model.layers.1.self_attn.k_proj.bias")
    ) as err:
        from_pretrained(tmp_path)
    assert err.value.report.missing == ("model.layers.1.self_attn.k_proj.bias",)


def test_missing_config_json(tmp_path):
    with pytest.raises(ValueError, match=re.escape("config.json")):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _spm_pieces():
    """Pieces, scores and GGUF types of a SentencePiece-style BPE vocabulary trained on CORPUS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    )
    trained = [
        p
        for p, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        if p not in ("<unk>", "<s>", "</s>")
    ]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + trained
    # Earlier-learned pieces score higher, as SentencePiece BPE's scores do.
    scores = [0.0] * 259 + [-float(k) for k in range(len(trained))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(trained)
    return pieces, scores, types


def _spm_tokenizer(pieces, scores, types):
    """The LLaMA-2 ``tokenizer.json`` layout, merges from transformers' SentencePiece conversion."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.tokenization_utils_base import generate_merges

    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, {p: s for p, s, t in zip(pieces, scores, types, strict=True) if t == 1})
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _save_tokenizer(tok, path, **tokenizer_config):
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config})
    )


def _hf_ids(path, text=PARAGRAPH):
    return transformers.AutoTokenizer.from_pretrained(str(path))(text)["input_ids"]


def test_byte_level_tokenizer_with_bos_from_post_processor(tmp_path):
    # Llama-3 style: no add_bos_token key; the tokenizer.json post-processor prepends <|begin_of_text|>.
    from tokenizers import processors

    tok = _byte_level_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    _save_tokenizer(tok, tmp_path, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    ours = tokenizer_from_hf_dir(tmp_path)
    ref = _hf_ids(tmp_path)
    assert ref[0] == 0 and ours.add_bos and ours.bos_id == 0 and ours.eos_id == 1
    np.testing.assert_array_equal(ours.encode(PARAGRAPH), ref)
    np.testing.assert_array_equal(ours.encode(PARAGRAPH, add_bos=False), ref[1:])
    np.testing.assert_array_equal(encode(ours, PARAGRAPH), ref[1:])
    assert ours.decode(ours.encode(PARAGRAPH, add_bos=False)) == PARAGRAPH
    assert ours.vocab_size == len(transformers.AutoTokenizer.from_pretrained(str(tmp_path)))


def test_byte_level_tokenizer_without_bos(tmp_path):
    # GPT-2 / SmolLM2 / Qwen2 style: no BOS is prepended.
    tok = _byte_level_tokenizer()
    _save_tokenizer(
        tok, tmp_path, bos_token="<|end_of_text|>", eos_token="<|end_of_text|>", add_bos_token=False
    )
    ours = tokenizer_from_hf_dir(tmp_path)
    assert not ours.add_bos
    np.testing.assert_array_equal(ours.encode(PARAGRAPH), _hf_ids(tmp_path))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    pieces, scores, types = _spm_pieces()
    path = tmp_path_factory.mktemp("spm")
    _save_tokenizer(
        _spm_tokenizer(pieces, scores, types),
        path,
        add_bos_token=True,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    return path, pieces, scores, types


def test_sentencepiece_tokenizer_json_matches_transformers(spm):
    path, pieces, _, _ = spm
    ours = tokenizer_from_hf_dir(path)
    ref = _hf_ids(path)
    assert ref[0] == 1 and ours.add_bos and ours.bos_id == 1 and ours.eos_id == 2
    assert any(pieces[i].startswith("<0x") for i in ref)  # CJK and emoji went through byte fallback
    np.testing.assert_array_equal(ours.encode(PARAGRAPH), ref)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.decode(ref[1:]) == hf_tok.decode(ref[1:])


def test_gguf_sentencepiece_tokenizer_matches_tokenizer_json(spm, tmp_path):
    import gguf

    path, pieces, scores, types = spm
    gguf_path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ref = _hf_ids(path)
    ours = text_tokenizer_from_gguf(gguf_path)
    assert isinstance(ours, TextTokenizer) and ours.add_bos and ours.bos_id == 1 and ours.eos_id == 2
    np.testing.assert_array_equal(ours.encode(PARAGRAPH), ref)
    raw = tokenizer_from_gguf(gguf_path)
    assert raw.encode(PARAGRAPH).ids == ref  # BOS through the post-processor, as in tokenizer.json
    np.testing.assert_array_equal(encode(raw, PARAGRAPH), ref[1:])
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert raw.decode(ref[1:], skip_special_tokens=False) == hf_tok.decode(ref[1:])


def test_from_pretrained_returns_the_tokenizer(spm, tmp_path):
    hf = _hf_model("llama", vocab_size=len(spm[1]))
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((spm[0] / name).read_bytes())
    model, params, tok, hf_config = from_pretrained(tmp_path)
    assert isinstance(model, Llama) and isinstance(tok, TextTokenizer)
    assert hf_config["_generation_config"].get("bos_token_id") == 1
    ids = tok.encode("the quick brown fox")
    np.testing.assert_array_equal(ids, _hf_ids(tmp_path, "the quick brown fox"))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)[None]))
    np.testing.assert_allclose(ours, _hf_logits(hf, ids[None]), rtol=0, atol=1e-4)
