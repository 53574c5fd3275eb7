"""The user's path end to end on tiny models: a Hugging Face directory made by transformers goes in
(``--model`` / ``--from``), is retrained or pruned 2:4, and comes out as hf / compressed-tensors / gguf /
compact, each read back by the program that reads it (transformers, the compressed-tensors package, our GGUF
reader, our compact loader).

Expected values come from transformers and the compressed-tensors package, never from the code under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ast_jax.export_cli import main as export_main  # noqa: E402
from ast_jax.model_source import load_model  # noqa: E402
from ast_jax.slorb import apply_with_slorb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENS = np.array([[5, 77, 12, 190, 3, 44, 250, 9, 101, 66, 7, 2]], np.int32)


def _tiny_hf_dir(path: Path) -> Path:
    """A random LLaMA made by transformers itself, with a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ast_jax.data import builtin_corpus

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # default init is too small for logits to differ much; spread them
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator([builtin_corpus(60_000)], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _tiny_hf_dir(tmp_path_factory.mktemp("tiny_llama"))


def _hf_logits(path) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


def _torch_nm(path, n=2, m=4) -> dict[str, bool]:
    """Straightforward check on the loaded torch weights: <= n non-zeros in every m consecutive inputs."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    out = {}
    for name, w in model.state_dict().items():
        if ".layers." in name and name.endswith("proj.weight"):
            groups = w.numpy().reshape(w.shape[0], -1, m)
            out[name] = bool(((groups != 0).sum(-1) <= n).all())
    return out


def _ours(loaded) -> np.ndarray:
    return np.asarray(apply_with_slorb(loaded.model, loaded.params, loaded.slorb, TOKENS))


def test_oneshot_export_from_hf_dir_loads_in_transformers(hf_dir, tmp_path, capsys):
    out = tmp_path / "wanda-hf"
    code = export_main(
        ["--from", str(hf_dir), "--format", "hf", "--oneshot", "wanda", "--calib-seqs", "4",
         "--calib-len", "64", "--dtype", "float32", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "strict 2:4" in capsys.readouterr().out
    nm = _torch_nm(out)
    assert len(nm) == 14 and all(nm.values())
    config = json.loads((out / "config.json").read_text())
    assert config["ast_sparsity"]["structure"] == "2:4"
    # Our model on the file transformers read gives transformers' logits.
    np.testing.assert_allclose(_ours(load_model(out)), _hf_logits(out), atol=1e-4, rtol=0)
    # What was not pruned is what the source holds (embeddings, norms).
    src, dst = load_model(hf_dir).params, load_model(out).params
    np.testing.assert_array_equal(src["embed"]["embedding"], dst["embed"]["embedding"])
    np.testing.assert_array_equal(src["final_norm"]["scale"], dst["final_norm"]["scale"])
    assert (out / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def retrained(hf_dir, tmp_path_factory):
    """A few AST steps on the tiny HF teacher (ast_jax.train --model), with and without SLoRB."""
    from ast_jax.train import main as train_main

    runs = {}
    for slorb in (False, True):
        ck = tmp_path_factory.mktemp("ckpt_slorb" if slorb else "ckpt")
        args = ["--model", str(hf_dir), "--steps", "4", "--batch-size", "8", "--seq-len", "32",
                "--max-bytes", "40000", "--checkpoint-dir", str(ck), "--save-every", "4",
                "--eval-windows", "0", "--no-progress", "--lr", "3e-3"]  # fmt: skip
        if slorb:
            args += ["--slorb", "--slorb-k", "16"]
        else:  # train's own export (compact by default) must load back as a --model
            args += ["--export-dir", str(tmp_path_factory.mktemp("train_export"))]
            runs["export"] = args[-1]
        assert train_main(args) == 0
        runs[slorb] = ck
    return runs


def test_train_compact_export_loads_as_a_model(retrained):
    from_checkpoint, from_export = load_model(retrained[False]), load_model(retrained["export"])
    assert from_export.kind == "compact" and from_export.sparsity == {"n": 2, "m": 4}
    assert from_export.model == from_checkpoint.model
    # unquantised compact kernels decompress to the hard-masked weights exactly
    np.testing.assert_allclose(_ours(from_export), _ours(from_checkpoint), atol=0, rtol=0)
    assert (
        from_export.tokenizer.encode("a test").tolist() == from_checkpoint.tokenizer.encode("a test").tolist()
    )


def test_retrained_checkpoint_to_every_format(retrained, tmp_path, capsys):
    ck = retrained[False]
    loaded = load_model(ck)
    assert loaded.kind == "checkpoint" and loaded.sparsity == {"n": 2, "m": 4}
    ours = _ours(loaded)

    hf = tmp_path / "hf"
    assert export_main(["--from", str(ck), "--format", "hf", "--dtype", "float32", "--out", str(hf)]) == 0
    np.testing.assert_allclose(ours, _hf_logits(hf), atol=1e-4, rtol=0)
    assert all(_torch_nm(hf).values())

    # compressed-tensors: the package's own decompressor gives the dequantised weights we wrote.
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    from ast_jax.export_ct import dequantize_compressed_tensors

    for bits in (4, 8):
        ct = tmp_path / f"w{bits}a16"
        args = [
            "--from",
            str(ck),
            "--format",
            "compressed-tensors",
            "--bits",
            str(bits),
            "--group-size",
            "32",
        ]
        assert export_main([*args, "--dtype", "float32", "--out", str(ct)]) == 0
        qc = json.loads((ct / "config.json").read_text())["quantization_config"]
        assert qc["format"] == "pack-quantized"
        scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
        assert scheme.weights.num_bits == bits
        name = "model.layers.1.mlp.down_proj"
        with safe_open(str(ct / "model.safetensors"), framework="pt") as f:
            sd = {k: f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
        theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"].numpy()
        ours_w = dequantize_compressed_tensors(
            sd["weight_packed"].numpy(), sd["weight_scale"].numpy(), sd["weight_shape"].numpy(), bits, 32
        )
        scale = np.repeat(sd["weight_scale"].numpy(), 32, axis=1)
        assert np.all(np.abs(theirs - ours_w) <= 1e-6 * scale)
        assert ((theirs.reshape(theirs.shape[0], -1, 4) != 0).sum(-1) <= 2).all()

    # gguf: our reader gives back the exported params (F32 exactly).
    from ast_jax.models.loading import load_llama_gguf

    gg = tmp_path / "m.gguf"
    assert export_main(["--from", str(ck), "--format", "gguf", "--gguf-type", "f32", "--out", str(gg)]) == 0
    _, back = load_llama_gguf(gg)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # compact: our own loader.
    from ast_jax.export import decompress_params, load_compressed

    cp = tmp_path / "compact"
    assert export_main(["--from", str(ck), "--format", "compact", "--out", str(cp)]) == 0
    flat = decompress_params(load_compressed(cp))
    np.testing.assert_array_equal(
        np.asarray(flat["layers_0"]["mlp"]["up_proj"]["kernel"]),
        np.asarray(loaded.params["layers_0"]["mlp"]["up_proj"]["kernel"]),
    )
    capsys.readouterr()


def test_slorb_is_refused_or_folded(retrained, tmp_path, capsys):
    ck = retrained[True]
    loaded = load_model(ck)
    assert loaded.slorb
    out = tmp_path / "hf"
    assert export_main(["--from", str(ck), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "SLoRB" in err and "--fold-slorb" in err and not out.exists()
    args = ["--from", str(ck), "--format", "hf", "--dtype", "float32", "--fold-slorb", "--out", str(out)]
    assert export_main(args) == 0
    assert "not N:M sparse" in capsys.readouterr().out
    # Folding keeps the function (transformers on the folded file == our SLoRB model) and loses the 2:4.
    np.testing.assert_allclose(_ours(loaded), _hf_logits(out), atol=1e-4, rtol=0)
    assert not all(_torch_nm(out).values())
    assert "ast_sparsity" not in json.loads((out / "config.json").read_text())


def test_bad_sources_and_formats_are_one_line_errors(hf_dir, tmp_path, capsys):
    assert export_main(["--from", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert export_main(["--from", str(hf_dir), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "--format" in capsys.readouterr().err
    # A dense model has no N:M kernels for the compact format: refused, with what to do instead.
    assert export_main(["--from", str(hf_dir), "--format", "compact", "--out", str(tmp_path / "c")]) == 2
    assert "--oneshot" in capsys.readouterr().err
    (tmp_path / "not.gguf").write_bytes(b"nope")
    assert export_main(["--from", str(tmp_path / "not.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- own-model-path -->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README lacks the own-model three-step block"
    return m.group(1)


def test_readme_three_step_path_runs_as_written(hf_dir, tmp_path, monkeypatch, capsys):
    """The README's three commands, with MODEL and corpus.txt pointing at the tiny model and a small text."""
    import shlex

    from ast_jax.data import builtin_corpus
    from ast_jax.generate.__main__ import main as generate_main
    from ast_jax.train import main as train_main

    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text(builtin_corpus(60_000), encoding="utf-8")
    mains = {"ast_jax.generate": generate_main, "ast_jax.train": train_main, "ast_jax.export": export_main}
    commands = [ln for ln in _readme_block().splitlines() if ln.startswith("python -m ")]
    assert [c.split()[2] for c in commands] == ["ast_jax.generate", "ast_jax.train", "ast_jax.export"]
    for line in commands:
        argv = shlex.split(line.split("#")[0].replace("MODEL", str(hf_dir)))
        assert mains[argv[2]](argv[3:]) == 0, capsys.readouterr().err
    nm = _torch_nm(tmp_path / "sparse-hf")
    assert nm and all(nm.values())
