"""Stopping and resuming ``ast_jax.train`` runs safely.

* Resuming compares the settings saved with a checkpoint (the flat flag view of the config,
  :meth:`ast_jax.config.Config.flags`) with the current ones *before any array is read*: a difference stops
  the run with :class:`SettingsMismatchError` naming every differing flag (nothing on disk is touched),
  except the :data:`OPTIMIZER_SETTINGS` (they keep every array shape) under ``--allow-optimizer-change``,
  which are then recorded. The teacher's checkpoint is compared on :data:`TEACHER_SETTINGS`.
* :func:`diverged` builds the divergence error with advice the user can follow (the last good checkpoint,
  a lower learning rate).
* :class:`SignalCatcher` turns SIGTERM/SIGINT into a flag the loop polls, so the run saves before it stops.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ast_jax.checkpoint import CheckpointMismatchError, CheckpointStore
from ast_jax.programs import checkpoint_target, say
from ast_jax.sharding import any_process
from ast_jax.step import TrainingDivergedError

if TYPE_CHECKING:
    from ast_jax.train import TrainConfig

__all__ = [
    "OPTIMIZER_SETTINGS",
    "RUN_CONTROL",
    "SHAPE_SETTINGS",
    "TEACHER_SETTINGS",
    "SettingsMismatchError",
    "SignalCatcher",
    "diverged",
    "resume_latest",
    "settings_check",
]

# Fields that do not change the numbers of a run: they may differ between a run and its resumption.
RUN_CONTROL = {
    "mesh", "coordinator_address", "num_processes", "process_id", "min_shard_size", "steps",
    "checkpoint_dir", "save_every", "keep", "restart", "allow_optimizer_change", "loss_spike",
    "log_every", "progress", "eval_windows", "export_dir", "export_bits", "export_format", "json", "log_dir",
}  # fmt: skip

# Optimizer settings that keep every array shape: with --allow-optimizer-change a resumed run may change them.
OPTIMIZER_SETTINGS = (
    "lr", "warmup_steps", "min_lr_ratio", "schedule_tail", "weight_decay", "b2", "max_decay", "ramp_steps",
    "mask_every",
)  # fmt: skip

# Settings that fix array shapes (named as such in the message when they differ).
SHAPE_SETTINGS = ("n_layer", "d_model", "n_head", "d_mlp", "seq_len", "slorb", "slorb_k", "n", "m")

# What the teacher checkpoint depends on (its step number, --teacher-steps, is compared separately).
TEACHER_SETTINGS = (
    *SHAPE_SETTINGS[:5], "remat", "batch_size", "seed", "text", "max_bytes", "teacher_lr",
    "teacher_min_lr_ratio", "warmup_steps", "schedule_tail", "weight_decay", "b2",
)  # fmt: skip


_UNRECORDED = object()
# Settings added after checkpoints were already being written, with the value that reproduces the behaviour of
# those older runs: a checkpoint that does not record one of them was written with that value.
_ADDED_LATER = {"model": None}


class SettingsMismatchError(CheckpointMismatchError):
    """The checkpoint to resume was written with other settings; nothing on disk was touched (exit 2)."""


class SignalCatcher:
    """Record SIGTERM/SIGINT instead of dying, so the loop can save and stop; restores handlers on exit."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalCatcher:
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

    def any_process(self) -> bool:
        """Whether a signal arrived in any process (a collective in multi-process runs)."""
        return any_process(self.received is not None)


def settings_check(
    cfg: TrainConfig, fields: Sequence[str], changes: dict[str, Any], *, required: bool, directory: Path
) -> Callable[[int, dict[str, Any]], None]:
    """``check_meta`` for :meth:`CheckpointStore.restore_latest`: compare the settings saved in a checkpoint's
    meta (the flat flag view, :meth:`ast_jax.config.Config.flags`) with ``cfg`` on ``fields``, before any
    array is read.

    A difference raises :class:`SettingsMismatchError` naming every differing setting, except the
    :data:`OPTIMIZER_SETTINGS` when ``--allow-optimizer-change`` is given: those are accepted and written into
    ``changes`` as ``{name: {"checkpoint": saved, "now": current}}``. ``required``: a checkpoint without saved
    settings is refused (else only the array shapes are compared, by the store).
    """
    now = cfg.flags()
    allowed = set(OPTIMIZER_SETTINGS) if cfg.checkpoint.allow_optimizer_change else set()

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
        # A setting the checkpoint does not record (written before the setting existed) differs too.
        recorded = lambda k: saved.get(k, _ADDED_LATER.get(k, _UNRECORDED))
        diffs = {k: (recorded(k), now[k]) for k in fields if recorded(k) != now[k]}
        refused = {k: v for k, v in diffs.items() if k not in allowed}
        if refused:
            items = []
            for k, (old, new) in sorted(refused.items()):
                why = ""
                if k in SHAPE_SETTINGS:
                    why = ", changes array shapes"
                elif k in OPTIMIZER_SETTINGS:
                    why = ", may change with --allow-optimizer-change"
                was = "not recorded" if old is _UNRECORDED else repr(old)
                items.append(f"--{k.replace('_', '-')} {was} (now {new!r}{why})")
            raise SettingsMismatchError(
                f"{where} was written with other settings: {'; '.join(items)}. Nothing was changed on disk; "
                "resume with the saved values, or use a fresh --checkpoint-dir"
            )
        changes.clear()  # an older step may be checked after a newer one failed to restore
        changes.update(
            {
                k: {"checkpoint": None if old is _UNRECORDED else old, "now": new}
                for k, (old, new) in diffs.items()
            }
        )

    return check


def resume_latest(
    cfg: TrainConfig, mesh: Any, store: CheckpointStore | None
) -> tuple[Any, list[dict[str, Any]]]:
    """The newest intact checkpoint (or ``None``), its settings compared with ``cfg`` before any array is
    read; and the optimizer changes recorded so far (this resume's appended)."""
    if store is None:
        return None, []
    changes: dict[str, Any] = {}
    fields = [f for f in cfg.flags() if f not in RUN_CONTROL]
    check = settings_check(cfg, fields, changes, required=True, directory=store.directory)
    found = store.restore_latest(
        checkpoint_target(cfg, mesh), check_meta=check, restart=cfg.checkpoint.restart
    )
    if found is None:
        return None, []
    recorded = list(found.meta.get("optimizer_changes", []))
    for msg in found.skipped:
        say(f"WARNING: skipped bad checkpoint: {msg}")
    if changes:
        recorded.append({"resumed_from": found.step, "changes": changes})
        listing = ", ".join(
            f"--{k.replace('_', '-')} {v['checkpoint']} -> {v['now']}" for k, v in changes.items()
        )
        say(f"optimizer settings changed on resume (--allow-optimizer-change): {listing}")
    say(f"resuming from checkpoint step {found.step} (data position {found.meta['data_position']})")
    return found, recorded


def diverged(
    what: str, step: int, store: CheckpointStore | None, cfg: TrainConfig, lr_flag: str = "--lr"
) -> TrainingDivergedError:
    """The :class:`TrainingDivergedError` for ``what`` at ``step``, with advice the user can follow."""
    last = None if store is None else store.latest_step()
    others = ", ".join("--" + s.replace("_", "-") for s in OPTIMIZER_SETTINGS[1:])
    lower = f"{(cfg.teacher.lr if lr_flag == '--teacher-lr' else cfg.optimizer.lr) / 10:g}"
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
