"""``python -m ast_jax``: AST end to end on a model that trains on a laptop CPU.

1. Train a small dense GPT-2-style teacher on the built-in corpus (standard-library docstrings, byte tokens)
   or ``--text PATH``, until its held-out loss flattens (or ``--teacher-steps`` is reached).
2. At the same step budget, from the teacher's weights: one-shot magnitude 2:4 (no training), fixed-mask
   retraining with CE only, AST-Naive (Annealing SR-STE + mask refresh + KL distillation) and AST-Boosted
   (AST-Naive + SLoRB).
3. Print a table of held-out perplexities, flip rates and parameter counts; save plots (loss, flip rate,
   λ(t)); ``--json PATH`` writes the numbers.

Every flag maps one-to-one onto a field of :class:`MainConfig` (``--teacher-steps`` -> ``teacher_steps``).
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

from ast_jax._cli import config_parser
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
from ast_jax.step import evaluate_perplexity, final_params, init_train_state, make_train_step

REQUIRED_VARIANTS = ("fixed_mask_ce", "ast_naive", "ast_boosted")
OPTIONAL_VARIANTS = ("fixed_mask_kl", "static_srste", "ste_kl")


@dataclasses.dataclass(frozen=True)
class MainConfig:
    """Settings of the main job (defaults: the measured run of ``docs/results-ast-main.md``)."""

    text: str | None = None  # UTF-8 text file to train on instead of the built-in corpus
    json: str | None = None  # write the results here
    out_dir: str = "outputs/ast_main"  # plots go here
    no_plots: bool = False
    seed: int = 0
    max_bytes: int | None = None  # truncate the corpus (quick runs)
    # model (GPT-2-style, byte vocabulary)
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 32
    # dense teacher: stop when the held-out loss improves by less than teacher_flat_tol (relative) twice
    teacher_steps: int = 3000
    teacher_lr: float = 3e-3
    teacher_eval_every: int = 100
    teacher_flat_tol: float = 0.005
    # retraining, identical budget for every variant
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.1
    n: int = 2
    m: int = 4
    mask_every: int = 10
    max_decay: float = 0.1  # λ_max for a few-hundred-step budget (AST.md lesson 1; measured in the docs)
    ramp_steps: int = 100  # T0
    w_kl: float = 0.67
    w_ce: float = 0.33
    temperature: float = 2.0
    slorb_k: int = 16
    extra_variants: str = ""  # comma-separated subset of fixed_mask_kl,static_srste,ste_kl
    eval_windows: int = 512  # held-out windows of seq_len tokens for the final perplexities
    progress: bool = True
    fast_compile: bool = False  # XLA backend optimisation level 0: for smoke runs where compiling dominates

    def __post_init__(self) -> None:
        positive = ("n_layer", "d_model", "n_head", "seq_len", "batch_size", "teacher_steps", "steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.teacher_eval_every < 1 or self.eval_windows < 1 or self.mask_every < 1:
            raise ValueError("--teacher-eval-every, --eval-windows and --mask-every must be >= 1")
        for v in self.extras:
            if v not in OPTIONAL_VARIANTS:
                raise ValueError(f"--extra-variants: unknown variant {v!r}; choose from {OPTIONAL_VARIANTS}")
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
    """Flags -> :class:`MainConfig` (one flag per field)."""
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
                raise FloatingPointError(f"teacher loss is not finite at step {i + 1}")
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
        raise FloatingPointError(f"{name}: the training loss became non-finite")
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


def run(cfg: MainConfig) -> dict[str, Any]:
    """The whole job; returns the results dict that ``--json`` writes."""
    t_start = time.perf_counter()
    data = load_text_data(cfg.text, max_bytes=cfg.max_bytes)
    if len(data.heldout) < cfg.seq_len + 1 or len(data.train) < cfg.seq_len + 1:
        raise ValueError(f"the text is too short for --seq-len {cfg.seq_len} (need several KB)")
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
    cfg = parse_config(argv)
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
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
