"""The AST training loop: schedule and optimizer from the config, one loop around a jitted step, and the runs
built on it (the dense teacher, sparse retraining and its report, gradual magnitude pruning).

Every AST entry point trains through :func:`fit`::

    for i in [start, stop):  state, metrics = step(state, batch_at(i), *step_args)

with the metrics read back to the host in blocks (every ``report_every`` steps, at ``report_at`` steps, at
the end), so the host never stalls the device queue between reports. A report hook checks, logs, saves or
stops the run; a stop hook (signals) ends it early. The step is :func:`ast_jax.step.make_train_step` (pure,
jitted here or, with shardings, by :mod:`ast_jax.train`), or the GMP step below.

The optimizers come from one place: :func:`build_optimizer` (sparse: :func:`ast_jax.optim.sparse_adamw`) and
:func:`build_dense_optimizer` (the teacher, GMP and the dense controls), both on :func:`build_schedule`.
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
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from ast_jax.config import OptimizerConfig, SparsityConfig, TeacherConfig
from ast_jax.distill import LossConfig, distill_loss
from ast_jax.masks import nm_mask, tree_flip_count, tree_size
from ast_jax.optim import get_masks, get_sparse_state, sparse_adamw
from ast_jax.slorb import slorb_init_tree
from ast_jax.sparsify import apply_masks, compute_masks, count_params, is_strict_nm, masked_params
from ast_jax.step import TrainingDivergedError, final_params, init_train_state, make_train_step

__all__ = [
    "Fit",
    "GMPState",
    "LossWatch",
    "Retrained",
    "build_dense_optimizer",
    "build_optimizer",
    "build_schedule",
    "fit",
    "gmp_keep",
    "make_gmp_step",
    "retrain",
    "retrain_gmp",
    "train_teacher",
]

Batch = dict[str, Any]
CE_ONLY = LossConfig(w_kl=0.0, w_ce=1.0)


# ---------------------------------------------------------------------------------------------------------
# Schedule and optimizers


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
    teacher (with its own ``lr``/``min_lr_ratio``), GMP and the dense controls."""
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
      history: per step run, ``step``, ``loss``, ``flip_rate`` (flip rate of the last refresh, or GMP's
        flips) and ``decay`` (λ, or GMP's kept entries per group).
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
        history["flip_rate"].append(float(mt.get("flip_rate_prev", mt.get("flips", 0.0))))
        history["decay"].append(float(mt.get("decay", mt.get("keep", 0.0))))


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
) -> Fit:
    """Run ``state, metrics = step(state, batch_at(i), *step_args)`` for ``i`` in ``[start, stop)``.

    The metrics of the steps since the last report are read back in one transfer after step ``done`` when
    ``done % report_every == 0``, ``report_at(done)``, ``done == stop`` or a stop is requested; then
    ``on_report(rows, state, last)`` gets them as ``[(step, metrics on the host), ...]`` with ``state`` after
    step ``done`` and ``last`` true for the final report (end or stop). It may raise (e.g.
    :class:`ast_jax.step.TrainingDivergedError`) or return ``True`` to end the loop early.
    ``stop_requested()`` is asked after every step (e.g. whether a signal arrived).
    """
    history: dict[str, list[float]] = {"step": [], "loss": [], "flip_rate": [], "decay": []}
    pending: list[tuple[int, dict[str, Any]]] = []
    done, stopped = start, False
    t0 = time.perf_counter()
    t_first, timed = None, 0
    bar = tqdm(range(start, stop), desc=desc, disable=not progress, leave=False, file=sys.stderr)
    for i in bar:
        state, metrics = step(state, batch_at(i), *step_args)
        done = i + 1
        pending.append((done, metrics))
        if t_first is None:
            jax.block_until_ready(metrics["loss"])
            t_first = time.perf_counter()  # compilation + first step excluded from the timed steps
        else:
            timed += 1
        stop_now = stop_requested is not None and stop_requested()
        last = stop_now or done == stop
        if last or done % report_every == 0 or (report_at is not None and report_at(done)):
            rows = jax.device_get(pending)
            pending = []
            _record(history, rows)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
            if on_report is not None and on_report(rows, state, last) and not last:
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


def _fresh(tree: Any) -> Any:
    # The state is donated to the jitted step: it must own one buffer per leaf (callers keep their arrays,
    # and an optimizer state may share buffers at init, e.g. masks and initial masks).
    return jax.tree.map(jnp.copy, tree)


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
    seed: int = 0,
    log_every: int = 10,
    progress: bool = False,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Dense CE training of ``params`` for at most ``teacher.steps`` steps (:func:`build_teacher_optimizer`).

    Every ``eval_every`` steps ``evaluate(params)`` gives the held-out perplexity; training stops after two
    evaluations in a row that improve the held-out loss (its log) by less than ``flat_tol`` of itself.
    Returns ``(params, history)`` with ``loss`` per step, ``eval_step``/``eval_loss``, ``steps``, ``seconds``.
    """
    tx = build_teacher_optimizer(optimizer, teacher)
    state = _fresh(init_train_state(params, tx, seed=seed))
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
        ev = math.log(evaluate(st.params["model"]))
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
    seed: int = 0,
    name: str = "retrain",
    log_every: int = 10,
    progress: bool = False,
    compiler_options: dict[str, Any] | None = None,
) -> Retrained:
    """Sparse retraining of ``params`` for ``steps`` steps with :func:`build_optimizer` (``variant``) and
    ``loss`` against the frozen ``teacher`` params (passed to every step), optionally with SLoRB.

    ``initial_masks`` (model structure, ``None`` at dense leaves; default: magnitude masks of ``params``)
    start the optimizer and SLoRB. A non-finite loss raises :class:`TrainingDivergedError`.
    """
    n, m = sparsity.n, sparsity.m
    jit = _jit(compiler_options)
    slorb_params = None
    if slorb:

        def init_slorb(p: Any, mk: Any) -> Any:
            mk = compute_masks(p, n, m) if mk is None else mk
            return slorb_init_tree({"model": p}, {"model": mk}, sparsity.slorb_k, "mean")["model"]

        slorb_params = jit(init_slorb)(params, initial_masks)
    masks0 = None
    if initial_masks is not None:
        masks0 = {"model": initial_masks}
        if slorb_params:
            masks0["slorb"] = jax.tree.map(lambda x: None, slorb_params)
    tx = build_optimizer(optimizer, sparsity, steps, variant=variant, initial_masks=masks0)
    state = _fresh(init_train_state(params, tx, slorb_params=slorb_params, seed=seed))
    step = jit(make_train_step(model, None, tx, loss), donate_argnums=0)
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
    )
    model_params, slorb_out = jit(final_params)(out.state)
    masks = get_masks(out.state.opt_state)["model"]
    sst = get_sparse_state(out.state.opt_state)
    size = max(tree_size(masks), 1)
    flips = (float(sst.flips_prev) / size if variant != "fixed" else 0.0, float(sst.flips_init) / size)
    return Retrained(
        model_params, slorb_out, masks, _report(model_params, slorb_out, masks, n, m, flips, out)
    )


# ---------------------------------------------------------------------------------------------------------
# Gradual magnitude pruning (its own small step: masks shrink from m:m to n:m, pruned weights are zeroed)


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


def retrain_gmp(
    model: Any,
    teacher: Any,
    teacher_fwd: Any,
    batch_at: Callable[[int], Batch],
    *,
    optimizer: OptimizerConfig,
    sparsity: SparsityConfig,
    steps: int,
    ramp_frac: float,
    loss: LossConfig,
    n_keep: int | None = None,
    name: str = "gmp",
    log_every: int = 10,
    progress: bool = False,
) -> Retrained:
    """GMP from the dense ``teacher`` params with :func:`build_dense_optimizer`: the kept entries per group go
    from m down to ``n_keep`` (default: the config's n) on :func:`gmp_keep` over ``ramp_frac`` of the steps
    (whole refresh intervals); ``n_keep = m`` never prunes (a dense fine-tune on the same loop).
    ``teacher_fwd`` is the teacher in the forward pass's dtype."""
    n, m, every = sparsity.n, sparsity.m, sparsity.mask_every
    tx = build_dense_optimizer(optimizer, steps)
    params = {"model": teacher}
    masks0 = jax.tree_util.tree_map(jnp.ones_like, {"model": compute_masks(teacher, n, m)})  # dense start
    ramp = max(every, round(ramp_frac * steps) // every * every)
    state = _fresh(GMPState(params, tx.init(params), masks0, jnp.zeros((), jnp.int32)))
    keep = n if n_keep is None else n_keep
    step = jax.jit(make_gmp_step(model, tx, loss, keep, m, ramp, every), donate_argnums=0)
    out = fit(
        step,
        state,
        batch_at,
        stop=steps,
        report_every=log_every,
        on_report=stop_if_nonfinite(name),
        step_args=(teacher_fwd,),
        desc=name,
        progress=progress,
    )
    masks = out.state.masks["model"]
    params = apply_masks(out.state.params, out.state.masks)["model"]
    return Retrained(params, None, masks, _report(params, None, masks, n, m, (math.nan, math.nan), out))
