"""``python -m ast_jax``: AST end to end on a model that trains on a laptop CPU.

1. Train a small dense GPT-2-style teacher on the built-in corpus (standard-library docstrings, byte tokens)
   or ``--text PATH``, until its held-out loss flattens (or ``--teacher-steps`` is reached).
2. At the same step budget, from the teacher's weights: one-shot magnitude 2:4 (no training), fixed-mask
   retraining with CE only, AST-Naive (Annealing SR-STE + mask refresh + KL distillation) and AST-Boosted
   (AST-Naive + SLoRB).
3. Print a table of held-out perplexities, flip rates and parameter counts; save plots (loss, flip rate,
   λ(t)); ``--json PATH`` writes the numbers; ``--log-dir DIR`` writes every step's scalars as TensorBoard
   event files and JSON lines, one run per subdirectory (``teacher``, ``magnitude_oneshot``, each variant;
   :mod:`ast_jax.logs`).

Every flag maps one-to-one onto a leaf of :class:`MainConfig` (``--teacher-steps`` -> ``cfg.teacher.steps``;
the sections and the reasons for their defaults: :mod:`ast_jax.config`).
Exit statuses: 0 done; 2 a user error (impossible flag value, missing or unwritable file: one line on stderr);
3 a training loss became non-finite.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax._cli import run_cli
from ast_jax.config import (
    Config,
    DistillConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    SparsityConfig,
    TeacherConfig,
    TextDataConfig,
    check_gpt_widths,
    check_output,
    option,
)
from ast_jax.data import batch_at, eval_batches, load_text_data
from ast_jax.distill import LossConfig
from ast_jax.logs import MetricsLogger
from ast_jax.loop import build_gpt2, retrain, train_teacher
from ast_jax.optim import annealing_decay
from ast_jax.sparsify import apply_masks, compute_masks, count_params, is_strict_nm
from ast_jax.step import evaluate_perplexity

REQUIRED_VARIANTS = ("fixed_mask_ce", "ast_naive", "ast_boosted")
OPTIONAL_VARIANTS = ("fixed_mask_kl", "static_srste", "ste_kl")


@dataclasses.dataclass(frozen=True)
class MainTeacherConfig(TeacherConfig):
    """:class:`ast_jax.config.TeacherConfig` plus the main job's stopping rule: the teacher trains until its
    held-out loss has flattened (defaults: checked every 100 steps; flat = improving by less than 0.5% twice
    in a row, the measured teacher's rule), so retraining cannot win by merely training longer."""

    eval_every: int = option(100, "held-out evaluation interval of the teacher, in steps (>= 1)")
    flat_tol: float = option(
        0.005,
        "the teacher stops after two evaluations improving the held-out loss by less than this fraction "
        "(finite, >= 0)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least(1, "steps", "eval_every")
        self.finite("flat_tol")


@dataclasses.dataclass(frozen=True)
class MainRunConfig(RunConfig):
    """:class:`ast_jax.config.RunConfig` plus what the main job reports."""

    out_dir: str = option("outputs/ast_main", "directory for the plots (created if missing)")
    no_plots: bool = option(False, "skip the loss / flip-rate / lambda plots")
    extra_variants: str = option(
        "", f"comma-separated extra variants to run, from {', '.join(OPTIONAL_VARIANTS)} (default: none)"
    )
    fast_compile: bool = option(
        False, "XLA backend optimisation level 0: for smoke runs where compiling dominates"
    )
    log_dir: str | None = option(
        None,
        "write TensorBoard event files and metrics.jsonl of every step (losses, lambda, flip rate, learning "
        "rate, tokens/s, perplexity) to <log-dir>/<run>, one run per variant and the teacher "
        "(none = no logs)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for v in self.extras:
            if v not in OPTIONAL_VARIANTS:
                raise ValueError(f"--extra-variants: unknown variant {v!r}; choose from {OPTIONAL_VARIANTS}")

    @property
    def extras(self) -> tuple[str, ...]:
        return tuple(v for v in self.extra_variants.split(",") if v)


@dataclasses.dataclass(frozen=True)
class MainConfig(Config):
    """Settings of the main job: the sections of :mod:`ast_jax.config` (their defaults are the measured run
    of ``docs/results-ast-main.md``); impossible values raise ``ValueError`` naming the flag."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: TextDataConfig = dataclasses.field(default_factory=TextDataConfig)
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)
    loss: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    teacher: MainTeacherConfig = dataclasses.field(default_factory=MainTeacherConfig)
    run: MainRunConfig = dataclasses.field(default_factory=MainRunConfig)

    def __post_init__(self) -> None:
        self.data.require(self.data.eval_windows >= 1, "eval_windows", ">= 1")  # the job reports perplexities
        check_gpt_widths(self.model, self.sparsity, slorb=True)


def _parser():
    return MainConfig.parser("python -m ast_jax", __doc__.split("\n\n")[0])


def parse_config(argv: Sequence[str] | None = None) -> MainConfig:
    """Flags -> :class:`MainConfig` (one flag per leaf field; ``ValueError`` for impossible values)."""
    return MainConfig.from_flags(**vars(_parser().parse_args(argv)))


def _variant_specs(cfg: MainConfig) -> dict[str, dict[str, Any]]:
    kl = cfg.loss.loss()
    ce = LossConfig(w_kl=0.0, w_ce=1.0)
    specs = {
        "fixed_mask_ce": {"variant": "fixed", "loss": ce, "slorb": False},
        "ast_naive": {"variant": "annealing", "loss": kl, "slorb": False},
        "ast_boosted": {"variant": "annealing", "loss": kl, "slorb": True},
        "fixed_mask_kl": {"variant": "fixed", "loss": kl, "slorb": False},
        "static_srste": {"variant": "static", "loss": kl, "slorb": False},
        "ste_kl": {"variant": "ste", "loss": kl, "slorb": False},
    }
    return {k: specs[k] for k in (*REQUIRED_VARIANTS, *cfg.run.extras)}


def _compiler_options(cfg: MainConfig) -> dict[str, Any] | None:
    return {"xla_backend_optimization_level": 0} if cfg.run.fast_compile else None


def _jit(cfg: MainConfig, fn, **kw):
    return jax.jit(fn, compiler_options=_compiler_options(cfg), **kw)


def _heldout_ppl(model, params, data, cfg: MainConfig, windows: int, slorb=None) -> float:
    # Batches of min(64, windows) windows, so monitoring and final evaluations share one compilation.
    batches = eval_batches(
        data.heldout, cfg.data.seq_len, min(64, cfg.data.eval_windows), max_windows=windows
    )
    opts = _compiler_options(cfg)
    return evaluate_perplexity(model, params, batches, slorb_params=slorb, compiler_options=opts)


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
        every = cfg.sparsity.mask_every
        refresh = np.arange(every - 1, len(fr), every)
        if np.any(fr > 0):
            ax[0].plot(refresh + 1, fr[refresh], ".-", label=name)
    ax[0].set(
        title="flip rate at each mask refresh", xlabel="step", ylabel="flips / sparse weights", yscale="log"
    )
    ax[0].legend()
    sp = cfg.sparsity
    t = np.arange(1, cfg.run.steps + 1)
    ax[1].plot(t, np.asarray(annealing_decay(t, sp.max_decay, sp.ramp_steps)))
    ax[1].set(title=f"λ(t): λ_max={sp.max_decay:g}, T0={sp.ramp_steps}", xlabel="step", ylabel="λ")
    fig.tight_layout()
    paths.append(str(out / "flips_decay.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run(cfg: MainConfig) -> dict[str, Any]:
    """The whole job; returns the results dict that ``--json`` writes.

    Raises ``ValueError`` before any training for unusable inputs or outputs (text too short or missing,
    ``--json``/``--out-dir`` not writable) and :class:`ast_jax.step.TrainingDivergedError` when a loss becomes
    non-finite.
    """
    t_start = time.perf_counter()
    d, run = cfg.data, cfg.run
    data = load_text_data(d.text, max_bytes=d.max_bytes)
    if len(data.heldout) < d.seq_len + 1 or len(data.train) < d.seq_len + 1:
        raise ValueError(f"the text is too short for --seq-len {d.seq_len} (need several KB)")
    check_output("--json", run.json)  # before any training
    check_output("--log-dir", run.log_dir, directory=True)
    if not run.no_plots:
        check_output("--out-dir", run.out_dir, directory=True)
    model = build_gpt2(cfg.model, data.vocab_size, d.seq_len)
    with MetricsLogger(run.log_dir) as logger:
        return _run(cfg, data, model, logger, t_start)


def _run(cfg: MainConfig, data: Any, model: Any, logger: MetricsLogger, t_start: float) -> dict[str, Any]:
    """:func:`run` after its checks: teacher, variants, report; scalars to ``logger``."""
    d, sp, run = cfg.data, cfg.sparsity, cfg.run

    def ppl_of(params: Any, windows: int = d.eval_windows, slorb: Any = None) -> float:
        return _heldout_ppl(model, params, data, cfg, windows, slorb)

    # 1. the dense teacher, on batches (seed, i)
    params0 = _jit(cfg, model.init)(jax.random.key(run.seed), jnp.zeros((1, d.seq_len), jnp.int32))["params"]
    teacher, teacher_hist = train_teacher(
        model,
        params0,
        lambda i: batch_at(data.train, i, d.batch_size, d.seq_len, seed=run.seed),
        optimizer=cfg.optimizer,
        teacher=cfg.teacher,
        evaluate=lambda p: ppl_of(p, min(64, d.eval_windows)),
        eval_every=cfg.teacher.eval_every,
        flat_tol=cfg.teacher.flat_tol,
        log_every=run.log_every,
        progress=run.progress,
        compiler_options=_compiler_options(cfg),
        logger=logger,
    )
    ppl = {"dense": ppl_of(teacher)}
    logger.scalars("teacher", teacher_hist["steps"], {"eval/perplexity": ppl["dense"]})

    # 2. one-shot magnitude, then every variant at the same budget on the same batches (seed + 1, i)
    masks = _jit(cfg, lambda p: compute_masks(p, sp.n, sp.m))(teacher)
    oneshot = _jit(cfg, apply_masks)(teacher, masks)
    ppl["magnitude_oneshot"] = ppl_of(oneshot)
    logger.scalars("magnitude_oneshot", 0, {"eval/perplexity": ppl["magnitude_oneshot"]})
    strict = {"magnitude_oneshot": is_strict_nm(oneshot, sp.n, sp.m, masks=masks)}
    runs = {}
    for name, spec in _variant_specs(cfg).items():
        out = retrain(
            model,
            teacher,
            teacher,
            lambda i: batch_at(data.train, i, d.batch_size, d.seq_len, seed=run.seed + 1),
            optimizer=cfg.optimizer,
            sparsity=sp,
            steps=run.steps,
            variant=spec["variant"],
            loss=spec["loss"],
            slorb=spec["slorb"],
            name=name,
            log_every=run.log_every,
            progress=run.progress,
            compiler_options=_compiler_options(cfg),
            logger=logger,
        )
        runs[name] = out.report
        ppl[name] = ppl_of(out.params, slorb=out.slorb)
        logger.scalars(name, run.steps, {"eval/perplexity": ppl[name]})
        strict[name] = out.report["strict_nm"]

    # 3. the report
    results: dict[str, Any] = {
        "perplexity": ppl,
        "strict_2of4": all(strict.values()),
        "strict_by_variant": strict,
        "flip_rate_last_refresh": {k: r["flip_rate_last_refresh"] for k, r in runs.items()},
        "flip_rate_vs_initial": {k: r["flip_rate_vs_initial"] for k, r in runs.items()},
        "params": {
            "dense": count_params(teacher)["total"],
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
        "config": cfg.flags(),
        "backend": jax.default_backend(),
    }
    if not run.no_plots:
        results["plots"] = _plots(cfg, teacher_hist, runs, pathlib.Path(run.out_dir))
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
    return run_cli(_parser(), lambda values: MainConfig.from_flags(**values), _main_body, argv)


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
    if cfg.run.json:
        path = pathlib.Path(cfg.run.json)
        path.write_text(json.dumps(results, indent=2))
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
