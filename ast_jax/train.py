"""``python -m ast_jax.train``: sharded, multi-host, fault-tolerant AST distillation runs.

One frozen :class:`TrainConfig`; every field is one command-line flag (``steps`` -> ``--steps``,
``checkpoint_dir`` -> ``--checkpoint-dir``; booleans get ``--x/--no-x``; ``none`` clears an optional value).

What a run does:

1. ``jax.distributed`` start-up when a coordinator is given (flags or ``JAX_COORDINATOR_ADDRESS`` etc.);
2. a ``(data, fsdp)`` mesh from ``--mesh`` (:mod:`ast_jax.sharding`); params, optimizer state (masks
   included) and the teacher are FSDP-sharded, each batch is split over all devices;
3. the teacher: a dense GPT-2-style model, trained for ``--teacher-steps`` with cross-entropy (or left at its
   random init with 0), saved once under ``<checkpoint-dir>/teacher``;
4. the student starts from the teacher's weights and is retrained 2:4 with ``sparse_adamw`` and the KL + CE
   loss, using :func:`ast_jax.step.make_train_step` jitted with ``NamedSharding`` in/out shardings;
5. a checkpoint every ``--save-every`` steps and at the end (:mod:`ast_jax.checkpoint`), holding params,
   optimizer state, masks, step, RNG and data position; on restart the newest intact checkpoint is resumed
   and the run continues bit-for-bit as if never interrupted;
6. SIGTERM / SIGINT: finish the current step, save, exit with status 128 + signal number;
7. a NaN/inf loss: stop with :class:`TrainingDivergedError` (exit status 3) without saving, so the last
   checkpoint on disk is the last good state;
8. optionally: held-out perplexity, a strict N:M check, a compressed export (:mod:`ast_jax.export`) and a
   JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
import jax.numpy as jnp
import numpy as np
import optax

from ast_jax import sharding as shd
from ast_jax._cli import config_parser
from ast_jax.checkpoint import CheckpointStore, abstract_like
from ast_jax.data import batch_at, eval_batches, load_text_data
from ast_jax.distill import LossConfig
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.optim import VARIANTS, get_masks, sparse_adamw
from ast_jax.slorb import slorb_init_tree
from ast_jax.sparsify import apply_masks, compute_masks, is_strict_nm
from ast_jax.step import TrainState, evaluate_perplexity, init_train_state, make_train_step

__all__ = [
    "RunResult",
    "TrainConfig",
    "TrainingDivergedError",
    "build_model",
    "checkpoint_tree",
    "main",
    "parse_args",
    "run",
    "state_from_checkpoint_tree",
]

_log = logging.getLogger("ast_jax.train")


def _f(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All settings of one run (one field = one ``--flag``)."""

    # parallelism
    mesh: str = _f("data=-1,fsdp=1", "device mesh 'data=D,fsdp=F' (one axis may be -1 = the rest)")
    coordinator_address: str | None = _f(None, "jax.distributed coordinator host:port (multi-host)")
    num_processes: int | None = _f(None, "number of processes (multi-host)")
    process_id: int | None = _f(None, "this process's index (multi-host)")
    min_shard_size: int = _f(2**14, "leaves with fewer elements are replicated instead of FSDP-sharded")
    # run length and data
    steps: int = _f(200, "sparse retraining steps")
    batch_size: int = _f(32, "global batch size in sequences (split over data*fsdp devices)")
    seq_len: int = _f(64, "tokens per sequence")
    seed: int = _f(0, "seed of init, data order and RNG")
    text: str | None = _f(None, "UTF-8 training text (default: the built-in stdlib docstring corpus)")
    max_bytes: int | None = _f(None, "truncate the corpus to this many bytes")
    # model
    n_layer: int = _f(2, "transformer blocks")
    d_model: int = _f(128, "model width")
    n_head: int = _f(4, "attention heads")
    d_mlp: int | None = _f(None, "MLP width (default 4*d_model)")
    remat: bool = _f(False, "gradient checkpointing of each block")
    # teacher
    teacher_steps: int = _f(200, "dense CE training steps of the teacher (0 = use the random init)")
    teacher_lr: float = _f(3e-3, "teacher learning rate")
    # sparse retraining
    n: int = _f(2, "kept weights per group (N of N:M)")
    m: int = _f(4, "group size (M of N:M)")
    variant: str = _f("annealing", f"sparse optimizer variant, one of {VARIANTS}")
    lr: float = _f(1e-3, "peak learning rate (warm-up then cosine to lr/10)")
    warmup_steps: int = _f(10, "learning-rate warm-up steps")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    max_decay: float = _f(1e-2, "lambda_max of Annealing SR-STE (large for short runs; see docs/AST.md)")
    ramp_steps: int = _f(100, "T0: steps over which lambda ramps up to lambda_max")
    mask_every: int = _f(10, "mask refresh interval in steps")
    w_kl: float = _f(0.67, "weight of the KL distillation loss")
    w_ce: float = _f(0.33, "weight of the cross-entropy loss")
    temperature: float = _f(2.0, "distillation temperature")
    slorb_k: int = _f(0, "SLoRB block size k (0 = off; 16 in the paper)")
    # checkpoints
    checkpoint_dir: str | None = _f(None, "directory of orbax checkpoints (none = no checkpoints)")
    save_every: int = _f(100, "checkpoint every this many steps (and at the end)")
    keep: int = _f(3, "checkpoints kept")
    # reporting and export
    log_every: int = _f(10, "print a progress line every this many steps")
    eval_windows: int = _f(64, "held-out windows for perplexity at the end (0 = skip)")
    export_dir: str | None = _f(None, "write the compressed N:M export of the final student here")
    export_bits: int | None = _f(None, "quantise exported kept values to 4 or 8 bits (none = exact)")
    json: str | None = _f(None, "write a JSON summary of the run here")

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "n_layer", "d_model", "n_head", "save_every", "keep", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len must be >= 2, got {self.seq_len}")
        for name in (
            "teacher_steps",
            "warmup_steps",
            "ramp_steps",
            "slorb_k",
            "eval_windows",
            "min_shard_size",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"TrainConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0 < self.n < self.m:
            raise ValueError(f"TrainConfig: need 0 < n < m, got n={self.n}, m={self.m}")
        if self.variant not in VARIANTS:
            raise ValueError(f"TrainConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("lr", "teacher_lr", "temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.export_bits not in (None, 4, 8):
            raise ValueError(f"TrainConfig.export_bits must be none, 4 or 8, got {self.export_bits}")
        shd.parse_mesh(self.mesh)  # syntax check before any device work


# Fields that do not change the numbers of a run: they may differ between a run and its resumption.
_RUN_CONTROL = {
    "mesh", "coordinator_address", "num_processes", "process_id", "min_shard_size", "steps",
    "checkpoint_dir", "save_every",
    "keep", "log_every", "eval_windows", "export_dir", "export_bits", "json",
}  # fmt: skip


class TrainingDivergedError(FloatingPointError):
    """The loss or gradient became NaN/inf; no checkpoint was written after the last good one."""


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
# Building blocks


def build_model(cfg: TrainConfig) -> GPT2:
    """The byte-level GPT-2-style model (teacher and student architecture) of a :class:`TrainConfig`."""
    return GPT2(
        GPT2Config(
            vocab_size=256,
            max_len=cfg.seq_len,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            d_model=cfg.d_model,
            d_mlp=cfg.d_mlp,
            remat=cfg.remat,
        )
    )


def _student_tx(cfg: TrainConfig) -> optax.GradientTransformation:
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), cfg.lr / 10
    )
    return sparse_adamw(
        schedule,
        max_decay=cfg.max_decay,
        ramp_steps=cfg.ramp_steps,
        mask_every=cfg.mask_every,
        n=cfg.n,
        m=cfg.m,
        weight_decay=cfg.weight_decay,
        variant=cfg.variant,
    )


def checkpoint_tree(state: TrainState) -> dict[str, Any]:
    """The pytree a checkpoint stores: ``{"params", "opt_state", "step", "rng", "data_position"}``.

    ``rng`` is the raw ``uint32`` key data of the typed PRNG key (orbax stores plain arrays). Use
    ``jax.eval_shape(checkpoint_tree, state)`` to build a restore target.
    """
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": jax.random.key_data(state.rng),
        "data_position": state.data_position,
    }


def state_from_checkpoint_tree(tree: dict[str, Any]) -> TrainState:
    """Inverse of :func:`checkpoint_tree`."""
    return TrainState(
        params=tree["params"],
        opt_state=tree["opt_state"],
        step=tree["step"],
        rng=jax.random.wrap_key_data(tree["rng"]),
        data_position=tree["data_position"],
    )


def _global_batch(tokens: np.ndarray, position: int, cfg: TrainConfig, seed_offset: int, sharding) -> Any:
    b = batch_at(tokens, position, cfg.batch_size, cfg.seq_len, seed=cfg.seed + seed_offset)
    return {k: shd.host_to_global(v, sharding) for k, v in b.items()}


def _to_host(tree: Any) -> Any:
    """Full host copies of (possibly multi-host sharded) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class _SignalCatcher:
    """Record SIGTERM/SIGINT instead of dying, so the loop can save and stop; restores handlers on exit."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalCatcher:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------------------
# The run


def _init_distributed(cfg: TrainConfig) -> None:
    from jax._src import distributed as _dist

    if _dist.global_state.client is None:  # idempotent: main() or a notebook may have started it already
        shd.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now if k not in _RUN_CONTROL and saved.get(k) != now[k]}
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"checkpoint_dir {cfg.checkpoint_dir!r} holds a run with different settings ({listing}); "
            "use the same settings to resume or a fresh --checkpoint-dir"
        )


def _teacher_tx(cfg: TrainConfig) -> optax.GradientTransformation:
    warmup = min(20, cfg.teacher_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.teacher_lr, warmup, cfg.teacher_steps, cfg.teacher_lr / 10
    )
    return optax.adamw(schedule, weight_decay=0.0)


# Settings that never reach a compiled program: runs differing only in these share compilations.
_NOT_COMPILED = (
    "mesh", "coordinator_address", "num_processes", "process_id", "text", "max_bytes", "checkpoint_dir",
    "save_every", "keep", "log_every", "eval_windows", "export_dir", "export_bits", "json",
)  # fmt: skip


class _Programs(NamedTuple):
    """The jitted functions of one run, with their shardings (cached per settings and mesh)."""

    model: GPT2
    psh: Any  # NamedSharding pytree of the model params (teacher and student)
    ssh: Any  # NamedSharding pytree of the student TrainState
    bsh: Any  # NamedSharding of a batch
    init: Any  # key -> params
    make_state: Any  # teacher params -> student TrainState
    step: Any  # (state, batch, teacher params) -> (state, metrics)
    teacher_state: Any  # params -> teacher TrainState (None without teacher training)
    teacher_step: Any  # (state, batch) -> (state, metrics)
    teacher_params: Any  # teacher TrainState -> params


def _programs(cfg: TrainConfig, mesh: Any) -> _Programs:
    """Jitted programs for ``cfg`` on ``mesh``; calling :func:`run` again in the same process with settings
    that differ only in :data:`_NOT_COMPILED` fields (e.g. to resume) reuses them without recompiling."""
    key = dataclasses.replace(cfg, **{f: TrainConfig.__dataclass_fields__[f].default for f in _NOT_COMPILED})
    return _build_programs(key, mesh)


@functools.lru_cache(maxsize=4)
def _build_programs(cfg: TrainConfig, mesh: Any) -> _Programs:
    model = build_model(cfg)
    rule = functools.partial(shd.param_shardings, mesh=mesh, min_shard_size=cfg.min_shard_size)
    bsh = shd.batch_sharding(mesh)
    rep = shd.replicated(mesh)
    dummy = jnp.zeros((1, cfg.seq_len), jnp.int32)
    init_fn = lambda key: model.init(key, dummy)["params"]
    abstract_params = jax.eval_shape(init_fn, jax.random.key(0))
    psh = rule(abstract_params)

    tx = _student_tx(cfg)

    def make_state(teacher_params: Any) -> TrainState:
        slorb = None
        if cfg.slorb_k:
            masks = compute_masks(teacher_params, cfg.n, cfg.m)
            slorb = slorb_init_tree(teacher_params, masks, cfg.slorb_k)
        return init_train_state(teacher_params, tx, slorb_params=slorb, seed=cfg.seed)

    ssh = rule(jax.eval_shape(make_state, abstract_params))
    loss_cfg = LossConfig(w_kl=cfg.w_kl, w_ce=cfg.w_ce, temperature=cfg.temperature)
    step = jax.jit(
        make_train_step(model, None, tx, loss_cfg),
        in_shardings=(ssh, bsh, psh),
        out_shardings=(ssh, rep),
        donate_argnums=0,
    )
    teacher_state = teacher_step = teacher_params = None
    if cfg.teacher_steps:
        ttx = _teacher_tx(cfg)
        t_state = lambda p: init_train_state(p, ttx, seed=cfg.seed)
        tsh = rule(jax.eval_shape(t_state, abstract_params))
        teacher_state = jax.jit(t_state, in_shardings=(psh,), out_shardings=tsh)
        teacher_step = jax.jit(
            make_train_step(model, None, ttx, LossConfig(w_kl=0.0, w_ce=1.0)),
            in_shardings=(tsh, bsh),
            out_shardings=(tsh, rep),
            donate_argnums=0,
        )
        teacher_params = jax.jit(lambda st: st.params["model"], in_shardings=(tsh,), out_shardings=psh)
    return _Programs(
        model=model,
        psh=psh,
        ssh=ssh,
        bsh=bsh,
        init=jax.jit(init_fn, out_shardings=psh),
        make_state=jax.jit(make_state, in_shardings=(psh,), out_shardings=ssh),
        step=step,
        teacher_state=teacher_state,
        teacher_step=teacher_step,
        teacher_params=teacher_params,
    )


def _train_teacher(cfg, progs: _Programs, tokens, params, teacher_store, signals) -> tuple[Any, Any]:
    """Dense CE pretraining of the teacher (or restore it from ``teacher_store``) -> ``(params, loss)``.

    ``params`` is ``None`` when a signal stopped the teacher phase (it is not checkpointed part-way).
    """
    if teacher_store is not None:
        found = teacher_store.restore_latest(abstract_like(params))
        if found is not None and found.step == cfg.teacher_steps:
            _say(f"teacher: restored from {teacher_store.directory} (step {found.step})")
            return found.state, found.meta.get("final_loss")
    if cfg.teacher_steps == 0:
        return params, None
    state = progs.teacher_state(params)
    loss = float("nan")
    for i in range(cfg.teacher_steps):
        if _any_process(signals.received is not None):
            return None, None
        state, metrics = progs.teacher_step(state, _global_batch(tokens, i, cfg, 7919, progs.bsh))
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.teacher_steps:
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise TrainingDivergedError(f"teacher loss is {loss} at step {i + 1}; lower --teacher-lr")
            _say(f"teacher step {i + 1}/{cfg.teacher_steps} loss {loss:.4f}")
    teacher = progs.teacher_params(state)
    if teacher_store is not None:
        teacher_store.save(cfg.teacher_steps, teacher, {"final_loss": loss})
    return teacher, loss


def run(config: TrainConfig, *, devices: Sequence[Any] | None = None) -> RunResult:
    """Run (or resume) the sharded AST retraining described by ``config``; see the module docstring.

    ``devices`` restricts the mesh to these devices (default: all devices of all processes). Raises
    ``ValueError`` for settings that cannot work (before any compilation) and :class:`TrainingDivergedError`
    on a non-finite loss. SIGTERM/SIGINT are caught for the whole call (in the main thread): the retraining
    loop then saves and returns with ``stopped_by`` set; during teacher training it returns at once.
    """
    with _SignalCatcher() as signals:
        return _run(config, devices, signals)


def _run(cfg: TrainConfig, devices: Sequence[Any] | None, signals: _SignalCatcher) -> RunResult:
    _init_distributed(cfg)
    mesh = shd.make_mesh(cfg.mesh, devices)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n_shards:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by data*fsdp={n_shards} (mesh {dict(mesh.shape)})"
        )
    data = load_text_data(cfg.text, max_bytes=cfg.max_bytes)
    if len(data.train) < cfg.seq_len + 1:
        raise ValueError(
            f"text: only {len(data.train)} training tokens, need more than seq_len={cfg.seq_len}"
        )
    progs = _programs(cfg, mesh)
    model, bsh = progs.model, progs.bsh
    _say(
        f"ast_jax.train: {jax.process_count()} process(es), mesh {dict(mesh.shape)} on "
        f"{mesh.devices.size} {jax.devices()[0].platform} device(s), corpus {data.source} "
        f"({len(data.train):,} training bytes)"
    )

    # -- teacher (dense), sharded like any params tree ---------------------------------------------------
    params0 = progs.init(jax.random.key(cfg.seed))
    ckdir = None if cfg.checkpoint_dir is None else Path(cfg.checkpoint_dir)
    teacher_store = None if ckdir is None else CheckpointStore(ckdir / "teacher", keep=1)
    t0 = time.perf_counter()
    teacher, teacher_loss = _train_teacher(cfg, progs, data.train, params0, teacher_store, signals)
    teacher_seconds = time.perf_counter() - t0
    if teacher is None:
        _say(f"received {signals.received} during teacher training: stopping (the teacher is not saved)")
        if teacher_store is not None:
            teacher_store.close()
        return RunResult(None, 0, [], None, signals.received, {"stopped_by": signals.received})

    # -- student state: starts from the teacher's weights ---------------------------------------------------
    state = progs.make_state(teacher)
    store = None if ckdir is None else CheckpointStore(ckdir, keep=cfg.keep)
    resumed_from = None
    found = None
    skipped: list[str] = []
    if store is not None:
        shapes = jax.eval_shape(checkpoint_tree, state)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            shapes,
            shd.param_shardings(shapes, mesh, min_shard_size=cfg.min_shard_size),
        )
        found = store.restore_latest(target)
        if found is not None:
            _check_resume_config(found.meta.get("config", {}), cfg)
            state = state_from_checkpoint_tree(found.state)
            resumed_from = found.step
            skipped = found.skipped
            for msg in skipped:
                _say(f"WARNING: skipped bad checkpoint: {msg}")
            _say(f"resuming from checkpoint step {found.step} (data position {found.meta['data_position']})")
    start = resumed_from or 0
    # The data position is also inside the state (as an array); the JSON copy avoids a device round trip.
    position = int(found.meta["data_position"]) if resumed_from is not None else 0
    step_fn = progs.step

    config_meta = dataclasses.asdict(cfg)

    def save(done: int, st: TrainState) -> None:
        if store is not None:
            meta = {"step": done, "data_position": position, "config": config_meta}
            store.save(done, checkpoint_tree(st), meta)

    def check(done: int, metrics: dict[str, Any]) -> float:
        loss = float(metrics["loss"])
        if not bool(metrics["finite"]) or not math.isfinite(loss):
            last = None if store is None else store.latest_step()
            raise TrainingDivergedError(
                f"non-finite loss ({loss}) or gradient at step {done}; stopped without saving. "
                + (f"Last good checkpoint: step {last} in {store.directory}." if last is not None else "")
                + " Lower --lr or check the data."
            )
        return loss

    losses: list[tuple[int, float]] = []
    stopped_by = None
    done = start
    t_first = None
    timed_steps = 0
    pending: tuple[int, Any] | None = None
    for i in range(start, cfg.steps):
        batch = _global_batch(data.train, position, cfg, 0, bsh)
        state, metrics = step_fn(state, batch, teacher)
        position += 1
        # Check the previous step while this one runs: the host never stalls the device queue.
        if pending is not None:
            losses.append((pending[0], check(*pending)))
        pending = (i + 1, metrics)
        done = i + 1
        if t_first is None:
            jax.block_until_ready(state.step)
            t_first = time.perf_counter()  # compile + first step excluded from throughput
        else:
            timed_steps += 1
        stop = _any_process(signals.received is not None)
        if done % cfg.log_every == 0 or done == cfg.steps or done % cfg.save_every == 0 or stop:
            losses.append((done, check(*pending)))
            pending = None
            if done % cfg.log_every == 0 or done == cfg.steps:
                _say(f"step {done}/{cfg.steps} loss {losses[-1][1]:.4f}")
            if done % cfg.save_every == 0 or done == cfg.steps or stop:
                save(done, state)
        if stop:
            stopped_by = signals.received or "signal on another process"
            saved = f"saved checkpoint at step {done}, " if store is not None else ""
            _say(f"received {stopped_by}: {saved}stopping")
            break
    if pending is not None:
        losses.append((pending[0], check(*pending)))
    jax.block_until_ready(state.step)
    elapsed = time.perf_counter() - t_first if t_first is not None else float("nan")
    tokens_per_s = timed_steps * cfg.batch_size * cfg.seq_len / elapsed if timed_steps else float("nan")

    summary: dict[str, Any] = {
        "config": config_meta,
        "mesh": dict(mesh.shape),
        "processes": jax.process_count(),
        "devices": int(mesh.devices.size),
        "platform": jax.devices()[0].platform,
        "step": done,
        "resumed_from": resumed_from,
        "skipped_checkpoints": skipped,
        "stopped_by": stopped_by,
        "final_loss": losses[-1][1] if losses else None,
        "losses": losses,
        "teacher_final_loss": teacher_loss,
        "teacher_seconds": teacher_seconds,
        "tokens_per_second": tokens_per_s,
        "timed_steps": timed_steps,
    }
    if stopped_by is None:
        _finish(cfg, model, mesh, data, teacher, state, summary)
    if teacher_store is not None:
        teacher_store.close()
    if store is not None:
        store.close()
    if cfg.json and jax.process_index() == 0:
        Path(cfg.json).write_text(json.dumps(summary, indent=1, default=float))
    return RunResult(state, done, losses, resumed_from, stopped_by, summary)


def _finish(cfg, model, mesh, data, teacher, state, summary) -> None:
    """End-of-run reports: strict N:M check, held-out perplexity, compressed export."""
    masks = get_masks(state.opt_state)
    hard = _to_host(apply_masks(state.params, masks))
    model_params, slorb = hard["model"], hard.get("slorb")
    summary["strict_nm"] = is_strict_nm(model_params, cfg.n, cfg.m)
    if cfg.eval_windows:
        windows = min(cfg.eval_windows, (len(data.heldout) - 1) // cfg.seq_len)
        if windows >= 1:
            batches = list(eval_batches(data.heldout, cfg.seq_len, cfg.batch_size, windows))
            teacher_host = _to_host(teacher)
            summary["perplexity"] = {
                "teacher": evaluate_perplexity(model, teacher_host, batches),
                "student": evaluate_perplexity(model, model_params, batches, slorb_params=slorb),
            }
            _say(
                f"held-out perplexity: teacher {summary['perplexity']['teacher']:.3f}, "
                f"{cfg.n}:{cfg.m} student {summary['perplexity']['student']:.3f} "
                f"(strict {cfg.n}:{cfg.m}: {summary['strict_nm']})"
            )
    if cfg.export_dir and jax.process_index() == 0:
        from ast_jax.export import ExportConfig, compress_params, save_compressed, size_report

        exported = compress_params(hard, ExportConfig(n=cfg.n, m=cfg.m, bits=cfg.export_bits))
        save_compressed(cfg.export_dir, exported)
        rep = size_report(exported)
        summary["export"] = {k: v for k, v in rep.items() if k != "layers"}
        _say(
            f"export: {cfg.export_dir} ({rep['compressed_bytes']:,} bytes of sparse layers, "
            f"{rep['ratio_fp32']:.2f}x smaller than FP32)"
        )


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    return config_parser(
        TrainConfig,
        "python -m ast_jax.train",
        "Sharded, fault-tolerant AST 2:4 distillation (one flag per TrainConfig field).",
    )


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line -> :class:`TrainConfig` (``ValueError`` for impossible settings)."""
    ns = _parser().parse_args(argv)
    return TrainConfig(**vars(ns))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.stopped_by in ("SIGTERM", "SIGINT"):
        return 128 + int(signal.Signals[result.stopped_by])
    return 0


if __name__ == "__main__":
    sys.exit(main())
