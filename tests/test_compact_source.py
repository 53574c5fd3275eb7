"""A compact export (``python -m ast_jax.export --format compact``) is a model source: ``load_model`` rebuilds
the module and tokenizer from ``ast_model.json`` and the dense params from the N:M tensors, and
``python -m ast_jax.generate --model DIR`` runs on it.

Expected values come from the pruned params before export (logits, greedy tokens), never from the loader.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.export import ExportConfig, compress_params, decompress_params, load_compressed, save_compressed
from ast_jax.export_cli import export_model, prune_oneshot
from ast_jax.generate import generate
from ast_jax.generate.__main__ import main as generate_main
from ast_jax.model_source import MODEL_RECORD, byte_tokenizer, describe_source, load_model
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.models.llama import Llama, LlamaConfig, RopeScaling
from ast_jax.sparsify import is_strict_nm
from ast_jax.tokenizer import TextTokenizer

TEXT = "Sparse models, compact files: 2:4 (¡ünïcode!)"
PROMPT = "The cat"


def _tiny(family: str):
    """A tiny model over the 256 byte ids, pruned strictly 2:4 by magnitude, and a tokenizer for it."""
    if family == "gpt2":
        model = GPT2(GPT2Config(vocab_size=256, max_len=64, n_layer=2, n_head=4, d_model=32))
        tok = byte_tokenizer()  # no BOS / EOS
    else:
        scaling = RopeScaling("linear", 2.0)  # a nested config field travels through the record too
        model = Llama(LlamaConfig.tiny(vocab_size=256, init_std=0.2, rope_scaling=scaling, n_layers=2))
        tok = TextTokenizer(byte_tokenizer().inner, bos_id=1, eos_id=2, add_bos=True, eos_ids=[2, 3])
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    pruned, _ = prune_oneshot(model, params, None, "magnitude", 2, 4)
    assert is_strict_nm(pruned, 2, 4)
    return model, jax.tree.map(np.asarray, pruned), tok


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    return _tiny(request.param)


def _logits(model, params, ids) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids)[None]))


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_compact_export_loads_as_a_model(tiny, bits, tmp_path):
    model, pruned, tok = tiny
    out = tmp_path / "compact"
    info = export_model(model, pruned, out, format="compact", tokenizer=tok, bits=bits)
    assert info["nm"] == "2:4" and 0 < info["compressed_bytes"] < info["fp32_bytes"]  # sizes of the kernels
    assert {p.name for p in out.iterdir()} == {"manifest.json", "tensors.npz", MODEL_RECORD, "tokenizer.json"}
    assert describe_source(str(out)) == "compact"

    loaded = load_model(out)
    assert loaded.kind == "compact" and loaded.source == str(out)
    assert loaded.sparsity == {"n": 2, "m": 4} and loaded.slorb is None
    assert type(loaded.model) is type(model) and loaded.model.cfg == model.cfg
    assert hash(loaded.model.cfg) == hash(model.cfg)  # same jit cache key: dtypes come back as jnp types
    assert is_strict_nm(loaded.params, 2, 4)
    assert jax.tree.structure(loaded.params) == jax.tree.structure(pruned)

    ids = tok.encode(TEXT)
    np.testing.assert_array_equal(loaded.tokenizer.encode(TEXT), ids)
    for attr in ("bos_id", "eos_id", "eos_ids", "add_bos"):
        assert getattr(loaded.tokenizer, attr) == getattr(tok, attr)

    got, want = _logits(loaded.model, loaded.params, ids), _logits(model, pruned, ids)
    if bits is None:  # the kept values are stored as they are: the very same function
        np.testing.assert_allclose(got, want, atol=0, rtol=0)
    else:
        # int8 / int4 with a scale per group of kept values: the loader gives what the format's own decoder
        # gives (float32 rounding apart), and every weight is within one quantisation step (absmax / qmax,
        # twice the codec's bound) of the pruned original, the pruned zeros exactly zero.
        ref = decompress_params(load_compressed(out))
        np.testing.assert_allclose(got, _logits(model, ref, ids), atol=1e-6, rtol=0)
        qmax = 2 ** (bits - 1) - 1
        flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
        for (path, a), (_, b) in zip(flat(loaded.params), flat(pruned), strict=True):
            a = np.asarray(a)
            np.testing.assert_allclose(a, b, atol=float(np.abs(b).max()) / qmax, rtol=0, err_msg=str(path))
            assert (a[b == 0] == 0).all(), path
        if bits == 8:  # int8 keeps the function: an RMS logit error under 5% of the logits' RMS
            assert np.sqrt(((got - want) ** 2).mean()) <= 0.05 * np.sqrt((want**2).mean())


def test_requested_dtype_and_reexport_from_compact(tiny, tmp_path):
    model, pruned, tok = tiny
    out = tmp_path / "a"
    export_model(model, pruned, out, format="compact", tokenizer=tok)
    half = load_model(out, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    # A compact export is a --from source like any other: exported again, it is the same model.
    from ast_jax.export_cli import main as export_main

    assert export_main(["--from", str(out), "--format", "compact", "--out", str(tmp_path / "b")]) == 0
    again = load_model(tmp_path / "b")
    assert again.model.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(pruned), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_generate_cli_on_a_compact_export(tiny, tmp_path, capsys):
    model, pruned, tok = tiny
    out = tmp_path / "compact"
    export_model(model, pruned, out, format="compact", tokenizer=tok)
    ids = tok.encode(PROMPT)
    want = [int(t) for t in generate(model, pruned, [ids], max_new_tokens=4).tokens[0]]
    if tok.eos_id in want:  # the CLI stops after the end-of-text token
        want = want[: want.index(tok.eos_id) + 1]
    capsys.readouterr()
    assert generate_main(["--model", str(out), "--prompt", PROMPT, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == PROMPT + tok.decode(want, skip_special_tokens=True) + "\n"


def test_compact_export_without_record_is_refused_clearly(tmp_path, capsys):
    _, pruned, _ = _tiny("gpt2")
    old = tmp_path / "old"
    save_compressed(old, compress_params(pruned, ExportConfig()))  # what --format compact wrote before
    for call in (describe_source, load_model):
        with pytest.raises(ValueError, match="predates architecture records") as e:
            call(str(old))
        assert str(old) in str(e.value) and "re-export" in str(e.value).lower()
    assert set(load_compressed(old)) == set(compress_params(pruned, ExportConfig()))  # still readable
    assert generate_main(["--model", str(old), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "predates architecture records" in err and "Traceback" not in err


def _export(tmp_path):
    model, pruned, tok = _tiny("gpt2")
    out = tmp_path / "compact"
    export_model(model, pruned, out, format="compact", tokenizer=tok)
    return out, json.loads((out / MODEL_RECORD).read_text())


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda rec: "{not json", r"ast_model\.json: not valid JSON"),
        (lambda rec: {**rec, "family": "Bert"}, r"ast_model\.json: family: 'Bert'"),
        (lambda rec: {**rec, "config": {**rec["config"], "n_layers": 2}}, r"config\.n_layers: not a field"),
        (lambda rec: {**rec, "config": {**rec["config"], "dtype": {"dtype": "f00"}}}, r"config\.dtype"),
        (lambda rec: {**rec, "config": {**rec["config"], "d_model": 64}}, r"block_0/.*re-export"),
        (lambda rec: {**rec, "tokenizer": {**rec["tokenizer"], "add_bos": 1}}, r"tokenizer\.add_bos"),
        (lambda rec: {**rec, "manifest_sha256": "0" * 64}, r"manifest_sha256 does not match"),
        (lambda rec: [], r"ast_model\.json: expected a JSON object"),
    ],
)
def test_damaged_record_is_named(tmp_path, damage, match):
    out, rec = _export(tmp_path)
    bad = damage(rec)
    (out / MODEL_RECORD).write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ValueError, match=match) as e:
        load_model(out)
    assert MODEL_RECORD in str(e.value)


def test_changed_tokenizer_file_is_named(tmp_path):
    out, _ = _export(tmp_path)
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"ast_model\.json: tokenizer\.sha256 does not match"):
        load_model(out)


def test_unsupported_model_is_refused_before_writing(tmp_path):
    _, pruned, tok = _tiny("gpt2")

    class Other:
        cfg = GPT2Config()

    out = tmp_path / "never"
    with pytest.raises(ValueError, match="not one of"):
        export_model(Other(), pruned, out, format="compact", tokenizer=tok)
    assert not out.exists()
