"""KV-cached generation: cached greedy == uncached argmax decoding, padding-independence, EOS, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax import generate
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.models.llama import Llama, LlamaConfig

PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 11, 4], [12, 6, 2, 9, 1]]
N_NEW = 6


def _model(kind: str):
    if kind == "gpt2":
        model = GPT2(GPT2Config(vocab_size=64, max_len=32, n_layer=2, n_head=4, d_model=32))
    else:
        # Larger init so logits are spread out: argmax gaps far above float32 rounding differences.
        model = Llama(LlamaConfig.tiny(max_len=32, init_std=0.2))
    params = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_params(request):
    return _model(request.param)


def _uncached_greedy(model, params, prompts, n_new):
    """Reference: full forward over each whole (right-padded, causal) sequence, argmax at its last token."""
    width = max(len(p) for p in prompts) + n_new
    seqs = np.zeros((len(prompts), width), np.int32)
    lens = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        seqs[i, : len(p)] = p
    apply = jax.jit(lambda s: model.apply({"params": params}, s))
    out = []
    for _ in range(n_new):
        logits = np.asarray(apply(jnp.asarray(seqs)))
        nxt = logits[np.arange(len(prompts)), lens - 1].argmax(-1)
        seqs[np.arange(len(prompts)), lens] = nxt
        lens = lens + 1
        out.append(nxt)
    return np.stack(out, 1)


def test_cached_greedy_equals_uncached_argmax(model_params):
    model, params = model_params
    res = generate(model, params, PROMPTS, max_new_tokens=N_NEW)
    assert res.tokens.shape == (3, N_NEW) and res.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(res.tokens, _uncached_greedy(model, params, PROMPTS, N_NEW))
    np.testing.assert_array_equal(res.lengths, [N_NEW] * 3)


def test_batch_rows_equal_single_prompt_runs(model_params):
    model, params = model_params
    batch = generate(model, params, PROMPTS, max_new_tokens=N_NEW).tokens
    for i, prompt in enumerate(PROMPTS):
        single = generate(model, params, [prompt], max_new_tokens=N_NEW).tokens
        np.testing.assert_array_equal(batch[i], single[0])


def test_eos_stops_row_and_pads_with_eos():
    model, params = _model("llama")
    free = np.asarray(generate(model, params, PROMPTS, max_new_tokens=N_NEW).tokens)
    eos = int(free[1, 2])  # row 1 emits this token at step 2 (maybe earlier, or in other rows too)
    res = generate(model, params, PROMPTS, max_new_tokens=N_NEW, eos_id=eos)
    for i in range(3):
        hits = np.flatnonzero(free[i] == eos)
        stop = hits[0] + 1 if hits.size else N_NEW
        assert int(res.lengths[i]) == stop
        np.testing.assert_array_equal(res.tokens[i, :stop], free[i, :stop])
        assert np.all(np.asarray(res.tokens[i, stop:]) == eos)


def test_sampling_reproducible_with_fixed_key():
    model, params = _model("llama")
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, params, PROMPTS, key=jax.random.key(3), **kw)
    b = generate(model, params, PROMPTS, key=jax.random.key(3), **kw)
    c = generate(model, params, PROMPTS, key=jax.random.key(4), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert np.all((np.asarray(a.tokens) >= 0) & (np.asarray(a.tokens) < 64))
    # top_k=1 leaves only the argmax token: sampling reduces to greedy decoding.
    greedy = generate(model, params, PROMPTS, max_new_tokens=N_NEW).tokens
    top1 = generate(
        model, params, PROMPTS, max_new_tokens=N_NEW, temperature=0.7, top_k=1, key=jax.random.key(5)
    )
    np.testing.assert_array_equal(top1.tokens, greedy)


def test_sample_logits_filters():
    from ast_jax.generate import sample_logits

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
    keys = jax.random.split(jax.random.key(0), 4)
    top2 = np.stack([sample_logits(logits, k, 1.0, top_k=2) for k in keys])
    assert set(np.unique(top2)) <= {0, 1}
    nucleus = np.stack([sample_logits(logits, k, 1.0, top_p=0.7) for k in keys])
    assert set(np.unique(nucleus)) == {0, 1}  # 0.5 < 0.7 <= 0.8: tokens 0 and 1 form the nucleus


def test_generate_rejects_bad_arguments():
    model, params = _model("gpt2")
    with pytest.raises(ValueError, match="max_len"):
        generate(model, params, PROMPTS, max_new_tokens=30)
    with pytest.raises(ValueError, match="key"):
        generate(model, params, PROMPTS, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, params, [[1], []], max_new_tokens=2)


def test_stream_yields_the_uncached_greedy_tokens(model_params):
    from ast_jax.generate import generate_stream

    model, params = model_params
    prompt = [3, 9, 27, 4, 1]
    want = _uncached_greedy(model, params, [prompt], 6)[0]
    got = list(generate_stream(model, params, prompt, max_new_tokens=6))
    assert got == list(want)
    # Stops right after EOS (yielded), so a stream never runs past the end of text.
    stopped = list(generate_stream(model, params, prompt, max_new_tokens=6, eos_id=int(want[2])))
    assert stopped == list(want[: list(want).index(want[2]) + 1])


def test_generate_cli_errors_are_one_line(capsys, tmp_path):
    from ast_jax.generate.__main__ import main

    assert main(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert main(["--prompt", ""]) == 2
    assert "--prompt is required" in capsys.readouterr().err
    assert main(["--prompt", "x", "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_generate_on_a_mesh_equals_the_unsharded_run():
    from ast_jax.sharding import make_mesh

    model, params = _model("llama")
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12], [13], [14, 15, 16], [17, 18]]
    want = generate(model, params, prompts, max_new_tokens=4)
    mesh = make_mesh("data=-1,fsdp=1")
    got = generate(model, params, prompts, max_new_tokens=4, mesh=mesh)
    assert got.tokens.sharding.num_devices == len(jax.devices())  # the batch really is split
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    with pytest.raises(ValueError, match="multiple of it"):
        generate(model, params, prompts[:3], max_new_tokens=2, mesh=mesh)
