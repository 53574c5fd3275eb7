"""Logs people can watch (issue 15): TensorBoard event files and JSON lines under ``--log-dir``.

The event files are read back with an independent decoder (tensorboardX's generated ``Event`` protobuf and
its CRC-32C), so a framing or encoding mistake in :mod:`ast_jax.logs` cannot cancel out in the test.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.config import OptimizerConfig, SparsityConfig
from ast_jax.logs import MetricsLogger, crc32c, masked_crc32c
from ast_jax.loop import build_schedule, fit
from ast_jax.srste import annealing_decay
from ast_jax.train import main as train_main

TINY_TRAIN = [
    "--batch-size", "8", "--seq-len", "16", "--steps", "6", "--teacher-steps", "2", "--n-layer", "1",
    "--d-model", "32", "--n-head", "2", "--eval-windows", "2", "--log-every", "2", "--lr", "3e-3",
    "--mask-every", "2", "--ramp-steps", "4", "--warmup-steps", "10", "--min-shard-size", "64",
    "--no-progress",
]  # fmt: skip
STUDENT_TAGS = {
    "train/loss", "train/ce", "train/kl", "train/grad_norm", "sparsity/lambda", "sparsity/flip_rate",
    "sparsity/flip_rate_vs_initial", "optim/lr", "perf/tokens_per_second",
}  # fmt: skip


def read_events(path: Path) -> list[tuple[int, dict[str, float], str]]:
    """``(step, {tag: simple_value}, file_version)`` of every record of an event file, CRCs checked."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    from tensorboardX.record_writer import masked_crc32c as tbx_masked_crc32c

    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == tbx_masked_crc32c(header)
        body = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == tbx_masked_crc32c(body)
        pos += 16 + length
        ev = event_pb2.Event.FromString(body)
        out.append((ev.step, {v.tag: v.simple_value for v in ev.summary.value}, ev.file_version))
    return out


def read_run(directory: Path) -> tuple[dict[str, dict[int, float]], list[dict]]:
    """``({tag: {step: value}}, jsonl lines)`` of one run directory holding one event file."""
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = read_events(files[0])
    assert events[0][2] == "brain.Event:2"  # the header TensorBoard expects first
    tags: dict[str, dict[int, float]] = {}
    for step, values, _ in events[1:]:
        for tag, v in values.items():
            tags.setdefault(tag, {})[step] = v
    lines = [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()]
    return tags, lines


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    tbx = pytest.importorskip("tensorboardX.record_writer")
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert masked_crc32c(data) == tbx.masked_crc32c(data)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, tiny_text_file):
    """One tiny ``python -m ast_jax.train`` with ``--log-dir`` (and ``--json`` for its reported numbers)."""
    tmp = tmp_path_factory.mktemp("logs")
    args = [*TINY_TRAIN, "--text", str(tiny_text_file), "--json", str(tmp / "summary.json")]
    assert train_main([*args, "--log-dir", str(tmp / "logs")]) == 0
    return tmp, args, json.loads((tmp / "summary.json").read_text())


def test_train_writes_tensorboard_and_jsonl(train_run):
    tmp, _, summary = train_run
    logs = tmp / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["student", "teacher"]

    tags, lines = read_run(logs / "student")
    assert set(tags) == STUDENT_TAGS | {"eval/perplexity"}
    for tag in STUDENT_TAGS - {"perf/tokens_per_second"}:
        assert sorted(tags[tag]) == [1, 2, 3, 4, 5, 6], tag  # every step, read back in reports of 2
    assert sorted(tags["perf/tokens_per_second"]) == [2, 4, 6]  # once per report, after the timed steps
    assert list(tags["eval/perplexity"]) == [6]
    assert all(v > 0 for v in tags["perf/tokens_per_second"].values())

    # The event file and the JSON lines hold the same numbers (the event file as float32).
    from_jsonl: dict[str, dict[int, float]] = {}
    for line in lines:
        for tag, v in line.items():
            if tag not in ("step", "wall_time"):
                from_jsonl.setdefault(tag, {})[line["step"]] = v
    assert set(from_jsonl) == set(tags)
    for tag in tags:
        assert sorted(from_jsonl[tag]) == sorted(tags[tag]), tag
        steps = sorted(tags[tag])
        np.testing.assert_allclose(
            [tags[tag][s] for s in steps], [from_jsonl[tag][s] for s in steps], rtol=1e-6, atol=0, err_msg=tag
        )

    # ... and the numbers the run reported: losses, perplexity; the schedules at each step.
    losses = dict(summary["losses"])
    assert sorted(losses) == sorted(from_jsonl["train/loss"])
    for step, loss in losses.items():
        assert from_jsonl["train/loss"][step] == loss  # the very same float, not a recomputation
    assert from_jsonl["eval/perplexity"][6] == summary["perplexity"]["student"]
    opt = OptimizerConfig(lr=3e-3, warmup_steps=10)
    steps = np.arange(1, 7)
    lr = np.asarray(build_schedule(opt, 6)(steps - 1))
    np.testing.assert_allclose([from_jsonl["optim/lr"][s] for s in steps], lr, rtol=1e-6, atol=1e-12)
    lam = np.asarray(annealing_decay(steps, SparsityConfig().max_decay, 4))
    np.testing.assert_allclose([from_jsonl["sparsity/lambda"][s] for s in steps], lam, rtol=1e-6, atol=1e-9)
    flips = [from_jsonl["sparsity/flip_rate"][s] for s in steps]
    assert all(0.0 <= f <= 1.0 for f in flips)

    # The teacher's run: its CE steps and its held-out perplexity, no sparsity tags.
    ttags, tlines = read_run(logs / "teacher")
    assert set(ttags) == {"train/loss", "train/ce", "train/grad_norm", "optim/lr", "eval/perplexity"} | {
        "perf/tokens_per_second"
    }
    assert sorted(ttags["train/loss"]) == [1, 2]
    teacher_ppl = next(x for x in tlines if "eval/perplexity" in x)["eval/perplexity"]
    assert teacher_ppl == summary["perplexity"]["teacher"]
    assert summary["teacher_final_loss"] == next(x for x in tlines if x["step"] == 2)["train/loss"]


def test_only_process_zero_writes(train_run, tmp_path, monkeypatch):
    _, args, _ = train_run
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    logs = tmp_path / "logs"
    assert train_main([*args[:-2], "--log-dir", str(logs)]) == 0  # same programs: nothing recompiles
    assert not logs.exists()


def test_no_log_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = MetricsLogger(None)
    assert logger.run("student") is None
    logger.scalars("student", 1, {"train/loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_logger_writes_what_it_is_given(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        log = logger.run("a", lr_schedule=lambda c: 0.5 * (c + 1))
        assert logger.run("a") is log  # one writer per run
        log.train_rows(
            [
                (1, {"loss": np.float32(2.0), "kl": 1.5, "decay": 0.25}),
                (2, {"loss": float("nan"), "kl": 1e40}),
            ],
            tokens=100,
            seconds=0.5,
        )
        logger.scalars("a", 2, {"eval/perplexity": 7.0, "skipped": None})
    tags, lines = read_run(tmp_path / "a")
    assert tags["train/loss"][1] == 2.0 and math.isnan(tags["train/loss"][2])
    assert tags["train/kl"][2] == math.inf  # beyond float32 in the event file; exact in the JSON line
    assert lines[1]["train/kl"] == 1e40
    assert tags["optim/lr"] == {1: 0.5, 2: 1.0}  # the schedule at the update count step - 1
    assert tags["sparsity/lambda"] == {1: 0.25}
    assert tags["perf/tokens_per_second"] == {2: 200.0}
    assert tags["eval/perplexity"] == {2: 7.0}
    assert [x["step"] for x in lines] == [1, 2, 2]


def test_fit_logs_each_report_before_its_hook(tmp_path):
    """:func:`ast_jax.loop.fit` hands every report's rows to the log first (a hook that raises on a bad loss
    still leaves it logged), with the tokens of the timed steps: the compiling first step is left out."""

    def step(state, batch, scale):
        return state + 1, {"loss": jnp.asarray(state, jnp.float32) * scale, "decay": jnp.float32(0.5)}

    def on_report(rows, state, last):
        if rows[-1][0] == 6:
            raise FloatingPointError("stop")

    batch = {"inputs": np.zeros((2, 5), np.int32)}
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(FloatingPointError):
            fit(step, jnp.int32(0), lambda i: batch, stop=8, report_every=3, on_report=on_report,
                step_args=(2.0,), log=logger.run("r"))  # fmt: skip
    tags, lines = read_run(tmp_path / "r")
    assert tags["train/loss"] == {s: 2.0 * (s - 1) for s in range(1, 7)}  # step 6 logged before the raise
    assert tags["sparsity/lambda"] == dict.fromkeys(range(1, 7), 0.5) and "optim/lr" not in tags
    assert sorted(tags["perf/tokens_per_second"]) == [3, 6] and all(v > 0 for v in lines[2:3][0].values())


def test_retrain_hands_its_run_to_fit(monkeypatch):
    """The hook ``python -m ast_jax`` and ``ast_jax.experiments`` use: ``retrain(..., logger=)`` logs to the
    run ``name`` with the run's learning-rate schedule (the caller adds its perplexity there)."""
    import ast_jax.loop as loop
    from ast_jax.distill import LossConfig

    class Stop(Exception):
        pass

    seen = {}

    def fake_fit(*args, **kwargs):
        seen.update(kwargs)
        raise Stop  # before anything compiles

    monkeypatch.setattr(loop, "fit", fake_fit)
    params = {"block": {"kernel": jnp.ones((8, 8))}}
    opt, logger = OptimizerConfig(lr=1e-3), MetricsLogger("unused")
    with pytest.raises(Stop):
        loop.retrain(
            None, params, params, lambda i: None, optimizer=opt, sparsity=SparsityConfig(), steps=30,
            variant="annealing", loss=LossConfig(), name="ast_naive", logger=logger,
        )  # fmt: skip
    log = seen["log"]
    assert log is logger.run("ast_naive")
    steps = np.arange(30)
    np.testing.assert_allclose(
        np.asarray(log.lr_schedule(steps)), np.asarray(build_schedule(opt, 30)(steps)), rtol=0, atol=0
    )
