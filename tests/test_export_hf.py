"""Hugging Face export (issue 14): tiny 2:4-pruned LLaMA and GPT-2 models written by ``save_hf`` /
``save_compressed_tensors`` and read back by transformers and compressed-tensors themselves."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from ast_jax.export_ct import dequantize_compressed_tensors, save_compressed_tensors  # noqa: E402
from ast_jax.export_hf import SPARSITY_KEY, check_nm_torch_layout, save_hf  # noqa: E402
from ast_jax.models.gpt2 import GPT2, GPT2Config  # noqa: E402
from ast_jax.models.llama import Llama, LlamaConfig  # noqa: E402
from ast_jax.oneshot import magnitude_prune  # noqa: E402
from ast_jax.sparsify import default_sparse_filter, key_path  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 64, size=(2, 11))


def _pruned(model, seed: int = 1):
    params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]

    def prune(path, leaf):
        return magnitude_prune(leaf, 2, 4)[0] if default_sparse_filter(key_path(path), leaf) else leaf

    return jax.tree_util.tree_map_with_path(prune, params)


def _load(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model.eval()


def _logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(TOKENS)).logits.float().numpy()


def _strict_24(w: np.ndarray, conv1d: bool = False) -> bool:
    """At most 2 non-zeros in every 4 consecutive inputs: the last axis of (out, in), the first of Conv1D."""
    w = w.T if conv1d else w
    out_f, in_f = w.shape
    for o in range(out_f):
        for g in range(0, in_f, 4):
            if np.count_nonzero(w[o, g : g + 4]) > 2:
                return False
    return True


LLAMA_LINEARS = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


def _llama_sparse_names(cfg) -> list[str]:
    return [f"model.layers.{i}.{m}.weight" for i in range(cfg.n_layers) for m in LLAMA_LINEARS]


@pytest.mark.parametrize("tie", [True, False])
def test_llama_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, tie):
    cfg = LlamaConfig.tiny(tie_embeddings=tie)
    model = Llama(cfg)
    params = _pruned(model)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS, jnp.int32)))
    out = save_hf(tmp_path / "m", cfg, params, dtype="float32", sparsity={"n": 2, "m": 4})
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"]
    assert conf[SPARSITY_KEY]["structure"] == "2:4" and conf[SPARSITY_KEY]["format"] == "dense-with-zeros"
    assert sorted(conf[SPARSITY_KEY]["targets"]) == sorted(_llama_sparse_names(cfg))
    hf = _load(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    np.testing.assert_allclose(_logits(hf), ours, rtol=0, atol=1e-4)
    sd = hf.state_dict()
    if not tie:
        np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), np.asarray(params["lm_head"]["kernel"]).T)
    for name in _llama_sparse_names(cfg):
        assert _strict_24(sd[name].numpy()), name
    # the helper agrees with the loop on the loaded tensors, and rejects a dense one
    assert all(check_nm_torch_layout(sd, 2, 4, _llama_sparse_names(cfg)).values())
    assert check_nm_torch_layout(sd, 2, 4, ["model.embed_tokens.weight"]) == {
        "model.embed_tokens.weight": False
    }


def test_bf16_export_keeps_every_pruned_weight_positive_zero(tmp_path):
    from safetensors import safe_open

    cfg = LlamaConfig.tiny()
    params = _pruned(Llama(cfg))
    # flip the sign of every zero: -0.0 must still be written as +0.0
    params = jax.tree_util.tree_map(lambda x: jnp.where(x == 0, -0.0, x), params)
    out = save_hf(tmp_path / "bf16", cfg, params, sparsity={"n": 2, "m": 4})
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    n_zero = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16
            w = t.float().numpy()
            zero = w == 0
            n_zero += int(zero.sum())
            assert not np.signbit(w[zero]).any(), name
            if name in _llama_sparse_names(cfg):
                assert _strict_24(w), name
    assert (
        n_zero >= sum(np.asarray(x).size // 2 for x in jax.tree_util.tree_leaves(params) if x.ndim == 2) // 2
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_sharded_export_loads_and_the_claimed_pattern_is_checked(tmp_path):
    cfg = LlamaConfig.tiny(tie_embeddings=False)
    model = Llama(cfg)
    params = _pruned(model)
    out = save_hf(tmp_path / "sh", cfg, params, dtype="float32", max_shard_bytes=10_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS, jnp.int32)))
    np.testing.assert_allclose(_logits(_load(out)), ours, rtol=0, atol=1e-4)
    # re-export unsharded into the same directory: the stale shards and index go away
    save_hf(out, cfg, params, dtype="float32")
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("*.safetensors"))) == 1
    # a dense model claimed as 2:4 is refused before anything is written
    dense = model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="not 2:4"):
        save_hf(tmp_path / "dense", cfg, dense, sparsity={"n": 2, "m": 4})
    assert not (tmp_path / "dense").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, tie):
    cfg = GPT2Config(vocab_size=64, max_len=16, n_layer=2, n_head=2, d_model=32, tie_embeddings=tie)
    model = GPT2(cfg)
    params = _pruned(model)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS, jnp.int32)))
    out = save_hf(tmp_path / "g", cfg, params, dtype="float32", sparsity={"n": 2, "m": 4})
    hf = _load(out)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    np.testing.assert_allclose(_logits(hf), ours, rtol=0, atol=1e-4)
    sd = hf.state_dict()
    names = [
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")
    ]
    names += [f"transformer.h.{i}.mlp.c_proj.weight" for i in range(2)]
    for name in names:
        assert _strict_24(sd[name].numpy(), conv1d=True), name
    assert all(check_nm_torch_layout(out, 2, 4, names).values())


def test_hf_config_is_kept_and_slorb_params_are_refused(tmp_path):
    cfg = LlamaConfig.tiny()
    params = _pruned(Llama(cfg))
    source = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "sliding_window": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    out = save_hf(
        tmp_path / "mistral", cfg, params, hf_config=source, dtype="float32", generation_config={"top_k": 5}
    )
    hf = _load(out)
    assert type(hf).__name__ == "MistralForCausalLM"
    ours = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS, jnp.int32)))
    np.testing.assert_allclose(_logits(hf), ours, rtol=0, atol=1e-4)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["top_k"] == 5 and gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    with pytest.raises(ValueError, match="disagrees"):
        save_hf(tmp_path / "bad", cfg, params, hf_config={**source, "hidden_size": 64})
    with pytest.raises(ValueError, match="SLoRB"):
        save_hf(tmp_path / "slorb", cfg, {"model": params, "slorb": {}})
    with pytest.raises(ValueError, match="unexpected"):
        save_hf(tmp_path / "extra", cfg, {**params, "extra": {"kernel": jnp.zeros((4, 4))}})


def test_tokenizer_files_are_written(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    cfg = LlamaConfig.tiny()
    params = _pruned(Llama(cfg))
    out = save_hf(tmp_path / "t", cfg, params, tokenizer=tok)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("ab").ids == [2]
    out2 = save_hf(tmp_path / "t2", cfg, params, tokenizer_dir=out)
    assert (out2 / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    assert (out2 / "tokenizer_config.json").exists()


# --------------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# --------------------------------------------------------------------------------------------------------


def _ct_decompress(directory, name: str, scheme):
    """compressed-tensors' own decompression of one layer, from the tensors in the file."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        sd = {k: f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
    return PackedQuantizationCompressor.decompress(sd, scheme)["weight"], sd


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_export_matches_the_package_decompression(tmp_path, bits):
    from compressed_tensors.quantization import QuantizationConfig

    cfg = LlamaConfig.tiny(tie_embeddings=False)
    model = Llama(cfg)
    params = _pruned(model)
    group = 16
    out = save_compressed_tensors(
        tmp_path / f"w{bits}",
        cfg,
        params,
        bits=bits,
        group_size=group,
        dtype="float32",
        sparsity={"n": 2, "m": 4},
    )
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert scheme.weights.num_bits == bits and scheme.weights.group_size == group

    dequant = {}
    for name in _llama_sparse_names(cfg):
        module = name[: -len(".weight")]
        theirs, sd = _ct_decompress(out, module, scheme)
        assert sd["weight_packed"].dtype == torch.int32 and sd["weight_shape"].dtype == torch.int64
        out_f, in_f = sd["weight_shape"].tolist()
        assert tuple(sd["weight_packed"].shape) == (out_f, in_f * bits // 32)
        scale = sd["weight_scale"].numpy()
        assert scale.shape == (out_f, in_f // group)
        ours = dequantize_compressed_tensors(
            sd["weight_packed"].numpy(), scale, sd["weight_shape"].numpy(), bits, group
        )
        diff = np.abs(ours - theirs.numpy())
        assert np.all(diff <= 1e-6 * np.repeat(scale, group, axis=1)), name
        assert _strict_24(theirs.numpy()), name
        # every kept weight within half a step of the original (plus the clamp at +max), pruned ones exactly 0
        path = _our_path(name)
        w = np.asarray(params[path[0]][path[1]][path[2]]["kernel"]).T
        assert np.all(np.abs(theirs.numpy() - w) <= np.repeat(scale, group, axis=1) * 0.5 + 1e-7), name
        assert np.all(theirs.numpy()[w == 0] == 0)
        dequant[path] = theirs.numpy()

    # transformers loads the directory through compressed-tensors and decompresses it on the first forward;
    # its logits equal our model's with the weights compressed-tensors decompressed
    hf = _load(out)
    swapped = jax.tree_util.tree_map(lambda x: x, params)
    for (lay, kind, proj), w in dequant.items():
        swapped[lay][kind][proj] = {"kernel": jnp.asarray(w.T)}
    ours = np.asarray(model.apply({"params": swapped}, jnp.asarray(TOKENS, jnp.int32)))
    np.testing.assert_allclose(_logits(hf), ours, rtol=0, atol=1e-4)


def _our_path(name: str) -> tuple[str, str, str]:
    parts = name.split(".")  # model.layers.i.(self_attn|mlp).x_proj.weight
    return f"layers_{parts[2]}", "attn" if parts[3] == "self_attn" else "mlp", parts[4]


def test_compressed_tensors_refusals_and_bf16_scales(tmp_path):
    cfg = LlamaConfig.tiny()
    params = _pruned(Llama(cfg))
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        save_compressed_tensors(tmp_path / "a", cfg, params, group_size=48)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        save_compressed_tensors(tmp_path / "b", cfg, params, bits=3)
    gcfg = GPT2Config(vocab_size=64, max_len=16, n_layer=1, n_head=2, d_model=32)
    with pytest.raises(ValueError, match="Conv1D"):
        save_compressed_tensors(tmp_path / "c", gcfg, _pruned(GPT2(gcfg)))
    # only the MLP quantised: the attention projections are listed in ignore and written dense
    out = save_compressed_tensors(
        tmp_path / "d",
        cfg,
        params,
        group_size=32,
        sparse_filter=lambda p, x: default_sparse_filter(p, x) and "mlp" in p,
    )
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        "model.layers.0.self_attn.q_proj" in qc["ignore"] and "model.layers.0.mlp.up_proj" not in qc["ignore"]
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.bfloat16
    assert (
        "model.layers.0.self_attn.q_proj.weight" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.isfinite(hf(torch.tensor(TOKENS)).logits).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantisation_and_packing_equal_the_package_functions(bits):
    from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from ast_jax.export_ct import pack_int32, quantize_group_symmetric, unpack_int32

    rng = np.random.default_rng(bits)
    w = rng.normal(size=(6, 64)).astype(np.float32)
    w[:, ::4] = 0  # a few pruned weights, and one all-zero group (scale eps, q = 0)
    w[1, :16] = 0
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=16)
    g = torch.tensor(w).reshape(6, 4, 16)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    q_theirs = quantize(torch.tensor(w), scale, zp, args, dtype=torch.int8)
    q, s = quantize_group_symmetric(w, bits, 16)
    np.testing.assert_array_equal(s, scale.numpy())
    np.testing.assert_array_equal(q, q_theirs.numpy())
    assert np.all(q[w == 0] == 0)
    # packing, also for a width that leaves part of the last word unused
    for cols in (64, 13):
        qq = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(5, cols)).astype(np.int8)
        packed = pack_to_int32(torch.tensor(qq), bits).numpy()
        np.testing.assert_array_equal(pack_int32(qq, bits), packed)
        np.testing.assert_array_equal(unpack_int32(packed, bits, cols), qq)
        np.testing.assert_array_equal(unpack_from_int32(torch.tensor(packed), bits, (5, cols)).numpy(), qq)


_FIELDS = set(LlamaConfig.__dataclass_fields__)


@pytest.mark.skipif(
    not {"attn_bias", "sliding_window", "rope_scaling"} <= _FIELDS,
    reason="LlamaConfig without Qwen2/Mistral fields",
)
@pytest.mark.parametrize("variant", ["qwen2", "mistral", "linear", "llama3"])
def test_architecture_and_rope_scaling_come_from_the_model_config(tmp_path, variant):
    from ast_jax.models.llama import RopeScaling

    extra = {
        "qwen2": {"attn_bias": True},
        "mistral": {"sliding_window": 4},
        "linear": {"rope_scaling": RopeScaling("linear", 4.0)},
        "llama3": {"rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 16)},
    }[variant]
    cfg = LlamaConfig.tiny(rope_base=50.0, **extra)
    model = Llama(cfg)
    params = _pruned(model)
    # non-zero biases, so a dropped or misplaced bias shows in the logits
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if key_path(p)[-1] == "bias" else x, params
    )
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS, jnp.int32)))
    out = save_hf(tmp_path / variant, cfg, params, dtype="float32")
    hf = _load(out)
    want = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(variant, "LlamaForCausalLM")
    assert type(hf).__name__ == want
    np.testing.assert_allclose(_logits(hf), ours, rtol=0, atol=1e-4)
