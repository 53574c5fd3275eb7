"""The AST training loop: schedule and optimizer from the config, one loop around a jitted step, and the runs
built on it (the dense teacher; retraining, sparse, gradual magnitude pruning or dense, and its report).

Every AST entry point trains through :func:`fit`::

    for i in [start, stop):  state, metrics = step(state, batch_at(i), *step_args)

with the metrics read back to the host in blocks (every ``report_every`` steps, at ``report_at`` steps, at
the end), so the host never stalls the device queue between reports. A report hook checks, logs, saves or
stops the run; a stop hook (signals) ends it early; a :class:`ast_jax.logs.RunLog` gets every step's metrics
of a report (TensorBoard + JSON lines, with the learning rate and tokens/s). The step is
:func:`ast_jax.step.make_train_step` (pure, jitted here or, with shardings, by :mod:`ast_jax.programs`).

The optimizers come from one place: :func:`build_optimizer` (sparse: :func:`ast_jax.optim.sparse_adamw`) and
:func:`build_dense_optimizer` (the teacher and the dense controls), both on :func:`build_schedule`.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from tqdm.auto import tqdm

from ast_jax.config import ModelConfig, OptimizerConfig, SparsityConfig, TeacherConfig
from ast_jax.distill import LossConfig
from ast_jax.logs import MetricsLogger, RunLog
from ast_jax.masks import tree_size
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.optim import get_masks, get_sparse_state, sparse_adamw
from ast_jax.slorb import slorb_init_tree, trainable_masks
from ast_jax.sparsify import compute_masks, count_params, is_strict_nm
from ast_jax.step import TrainingDivergedError, final_params, init_train_state, make_train_step

__all__ = [
    "Fit",
    "LossWatch",
    "Retrained",
    "build_dense_optimizer",
    "build_optimizer",
    "build_schedule",
    "fit",
    "retrain",
    "train_teacher",
]

Batch = dict[str, Any]
CE_ONLY = LossConfig(w_kl=0.0, w_ce=1.0)


# ---------------------------------------------------------------------------------------------------------
# Schedule and optimizers


def build_gpt2(model: ModelConfig, vocab_size: int, max_len: int) -> GPT2:
    """The GPT-2-style model (teacher and student architecture) of a :class:`ModelConfig`, for a vocabulary of
    ``vocab_size`` tokens and sequences of up to ``max_len``."""
    return GPT2(
        GPT2Config(
            vocab_size=vocab_size,
            max_len=max_len,
            n_layer=model.n_layer,
            n_head=model.n_head,
            d_model=model.d_model,
            d_mlp=model.d_mlp,
            remat=model.remat,
        )
    )


def build_schedule(
    opt: OptimizerConfig, steps: int, *, lr: float | None = None, min_lr_ratio: float | None = None
) -> optax.Schedule:
    """Linear warm-up from 0 over ``W = opt.warmup_for(steps)`` steps to ``lr``, then cosine to
    ``lr·min_lr_ratio`` at step ``steps + opt.schedule_tail`` (``lr``, ``min_lr_ratio``: the optimizer
    config's unless given, e.g. the teacher's)."""
    peak = opt.lr if lr is None else lr
    ratio = opt.min_lr_ratio if min_lr_ratio is None else min_lr_ratio
    warmup = opt.warmup_for(steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(steps + opt.schedule_tail, warmup + 1), peak * ratio
    )


def build_optimizer(
    opt: OptimizerConfig,
    sparsity: SparsityConfig,
    steps: int,
    *,
    variant: str = "annealing",
    initial_masks: Any = None,
) -> optax.GradientTransformation:
    """The sparse optimizer of a run of ``steps`` steps: :func:`ast_jax.optim.sparse_adamw` on
    :func:`build_schedule` with the config's N:M, λ schedule, refresh interval, weight decay and ``b2``."""
    return sparse_adamw(
        build_schedule(opt, steps),
        max_decay=sparsity.max_decay,
        ramp_steps=sparsity.ramp_steps,
        mask_every=sparsity.mask_every,
        n=sparsity.n,
        m=sparsity.m,
        weight_decay=opt.weight_decay,
        b2=opt.b2,
        variant=variant,
        initial_masks=initial_masks,
    )


def _matrices(params: Any) -> Any:
    # nanoGPT (the base of the public AST code) decays matrices only, never biases or norm scales.
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def build_dense_optimizer(
    opt: OptimizerConfig, steps: int, *, lr: float | None = None, min_lr_ratio: float | None = None
) -> optax.GradientTransformation:
    """Plain AdamW (``b2``, decoupled weight decay of the matrices) on :func:`build_schedule`: the dense
    teacher (with its own ``lr``/``min_lr_ratio``) and the dense controls.

    ``optax.adamw`` with a mask, not :func:`ast_jax.optim.dense_adamw` (the same update up to rounding
    order), so the measured main job's teacher is reproduced bit for bit."""
    schedule = build_schedule(opt, steps, lr=lr, min_lr_ratio=min_lr_ratio)
    return optax.adamw(schedule, b2=opt.b2, weight_decay=opt.weight_decay, mask=_matrices)


def build_teacher_optimizer(opt: OptimizerConfig, teacher: TeacherConfig) -> optax.GradientTransformation:
    """:func:`build_dense_optimizer` over the teacher's steps, at its learning rate."""
    return build_dense_optimizer(opt, teacher.steps, lr=teacher.lr, min_lr_ratio=teacher.min_lr_ratio)


# ---------------------------------------------------------------------------------------------------------
# The loop


class LossWatch:
    """The loss-based divergence rule: a loss must be finite and, with ``spike > 0``, at most ``spike`` times
    the median of the last 16 accepted losses (and at most ``spike`` nats, so that the noise of a tiny loss
    never counts as a spike). ``prior`` stands in for the median before any loss was accepted."""

    def __init__(self, spike: float = 0.0, prior: float | None = None) -> None:
        self.spike = spike
        self.prior = prior
        self.history: list[float] = []

    def problem(self, loss: float) -> str | None:
        """Why ``loss`` means divergence, or ``None``."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        recent = self.history[-16:]
        ref = statistics.median(recent) if recent else self.prior
        if self.spike and ref is not None and loss > self.spike * max(ref, 1.0):
            basis = f"the median of the previous {len(recent)} losses" if recent else "a uniform guess"
            return f"loss spike: {loss:.4g} is more than {self.spike:g}x {basis} ({ref:.4g}; --loss-spike)"
        return None

    def accept(self, loss: float) -> None:
        self.history.append(loss)


class Fit(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      state: the state after the last step run.
      done: the number of the last step run (``start`` when none ran).
      stopped: a report hook or the stop hook ended the loop before ``stop``.
      history: per step run, ``step``, ``loss``, ``flip_rate`` (flip rate of the last refresh) and ``decay``
        (λ, or under gradual pruning the entries kept per group).
      seconds: wall time of the loop (the first step's compilation included).
      timed_steps, timed_seconds: the steps after the first and their wall time (for throughput).
    """

    state: Any
    done: int
    stopped: bool
    history: dict[str, list[float]]
    seconds: float
    timed_steps: int
    timed_seconds: float

    @property
    def step_seconds(self) -> float:
        """Mean time of a step after the first (compilation excluded); NaN when only one step ran."""
        return self.timed_seconds / self.timed_steps if self.timed_steps else float("nan")


def _record(history: dict[str, list[float]], rows: list[tuple[int, dict[str, Any]]]) -> None:
    for step, mt in rows:
        history["step"].append(step)
        history["loss"].append(float(mt["loss"]))
        history["flip_rate"].append(float(mt.get("flip_rate_prev", 0.0)))
        history["decay"].append(float(mt.get("keep", mt.get("decay", 0.0))))


def fit(
    step: Callable[..., tuple[Any, dict[str, jax.Array]]],
    state: Any,
    batch_at: Callable[[int], Batch],
    *,
    stop: int,
    start: int = 0,
    report_every: int = 10,
    report_at: Callable[[int], bool] | None = None,
    on_report: Callable[[list[tuple[int, dict[str, Any]]], Any, bool], bool | None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    step_args: tuple[Any, ...] = (),
    desc: str = "",
    progress: bool = False,
    log: RunLog | None = None,
) -> Fit:
    """Run ``state, metrics = step(state, batch_at(i), *step_args)`` for ``i`` in ``[start, stop)``.

    The metrics of the steps since the last report are read back in one transfer after step ``done`` when
    ``done % report_every == 0``, ``report_at(done)``, ``done == stop`` or a stop is requested; then
    ``on_report(rows, state, last)`` gets them as ``[(step, metrics on the host), ...]`` with ``state`` after
    step ``done`` and ``last`` true for the final report (end or stop). It may raise (e.g.
    :class:`ast_jax.step.TrainingDivergedError`) or return ``True`` to end the loop early.
    ``stop_requested()`` is asked after every step (e.g. whether a signal arrived).

    ``log`` gets each report's rows before ``on_report`` (so a diverging loss is logged before the hook
    raises), with the tokens (``batch["inputs"].size``) and wall time of the timed steps since the previous
    report: the first step (compilation) and the time spent in the hooks are left out.
    """
    history: dict[str, list[float]] = {"step": [], "loss": [], "flip_rate": [], "decay": []}
    pending: list[tuple[int, dict[str, Any]]] = []
    done, stopped = start, False
    t0 = time.perf_counter()
    t_first, timed = None, 0
    t_mark, tokens = 0.0, 0  # start and tokens of the timed steps since the last report
    bar = tqdm(range(start, stop), desc=desc, disable=not progress, leave=False, file=sys.stderr)
    for i in bar:
        batch = batch_at(i)
        state, metrics = step(state, batch, *step_args)
        done = i + 1
        pending.append((done, metrics))
        if t_first is None:
            jax.block_until_ready(metrics["loss"])
            t_first = t_mark = time.perf_counter()  # compilation + first step excluded from the timed steps
        else:
            timed += 1
            if log is not None:
                tokens += int(batch["inputs"].size)  # a shape, no transfer
        stop_now = stop_requested is not None and stop_requested()
        last = stop_now or done == stop
        if last or done % report_every == 0 or (report_at is not None and report_at(done)):
            rows = jax.device_get(pending)  # the last step's metrics are ready: its step has run
            pending = []
            _record(history, rows)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
            if log is not None:
                log.train_rows(rows, tokens=tokens, seconds=time.perf_counter() - t_mark)
            end_now = on_report is not None and on_report(rows, state, last) and not last
            t_mark, tokens = time.perf_counter(), 0
            if end_now:
                stopped = True
                break
        if stop_now:
            stopped = True
            break
    jax.block_until_ready(state)
    t_end = time.perf_counter()
    timed_seconds = t_end - t_first if t_first is not None else 0.0
    return Fit(state, done, stopped, history, t_end - t0, timed, timed_seconds)


def stop_if_nonfinite(name: str, flag: str = "--lr") -> Callable[..., None]:
    """An ``on_report`` hook: :class:`TrainingDivergedError` at the first non-finite loss of a report."""

    def check(rows: list[tuple[int, dict[str, Any]]], state: Any, last: bool) -> None:
        for step, mt in rows:
            if not math.isfinite(float(mt["loss"])):
                raise TrainingDivergedError(
                    f"{name}: the training loss became non-finite at step {step}; lower {flag}"
                )

    return check


# ---------------------------------------------------------------------------------------------------------
# The dense teacher, sparse retraining, and its report


def _jit(compiler_options: dict[str, Any] | None) -> Callable[..., Any]:
    return functools.partial(jax.jit, compiler_options=compiler_options)


def train_teacher(
    model: Any,
    params: Any,
    batch_at: Callable[[int], Batch],
    *,
    optimizer: OptimizerConfig,
    teacher: TeacherConfig,
    evaluate: Callable[[Any], float],
    eval_every: int,
    flat_tol: float,
    log_every: int = 10,
    progress: bool = False,
    compiler_options: dict[str, Any] | None = None,
    logger: MetricsLogger | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Dense CE training of ``params`` for at most ``teacher.steps`` steps (:func:`build_teacher_optimizer`).

    Every ``eval_every`` steps ``evaluate(params)`` gives the held-out perplexity; training stops after two
    evaluations in a row that improve the held-out loss (its log) by less than ``flat_tol`` of itself.
    Returns ``(params, history)`` with ``loss`` per step, ``eval_step``/``eval_loss``, ``steps``, ``seconds``.
    ``logger``: the steps and the stopping rule's perplexities (``eval/monitor_perplexity``) go to its run
    ``teacher``.
    """
    tx = build_teacher_optimizer(optimizer, teacher)
    log = None
    if logger is not None:
        schedule = build_schedule(optimizer, teacher.steps, lr=teacher.lr, min_lr_ratio=teacher.min_lr_ratio)
        log = logger.run("teacher", lr_schedule=schedule)
    state = init_train_state(params, tx)  # owns its buffers: donated below
    step = _jit(compiler_options)(make_train_step(model, None, tx, CE_ONLY), donate_argnums=0)
    evals: dict[str, list] = {"eval_step": [], "eval_loss": []}
    flat = 0
    nonfinite = stop_if_nonfinite("teacher", "--teacher-lr")

    def report(rows: list[tuple[int, dict[str, Any]]], st: Any, last: bool) -> bool:
        nonlocal flat
        nonfinite(rows, st, last)
        done = rows[-1][0]
        if done % eval_every and done != teacher.steps:
            return False
        ppl = evaluate(st.params["model"])
        if log is not None:  # not eval/perplexity: the entry point logs its final evaluation there
            log.scalars(done, {"eval/monitor_perplexity": ppl})
        ev = math.log(ppl)
        prev = evals["eval_loss"][-1] if evals["eval_loss"] else None
        evals["eval_step"].append(done)
        evals["eval_loss"].append(ev)
        flat = flat + 1 if prev is not None and (prev - ev) < flat_tol * prev else 0
        return flat >= 2

    out = fit(
        step,
        state,
        batch_at,
        stop=teacher.steps,
        report_every=log_every,
        report_at=lambda done: done % eval_every == 0,
        on_report=report,
        desc="teacher",
        progress=progress,
        log=log,
    )
    hist = {"loss": out.history["loss"], **evals, "steps": out.done, "seconds": out.seconds}
    return out.state.params["model"], hist


class Retrained(NamedTuple):
    """A finished retraining run: hard-masked ``params`` (masked-out weights exactly zero), ``slorb`` params
    (or ``None``), the final ``masks`` and the ``report`` (strict N:M, flip rates, non-zero parameter
    counts, ``seconds``, ``step_s`` and the per-step ``history``)."""

    params: Any
    slorb: Any
    masks: Any
    report: dict[str, Any]


def _report(
    params: Any, slorb: Any, masks: Any, n: int, m: int, flips: tuple[float, float], out: Fit
) -> dict[str, Any]:
    extra = sum(x.size for x in jax.tree_util.tree_leaves(slorb)) if slorb else 0
    return {
        "strict_nm": is_strict_nm(params, n, m, masks=masks),
        "flip_rate_last_refresh": flips[0],
        "flip_rate_vs_initial": flips[1],
        "params_nonzero": count_params(params, masks)["nonzero_after_mask"] + extra,
        "slorb_params": extra,
        "seconds": out.seconds,
        "step_s": out.step_seconds,
        "history": out.history,
    }


def retrain(
    model: Any,
    params: Any,
    teacher: Any,
    batch_at: Callable[[int], Batch],
    *,
    optimizer: OptimizerConfig,
    sparsity: SparsityConfig,
    steps: int,
    variant: str,
    loss: LossConfig,
    slorb: bool = False,
    initial_masks: Any = None,
    name: str = "retrain",
    log_every: int = 10,
    progress: bool = False,
    compiler_options: dict[str, Any] | None = None,
    logger: MetricsLogger | None = None,
) -> Retrained:
    """Retraining of ``params`` for ``steps`` steps with ``loss`` against the frozen ``teacher`` params
    (passed to every step), optionally with SLoRB.

    ``variant``: one of :data:`ast_jax.optim.VARIANTS` (:func:`build_optimizer`; ``"gmp"`` prunes from m:m
    to n:m over ``sparsity.ramp_steps`` updates), or ``"dense"`` (:func:`build_dense_optimizer`, no masks:
    the dense controls). ``initial_masks`` (model structure, ``None`` at dense leaves; default: magnitude
    masks of ``params``) start the optimizer and SLoRB. A non-finite loss raises
    :class:`TrainingDivergedError`. GMP and dense runs report no flip rate (NaN). ``logger``: every step's
    metrics go to its run ``name`` (the caller adds the run's perplexity there:
    ``logger.scalars(name, steps, {"eval/perplexity": ppl})``).
    """
    n, m = sparsity.n, sparsity.m
    jit = _jit(compiler_options)
    slorb_params = None
    if slorb:

        def init_slorb(p: Any, mk: Any) -> Any:
            mk = compute_masks(p, n, m) if mk is None else mk
            return slorb_init_tree({"model": p}, {"model": mk}, sparsity.slorb_k, "mean")["model"]

        slorb_params = jit(init_slorb)(params, initial_masks)
    masks0 = None if initial_masks is None else trainable_masks(initial_masks, slorb_params)
    if variant == "dense":
        tx = build_dense_optimizer(optimizer, steps)
    else:
        tx = build_optimizer(optimizer, sparsity, steps, variant=variant, initial_masks=masks0)
    state = init_train_state(params, tx, slorb_params=slorb_params)  # owns its buffers
    step = jit(make_train_step(model, None, tx, loss), donate_argnums=0)
    log = None if logger is None else logger.run(name, lr_schedule=build_schedule(optimizer, steps))
    out = fit(
        step,
        state,
        batch_at,
        stop=steps,
        report_every=log_every,
        on_report=stop_if_nonfinite(name),
        step_args=(teacher,),
        desc=name,
        progress=progress,
        log=log,
    )
    model_params, slorb_out = jit(final_params)(out.state)
    masks = get_masks(out.state.opt_state)
    masks = None if masks is None else masks["model"]
    flips = (math.nan, math.nan)  # a pruning schedule's or a dense run's "flips" are no AST flip rate
    if variant not in ("dense", "gmp"):
        sst = get_sparse_state(out.state.opt_state)
        size = max(tree_size(masks), 1)
        flips = (float(sst.flips_prev) / size if variant != "fixed" else 0.0, float(sst.flips_init) / size)
    report = _report(model_params, slorb_out, masks, n, m, flips, out)
    return Retrained(model_params, slorb_out, masks, report)
