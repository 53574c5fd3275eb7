"""Fault-tolerant checkpoints: orbax ``CheckpointManager`` plus an integrity manifest per step.

Every checkpoint step directory holds two orbax items, written with the ``args=`` API:

* ``state`` (``ocp.args.StandardSave``): any pytree of arrays -- in training, params, optimizer state (with
  the N:M masks inside it) and the RNG key data; restored directly into the caller's shardings;
* ``meta`` (``ocp.args.JsonSave``): a small JSON dict -- step, data position, the config that shapes the
  state.

Orbax makes a save atomic (it writes a temporary directory and renames it when complete) and keeps the last
``keep`` steps. On top of that, once a save has finished, process 0 writes ``integrity.json`` into the step
directory: the size and SHA-256 of every file.

:meth:`CheckpointStore.restore_latest` tells three situations apart:

* a step whose own bytes are bad -- manifest missing (the run died between the rename and the manifest),
  files that no longer match it (truncated, overwritten, bit rot), or files orbax cannot parse -- is rejected
  and the next older step is tried; once an older step restores, the rejected ones are moved to
  ``<directory>/_corrupted/`` (so their step numbers can be written again);
* an intact step written for a different state (other settings, as judged by the caller's ``check_meta``, or
  other array shapes) raises :class:`CheckpointMismatchError` and nothing on disk is touched;
* when every step is rejected, :class:`NoUsableCheckpointError` lists them and why, again touching nothing;
  only ``restart=True`` moves them aside and lets the caller start over.

A directory that is a file, lies under a file or cannot be written is reported when the store is opened
(:func:`ensure_writable_dir`), before any work that would need a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from ast_jax.sparsify import key_path, path_str

__all__ = [
    "INTEGRITY_FILE",
    "CheckpointMismatchError",
    "CheckpointStore",
    "NoUsableCheckpointError",
    "Restored",
    "abstract_like",
    "ensure_writable_dir",
]

PyTree = Any
INTEGRITY_FILE = "integrity.json"
CORRUPTED_DIR = "_corrupted"
_log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """An intact checkpoint belongs to a different run (settings or array shapes differ); nothing was moved.

    ``exit_code`` is the process exit status command lines use for it (a user error, like a bad flag).
    """

    exit_code = 2


class NoUsableCheckpointError(RuntimeError):
    """Every checkpoint in the directory failed its integrity check; none was moved.

    ``rejected`` holds one message per step (newest first). ``exit_code`` is the process exit status command
    lines use for it.
    """

    exit_code = 4

    def __init__(self, directory: Path, rejected: list[str]) -> None:
        self.directory = directory
        self.rejected = list(rejected)
        listing = "; ".join(self.rejected)
        super().__init__(
            f"no usable checkpoint in {directory}: every one failed its integrity check ({listing}). "
            f"Nothing was moved or deleted; to start over from step 0 anyway, pass --restart (the rejected "
            f"steps then go to {directory / CORRUPTED_DIR})"
        )


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and check that files can be written in it; returns its absolute path.

    Raises ``ValueError`` naming the problem: the path (or a parent of it) is a regular file, the directory
    cannot be created, or a file cannot be written in it. The check writes and removes a small probe file,
    because permission bits alone say nothing for root or on a read-only file system.
    """
    path = Path(directory).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise ValueError(f"{path} {where}, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the directory {path} ({e.strerror or e})") from None
    probe = path / f".write_probe.{jax.process_index()}.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write in the directory {path} ({e.strerror or e})") from None
    return path


def _leaf_specs(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"a/b/c": (shape, dtype)}`` for every array leaf; dict keys and NamedTuple fields read alike, so the
    tree orbax reports for a saved state compares with the caller's target."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            name = path_str(key_path(path))
            out[name] = (tuple(int(d) for d in leaf.shape), str(leaf.dtype))
    return out


def _describe_mismatch(saved: dict, wanted: dict, limit: int = 6) -> str:
    parts = []
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            parts.append(f"{name}: not in the checkpoint")
        elif name not in wanted:
            parts.append(f"{name}: in the checkpoint only")
        elif saved[name] != wanted[name]:
            (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], wanted[name]
            parts.append(f"{name}: checkpoint {s_dtype}{list(s_shape)}, now {w_dtype}{list(w_shape)}")
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


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
        # Before orbax touches it: a bad directory must fail now, not at the first save after hours of work.
        self.directory = ensure_writable_dir(directory)
        self.keep = keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        # Named handlers let a fresh manager read one item (the JSON meta) or the saved array metadata alone.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON ``meta`` of checkpoint ``step`` alone (no arrays are read)."""
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def _saved_specs(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        found = self._manager.item_metadata(step)["state"]
        if found is None:
            raise ValueError("no array metadata")
        return _leaf_specs(found.tree)

    def check_shapes(self, step: int, abstract_state: PyTree) -> None:
        """Raise :class:`CheckpointMismatchError` unless step ``step`` holds exactly the arrays (names,
        shapes, dtypes) of ``abstract_state``; reads only orbax's metadata."""
        self._compare_specs(step, self._saved_specs(step), abstract_state)

    def _compare_specs(self, step: int, saved: dict, abstract_state: PyTree) -> None:
        wanted = _leaf_specs(abstract_state)
        if saved != wanted:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds arrays of another shape than this run "
                f"needs ({_describe_mismatch(saved, wanted)}); nothing was changed on disk. Use the settings "
                "it was written with, or a fresh checkpoint directory"
            )

    def restore_latest(
        self,
        abstract_state: PyTree,
        *,
        check_meta: Callable[[int, dict[str, Any]], None] | None = None,
        restart: bool = False,
    ) -> Restored | None:
        """Restore the newest checkpoint whose own bytes are intact; ``None`` if the directory holds none.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (see :func:`abstract_like`) with the
        structure of the saved state. Steps are tried newest first:

        1. :meth:`verify` (manifest, sizes, SHA-256) and orbax's reading of the step's metadata and meta: a
           failure means the step's own bytes are bad; it is rejected (logged as a warning) and the next older
           step is tried;
        2. ``check_meta(step, meta)`` (e.g. "were these the same settings?") may raise; its exception
           propagates and nothing on disk is touched;
        3. :meth:`check_shapes`: other arrays than ``abstract_state`` raise :class:`CheckpointMismatchError`,
           nothing touched;
        4. the restore itself; a failure counts as unreadable bytes (step 1).

        Once a step restores, the rejected newer ones are moved to ``<directory>/_corrupted/`` (so the run can
        write those step numbers again) and listed in ``Restored.skipped``. If every step is rejected,
        :class:`NoUsableCheckpointError` is raised and nothing is moved -- unless ``restart``, which moves
        them all to ``_corrupted/`` and returns ``None`` (the caller starts over).
        """
        skipped: list[str] = []
        rejected_steps: list[int] = []
        for step in reversed(self.all_steps()):
            problem = self.verify(step)
            if problem is None:
                try:  # orbax raises many types for unparseable files; any of them means "bad bytes"
                    meta = self.read_meta(step)
                    saved = self._saved_specs(step)
                except Exception as e:
                    problem = f"step {step}: orbax could not read it ({type(e).__name__}: {e})"
            if problem is None:
                if check_meta is not None:
                    check_meta(step, meta)
                self._compare_specs(step, saved, abstract_state)
                try:
                    state, meta = self.restore(step, abstract_state)
                except Exception as e:
                    problem = f"step {step}: orbax could not restore it ({type(e).__name__}: {e})"
                else:
                    for bad in rejected_steps:
                        self._quarantine(bad)
                    if skipped:
                        _log.warning("resuming from checkpoint step %d in %s", step, self.directory)
                    return Restored(step, state, meta, skipped)
            _log.warning("rejecting checkpoint %s", problem)
            skipped.append(problem)
            rejected_steps.append(step)
        if not rejected_steps:
            return None
        if not restart:
            raise NoUsableCheckpointError(self.directory, skipped)
        for bad in rejected_steps:
            self._quarantine(bad)
        _log.warning("restart: moved %d unusable checkpoint(s) aside; starting over", len(rejected_steps))
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
