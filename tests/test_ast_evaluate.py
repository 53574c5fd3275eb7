"""ast_jax.evaluate: perplexity (both protocols), lm-eval-style multiple choice, the task loaders and the CLI.

References are straightforward per-window / per-request loops over ``model.apply`` logits (unbatched,
unpadded, NumPy log-softmax), never the code under test.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from ast_jax import evaluate as ev
from ast_jax.model_source import byte_tokenizer
from ast_jax.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig.tiny(vocab_size=256)
    model = Llama(cfg)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    return cfg, model, params


@functools.cache
def _jit_apply(model):
    # model.apply compiled once per sequence length (eager Flax is slower than compiling on 2 cores)
    return jax.jit(model.apply)


def _logp(model, params, ids) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for t = 0..len-2 of one unpadded sequence (NumPy log-softmax)."""
    logits = _jit_apply(model)({"params": params}, np.asarray(ids, np.int32)[None])
    logits = np.asarray(logits, np.float64)[0]
    logits = logits - logits.max(-1, keepdims=True)
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logsm[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def _stream(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=n).astype(np.int32)


# ---------------------------------------------------------------------------------------------- perplexity


def test_perplexity_non_overlapping_windows_match_a_per_window_loop(tiny):
    _, model, params = tiny
    ids, ctx = _stream(100), 16  # 6 windows, a 4-token tail dropped
    nll, count = 0.0, 0
    for k in range(len(ids) // ctx):
        lp = _logp(model, params, ids[k * ctx : (k + 1) * ctx])
        nll -= lp.sum()
        count += len(lp)
    r = ev.perplexity(model, params, ids, context=ctx, batch_size=4)  # 6 windows: a padded second batch
    assert (r.tokens_scored, r.windows) == (6 * 15, 6) and count == 90
    np.testing.assert_allclose(r.nll_sum, nll, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r.ppl, np.exp(nll / count), rtol=1e-5, atol=1e-6)
    assert ev.perplexity(model, params, ids, context=ctx, stride=ctx).tokens_scored == 90


def test_perplexity_sliding_windows_match_hugging_faces_loop(tiny):
    _, model, params = tiny
    ids, ctx, stride = _stream(61), 16, 6
    nll, count, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):  # the loop of HF's "perplexity of fixed-length models"
        end = min(begin + ctx, len(ids))
        trg_len = end - prev_end
        lp = _logp(model, params, ids[begin:end])  # lp[j] scores token begin + j + 1
        scored = lp[-trg_len:] if trg_len < len(lp) + 1 else lp
        nll -= scored.sum()
        count += len(scored)
        windows += 1
        prev_end = end
        if end == len(ids):
            break
    r = ev.perplexity(model, params, ids, context=ctx, stride=stride, batch_size=3)
    assert count == len(ids) - 1 and r.tokens_scored == len(ids) - 1 and r.windows == windows
    np.testing.assert_allclose(r.nll_sum, nll, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r.ppl, np.exp(nll / count), rtol=1e-5, atol=1e-6)


def test_perplexity_windows_rule_and_errors():
    w = ev.perplexity_windows(20, 8, 3)
    # starts 0,3,6,9,12 (ends 8,11,14,17,20); each scores what the previous one did not reach
    assert w.tolist() == [[0, 8, 0], [3, 8, 4], [6, 8, 4], [9, 8, 4], [12, 8, 4]]
    assert ev.perplexity_windows(20, 8).tolist() == [[0, 8, 0], [8, 8, 0]]
    with pytest.raises(ValueError, match="no window"):
        ev.perplexity_windows(7, 8)
    with pytest.raises(ValueError, match="stride"):
        ev.perplexity_windows(20, 8, 9)


# ---------------------------------------------------------------------------------------- multiple choice


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tok = byte_tokenizer()
    ctx, cont = ev.encode_pair(tok, "Answer:  ", "yes")
    assert bytes(ctx) == b"Answer:" and bytes(cont) == b"  yes"
    ctx, cont = ev.encode_pair(tok, "Q: é?", " ü")
    assert bytes(ctx) == "Q: é?".encode() and bytes(cont) == " ü".encode()
    with pytest.raises(ValueError, match="empty context"):
        ev.encode_pair(tok, "", " x")


def _reference_ll(model, params, tok, context, continuation) -> float:
    ctx, cont = ev.encode_pair(tok, context, continuation)
    lp = _logp(model, params, [*ctx, *cont])
    return float(lp[-len(cont) :].sum())


def _items():
    return [
        ev.MCItem("Q: red?\nA:", ("a", "ab", "apple"), 2),
        ev.MCItem("x", ("y", "yy"), 0),
        ev.MCItem("Sky:", ("blue", "é", "ü!"), 1),
        ev.MCItem("", ("The cat sat on the", "The dog sat on the"), 1, continuation="mat."),
        ev.MCItem("Tea? ", ("t", "tt"), 1),
        ev.MCItem("Pick", ("q", "qq", "qqq"), 0),
        ev.MCItem("A long", ("z", "zz"), 1),
    ]


def test_multiple_choice_matches_an_unbatched_reference_and_ignores_batching(tiny):
    _, model, params = tiny
    tok = byte_tokenizer()
    items = _items()
    ref = [np.array([_reference_ll(model, params, tok, c, k) for c, k in it.requests()]) for it in items]
    runs = [
        ev.evaluate_multiple_choice(model, params, tok, items, batch_size=bs, bucket=bk)
        for bs, bk in ((1, 16), (3, 8), (8, 32))
    ]
    for r in runs:
        for got, want in zip(r.loglikelihoods, ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(r.pred, runs[0].pred)
        np.testing.assert_array_equal(r.pred_norm, runs[0].pred_norm)

    # acc / acc_norm by hand from the reference log-likelihoods
    gold = np.array([it.gold for it in items])
    pred = np.array([np.argmax(ll) for ll in ref])
    chars = [np.array([len(c) for c in it.choices], float) for it in items]
    nbytes = [np.array([len(c.encode("utf-8")) for c in it.choices], float) for it in items]
    pred_norm = np.array([np.argmax(ll / n) for ll, n in zip(ref, chars, strict=True)])
    pred_bytes = np.array([np.argmax(ll / n) for ll, n in zip(ref, nbytes, strict=True)])
    assert (pred != pred_norm).any(), "the case should make acc and acc_norm disagree"
    r = runs[-1]
    np.testing.assert_array_equal(r.pred, pred)
    np.testing.assert_array_equal(r.pred_norm, pred_norm)
    hits, hits_norm = (pred == gold).astype(float), (pred_norm == gold).astype(float)
    np.testing.assert_allclose(r.acc, hits.mean(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.acc_norm, hits_norm.mean(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.acc_stderr, hits.std(ddof=1) / np.sqrt(len(items)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        r.acc_norm_stderr, hits_norm.std(ddof=1) / np.sqrt(len(items)), rtol=0, atol=1e-12
    )
    rb = ev.evaluate_multiple_choice(model, params, tok, items, norm_unit="bytes")
    np.testing.assert_array_equal(rb.pred_norm, pred_bytes)
    assert r.n == len(items) and r.gold.tolist() == gold.tolist()


def test_loglikelihood_left_truncates_to_max_length(tiny):
    _, model, params = tiny
    ctx, cont = list(range(40, 70)), [7, 8, 9]
    got = ev.loglikelihoods(model, params, [(ctx, cont)], max_length=12)
    seq = [*ctx, *cont][-13:]
    np.testing.assert_allclose(got[0], _logp(model, params, seq)[-3:].sum(), rtol=1e-5, atol=1e-4)


# -------------------------------------------------------------------------------------------- task loaders


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def test_arc_loader_both_layouts_and_numeric_keys(tmp_path):
    hf = {
        "id": "1",
        "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    num = {
        "id": "2",
        "question": "2+2?",
        "choices": {"text": ["3", "4"], "label": ["1", "2"]},
        "answerKey": "2",
    }
    ai2 = {
        "id": "3",
        "question": {
            "stem": "Sun is a?",
            "choices": [{"text": "star", "label": "A"}, {"text": "moon", "label": "B"}],
        },
        "answerKey": "A",
    }
    items = ev.load_task("arc_challenge", _write(tmp_path / "arc.jsonl", [hf, num, ai2]))
    assert items[0] == ev.MCItem("Question: Which is a gas?\nAnswer:", ("ice", "steam", "rock"), 1)
    assert items[1] == ev.MCItem("Question: 2+2?\nAnswer:", ("3", "4"), 1)
    assert items[2] == ev.MCItem("Question: Sun is a?\nAnswer:", ("star", "moon"), 0)
    assert items[0].requests()[1] == ("Question: Which is a gas?\nAnswer:", " steam")
    assert len(ev.load_task("arc_easy", tmp_path / "arc.jsonl", limit=2)) == 2


def test_hellaswag_loader(tmp_path):
    line = {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing "
        "winter clothes smiles.",
        "ctx_b": "then",
        "endings": [
            ", the man adds wax to the windshield [title] and cuts it.",
            " [header] a man [step] runs.",
        ],
        "label": "0",
    }
    wiki = {
        "activity_label": "Home",
        "ctx_a": "[title] How to clean.  Wipe it.",
        "ctx_b": "",
        "endings": ["a", "b"],
        "label": 1,
    }
    items = ev.load_task("hellaswag", _write(tmp_path / "hs.jsonl", [line, wiki]))
    assert items[0].context == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
        "wearing winter clothes smiles. Then"
    )
    assert items[0].choices == (", the man adds wax to the windshield. and cuts it.", " a man runs.")
    assert items[0].gold == 0 and items[0].continuation is None
    # preprocess runs on "Home: [title] How to clean.  Wipe it. ": " [title]" -> ". ", then "  " -> " "
    assert items[1].context == "Home:. How to clean. Wipe it." and items[1].gold == 1


def test_piqa_loader_inline_and_separate_labels(tmp_path):
    lines = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it", "label": 0}]
    items = ev.load_task("piqa", _write(tmp_path / "piqa.jsonl", lines))
    assert items == [ev.MCItem("Question: Open a jar\nAnswer:", ("twist the lid", "hit it"), 0)]
    _write(
        tmp_path / "valid.jsonl",
        [{"goal": "g1", "sol1": "a", "sol2": "b"}, {"goal": "g2", "sol1": "c", "sol2": "d"}],
    )
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    items = ev.load_task("piqa", tmp_path / "valid.jsonl")
    assert [it.gold for it in items] == [1, 0] and items[1].context == "Question: g2\nAnswer:"


def test_winogrande_loader_is_partial_evaluation(tmp_path):
    line = {
        "qID": "x",
        "sentence": "The trophy doesn't fit into the suitcase because _ is too large.",
        "option1": "the trophy",
        "option2": "the suitcase",
        "answer": "1",
    }
    (item,) = ev.load_task("winogrande", _write(tmp_path / "wg.jsonl", [{**line, "answer": "2"}]))
    assert item.choices == (
        "The trophy doesn't fit into the suitcase because the trophy",
        "The trophy doesn't fit into the suitcase because the suitcase",
    )
    assert item.continuation == "is too large." and item.gold == 1 and item.context == ""
    assert item.requests() == [(c, " is too large.") for c in item.choices]


def test_boolq_rte_openbookqa_loaders(tmp_path):
    b = ev.load_task(
        "boolq",
        _write(
            tmp_path / "b.jsonl",
            [
                {"question": "is water wet", "passage": "Water is wet.", "idx": 0, "label": 1},
                {"question": "is fire cold", "title": "Fire", "answer": False, "passage": "Fire is hot."},
            ],
        ),
    )
    assert b[0] == ev.MCItem("Water is wet.\nQuestion: is water wet?\nAnswer:", ("no", "yes"), 1)
    assert b[1].gold == 0 and b[0].requests() == [(b[0].context, " no"), (b[0].context, " yes")]
    r = ev.load_task(
        "rte",
        _write(
            tmp_path / "r.jsonl",
            [
                {"sentence1": "A dog runs.", "sentence2": "An animal moves.", "label": 0, "idx": 0},
                {"premise": "It rains.", "hypothesis": "It is dry.", "label": "not_entailment", "idx": 1},
            ],
        ),
    )
    assert r[0] == ev.MCItem(
        "A dog runs.\nQuestion: An animal moves. True or False?\nAnswer:", ("True", "False"), 0
    )
    assert r[1].context == "It rains.\nQuestion: It is dry. True or False?\nAnswer:" and r[1].gold == 1
    o = ev.load_task(
        "openbookqa",
        _write(
            tmp_path / "o.jsonl",
            [
                {
                    "id": "7-980",
                    "question_stem": "The sun is responsible for",
                    "choices": {"text": ["puppies", "plants sprouting"], "label": ["A", "B"]},
                    "answerKey": "B",
                },
                {
                    "id": "2",
                    "question": {"stem": "Rain is", "choices": [{"text": "wet", "label": "A"}]},
                    "answerKey": "A",
                },
            ],
        ),
    )
    assert o[0] == ev.MCItem("The sun is responsible for", ("puppies", "plants sprouting"), 1)
    assert o[1] == ev.MCItem("Rain is", ("wet",), 0)


def test_loader_errors_name_the_line(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        ev.load_task("mmlu", tmp_path / "x.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        ev.load_task("piqa", bad)


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    export_gguf = pytest.importorskip("ast_jax.export_gguf")
    pytest.importorskip("gguf")
    cfg, _, params = tiny
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export_gguf.save_gguf(path, cfg, params, tokenizer=byte_tokenizer(), gguf_type="f32")
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m ast_jax.evaluate: error:") and "\n" not in err, err
    return err


def test_cli_user_errors_exit_2_with_one_line_before_loading(tiny_gguf, tmp_path, capsys, monkeypatch):
    import ast_jax.model_source as ms

    def no_loading(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(ms, "load_model", no_loading)
    ok = _write(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    assert ev.main(["--model", str(tiny_gguf), "--task", f"mmlu={ok}"]) == 2
    assert "unknown task 'mmlu'" in _one_line_error(capsys)
    assert ev.main(["--model", str(tiny_gguf), "--task", f"piqa={tmp_path / 'missing.jsonl'}"]) == 2
    assert "file not found" in _one_line_error(capsys)
    assert ev.main(["--model", str(tmp_path / "nope"), "--task", f"piqa={ok}"]) == 2
    assert "not found" in _one_line_error(capsys)
    assert ev.main(["--model", str(tiny_gguf), "--ppl-text", str(tmp_path / "none.txt")]) == 2
    assert "--ppl-text" in _one_line_error(capsys)
    assert ev.main(["--model", str(tiny_gguf)]) == 2
    assert "nothing to evaluate" in _one_line_error(capsys)


def _run_cli_end_to_end(tiny, gguf_path, tmp_path, capsys) -> None:
    _, model, params = tiny
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (tmp_path / "t.txt").write_text(text)
    items = [
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it", "label": 0},
        {"goal": "Dry hair", "sol1": "use a towel", "sol2": "use water", "label": 0},
    ]
    task = _write(tmp_path / "piqa.jsonl", items)
    out = tmp_path / "res.json"
    argv = ["--model", str(gguf_path), "--ppl-text", str(tmp_path / "t.txt"), "--context", "16"]
    assert ev.main([*argv, "--task", f"piqa={task}", "--json", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "piqa" in printed and "acc_norm" in printed
    res = json.loads(out.read_text())
    want = ev.perplexity(model, params, np.frombuffer(text.encode(), np.uint8), context=16)
    assert res["perplexity"]["tokens_scored"] == want.tokens_scored == (len(text) // 16) * 15
    np.testing.assert_allclose(res["perplexity"]["ppl"], want.ppl, rtol=1e-5, atol=1e-6)
    mc = ev.evaluate_multiple_choice(model, params, byte_tokenizer(), ev.load_task("piqa", task))
    assert res["piqa"]["n"] == 2
    np.testing.assert_allclose(res["piqa"]["acc"], mc.acc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["piqa"]["acc_norm"], mc.acc_norm, rtol=0, atol=1e-12)


def test_cli_end_to_end_with_the_loader_stubbed(tiny, tiny_gguf, tmp_path, capsys, monkeypatch):
    """The whole command (flags, task files, both evaluations, table, JSON) with load_model returning the
    in-memory model: independent of whether a byte-level GGUF reads back (next test)."""
    import ast_jax.model_source as ms

    _, model, params = tiny
    loaded = ms.LoadedModel(model, params, byte_tokenizer(), None, "gguf", str(tiny_gguf))
    monkeypatch.setattr(ms, "load_model", lambda path, **kw: loaded)
    _run_cli_end_to_end(tiny, tiny_gguf, tmp_path, capsys)


def test_cli_end_to_end_on_a_gguf(tiny, tiny_gguf, tmp_path, capsys):
    from ast_jax.model_source import load_model

    try:
        load_model(tiny_gguf)
    except ValueError as e:  # the byte tokenizer has no merges; the GGUF tokenizer reader requires them
        pytest.skip(f"a byte-level GGUF written by save_gguf does not load back yet: {e}")
    _run_cli_end_to_end(tiny, tiny_gguf, tmp_path, capsys)
