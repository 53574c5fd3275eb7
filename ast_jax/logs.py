"""Training logs people can watch: TensorBoard event files and JSON lines, written by process 0 only.

Layout under ``--log-dir`` (one subdirectory per run, so TensorBoard overlays the runs of one job)::

    <log-dir>/<run>/events.out.tfevents.<unix time>.<host>.<pid>.<n>   TensorBoard scalars
    <log-dir>/<run>/metrics.jsonl        one line per step: {"step": s, "wall_time": t, tag: value, ...}

Runs: ``teacher`` and ``student`` (``python -m ast_jax.train``), ``teacher`` and one per variant
(``python -m ast_jax``, ``python -m ast_jax.experiments``). Every scalar of a step goes to one TensorBoard
event and one JSON line, with the same tags. Tags (:data:`TAGS` maps the step's metrics onto them):

    train/loss, train/ce, train/kl, train/hidden, train/grad_norm   the step's loss and its terms
    sparsity/lambda                                                 λ(t) of Annealing SR-STE at that update
    sparsity/flip_rate, sparsity/flip_rate_vs_initial               flips / sparse weights (last refresh)
    sparsity/keep                                                   kept entries per group (gradual pruning)
    optim/lr                                                        learning rate of that update
    perf/tokens_per_second                                          tokens / wall time between reports
    eval/perplexity                                                 the run's reported held-out perplexity
    eval/monitor_perplexity                     the teacher's stopping-rule evaluations (python -m ast_jax)

A resumed run appends: a new event file next to the old ones and more lines to ``metrics.jsonl``; the steps
between the checkpoint and the interruption then appear twice (the later value is the one that continued).

The event files are written here (TFRecord framing and the two protobuf messages they need, by hand), not
with a TensorBoard package: ``tensorboardX`` imports ``torch`` when it is installed, which a JAX training
process should not pay for, and the format needs no more than ~40 lines.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["TAGS", "MetricsLogger", "RunLog", "crc32c", "masked_crc32c"]

# Step metrics (:func:`ast_jax.step.make_train_step`, :func:`ast_jax.optim.mask_stats`) -> tags.
TAGS = {
    "loss": "train/loss",
    "ce": "train/ce",
    "kl": "train/kl",
    "hidden": "train/hidden",
    "grad_norm": "train/grad_norm",
    "decay": "sparsity/lambda",
    "flip_rate_prev": "sparsity/flip_rate",
    "flip_rate_init": "sparsity/flip_rate_vs_initial",
    "keep": "sparsity/keep",
}
LR_TAG = "optim/lr"
TOKENS_TAG = "perf/tokens_per_second"
PERPLEXITY_TAG = "eval/perplexity"


# ---------------------------------------------------------------------------------------------------------
# The event file format: TFRecords of tensorflow.Event protobufs


@functools.cache
def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return tuple(table)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, the checksum of TFRecord framing."""
    table, crc = _crc_table(), 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C TFRecords store (rotated and offset, so a CRC of CRCs is not a CRC)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(
    wall_time: float, step: int, *, file_version: str = "", scalars: Mapping[str, float] | None = None
) -> bytes:
    """A serialized ``tensorflow.Event``: wall_time (1, double), step (2, int64), file_version (3) or a
    ``Summary`` (5) of ``Value``\\ s with tag (1) and simple_value (2, float)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version:
        return out + _field(3, file_version.encode())
    values = b"".join(
        _field(1, _field(1, tag.encode()) + b"\x15" + _float32(value))
        for tag, value in (scalars or {}).items()
    )
    return out + _field(5, values)


def _float32(x: float) -> bytes:
    with np.errstate(over="ignore"):  # a value beyond float32 (a diverging loss) is logged as inf
        return np.asarray(x, "<f4").tobytes()


def _record(data: bytes) -> bytes:
    """TFRecord framing: length (uint64 LE), its masked CRC, the data, the data's masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# ---------------------------------------------------------------------------------------------------------
# Writers


class RunLog:
    """The scalars of one run in ``directory`` (TensorBoard events + ``metrics.jsonl``).

    ``lr_schedule`` (an optax schedule, evaluated on the host at ``step - 1``: the update count the
    optimizer saw at 1-based step ``step``) adds ``optim/lr`` to :meth:`train_rows`. Files are opened on the
    first write and flushed after each call, so a crashed run keeps what it logged.
    """

    _opened = 0  # distinguishes event files opened in the same second by the same process

    def __init__(self, directory: Path, lr_schedule: Callable[[Any], Any] | None = None) -> None:
        self.directory = directory
        self.lr_schedule = lr_schedule
        self._events: Any = None
        self._jsonl: Any = None

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        RunLog._opened += 1
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{RunLog._opened}"
        self._events = open(self.directory / name, "wb")  # held open until close()
        self._events.write(_record(_event(now, 0, file_version="brain.Event:2")))
        self._jsonl = open(self.directory / "metrics.jsonl", "a", encoding="utf-8")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write ``{tag: value}`` at ``step``: one event and one JSON line (non-finite values included)."""
        self.write([(step, values)])

    def write(self, entries: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """:meth:`scalars` for several steps, flushed once."""
        entries = [(int(step), {k: float(v) for k, v in values.items()}) for step, values in entries]
        entries = [e for e in entries if e[1]]
        if not entries:
            return
        if self._events is None:
            self._open()
        now = time.time()
        for step, values in entries:
            self._events.write(_record(_event(now, step, scalars=values)))
            self._jsonl.write(json.dumps({"step": step, "wall_time": now, **values}) + "\n")
        self._events.flush()
        self._jsonl.flush()

    def train_rows(
        self, rows: list[tuple[int, Mapping[str, Any]]], *, tokens: int = 0, seconds: float = 0.0
    ) -> None:
        """Log the host metrics of a report of :func:`ast_jax.loop.fit` (``[(step, metrics), ...]``): the
        :data:`TAGS` present, ``optim/lr`` when a schedule is known, and at the report's last step
        ``perf/tokens_per_second`` = ``tokens / seconds`` (the timed steps' tokens and wall time; none when
        no step was timed, e.g. a report holding only the compiling first step)."""
        if not rows:
            return
        entries = [(step, {tag: mt[k] for k, tag in TAGS.items() if k in mt}) for step, mt in rows]
        if self.lr_schedule is not None:
            steps = np.asarray([step for step, _ in rows]) - 1
            # On the CPU: a few scalar ops that must not queue behind (or sync) the accelerator's steps.
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                lrs = np.asarray(self.lr_schedule(steps), np.float64)
            for (_, values), lr in zip(entries, lrs, strict=True):
                values[LR_TAG] = lr
        if tokens and seconds > 0:
            entries[-1][1][TOKENS_TAG] = tokens / seconds
        self.write(entries)

    def close(self) -> None:
        """Close the files (nothing when nothing was written)."""
        for f in (self._events, self._jsonl):
            if f is not None:
                f.close()
        self._events = self._jsonl = None


class MetricsLogger:
    """The logs of one job under ``log_dir`` (``None``: log nothing), one :class:`RunLog` per run name.

    Only process 0 of a multi-host job writes (``jax.process_index() == 0`` when the logger is made): the
    other processes hold the same metrics (every step's loss is a global mean), so their copies would only
    collide on a shared file system. Use as a context manager, or :meth:`close` when done.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None) -> None:
        self.enabled = log_dir is not None and jax.process_index() == 0
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._runs: dict[str, RunLog] = {}

    def run(self, name: str, *, lr_schedule: Callable[[Any], Any] | None = None) -> RunLog | None:
        """The :class:`RunLog` of run ``name`` (the same one on every call; ``lr_schedule`` given later
        replaces the earlier one); ``None`` when this logger writes nothing."""
        if not self.enabled:
            return None
        log = self._runs.get(name)
        if log is None:
            log = self._runs[name] = RunLog(self.log_dir / name, lr_schedule)
        elif lr_schedule is not None:
            log.lr_schedule = lr_schedule
        return log

    def scalars(self, run: str, step: int, values: Mapping[str, float]) -> None:
        """``run(run).scalars(step, values)`` without the ``None`` values; nothing when disabled."""
        log = self.run(run)
        if log is not None:
            log.scalars(step, {k: v for k, v in values.items() if v is not None})

    def close(self) -> None:
        """Close every run's files."""
        for log in self._runs.values():
            log.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
