"""Fault-tolerant checkpoints: orbax ``CheckpointManager`` plus an integrity manifest per step.

Every checkpoint step directory holds two orbax items, written with the ``args=`` API:

* ``state`` (``ocp.args.StandardSave``): any pytree of arrays -- in training, params, optimizer state (with
  the N:M masks inside it) and the RNG key data; restored directly into the caller's shardings;
* ``meta`` (``ocp.args.JsonSave``): a small JSON dict -- step, data position, the config that shapes the
  state.

Orbax makes a save atomic (it writes a temporary directory and renames it when complete) and keeps the last
``keep`` steps. On top of that, once a save has finished, process 0 writes ``integrity.json`` into the step
directory: the size and SHA-256 of every file. A step whose manifest is missing (the run died between the
rename and the manifest) or whose files no longer match it (truncated, overwritten, bit rot), or which orbax
fails to read, is reported, moved to ``<directory>/_corrupted/``, and :func:`CheckpointStore.restore_latest`
falls back to the newest step that passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

__all__ = ["INTEGRITY_FILE", "CheckpointStore", "Restored", "abstract_like"]

PyTree = Any
INTEGRITY_FILE = "integrity.json"
CORRUPTED_DIR = "_corrupted"
_log = logging.getLogger(__name__)


class Restored(NamedTuple):
    """A restored checkpoint: ``step``, the ``state`` pytree (placed on the requested shardings), the ``meta``
    dict, and ``skipped``: one message per newer step that was rejected before this one was accepted."""

    step: int
    state: PyTree
    meta: dict[str, Any]
    skipped: list[str]


def abstract_like(tree: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` (with sharding) for every leaf: the restore target for a state pytree."""

    def one(x: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tree_files(step_dir: Path) -> dict[str, list[Any]]:
    files = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != INTEGRITY_FILE:
            files[p.relative_to(step_dir).as_posix()] = [p.stat().st_size, _file_digest(p)]
    return files


class CheckpointStore:
    """Save and restore ``(state, meta)`` by step under ``directory``, keeping the last ``keep`` steps.

    Saves are synchronous: when :meth:`save` returns, the step is on disk, finalised and checksummed, so a
    SIGKILL at any later moment cannot lose it. All processes of a multi-host run must call :meth:`save` and
    :meth:`restore_latest` together (orbax coordinates the writes; the directory must be shared).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, step: int, state: PyTree, meta: dict[str, Any] | None = None) -> None:
        """Write ``state`` and ``meta`` (JSON-serialisable) as checkpoint ``step``; returns once durable."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        meta = dict(meta or {})
        meta.setdefault("step", step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            step_dir = self.directory / str(step)
            manifest = {"step": step, "time": time.time(), "files": _tree_files(step_dir)}
            tmp = step_dir / (INTEGRITY_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, step_dir / INTEGRITY_FILE)
        _barrier("ast_jax_checkpoint_saved")

    # -- checking and restoring -----------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps present on disk (not yet verified), oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def verify(self, step: int) -> str | None:
        """``None`` if step ``step`` matches its integrity manifest, else a description of the problem."""
        step_dir = self.directory / str(step)
        manifest_path = step_dir / INTEGRITY_FILE
        if not manifest_path.is_file():
            return f"step {step}: no {INTEGRITY_FILE} (the save did not complete)"
        try:
            expected = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError) as e:
            return f"step {step}: unreadable {INTEGRITY_FILE} ({e})"
        for rel, (size, digest) in expected.items():
            p = step_dir / rel
            if not p.is_file():
                return f"step {step}: file {rel} is missing"
            if p.stat().st_size != size:
                return f"step {step}: file {rel} has {p.stat().st_size} bytes, expected {size} (truncated?)"
            if _file_digest(p) != digest:
                return f"step {step}: file {rel} fails its SHA-256 check (corrupted)"
        return None

    def restore(self, step: int, abstract_state: PyTree | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restore checkpoint ``step`` (no integrity check) as ``(state, meta)``.

        With ``abstract_state`` the arrays get its shapes, dtypes and shardings; without it the saved tree is
        returned as orbax reads it (plain nested containers, arrays on the default device).
        """
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        return out["state"], dict(out["meta"])

    def restore_latest(self, abstract_state: PyTree) -> Restored | None:
        """Restore the newest checkpoint that passes :meth:`verify` and reads back; ``None`` if there is none.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (see :func:`abstract_like`) with the
        structure of the saved state. Each rejected newer step is logged as a warning, moved to
        ``<directory>/_corrupted/`` (so the run can write that step number again) and listed in
        ``Restored.skipped``.
        """
        skipped: list[str] = []
        for step in reversed(self.all_steps()):
            problem = self.verify(step)
            if problem is None:
                try:
                    state, meta = self.restore(step, abstract_state)
                except Exception as e:  # orbax raises many types for unreadable data; any of them means "bad"
                    problem = f"step {step}: orbax could not restore it ({type(e).__name__}: {e})"
                else:
                    if skipped:
                        _log.warning("resuming from checkpoint step %d in %s", step, self.directory)
                    return Restored(step, state, meta, skipped)
            _log.warning("rejecting checkpoint %s; falling back to an older one", problem)
            skipped.append(problem)
            self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            dest = self.directory / CORRUPTED_DIR
            dest.mkdir(exist_ok=True)
            target = dest / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
            shutil.move(str(self.directory / str(step)), str(target))
        _barrier("ast_jax_checkpoint_quarantine")
        # The manager caches the step list; reopen it so the moved step is forgotten.
        self._manager.close()
        self._manager = self._open()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
