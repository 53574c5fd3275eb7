"""``python -m ast_jax``: AST end to end on a model that trains on a laptop CPU.

1. Train a small dense GPT-2-style teacher on the built-in corpus (standard-library docstrings, byte tokens)
   or ``--text PATH``, until its held-out loss flattens (or ``--teacher-steps`` is reached).
2. At the same step budget, from the teacher's weights: one-shot magnitude 2:4 (no training), fixed-mask
   retraining with CE only, AST-Naive (Annealing SR-STE + mask refresh + KL distillation) and AST-Boosted
   (AST-Naive + SLoRB).
3. Print a table of held-out perplexities, flip rates and parameter counts; save plots (loss, flip rate,
   λ(t)); ``--json PATH`` writes the numbers.

Every flag maps one-to-one onto a field of :class:`MainConfig` (``--teacher-steps`` -> ``teacher_steps``).
Exit statuses: 0 done; 2 a user error (impossible flag value, missing or unwritable file: one line on stderr);
3 a training loss became non-finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ast_jax._cli import config_parser, option, run_cli
from ast_jax.data import BatchIterator, eval_batches, load_text_data
from ast_jax.distill import LossConfig
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.optim import annealing_decay, get_masks, get_sparse_state, sparse_adamw
from ast_jax.slorb import slorb_init_tree
from ast_jax.sparsify import (
    apply_masks,
    compute_masks,
    count_params,
    is_strict_nm,
)
from ast_jax.step import (
    TrainingDivergedError,
    evaluate_perplexity,
    final_params,
    init_train_state,
    make_train_step,
)

REQUIRED_VARIANTS = ("fixed_mask_ce", "ast_naive", "ast_boosted")
OPTIONAL_VARIANTS = ("fixed_mask_kl", "static_srste", "ste_kl")


@dataclasses.dataclass(frozen=True)
class MainConfig:
    """Settings of the main job (defaults: the measured run of ``docs/results-ast-main.md``); impossible
    values raise ``ValueError`` naming the flag."""

    text: str | None = option(None, "UTF-8 text file to train on instead of the built-in docstring corpus")
    json: str | None = option(
        None, "write the results (perplexities, flip rates, histories) to this JSON file"
    )
    out_dir: str = option("outputs/ast_main", "directory for the plots (created if missing)")
    no_plots: bool = option(False, "skip the loss / flip-rate / lambda plots")
    seed: int = option(0, "seed of the initialisation and the batch order (>= 0)")
    max_bytes: int | None = option(None, "truncate the corpus to this many bytes, for quick runs (>= 1)")
    # model (GPT-2-style, byte vocabulary)
    n_layer: int = option(2, "transformer blocks (>= 1)")
    d_model: int = option(128, "model width; a multiple of --n-head, --m and --slorb-k")
    n_head: int = option(4, "attention heads (>= 1)")
    seq_len: int = option(64, "tokens (bytes) per training window (>= 1)")
    batch_size: int = option(32, "sequences per training batch (>= 1)")
    # dense teacher: stop when the held-out loss improves by less than teacher_flat_tol (relative) twice
    teacher_steps: int = option(3000, "most dense teacher training steps (>= 1)")
    teacher_lr: float = option(3e-3, "teacher peak learning rate (finite, > 0)")
    teacher_eval_every: int = option(100, "held-out evaluation interval of the teacher, in steps (>= 1)")
    teacher_flat_tol: float = option(
        0.005,
        "the teacher stops after two evaluations improving the held-out loss by less than this fraction "
        "(finite, >= 0)",
    )
    # retraining, identical budget for every variant
    steps: int = option(300, "retraining steps of every sparse variant (>= 1)")
    lr: float = option(1e-3, "peak retraining learning rate, warm-up then cosine to lr/10 (finite, > 0)")
    weight_decay: float = option(0.1, "decoupled weight decay of the matrices (finite, >= 0)")
    n: int = option(2, "kept weights per group (N of N:M, 0 < N < M)")
    m: int = option(4, "group size along a kernel's input (M of N:M, >= 2)")
    mask_every: int = option(10, "mask refresh interval of the adaptive variants, in steps (>= 1)")
    # λ_max for a few-hundred-step budget (AST.md lesson 1; measured in the docs)
    max_decay: float = option(0.1, "lambda_max of Annealing SR-STE (finite, >= 0)")
    ramp_steps: int = option(100, "T0: steps over which lambda ramps up to lambda_max (>= 0)")
    w_kl: float = option(0.67, "weight of the KL distillation loss (finite, >= 0)")
    w_ce: float = option(0.33, "weight of the cross-entropy loss (finite, >= 0; w_kl + w_ce > 0)")
    temperature: float = option(2.0, "distillation temperature (finite, > 0)")
    slorb_k: int = option(16, "SLoRB block size k of AST-Boosted; divides --d-model (>= 1)")
    extra_variants: str = option(
        "", f"comma-separated extra variants to run, from {', '.join(OPTIONAL_VARIANTS)} (default: none)"
    )
    eval_windows: int = option(512, "held-out windows of --seq-len tokens for the final perplexities (>= 1)")
    progress: bool = option(True, "show progress bars")
    fast_compile: bool = option(
        False, "XLA backend optimisation level 0: for smoke runs where compiling dominates"
    )

    def __post_init__(self) -> None:
        def bad(name: str, need: str) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')} must be {need}, got {getattr(self, name)!r}")

        positive = ("n_layer", "d_model", "n_head", "seq_len", "batch_size", "teacher_steps", "steps")
        for name in (*positive, "teacher_eval_every", "eval_windows", "mask_every", "slorb_k"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        for name in ("seed", "ramp_steps"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise bad("max_bytes", ">= 1 or none")
        for name in ("lr", "teacher_lr", "temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a finite number > 0")
        for name in ("weight_decay", "max_decay", "w_kl", "w_ce", "teacher_flat_tol"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "a finite number >= 0")
        if self.w_kl + self.w_ce == 0:
            raise ValueError("--w-kl and --w-ce are both 0: the loss would be zero")
        if not 0 < self.n < self.m:
            raise ValueError(f"--n and --m need 0 < n < m, got n={self.n}, m={self.m}")
        for v in self.extras:
            if v not in OPTIONAL_VARIANTS:
                raise ValueError(f"--extra-variants: unknown variant {v!r}; choose from {OPTIONAL_VARIANTS}")
        if self.d_model % self.n_head:
            raise ValueError(f"--d-model {self.d_model} is not divisible by --n-head {self.n_head}")
        if self.d_model % self.m or (4 * self.d_model) % self.m:
            raise ValueError(
                f"--d-model {self.d_model} must make every layer's input a multiple of m={self.m}"
            )
        if self.d_model % self.slorb_k:
            raise ValueError(f"--slorb-k {self.slorb_k} must divide --d-model {self.d_model}")

    @property
    def extras(self) -> tuple[str, ...]:
        return tuple(v for v in self.extra_variants.split(",") if v)


def _parser() -> argparse.ArgumentParser:
    return config_parser(MainConfig, "python -m ast_jax", __doc__.split("\n\n")[0])


def parse_config(argv: Sequence[str] | None = None) -> MainConfig:
    """Flags -> :class:`MainConfig` (one flag per field; ``ValueError`` for impossible values)."""
    return MainConfig(**vars(_parser().parse_args(argv)))


def _variant_specs(cfg: MainConfig) -> dict[str, dict[str, Any]]:
    kl = LossConfig(w_kl=cfg.w_kl, w_ce=cfg.w_ce, temperature=cfg.temperature)
    ce = LossConfig(w_kl=0.0, w_ce=1.0)
    specs = {
        "fixed_mask_ce": {"variant": "fixed", "loss": ce, "slorb": False},
        "ast_naive": {"variant": "annealing", "loss": kl, "slorb": False},
        "ast_boosted": {"variant": "annealing", "loss": kl, "slorb": True},
        "fixed_mask_kl": {"variant": "fixed", "loss": kl, "slorb": False},
        "static_srste": {"variant": "static", "loss": kl, "slorb": False},
        "ste_kl": {"variant": "ste", "loss": kl, "slorb": False},
    }
    return {k: specs[k] for k in (*REQUIRED_VARIANTS, *cfg.extras)}


def _compiler_options(cfg: MainConfig) -> dict[str, Any] | None:
    return {"xla_backend_optimization_level": 0} if cfg.fast_compile else None


def _jit(cfg: MainConfig, fn, **kw):
    return jax.jit(fn, compiler_options=_compiler_options(cfg), **kw)


def _heldout_ppl(model, params, data, cfg: MainConfig, windows: int, slorb=None) -> float:
    # Batches of min(64, windows) windows, so monitoring and final evaluations share one compilation.
    batches = eval_batches(data.heldout, cfg.seq_len, min(64, cfg.eval_windows), max_windows=windows)
    opts = _compiler_options(cfg)
    return evaluate_perplexity(model, params, batches, slorb_params=slorb, compiler_options=opts)


def train_teacher(cfg: MainConfig, model: GPT2, data) -> tuple[Any, dict[str, Any]]:
    """Dense CE training with warm-up + cosine; stops once the held-out loss has flattened."""
    params = _jit(cfg, model.init)(jax.random.key(cfg.seed), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
    sched = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.teacher_lr,
        max(1, min(100, cfg.teacher_steps // 10)),
        cfg.teacher_steps + 1,
        cfg.teacher_lr * 0.05,
    )
    tx = optax.adamw(
        sched, b2=0.99, weight_decay=cfg.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    )
    state = init_train_state(params, tx, seed=cfg.seed)
    step = _jit(cfg, make_train_step(model, None, tx, LossConfig(w_kl=0.0, w_ce=1.0)))
    it = BatchIterator(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    hist: dict[str, list] = {"loss": [], "eval_step": [], "eval_loss": []}
    flat = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.teacher_steps), desc="teacher", disable=not cfg.progress, leave=False)
    for i in bar:
        state, met = step(state, next(it))
        hist["loss"].append(met["loss"])
        if (i + 1) % cfg.teacher_eval_every == 0 or i + 1 == cfg.teacher_steps:
            ppl = _heldout_ppl(model, state.params["model"], data, cfg, min(64, cfg.eval_windows))
            ev = math.log(ppl)
            prev = hist["eval_loss"][-1] if hist["eval_loss"] else None
            hist["eval_step"].append(i + 1)
            hist["eval_loss"].append(ev)
            bar.set_postfix(heldout_loss=f"{ev:.3f}")
            if not np.isfinite(float(met["loss"])):
                raise TrainingDivergedError(f"teacher loss is not finite at step {i + 1}; lower --teacher-lr")
            flat = flat + 1 if prev is not None and (prev - ev) < cfg.teacher_flat_tol * prev else 0
            if flat >= 2:
                break
    hist["loss"] = [float(x) for x in hist["loss"]]
    hist["steps"] = len(hist["loss"])
    hist["seconds"] = time.perf_counter() - t0
    return state.params["model"], hist


def retrain(
    cfg: MainConfig, name: str, spec: dict[str, Any], model: GPT2, teacher: Any, data
) -> dict[str, Any]:
    """One retraining run from the teacher's weights with the variant's optimizer and loss."""
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.steps // 10, 1), cfg.steps + 1, cfg.lr * 0.1
    )
    tx = sparse_adamw(
        sched,
        max_decay=cfg.max_decay,
        ramp_steps=cfg.ramp_steps,
        mask_every=cfg.mask_every,
        n=cfg.n,
        m=cfg.m,
        weight_decay=cfg.weight_decay,
        b2=0.99,
        variant=spec["variant"],
    )
    slorb = None
    if spec["slorb"]:
        init = lambda p: slorb_init_tree(p, compute_masks(p, cfg.n, cfg.m), cfg.slorb_k, "mean")
        slorb = _jit(cfg, init)({"model": teacher})["model"]
    state = init_train_state(teacher, tx, slorb_params=slorb, seed=cfg.seed + 1)
    step = _jit(cfg, make_train_step(model, teacher, tx, spec["loss"]))
    it = BatchIterator(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1)
    hist: dict[str, list] = {"loss": [], "flip_rate": [], "decay": []}
    t0 = time.perf_counter()
    for _ in tqdm(range(cfg.steps), desc=name, disable=not cfg.progress, leave=False):
        state, met = step(state, next(it))
        hist["loss"].append(met["loss"])
        hist["flip_rate"].append(met["flip_rate_prev"])
        hist["decay"].append(met["decay"])
    hist = {k: [float(x) for x in v] for k, v in hist.items()}
    if not all(np.isfinite(hist["loss"])):
        step = int(np.argmin(np.isfinite(hist["loss"]))) + 1
        raise TrainingDivergedError(f"{name}: the training loss became non-finite at step {step}; lower --lr")
    secs = time.perf_counter() - t0
    model_params, slorb_params = _jit(cfg, final_params)(state)
    masks = get_masks(state.opt_state)["model"]
    ppl = _heldout_ppl(model, model_params, data, cfg, cfg.eval_windows, slorb_params)
    sparse_size = sum(x.size for x in jax.tree_util.tree_leaves(masks))
    counts = count_params(model_params, masks)
    extra = sum(x.size for x in jax.tree_util.tree_leaves(slorb_params)) if slorb_params else 0
    sst = get_sparse_state(state.opt_state)
    return {
        "perplexity": ppl,
        "strict": is_strict_nm(model_params, cfg.n, cfg.m, masks=masks),
        "flip_rate_last_refresh": float(sst.flips_prev) / sparse_size if spec["variant"] != "fixed" else 0.0,
        "flip_rate_vs_initial": float(sst.flips_init) / sparse_size,
        "params_nonzero": counts["nonzero_after_mask"] + extra,
        "slorb_params": extra,
        "seconds": secs,
        "history": hist,
    }


def _plots(cfg: MainConfig, teacher_hist: dict, runs: dict[str, dict], out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def smooth(y, w=10):
        y = np.asarray(y)
        return np.convolve(y, np.ones(w) / w, mode="valid") if len(y) > w else y

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(smooth(teacher_hist["loss"]), label="train (smoothed)")
    ax[0].plot(teacher_hist["eval_step"], teacher_hist["eval_loss"], "o-", label="held-out")
    ax[0].set(title="dense teacher", xlabel="step", ylabel="loss (nats/byte)")
    ax[0].legend()
    for name, r in runs.items():
        ax[1].plot(smooth(r["history"]["loss"]), label=name)
    ax[1].set(title="retraining loss (each variant's own objective, smoothed)", xlabel="step", ylabel="loss")
    ax[1].legend()
    fig.tight_layout()
    paths.append(str(out / "loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        fr = np.asarray(r["history"]["flip_rate"])
        refresh = np.arange(cfg.mask_every - 1, len(fr), cfg.mask_every)
        if np.any(fr > 0):
            ax[0].plot(refresh + 1, fr[refresh], ".-", label=name)
    ax[0].set(
        title="flip rate at each mask refresh", xlabel="step", ylabel="flips / sparse weights", yscale="log"
    )
    ax[0].legend()
    t = np.arange(1, cfg.steps + 1)
    ax[1].plot(t, np.asarray(annealing_decay(t, cfg.max_decay, cfg.ramp_steps)))
    ax[1].set(title=f"λ(t): λ_max={cfg.max_decay:g}, T0={cfg.ramp_steps}", xlabel="step", ylabel="λ")
    fig.tight_layout()
    paths.append(str(out / "flips_decay.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _check_outputs(cfg: MainConfig) -> None:
    """Fail before any training when ``--json`` or the plot directory cannot be written."""
    from ast_jax.checkpoint import ensure_writable_dir

    if cfg.json:
        if pathlib.Path(cfg.json).is_dir():
            raise ValueError(f"--json {cfg.json!r} is a directory, not a file")
        try:
            ensure_writable_dir(pathlib.Path(cfg.json).absolute().parent)
        except ValueError as e:
            raise ValueError(f"--json {cfg.json!r}: {e}") from None
    if not cfg.no_plots:
        try:
            ensure_writable_dir(cfg.out_dir)
        except ValueError as e:
            raise ValueError(f"--out-dir {cfg.out_dir!r}: {e}") from None


def run(cfg: MainConfig) -> dict[str, Any]:
    """The whole job; returns the results dict that ``--json`` writes.

    Raises ``ValueError`` before any training for unusable inputs or outputs (text too short or missing,
    ``--json``/``--out-dir`` not writable) and :class:`ast_jax.step.TrainingDivergedError` when a loss becomes
    non-finite.
    """
    t_start = time.perf_counter()
    data = load_text_data(cfg.text, max_bytes=cfg.max_bytes)
    if len(data.heldout) < cfg.seq_len + 1 or len(data.train) < cfg.seq_len + 1:
        raise ValueError(f"the text is too short for --seq-len {cfg.seq_len} (need several KB)")
    _check_outputs(cfg)
    mcfg = GPT2Config(
        vocab_size=data.vocab_size,
        max_len=cfg.seq_len,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        d_model=cfg.d_model,
    )
    model = GPT2(mcfg)

    teacher, teacher_hist = train_teacher(cfg, model, data)
    ppl = {"dense": _heldout_ppl(model, teacher, data, cfg, cfg.eval_windows)}

    masks = _jit(cfg, lambda p: compute_masks(p, cfg.n, cfg.m))(teacher)
    oneshot = _jit(cfg, apply_masks)(teacher, masks)
    ppl["magnitude_oneshot"] = _heldout_ppl(model, oneshot, data, cfg, cfg.eval_windows)
    strict = {"magnitude_oneshot": is_strict_nm(oneshot, cfg.n, cfg.m, masks=masks)}

    runs = {}
    for name, spec in _variant_specs(cfg).items():
        runs[name] = retrain(cfg, name, spec, model, teacher, data)
        ppl[name] = runs[name]["perplexity"]
        strict[name] = runs[name]["strict"]

    dense_count = count_params(teacher)["total"]
    results: dict[str, Any] = {
        "perplexity": ppl,
        "strict_2of4": all(strict.values()),
        "strict_by_variant": strict,
        "flip_rate_last_refresh": {k: r["flip_rate_last_refresh"] for k, r in runs.items()},
        "flip_rate_vs_initial": {k: r["flip_rate_vs_initial"] for k, r in runs.items()},
        "params": {
            "dense": dense_count,
            "magnitude_oneshot": count_params(oneshot, masks)["nonzero_after_mask"],
            **{k: r["params_nonzero"] for k, r in runs.items()},
        },
        "orderings": {
            "ast_naive < fixed_mask_ce": ppl["ast_naive"] < ppl["fixed_mask_ce"],
            "fixed_mask_ce < magnitude_oneshot": ppl["fixed_mask_ce"] < ppl["magnitude_oneshot"],
            "ast_boosted <= ast_naive": ppl["ast_boosted"] <= ppl["ast_naive"],
        },
        "teacher": {
            "steps": teacher_hist["steps"],
            "heldout_loss_curve": list(
                zip(teacher_hist["eval_step"], teacher_hist["eval_loss"], strict=True)
            ),
            "seconds": teacher_hist["seconds"],
        },
        "seconds": {k: r["seconds"] for k, r in runs.items()},
        "corpus": {"source": data.source, "train_bytes": len(data.train), "heldout_bytes": len(data.heldout)},
        "config": dataclasses.asdict(cfg),
        "backend": jax.default_backend(),
    }
    if not cfg.no_plots:
        results["plots"] = _plots(cfg, teacher_hist, runs, pathlib.Path(cfg.out_dir))
    results["total_seconds"] = time.perf_counter() - t_start
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the results."""
    ppl = results["perplexity"]
    rows = [
        "| model | held-out perplexity | non-zero params | flip rate (last refresh) | flips vs initial mask |"
    ]
    rows.append("|---|---|---|---|---|")
    for name, v in ppl.items():
        fr = results["flip_rate_last_refresh"].get(name)
        fi = results["flip_rate_vs_initial"].get(name)
        fr_s = "–" if fr is None else f"{fr:.4f}"
        fi_s = "–" if fi is None else f"{fi:.4f}"
        rows.append(f"| {name} | {v:.3f} | {results['params'][name]:,} | {fr_s} | {fi_s} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ast_jax``: returns the exit status (0 done, 2 user error, 3 diverged)."""
    return run_cli(_parser(), lambda values: MainConfig(**values), _main_body, argv)


def _main_body(cfg: MainConfig) -> int:
    results = run(cfg)
    print(format_table(results))
    print(
        f"strict {results['config']['n']}:{results['config']['m']} on every sparse kernel: "
        f"{results['strict_2of4']}"
    )
    for k, v in results["orderings"].items():
        print(f"  {k}: {v}")
    print(f"teacher steps: {results['teacher']['steps']}; total {results['total_seconds']:.0f} s")
    if "plots" in results:
        print("plots:", ", ".join(results["plots"]))
    if cfg.json:
        path = pathlib.Path(cfg.json)
        path.write_text(json.dumps(results, indent=2))
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
