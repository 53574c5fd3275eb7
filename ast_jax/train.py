"""``python -m ast_jax.train``: sharded, multi-host, fault-tolerant AST distillation runs.

One frozen :class:`TrainConfig`: the sections of :mod:`ast_jax.config` (model, data, sparsity, loss,
optimizer, teacher, run; their defaults and why) plus this entry point's own (parallel, checkpoint, export).
Every leaf is one command-line flag (``cfg.run.steps`` -> ``--steps``, ``cfg.checkpoint.checkpoint_dir`` ->
``--checkpoint-dir``, ``cfg.teacher.lr`` -> ``--teacher-lr``; booleans get ``--x/--no-x``; ``none`` clears an
optional value).

What a run does:

1. ``jax.distributed`` start-up when a coordinator is given (flags or ``JAX_COORDINATOR_ADDRESS`` etc.);
2. a ``(data, fsdp)`` mesh from ``--mesh`` (:mod:`ast_jax.sharding`); params, optimizer state (masks
   included) and the teacher are FSDP-sharded, each batch is split over all devices;
3. the teacher: a dense GPT-2-style model, trained for ``--teacher-steps`` with cross-entropy (or left at its
   random init with 0), saved once under ``<checkpoint-dir>/teacher``;
4. the student starts from the teacher's weights and is retrained 2:4 with ``sparse_adamw`` and the KL + CE
   loss (``--slorb`` adds SLoRB), using :func:`ast_jax.step.make_train_step` jitted with ``NamedSharding``
   in/out shardings (:mod:`ast_jax.programs`) in the loop of :func:`ast_jax.loop.fit`;
5. a checkpoint every ``--save-every`` steps and at the end (:mod:`ast_jax.checkpoint`), holding params,
   optimizer state, masks, step, RNG and data position; on restart the newest intact checkpoint is resumed
   and the run continues bit-for-bit as if never interrupted;
6. SIGTERM / SIGINT: finish the current step, save, exit with status 128 + signal number;
7. divergence -- a NaN/inf loss or gradient, a loss spike (``--loss-spike``), or params / optimizer state
   that are not finite or give such a loss -- stops the run with :class:`TrainingDivergedError` before that
   state is saved, so every checkpoint on disk is a good state;
8. optionally: held-out perplexity, a strict N:M check, a compressed export (:mod:`ast_jax.export`) and a
   JSON summary;
9. with ``--log-dir``: every step's loss terms, λ(t), flip rate, learning rate, tokens/s and the held-out
   perplexities as TensorBoard event files and JSON lines under ``<log-dir>/teacher`` and
   ``<log-dir>/student``, written by process 0 (:mod:`ast_jax.logs`).

Resuming compares the settings saved with the newest intact checkpoint with the current ones *before* reading
any array: a difference stops the run (nothing on disk is touched) unless it is one of the optimizer settings
that keep every array shape (``--lr``, ``--warmup-steps``, ``--min-lr-ratio``, ``--schedule-tail``,
``--weight-decay``, ``--b2``, ``--max-decay``, ``--ramp-steps``, ``--mask-every``) and
``--allow-optimizer-change`` is given; such a change is recorded in
the checkpoints and the JSON summary (``optimizer_changes``). A directory whose checkpoints all fail their
integrity check stops the run unless ``--restart`` is given. The checkpoint directory, ``--json`` and
``--export-dir`` are checked for being writable before any training step.

Exit statuses of the command line: 0 done; 2 a user error (bad flag value, settings that differ from the
checkpoint's, an unusable path); 3 training diverged; 4 no usable checkpoint (see ``--restart``);
128 + N stopped by signal N after saving.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax

from ast_jax import sharding as shd
from ast_jax._cli import run_cli
from ast_jax.checkpoint import CheckpointStore, abstract_like
from ast_jax.config import (
    Config,
    DistillConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    Section,
    SparsityConfig,
    TeacherConfig,
    TextDataConfig,
    check_gpt_widths,
    check_output,
    option,
)
from ast_jax.data import eval_batches, load_text_data
from ast_jax.logs import MetricsLogger
from ast_jax.loop import LossWatch, build_schedule, fit
from ast_jax.optim import VARIANTS, get_masks
from ast_jax.programs import (
    Programs,
    build_model,
    checkpoint_tree,
    global_batch,
    init_distributed,
    initial_params,
    pretrained_tokenizer,
    programs,
    say,
    state_from_checkpoint_tree,
)
from ast_jax.resume import (
    OPTIMIZER_SETTINGS,
    TEACHER_SETTINGS,
    SettingsMismatchError,
    SignalCatcher,
    diverged,
    resume_latest,
    settings_check,
)
from ast_jax.sparsify import apply_masks, is_strict_nm
from ast_jax.step import TrainingDivergedError, TrainState, evaluate_perplexity

__all__ = [
    "OPTIMIZER_SETTINGS",
    "RunResult",
    "SettingsMismatchError",
    "TrainConfig",
    "TrainingDivergedError",
    "build_model",
    "checkpoint_tree",
    "main",
    "parse_args",
    "run",
    "state_from_checkpoint_tree",
]


@dataclasses.dataclass(frozen=True)
class TrainRunConfig(RunConfig):
    """:class:`ast_jax.config.RunConfig` plus what this entry point trains (default: AST-Naive, the paper's
    annealing variant without SLoRB)."""

    variant: str = option("annealing", f"sparse optimizer variant, one of {', '.join(VARIANTS)}")
    slorb: bool = option(False, "add SLoRB with block size --slorb-k (AST-Boosted)")
    log_dir: str | None = option(
        None,
        "write TensorBoard event files and metrics.jsonl of every step (losses, lambda, flip rate, learning "
        "rate, tokens/s, perplexity) to <log-dir>/teacher and <log-dir>/student (none = no logs)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")


@dataclasses.dataclass(frozen=True)
class ParallelConfig(Section):
    """Mesh and multi-host settings (default: data parallel over every device, one process)."""

    mesh: str = option("data=-1,fsdp=1", "device mesh 'data=D,fsdp=F' (one axis may be -1 = the rest)")
    coordinator_address: str | None = option(None, "jax.distributed coordinator host:port (multi-host)")
    num_processes: int | None = option(None, "number of processes of a multi-host run (>= 1)")
    process_id: int | None = option(None, "this process's index in a multi-host run (0 .. num-processes - 1)")
    min_shard_size: int = option(2**14, "leaves with fewer elements are replicated instead of FSDP-sharded")

    def __post_init__(self) -> None:
        self.at_least(1, "num_processes")
        self.at_least(0, "process_id", "min_shard_size")
        try:
            shd.parse_mesh(self.mesh)  # syntax check before any device work
        except ValueError as e:
            raise ValueError(f"--mesh {self.mesh!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
    """Checkpoints and failure handling (defaults: a checkpoint every 100 steps, the last 3 kept)."""

    checkpoint_dir: str | None = option(None, "directory of orbax checkpoints (none = no checkpoints)")
    save_every: int = option(100, "checkpoint every this many steps, and at the end (>= 1)")
    keep: int = option(3, "checkpoints kept (>= 1)")
    restart: bool = option(
        False,
        "when no checkpoint in --checkpoint-dir passes its integrity check, move them all to _corrupted/ and "
        "start from step 0 (without this flag such a run stops with exit status 4); no effect when an intact "
        "checkpoint exists",
    )
    allow_optimizer_change: bool = option(
        False,
        "resume a checkpoint although --lr, --warmup-steps, --min-lr-ratio, --schedule-tail, --weight-decay, "
        "--b2, --max-decay, --ramp-steps or --mask-every differ from the run that wrote it (the change is "
        "recorded in the checkpoints and --json); settings that change array shapes or the loss can never "
        "change on resume",
    )
    loss_spike: float = option(
        10.0,
        "divergence rule: stop (saving nothing newer) when a loss exceeds this many times the median of the "
        "last 16 losses (and this many nats); 0 = only NaN/inf stop the run (else finite, > 1)",
    )

    def __post_init__(self) -> None:
        self.at_least(1, "save_every", "keep")
        ok = self.loss_spike == 0 or (math.isfinite(self.loss_spike) and self.loss_spike > 1)
        self.require(ok, "loss_spike", "0 (off) or a finite number > 1")


@dataclasses.dataclass(frozen=True)
class TrainModelConfig(ModelConfig):
    """The byte-level GPT-2 of :class:`ast_jax.config.ModelConfig`, or (``--model PATH``) a pretrained
    teacher: a Hugging Face directory or a GGUF file (:func:`ast_jax.model_source.load_model`). With
    ``--model`` the GPT-2 size flags and the teacher training (``--teacher-*``) do not apply: the teacher
    is the loaded model and its own tokenizer tokenises ``--text``."""

    model: str | None = option(
        None, "pretrained teacher: Hugging Face directory or GGUF file (none = train a byte-level GPT-2)"
    )


@dataclasses.dataclass(frozen=True)
class ExportSection(Section):
    """The export of the final student (default: none)."""

    export_dir: str | None = option(
        None, "write the final student here (a directory; a .gguf file for --export-format gguf)"
    )
    export_format: str = option("compact", "compact (N:M, smallest), hf, compressed-tensors or gguf")
    export_bits: int | None = option(
        None, "compact: quantise kept values to 4 or 8 bits; compressed-tensors: 4 (default) or 8"
    )

    def __post_init__(self) -> None:
        self.require(self.export_bits in (None, 4, 8), "export_bits", "none, 4 or 8")
        formats = ("compact", "hf", "compressed-tensors", "gguf")
        self.require(self.export_format in formats, "export_format", ", ".join(formats))


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """All settings of one run: the :mod:`ast_jax.config` sections plus parallelism, checkpoints and export
    (one leaf = one ``--flag``); impossible values raise ``ValueError`` naming the flag when it is built."""

    model: TrainModelConfig = dataclasses.field(default_factory=TrainModelConfig)
    data: TextDataConfig = dataclasses.field(default_factory=TextDataConfig)
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)
    loss: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    run: TrainRunConfig = dataclasses.field(default_factory=TrainRunConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    export: ExportSection = dataclasses.field(default_factory=ExportSection)

    def __post_init__(self) -> None:
        if self.model.model is None:  # a pretrained model's widths are checked when it is loaded
            check_gpt_widths(self.model, self.sparsity, slorb=self.run.slorb)


class RunResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      state: the final :class:`ast_jax.step.TrainState` (sharded).
      step: completed retraining steps.
      losses: ``(step, loss)`` of every step run in this process (not the resumed-over ones).
      resumed_from: checkpoint step resumed from, or ``None``.
      stopped_by: ``None``, or the name of the signal that stopped the run early.
      summary: the JSON summary (perplexities, throughput, export sizes, ...).
    """

    state: TrainState
    step: int
    losses: list[tuple[int, float]]
    resumed_from: int | None
    stopped_by: str | None
    summary: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# The run


def _train_teacher(cfg, progs: Programs, tokens, params, teacher_store, signals, logger) -> tuple[Any, Any]:
    """Dense CE pretraining of the teacher (or restore it from ``teacher_store``) -> ``(params, loss)``.

    ``params`` is ``None`` when a signal stopped the teacher phase (it is not checkpointed part-way).
    """
    steps, run = cfg.teacher.steps, cfg.run
    if steps == 0 or cfg.model.model is not None:  # a pretrained teacher is used as it is
        return params, None
    if teacher_store is not None:
        check = settings_check(cfg, TEACHER_SETTINGS, {}, required=False, directory=teacher_store.directory)
        found = teacher_store.restore_latest(
            abstract_like(params), check_meta=check, restart=cfg.checkpoint.restart
        )
        if found is not None and found.step == steps:
            say(f"teacher: restored from {teacher_store.directory} (step {found.step})")
            return found.state, found.meta.get("final_loss")
    watch = LossWatch(cfg.checkpoint.loss_spike, prior=math.log(256))  # a uniform guess over the bytes
    last_loss = [float("nan")]

    def report(rows: list[tuple[int, dict[str, Any]]], state: Any, last: bool) -> None:
        done, metrics = rows[-1]
        if done % run.log_every and done != steps:
            return  # the teacher's rule looks at the logged losses only
        loss = last_loss[0] = float(metrics["loss"])
        problem = watch.problem(loss)
        if problem is not None:
            raise diverged(f"teacher {problem}", done, None, cfg, "--teacher-lr")
        watch.accept(loss)
        if run.progress:
            say(f"teacher step {done}/{steps} loss {loss:.4f}")

    t = cfg.teacher
    schedule = build_schedule(cfg.optimizer, steps, lr=t.lr, min_lr_ratio=t.min_lr_ratio)
    out = fit(
        progs.teacher_step,
        progs.teacher_state(params),
        lambda i: global_batch(tokens, i, cfg, 7919, progs.bsh),
        stop=steps,
        report_every=run.log_every,
        on_report=report,
        stop_requested=signals.any_process,
        log=logger.run("teacher", lr_schedule=schedule),
    )
    if out.stopped and out.done < steps:
        return None, None
    teacher, finite = progs.teacher_params(out.state)
    if not bool(finite):
        raise diverged("the teacher's params hold NaN/inf", steps, None, cfg, "--teacher-lr")
    if teacher_store is not None:
        config = {k: v for k, v in cfg.flags().items() if k in TEACHER_SETTINGS}
        teacher_store.save(steps, teacher, {"final_loss": last_loss[0], "config": config})
    return teacher, last_loss[0]


def _check_outputs(cfg: TrainConfig) -> tuple[CheckpointStore | None, CheckpointStore | None]:
    """Open the checkpoint stores and check ``--json`` / ``--export-dir``: every output path is known to be
    writable before the first training step. Returns ``(teacher_store, store)``."""
    if jax.process_index() == 0:  # only process 0 writes these
        check_output("--json", cfg.run.json)
        check_output("--export-dir", cfg.export.export_dir, directory=True)
        check_output("--log-dir", cfg.run.log_dir, directory=True)
    ck = cfg.checkpoint
    if ck.checkpoint_dir is None:
        return None, None
    ckdir = Path(ck.checkpoint_dir)
    try:
        store = CheckpointStore(ckdir, keep=ck.keep)
        teacher_store = CheckpointStore(ckdir / "teacher", keep=1)
    except ValueError as e:
        raise ValueError(f"--checkpoint-dir {ck.checkpoint_dir!r}: {e}") from None
    return teacher_store, store


def run(config: TrainConfig, *, devices: Sequence[Any] | None = None) -> RunResult:
    """Run (or resume) the sharded AST retraining described by ``config``; see the module docstring.

    ``devices`` restricts the mesh to these devices (default: all devices of all processes). Raises, before
    any training step: ``ValueError`` for settings or paths that cannot work,
    :class:`SettingsMismatchError` when the checkpoint to resume was written with other settings, and
    :class:`ast_jax.checkpoint.NoUsableCheckpointError` when every checkpoint is damaged (unless
    ``restart``); during training, :class:`TrainingDivergedError` (nothing diverged is saved).
    SIGTERM/SIGINT are caught for the whole call (in the main thread): the retraining loop then saves and
    returns with ``stopped_by`` set; during teacher training it returns at once.
    """
    with SignalCatcher() as signals:
        teacher_store = store = logger = None
        try:
            init_distributed(config)
            mesh = shd.make_mesh(config.parallel.mesh, devices)
            n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
            if config.data.batch_size % n_shards:
                raise ValueError(
                    f"--batch-size {config.data.batch_size} must be divisible by data*fsdp={n_shards} "
                    f"(mesh {dict(mesh.shape)})"
                )
            teacher_store, store = _check_outputs(config)
            logger = MetricsLogger(config.run.log_dir)  # after the check: --log-dir is writable
            return _run(config, mesh, signals, teacher_store, store, logger)
        finally:
            for s in (teacher_store, store, logger):
                if s is not None:
                    s.close()


def _run(cfg: TrainConfig, mesh, signals: SignalCatcher, teacher_store, store, logger) -> RunResult:
    d, run = cfg.data, cfg.run
    data = load_text_data(d.text, max_bytes=d.max_bytes, tokenizer=pretrained_tokenizer(cfg))
    if len(data.train) < d.seq_len + 1:
        raise ValueError(
            f"--text: only {len(data.train)} training tokens, need more than --seq-len {d.seq_len}"
        )
    say(
        f"ast_jax.train: {jax.process_count()} process(es), mesh {dict(mesh.shape)} on "
        f"{mesh.devices.size} {jax.devices()[0].platform} device(s), corpus {data.source} "
        f"({len(data.train):,} training bytes)"
    )
    # -- resume: settings compared before any array is read, before any training --------------------------
    found, optimizer_changes = resume_latest(cfg, mesh, store)
    resumed_from = None if found is None else found.step

    # -- teacher (dense), sharded like any params tree ---------------------------------------------------
    progs = programs(cfg, mesh)
    t0 = time.perf_counter()
    params0 = initial_params(cfg, progs)
    teacher, teacher_loss = _train_teacher(cfg, progs, data.train, params0, teacher_store, signals, logger)
    teacher_seconds = time.perf_counter() - t0
    if teacher is None:
        say(f"received {signals.received} during teacher training: stopping (the teacher is not saved)")
        return RunResult(None, 0, [], None, signals.received, {"stopped_by": signals.received})

    # -- student: the checkpoint's state, or a fresh one from the teacher's weights ------------------------
    state = progs.make_state(teacher) if found is None else state_from_checkpoint_tree(found.state)
    start = resumed_from or 0
    # The data position is also inside the state (as an array); the JSON copy avoids a device round trip.
    position0 = int(found.meta["data_position"]) if found is not None else 0
    batch = lambda i: global_batch(data.train, position0 + i - start, cfg, 0, progs.bsh)
    config_meta = cfg.flags()
    watch = LossWatch(cfg.checkpoint.loss_spike)
    losses: list[tuple[int, float]] = []

    def save(done: int, st: TrainState) -> None:
        # Checked also without a store: a diverged state must not reach the export either.
        finite, loss = progs.probe(st, batch(done), teacher)
        if not bool(finite):
            raise diverged("the updated params or optimizer state hold NaN/inf", done, store, cfg)
        problem = watch.problem(float(loss))
        if problem is not None:
            raise diverged(f"the updated params give a {problem}", done, store, cfg)
        if store is not None:
            meta = {
                "step": done,
                "data_position": position0 + done - start,
                "config": config_meta,
                "optimizer_changes": optimizer_changes,
            }
            store.save(done, checkpoint_tree(st), meta)

    def report(rows: list[tuple[int, dict[str, Any]]], st: TrainState, last: bool) -> None:
        for done, metrics in rows:
            loss = float(metrics["loss"])
            if not bool(metrics["finite"]):
                raise diverged(f"non-finite loss ({loss}) or gradient", done, store, cfg)
            problem = watch.problem(loss)
            if problem is not None:
                raise diverged(problem, done, store, cfg)
            watch.accept(loss)
            losses.append((done, loss))
        done = rows[-1][0]
        if run.progress and (done % run.log_every == 0 or done == run.steps):
            say(f"step {done}/{run.steps} loss {losses[-1][1]:.4f}")
        if done % cfg.checkpoint.save_every == 0 or last:
            save(done, st)

    out = fit(
        progs.step,
        state,
        batch,
        start=start,
        stop=run.steps,
        report_every=run.log_every,
        report_at=lambda done: done % cfg.checkpoint.save_every == 0,
        on_report=report,
        stop_requested=signals.any_process,
        step_args=(teacher,),
        log=logger.run("student", lr_schedule=build_schedule(cfg.optimizer, run.steps)),
    )
    state, done = out.state, out.done
    stopped_by = None
    if out.stopped:
        stopped_by = signals.received or "signal on another process"
        saved = f"saved checkpoint at step {done}, " if store is not None else ""
        say(f"received {stopped_by}: {saved}stopping")
    tokens = out.timed_steps * d.batch_size * d.seq_len
    summary: dict[str, Any] = {
        "config": config_meta,
        "mesh": dict(mesh.shape),
        "processes": jax.process_count(),
        "devices": int(mesh.devices.size),
        "platform": jax.devices()[0].platform,
        "step": done,
        "resumed_from": resumed_from,
        "skipped_checkpoints": [] if found is None else found.skipped,
        "optimizer_changes": optimizer_changes,
        "stopped_by": stopped_by,
        "final_loss": losses[-1][1] if losses else None,
        "losses": losses,
        "teacher_final_loss": teacher_loss,
        "teacher_seconds": teacher_seconds,
        "tokens_per_second": tokens / out.timed_seconds if out.timed_steps else float("nan"),
        "timed_steps": out.timed_steps,
    }
    if stopped_by is None:
        _finish(cfg, progs.model, data, teacher, state, summary)
        if "perplexity" in summary:
            ppl = summary["perplexity"]
            teacher_step = 0 if cfg.model.model is not None else cfg.teacher.steps  # a loaded teacher: step 0
            logger.scalars("teacher", teacher_step, {"eval/perplexity": ppl["teacher"]})
            logger.scalars("student", done, {"eval/perplexity": ppl["student"]})
    if run.json and jax.process_index() == 0:
        Path(run.json).write_text(json.dumps(summary, indent=1, default=float))
    return RunResult(state, done, losses, resumed_from, stopped_by, summary)


def _finish(cfg: TrainConfig, model, data, teacher, state, summary) -> None:
    """End-of-run reports: strict N:M check, held-out perplexity, compressed export."""
    n, m, d = cfg.sparsity.n, cfg.sparsity.m, cfg.data
    hard = shd.to_host(apply_masks(state.params, get_masks(state.opt_state)))
    model_params, slorb = hard["model"], hard.get("slorb")
    summary["strict_nm"] = is_strict_nm(model_params, n, m)
    windows = min(d.eval_windows, (len(data.heldout) - 1) // d.seq_len)
    if windows >= 1:
        batches = list(eval_batches(data.heldout, d.seq_len, d.batch_size, windows))
        summary["perplexity"] = {
            "teacher": evaluate_perplexity(model, shd.to_host(teacher), batches),
            "student": evaluate_perplexity(model, model_params, batches, slorb_params=slorb),
        }
        say(
            f"held-out perplexity: teacher {summary['perplexity']['teacher']:.3f}, {n}:{m} student "
            f"{summary['perplexity']['student']:.3f} (strict {n}:{m}: {summary['strict_nm']})"
        )
    ex = cfg.export
    if not ex.export_dir or jax.process_index() != 0:
        return
    if ex.export_format == "compact" and slorb:
        # The compact format has no place for SLoRB params in a loadable model, so they are stored beside the
        # kernels as {model, slorb} (readable with ast_jax.export.load_compressed, not as a --model).
        from ast_jax.export import ExportConfig, compress_params, save_compressed, size_report

        exported = compress_params(hard, ExportConfig(n=n, m=m, bits=ex.export_bits))
        save_compressed(ex.export_dir, exported)
        rep = size_report(exported)
        summary["export"] = {k: v for k, v in rep.items() if k != "layers"}
        say(
            f"export: {ex.export_dir} ({rep['compressed_bytes']:,} bytes of sparse layers, "
            f"{rep['ratio_fp32']:.2f}x smaller than FP32; with SLoRB params, so not loadable as --model)"
        )
        return
    from ast_jax.export_cli import export_model
    from ast_jax.model_source import byte_tokenizer, pretrained

    source = None if cfg.model.model is None else pretrained(cfg.model.model)
    summary["export"] = export_model(
        model, model_params, ex.export_dir, format=ex.export_format, n=n, m=m, bits=ex.export_bits,
        tokenizer=byte_tokenizer() if source is None else source.tokenizer,
        hf_config=None if source is None else source.hf_config,
        tokenizer_dir=source.source if source is not None and source.kind == "hf" else None,
        dtype="float32", slorb=slorb, fold_slorb=False,
    )  # fmt: skip
    say(f"export: {ex.export_format} {summary['export']['path']} ({summary['export']['bytes']:,} bytes)")


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parser():
    return TrainConfig.parser(
        "python -m ast_jax.train",
        "Sharded, fault-tolerant AST 2:4 distillation (one flag per TrainConfig setting).",
    )


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line -> :class:`TrainConfig` (``ValueError`` for impossible settings)."""
    return TrainConfig.from_flags(**vars(_parser().parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ast_jax.train``: returns the exit status (see the module docstring for their meaning)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body(cfg: TrainConfig) -> int:
        result = run(cfg)
        if result.stopped_by in ("SIGTERM", "SIGINT"):
            return 128 + int(signal.Signals[result.stopped_by])
        return 0

    return run_cli(_parser(), lambda values: TrainConfig.from_flags(**values), body, argv)


if __name__ == "__main__":
    sys.exit(main())
