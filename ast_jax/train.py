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
7. divergence -- a NaN/inf loss or gradient, a loss spike (``--loss-spike``), or params / optimizer state
   that are not finite or give such a loss -- stops the run with :class:`TrainingDivergedError` before that
   state is saved, so every checkpoint on disk is a good state;
8. optionally: held-out perplexity, a strict N:M check, a compressed export (:mod:`ast_jax.export`) and a
   JSON summary.

Resuming compares the settings saved with the newest intact checkpoint with the current ones *before* reading
any array: a difference stops the run (nothing on disk is touched) unless it is one of the optimizer settings
that keep every array shape (``--lr``, ``--warmup-steps``, ``--weight-decay``, ``--max-decay``,
``--ramp-steps``, ``--mask-every``) and ``--allow-optimizer-change`` is given; such a change is recorded in
the checkpoints and the JSON summary (``optimizer_changes``). A directory whose checkpoints all fail their
integrity check stops the run unless ``--restart`` is given. The checkpoint directory, ``--json`` and
``--export-dir`` are checked for being writable before any training step.

Exit statuses of the command line: 0 done; 2 a user error (bad flag value, settings that differ from the
checkpoint's, an unusable path); 3 training diverged; 4 no usable checkpoint (see ``--restart``);
128 + N stopped by signal N after saving.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ast_jax import sharding as shd
from ast_jax._cli import config_parser, option, run_cli
from ast_jax.checkpoint import CheckpointMismatchError, CheckpointStore, abstract_like, ensure_writable_dir
from ast_jax.data import batch_at, eval_batches, load_text_data
from ast_jax.distill import LossConfig, distill_loss
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.optim import VARIANTS, get_masks, sparse_adamw
from ast_jax.slorb import apply_with_slorb, slorb_init_tree
from ast_jax.sparsify import apply_masks, compute_masks, is_strict_nm
from ast_jax.step import (
    TrainingDivergedError,
    TrainState,
    evaluate_perplexity,
    init_train_state,
    make_train_step,
)

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

_log = logging.getLogger("ast_jax.train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All settings of one run (one field = one ``--flag``); impossible values raise ``ValueError`` naming
    the flag when the config is built."""

    # parallelism
    mesh: str = option("data=-1,fsdp=1", "device mesh 'data=D,fsdp=F' (one axis may be -1 = the rest)")
    coordinator_address: str | None = option(None, "jax.distributed coordinator host:port (multi-host)")
    num_processes: int | None = option(None, "number of processes of a multi-host run (>= 1)")
    process_id: int | None = option(None, "this process's index in a multi-host run (0 .. num-processes - 1)")
    min_shard_size: int = option(2**14, "leaves with fewer elements are replicated instead of FSDP-sharded")
    # run length and data
    steps: int = option(200, "sparse retraining steps (>= 1)")
    batch_size: int = option(32, "global batch size in sequences, split over data*fsdp devices (>= 1)")
    seq_len: int = option(64, "tokens per sequence (>= 2)")
    seed: int = option(0, "seed of init, data order and RNG (>= 0)")
    text: str | None = option(None, "UTF-8 training text (default: the built-in stdlib docstring corpus)")
    max_bytes: int | None = option(None, "truncate the corpus to this many bytes (>= 1; none = all)")
    # model
    n_layer: int = option(2, "transformer blocks (>= 1)")
    d_model: int = option(128, "model width; a multiple of --n-head and of --m (>= 1)")
    n_head: int = option(4, "attention heads (>= 1)")
    d_mlp: int | None = option(None, "MLP width, a multiple of --m (default 4*d_model)")
    remat: bool = option(False, "gradient checkpointing of each block (less memory, more compute)")
    # teacher
    teacher_steps: int = option(200, "dense CE training steps of the teacher (0 = use the random init)")
    teacher_lr: float = option(3e-3, "teacher peak learning rate (finite, > 0)")
    # sparse retraining
    n: int = option(2, "kept weights per group (N of N:M, 0 < N < M)")
    m: int = option(4, "group size (M of N:M, >= 2)")
    variant: str = option("annealing", f"sparse optimizer variant, one of {', '.join(VARIANTS)}")
    lr: float = option(1e-3, "peak learning rate, warm-up then cosine to lr/10 (finite, > 0)")
    warmup_steps: int = option(10, "learning-rate warm-up steps (>= 0)")
    weight_decay: float = option(0.0, "decoupled weight decay of the matrices (finite, >= 0)")
    max_decay: float = option(
        1e-2, "lambda_max of Annealing SR-STE (finite, >= 0; large for short runs; see docs/AST.md)"
    )
    ramp_steps: int = option(100, "T0: steps over which lambda ramps up to lambda_max (>= 0)")
    mask_every: int = option(10, "mask refresh interval in steps (>= 1)")
    w_kl: float = option(0.67, "weight of the KL distillation loss (finite, >= 0)")
    w_ce: float = option(0.33, "weight of the cross-entropy loss (finite, >= 0; w_kl + w_ce > 0)")
    temperature: float = option(2.0, "distillation temperature (finite, > 0)")
    slorb_k: int = option(
        0, "SLoRB block size k, dividing every sparse layer's input (0 = off; 16 in the paper)"
    )
    # checkpoints and failure handling
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
        "resume a checkpoint although --lr, --warmup-steps, --weight-decay, --max-decay, --ramp-steps or "
        "--mask-every differ from the run that wrote it (the change is recorded in the checkpoints and "
        "--json); settings that change array shapes or the loss can never change on resume",
    )
    loss_spike: float = option(
        10.0,
        "divergence rule: stop (saving nothing newer) when a loss exceeds this many times the median of the "
        "last 16 losses (and this many nats); 0 = only NaN/inf stop the run (else finite, > 1)",
    )
    # reporting and export
    log_every: int = option(10, "print a progress line every this many steps (>= 1)")
    eval_windows: int = option(64, "held-out windows for perplexity at the end (0 = skip)")
    export_dir: str | None = option(None, "write the compressed N:M export of the final student here")
    export_bits: int | None = option(None, "quantise exported kept values to 4 or 8 bits (none = exact)")
    json: str | None = option(None, "write a JSON summary of the run to this file")

    def __post_init__(self) -> None:
        def bad(name: str, need: str) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')} must be {need}, got {getattr(self, name)!r}")

        for name in (
            "steps",
            "batch_size",
            "n_layer",
            "d_model",
            "n_head",
            "save_every",
            "keep",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.mask_every < 1:
            raise bad("mask_every", ">= 1")
        if self.seq_len < 2:
            raise bad("seq_len", ">= 2")
        for name in (
            "teacher_steps",
            "warmup_steps",
            "ramp_steps",
            "slorb_k",
            "eval_windows",
            "min_shard_size",
        ):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if self.seed < 0:
            raise bad("seed", ">= 0")
        for name in ("max_bytes", "d_mlp", "num_processes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, ">= 1 or none")
        if self.process_id is not None and self.process_id < 0:
            raise bad("process_id", ">= 0 or none")
        for name in ("lr", "teacher_lr", "temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a finite number > 0")
        for name in ("weight_decay", "max_decay", "w_kl", "w_ce"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "a finite number >= 0")
        if self.w_kl + self.w_ce == 0:
            raise ValueError("--w-kl and --w-ce are both 0: the loss would be zero")
        if not (self.loss_spike == 0 or (math.isfinite(self.loss_spike) and self.loss_spike > 1)):
            raise bad("loss_spike", "0 (off) or a finite number > 1")
        if self.d_model % self.n_head:
            raise ValueError(f"--d-model {self.d_model} is not divisible by --n-head {self.n_head}")
        if not 0 < self.n < self.m:
            raise ValueError(f"--n and --m need 0 < n < m, got n={self.n}, m={self.m}")
        d_mlp = 4 * self.d_model if self.d_mlp is None else self.d_mlp
        for name, width in (("d_model", self.d_model), ("d_mlp", d_mlp)):
            # every sparse kernel's input is d_model or d_mlp wide, cut into groups of m (and k for SLoRB)
            if width % self.m:
                raise ValueError(f"--{name.replace('_', '-')} {width} is not a multiple of --m {self.m}")
            if self.slorb_k and width % self.slorb_k:
                raise ValueError(
                    f"--slorb-k {self.slorb_k} does not divide --{name.replace('_', '-')} {width}"
                )
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.export_bits not in (None, 4, 8):
            raise bad("export_bits", "none, 4 or 8")
        try:
            shd.parse_mesh(self.mesh)  # syntax check before any device work
        except ValueError as e:
            raise ValueError(f"--mesh {self.mesh!r}: {e}") from None


# Fields that do not change the numbers of a run: they may differ between a run and its resumption.
_RUN_CONTROL = {
    "mesh", "coordinator_address", "num_processes", "process_id", "min_shard_size", "steps",
    "checkpoint_dir", "save_every", "keep", "restart", "allow_optimizer_change", "loss_spike",
    "log_every", "eval_windows", "export_dir", "export_bits", "json",
}  # fmt: skip

# Optimizer settings that keep every array shape: with --allow-optimizer-change a resumed run may change them.
OPTIMIZER_SETTINGS = ("lr", "warmup_steps", "weight_decay", "max_decay", "ramp_steps", "mask_every")

# Settings that fix array shapes (named as such in the message when they differ).
_SHAPE_SETTINGS = ("n_layer", "d_model", "n_head", "d_mlp", "seq_len", "slorb_k", "n", "m")

# What the teacher checkpoint depends on (its step number, --teacher-steps, is compared separately).
_TEACHER_SETTINGS = (*_SHAPE_SETTINGS[:5], "remat", "batch_size", "seed", "text", "max_bytes", "teacher_lr")


class SettingsMismatchError(CheckpointMismatchError):
    """The checkpoint to resume was written with other settings; nothing on disk was touched (exit 2)."""


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


def _settings_check(
    cfg: TrainConfig, fields: Sequence[str], changes: dict[str, Any], *, required: bool, directory: Path
) -> Callable[[int, dict[str, Any]], None]:
    """``check_meta`` for :meth:`CheckpointStore.restore_latest`: compare the settings saved in a checkpoint's
    meta with ``cfg`` on ``fields``, before any array is read.

    A difference raises :class:`SettingsMismatchError` naming every differing setting, except the
    :data:`OPTIMIZER_SETTINGS` when ``--allow-optimizer-change`` is given: those are accepted and written into
    ``changes`` as ``{name: {"checkpoint": saved, "now": current}}``. ``required``: a checkpoint without saved
    settings is refused (else only the array shapes are compared, by the store).
    """
    now = dataclasses.asdict(cfg)
    allowed = set(OPTIMIZER_SETTINGS) if cfg.allow_optimizer_change else set()

    def check(step: int, meta: dict[str, Any]) -> None:
        saved = meta.get("config")
        where = f"checkpoint step {step} in {directory}"
        if not isinstance(saved, dict):
            if required:
                raise SettingsMismatchError(
                    f"{where} records no settings (not written by ast_jax.train); nothing was changed on "
                    "disk. Use a fresh --checkpoint-dir"
                )
            return
        diffs = {k: (saved.get(k), now[k]) for k in fields if saved.get(k) != now[k]}
        refused = {k: v for k, v in diffs.items() if k not in allowed}
        if refused:
            items = []
            for k, (old, new) in sorted(refused.items()):
                why = ""
                if k in _SHAPE_SETTINGS:
                    why = ", changes array shapes"
                elif k in OPTIMIZER_SETTINGS:
                    why = ", may change with --allow-optimizer-change"
                items.append(f"--{k.replace('_', '-')} {old!r} (now {new!r}{why})")
            raise SettingsMismatchError(
                f"{where} was written with other settings: {'; '.join(items)}. Nothing was changed on disk; "
                "resume with the saved values, or use a fresh --checkpoint-dir"
            )
        changes.clear()  # an older step may be checked after a newer one failed to restore
        changes.update({k: {"checkpoint": old, "now": new} for k, (old, new) in diffs.items()})

    return check


def _teacher_tx(cfg: TrainConfig) -> optax.GradientTransformation:
    warmup = min(20, cfg.teacher_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.teacher_lr, warmup, cfg.teacher_steps, cfg.teacher_lr / 10
    )
    return optax.adamw(schedule, weight_decay=0.0)


# Settings that never reach a compiled program: runs differing only in these share compilations.
_NOT_COMPILED = (
    "mesh", "coordinator_address", "num_processes", "process_id", "text", "max_bytes", "checkpoint_dir",
    "save_every", "keep", "restart", "allow_optimizer_change", "loss_spike", "log_every", "eval_windows",
    "export_dir", "export_bits", "json",
)  # fmt: skip


def _all_finite(tree: Any) -> jax.Array:
    """One boolean: no float leaf of ``tree`` holds NaN or inf (integer and bool leaves always pass)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


class _Programs(NamedTuple):
    """The jitted functions of one run, with their shardings (cached per settings and mesh)."""

    model: GPT2
    psh: Any  # NamedSharding pytree of the model params (teacher and student)
    ssh: Any  # NamedSharding pytree of the student TrainState
    bsh: Any  # NamedSharding of a batch
    init: Any  # key -> params
    make_state: Any  # teacher params -> student TrainState
    step: Any  # (state, batch, teacher params) -> (state, metrics)
    probe: Any  # (state, batch, teacher params) -> (params and opt state finite, loss of the state's params)
    teacher_state: Any  # params -> teacher TrainState (None without teacher training)
    teacher_step: Any  # (state, batch) -> (state, metrics)
    teacher_params: Any  # teacher TrainState -> (params, params finite)


def _programs(cfg: TrainConfig, mesh: Any) -> _Programs:
    """Jitted programs for ``cfg`` on ``mesh``; calling :func:`run` again in the same process with settings
    that differ only in :data:`_NOT_COMPILED` fields (e.g. to resume) reuses them without recompiling."""
    key = dataclasses.replace(cfg, **{f: TrainConfig.__dataclass_fields__[f].default for f in _NOT_COMPILED})
    return _build_programs(key, mesh)


def _student_parts(cfg: TrainConfig) -> tuple[GPT2, Any, optax.GradientTransformation, Any, Any]:
    """``(model, init_fn, tx, make_state, abstract_params)`` of a run: plain functions, nothing compiled."""
    model = build_model(cfg)
    dummy = jnp.zeros((1, cfg.seq_len), jnp.int32)
    init_fn = lambda key: model.init(key, dummy)["params"]
    tx = _student_tx(cfg)

    def make_state(teacher_params: Any) -> TrainState:
        slorb = None
        if cfg.slorb_k:
            masks = compute_masks(teacher_params, cfg.n, cfg.m)
            slorb = slorb_init_tree(teacher_params, masks, cfg.slorb_k)
        return init_train_state(teacher_params, tx, slorb_params=slorb, seed=cfg.seed)

    return model, init_fn, tx, make_state, jax.eval_shape(init_fn, jax.random.key(0))


def _checkpoint_target(cfg: TrainConfig, mesh: Any) -> Any:
    """``jax.ShapeDtypeStruct`` pytree (with shardings) of ``checkpoint_tree`` of the student state: the
    restore target, built by tracing only (a refused resume compiles nothing)."""
    _, _, _, make_state, abstract_params = _student_parts(cfg)
    shapes = jax.eval_shape(lambda p: checkpoint_tree(make_state(p)), abstract_params)
    shardings = shd.param_shardings(shapes, mesh, min_shard_size=cfg.min_shard_size)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


@functools.lru_cache(maxsize=4)
def _build_programs(cfg: TrainConfig, mesh: Any) -> _Programs:
    model, init_fn, tx, make_state, abstract_params = _student_parts(cfg)
    rule = functools.partial(shd.param_shardings, mesh=mesh, min_shard_size=cfg.min_shard_size)
    bsh = shd.batch_sharding(mesh)
    rep = shd.replicated(mesh)
    psh = rule(abstract_params)
    ssh = rule(jax.eval_shape(make_state, abstract_params))
    loss_cfg = LossConfig(w_kl=cfg.w_kl, w_ce=cfg.w_ce, temperature=cfg.temperature)
    step = jax.jit(
        make_train_step(model, None, tx, loss_cfg),
        in_shardings=(ssh, bsh, psh),
        out_shardings=(ssh, rep),
        donate_argnums=0,
    )

    def probe(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any) -> tuple[Any, Any]:
        # The step reports the loss of the params it started from; a save needs the loss of the params it
        # writes, so an update that exploded (finite but huge weights) is caught before it reaches the disk.
        fwd = apply_masks(state.params, get_masks(state.opt_state))
        logits = apply_with_slorb(model, fwd["model"], fwd.get("slorb"), batch["inputs"])
        t_logits = (
            model.apply({"params": teacher_params}, batch["inputs"]) if loss_cfg.needs_teacher else None
        )
        loss, _ = distill_loss(logits, batch["targets"], loss_cfg, t_logits)
        return _all_finite((state.params, state.opt_state)), loss

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
        teacher_params = jax.jit(
            lambda st: (st.params["model"], _all_finite(st.params)),
            in_shardings=(tsh,),
            out_shardings=(psh, rep),
        )
    return _Programs(
        model=model,
        psh=psh,
        ssh=ssh,
        bsh=bsh,
        init=jax.jit(init_fn, out_shardings=psh),
        make_state=jax.jit(make_state, in_shardings=(psh,), out_shardings=ssh),
        step=step,
        probe=jax.jit(probe, in_shardings=(ssh, bsh, psh), out_shardings=(rep, rep)),
        teacher_state=teacher_state,
        teacher_step=teacher_step,
        teacher_params=teacher_params,
    )


class _LossWatch:
    """The loss-based divergence rule: a loss must be finite and, with ``spike > 0``, at most ``spike`` times
    the median of the last 16 accepted losses (and at most ``spike`` nats, so that the noise of a tiny loss
    never counts as a spike). ``prior`` stands in for the median before any loss was accepted."""

    def __init__(self, spike: float, prior: float | None = None) -> None:
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


def _diverged(
    what: str, step: int, store: CheckpointStore | None, cfg: TrainConfig, lr_flag: str = "--lr"
) -> TrainingDivergedError:
    """The :class:`TrainingDivergedError` for ``what`` at ``step``, with advice the user can follow."""
    last = None if store is None else store.latest_step()
    others = ", ".join("--" + s.replace("_", "-") for s in OPTIMIZER_SETTINGS[1:])
    lower = f"{(cfg.teacher_lr if lr_flag == '--teacher-lr' else cfg.lr) / 10:g}"
    if lr_flag == "--teacher-lr":
        advice = f"Rerun with a lower --teacher-lr (e.g. {lower}); the teacher is not checkpointed part-way."
    elif last is None:
        advice = f"No checkpoint was written; rerun with a lower --lr (e.g. {lower})."
    else:
        advice = (
            f"Last good checkpoint: step {last} in {store.directory}. To continue from it with a lower "
            f"learning rate, rerun the same command with a lower --lr (e.g. --lr {lower}) and "
            f"--allow-optimizer-change (the other settings {others} may change the same way)."
        )
    return TrainingDivergedError(
        f"training diverged at step {step}: {what}; that state was not saved. {advice}"
    )


def _train_teacher(cfg, progs: _Programs, tokens, params, teacher_store, signals) -> tuple[Any, Any]:
    """Dense CE pretraining of the teacher (or restore it from ``teacher_store``) -> ``(params, loss)``.

    ``params`` is ``None`` when a signal stopped the teacher phase (it is not checkpointed part-way).
    """
    if cfg.teacher_steps == 0:
        return params, None
    if teacher_store is not None:
        check = _settings_check(cfg, _TEACHER_SETTINGS, {}, required=False, directory=teacher_store.directory)
        found = teacher_store.restore_latest(abstract_like(params), check_meta=check, restart=cfg.restart)
        if found is not None and found.step == cfg.teacher_steps:
            _say(f"teacher: restored from {teacher_store.directory} (step {found.step})")
            return found.state, found.meta.get("final_loss")
    state = progs.teacher_state(params)
    watch = _LossWatch(cfg.loss_spike, prior=math.log(256))  # a uniform guess over the byte vocabulary
    loss = float("nan")
    for i in range(cfg.teacher_steps):
        if _any_process(signals.received is not None):
            return None, None
        state, metrics = progs.teacher_step(state, _global_batch(tokens, i, cfg, 7919, progs.bsh))
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.teacher_steps:
            loss = float(metrics["loss"])
            problem = watch.problem(loss)
            if problem is not None:
                raise _diverged(f"teacher {problem}", i + 1, None, cfg, "--teacher-lr")
            watch.accept(loss)
            _say(f"teacher step {i + 1}/{cfg.teacher_steps} loss {loss:.4f}")
    teacher, finite = progs.teacher_params(state)
    if not bool(finite):
        raise _diverged("the teacher's params hold NaN/inf", cfg.teacher_steps, None, cfg, "--teacher-lr")
    if teacher_store is not None:
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k in _TEACHER_SETTINGS}
        teacher_store.save(cfg.teacher_steps, teacher, {"final_loss": loss, "config": config})
    return teacher, loss


def _check_outputs(cfg: TrainConfig) -> tuple[CheckpointStore | None, CheckpointStore | None]:
    """Open the checkpoint stores and check ``--json`` / ``--export-dir``: every output path is known to be
    writable before the first training step. Returns ``(teacher_store, store)``."""
    if jax.process_index() == 0:  # only process 0 writes these
        if cfg.json:
            path = Path(cfg.json)
            if path.is_dir():
                raise ValueError(f"--json {cfg.json!r} is a directory, not a file")
            try:
                ensure_writable_dir(path.absolute().parent)
            except ValueError as e:
                raise ValueError(f"--json {cfg.json!r}: {e}") from None
        if cfg.export_dir:
            try:
                ensure_writable_dir(cfg.export_dir)
            except ValueError as e:
                raise ValueError(f"--export-dir {cfg.export_dir!r}: {e}") from None
    if cfg.checkpoint_dir is None:
        return None, None
    ckdir = Path(cfg.checkpoint_dir)
    try:
        store = CheckpointStore(ckdir, keep=cfg.keep)
        teacher_store = CheckpointStore(ckdir / "teacher", keep=1)
    except ValueError as e:
        raise ValueError(f"--checkpoint-dir {cfg.checkpoint_dir!r}: {e}") from None
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
    with _SignalCatcher() as signals:
        teacher_store = store = None
        try:
            _init_distributed(config)
            mesh = shd.make_mesh(config.mesh, devices)
            n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
            if config.batch_size % n_shards:
                raise ValueError(
                    f"--batch-size {config.batch_size} must be divisible by data*fsdp={n_shards} "
                    f"(mesh {dict(mesh.shape)})"
                )
            teacher_store, store = _check_outputs(config)
            return _run(config, mesh, signals, teacher_store, store)
        finally:
            for s in (teacher_store, store):
                if s is not None:
                    s.close()


def _run(cfg: TrainConfig, mesh, signals: _SignalCatcher, teacher_store, store) -> RunResult:
    data = load_text_data(cfg.text, max_bytes=cfg.max_bytes)
    if len(data.train) < cfg.seq_len + 1:
        raise ValueError(
            f"--text: only {len(data.train)} training tokens, need more than --seq-len {cfg.seq_len}"
        )
    _say(
        f"ast_jax.train: {jax.process_count()} process(es), mesh {dict(mesh.shape)} on "
        f"{mesh.devices.size} {jax.devices()[0].platform} device(s), corpus {data.source} "
        f"({len(data.train):,} training bytes)"
    )

    # -- resume: settings compared before any array is read, before any training --------------------------
    found = None
    changes: dict[str, Any] = {}
    if store is not None:
        fields = [f for f in dataclasses.asdict(cfg) if f not in _RUN_CONTROL]
        check = _settings_check(cfg, fields, changes, required=True, directory=store.directory)
        target = _checkpoint_target(cfg, mesh)
        found = store.restore_latest(target, check_meta=check, restart=cfg.restart)
    resumed_from = None if found is None else found.step
    skipped = [] if found is None else found.skipped
    optimizer_changes = [] if found is None else list(found.meta.get("optimizer_changes", []))
    if found is not None:
        for msg in skipped:
            _say(f"WARNING: skipped bad checkpoint: {msg}")
        if changes:
            optimizer_changes.append({"resumed_from": found.step, "changes": changes})
            listing = ", ".join(
                f"--{k.replace('_', '-')} {v['checkpoint']} -> {v['now']}" for k, v in changes.items()
            )
            _say(f"optimizer settings changed on resume (--allow-optimizer-change): {listing}")
        _say(f"resuming from checkpoint step {found.step} (data position {found.meta['data_position']})")

    # -- teacher (dense), sharded like any params tree ---------------------------------------------------
    progs = _programs(cfg, mesh)
    model, bsh = progs.model, progs.bsh
    params0 = progs.init(jax.random.key(cfg.seed))
    t0 = time.perf_counter()
    teacher, teacher_loss = _train_teacher(cfg, progs, data.train, params0, teacher_store, signals)
    teacher_seconds = time.perf_counter() - t0
    if teacher is None:
        _say(f"received {signals.received} during teacher training: stopping (the teacher is not saved)")
        return RunResult(None, 0, [], None, signals.received, {"stopped_by": signals.received})

    # -- student state: the checkpoint's, or a fresh one from the teacher's weights ------------------------
    state = progs.make_state(teacher) if found is None else state_from_checkpoint_tree(found.state)
    start = resumed_from or 0
    # The data position is also inside the state (as an array); the JSON copy avoids a device round trip.
    position = int(found.meta["data_position"]) if found is not None else 0
    step_fn = progs.step

    config_meta = dataclasses.asdict(cfg)
    watch = _LossWatch(cfg.loss_spike)

    def check(done: int, metrics: dict[str, Any]) -> float:
        loss = float(metrics["loss"])
        if not bool(metrics["finite"]):
            raise _diverged(f"non-finite loss ({loss}) or gradient", done, store, cfg)
        problem = watch.problem(loss)
        if problem is not None:
            raise _diverged(problem, done, store, cfg)
        watch.accept(loss)
        return loss

    def check_state(done: int, st: TrainState) -> None:
        finite, loss = progs.probe(st, _global_batch(data.train, position, cfg, 0, bsh), teacher)
        if not bool(finite):
            raise _diverged("the updated params or optimizer state hold NaN/inf", done, store, cfg)
        problem = watch.problem(float(loss))
        if problem is not None:
            raise _diverged(f"the updated params give a {problem}", done, store, cfg)

    def save(done: int, st: TrainState) -> None:
        check_state(done, st)  # also without a store: a diverged state must not reach the export either
        if store is not None:
            meta = {
                "step": done,
                "data_position": position,
                "config": config_meta,
                "optimizer_changes": optimizer_changes,
            }
            store.save(done, checkpoint_tree(st), meta)

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
        "optimizer_changes": optimizer_changes,
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
    """``python -m ast_jax.train``: returns the exit status (see the module docstring for their meaning)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body(cfg: TrainConfig) -> int:
        result = run(cfg)
        if result.stopped_by in ("SIGTERM", "SIGINT"):
            return 128 + int(signal.Signals[result.stopped_by])
        return 0

    return run_cli(_parser(), lambda values: TrainConfig(**values), body, argv)


if __name__ == "__main__":
    sys.exit(main())
