"""One configuration for every AST run: nested frozen dataclasses with one default per setting.

Every entry point's config is built from the same sections, each a frozen dataclass validated when it is
built::

    cfg.model       the architecture                       (ModelConfig: the byte-level GPT-2)
    cfg.data        the training batches                   (DataConfig; TextDataConfig adds the corpus)
    cfg.sparsity    N:M, Annealing SR-STE, SLoRB            (SparsityConfig)
    cfg.loss        distillation weights                   (DistillConfig)
    cfg.optimizer   AdamW and its learning-rate schedule   (OptimizerConfig)
    cfg.teacher     dense teacher training                 (TeacherConfig)
    cfg.run         budget, seed, reporting                (RunConfig)

An entry point extends a section with fields of its own (a subclass: the main job's teacher stopping rule,
the SmolLM2 data) and adds sections only it has (``ast_jax.train``: mesh, checkpoints, export; the SmolLM2
experiments: their GGUF model, one-shot pruning); those experiments start from a pretrained teacher, so they
have no teacher section. A setting that two entry points share is the same field with the same default.

Command lines stay flat: every leaf field is one flag of the same name (``cfg.optimizer.lr`` is ``--lr``); the
teacher's fields carry the prefix ``teacher_`` (``cfg.teacher.lr`` is ``--teacher-lr``). :class:`Config`
gives every entry config ``parser()``, ``from_flags(**flags)``, ``flags()`` (the flat ``{name: value}`` view
that JSON summaries and checkpoints record) and ``replace(**flags)``. An impossible value raises
``ValueError`` naming its flag, before any work.

Each section's docstring gives the reason for each default. The measured main job
(``docs/results-ast-main.md``) fixed the defaults it uses; the SmolLM2 experiments, a pretrained model at a
lower learning rate, pass their settings as flags (``docs/results-ast.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, ClassVar, Self

from ast_jax._cli import config_parser, option
from ast_jax.distill import LossConfig

__all__ = [
    "Config",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "Section",
    "SparsityConfig",
    "TeacherConfig",
    "TextDataConfig",
    "check_gpt_widths",
    "check_output",
    "option",
]


class Section:
    """Base of a config section: flag names and the validation helpers (each error names the flag)."""

    FLAG_PREFIX: ClassVar[str] = ""

    def flag(self, name: str) -> str:
        """The command-line flag of field ``name`` (``warmup_steps`` -> ``--warmup-steps``)."""
        return "--" + (self.FLAG_PREFIX + name).replace("_", "-")

    def require(self, ok: bool, name: str, need: str) -> None:
        """``ValueError("--flag must be <need>, got <value>")`` unless ``ok``."""
        if not ok:
            raise ValueError(f"{self.flag(name)} must be {need}, got {getattr(self, name)!r}")

    def at_least(self, low: int, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            optional = self.__dataclass_fields__[name].default is None  # type: ignore[attr-defined]
            self.require(value is None or value >= low, name, f">= {low}" + (" or none" if optional else ""))

    def finite(self, *names: str, positive: bool = False) -> None:
        for name in names:
            x = getattr(self, name)
            ok = math.isfinite(x) and (x > 0 if positive else x >= 0)
            self.require(ok, name, "a finite number " + ("> 0" if positive else ">= 0"))

    def fraction(self, *names: str) -> None:
        for name in names:
            self.require(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]")  # also false for NaN


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """The byte-level GPT-2-style model (teacher and student share it).

    Defaults: 2 blocks of width 128 with 4 heads is the measured main job's model: it trains to a flat
    held-out loss in minutes on 2 CPU cores. ``d_mlp`` none is GPT-2's 4·d_model.
    """

    n_layer: int = option(2, "transformer blocks (>= 1)")
    d_model: int = option(128, "model width; a multiple of --n-head and --m (>= 1)")
    n_head: int = option(4, "attention heads (>= 1)")
    d_mlp: int | None = option(None, "MLP width, a multiple of --m (default 4*d_model)")
    remat: bool = option(False, "gradient checkpointing of each block (less memory, more compute)")

    def __post_init__(self) -> None:
        self.at_least(1, "n_layer", "d_model", "n_head", "d_mlp")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """The training batches: ``batch_size`` windows of ``seq_len`` tokens.

    Defaults: 32 windows of 64 bytes, the measured main job's batches (a context of 64 bytes is enough for
    its 2-block model). ``python -m ast_jax`` and ``ast_jax.train`` extend this section with the byte corpus
    (:class:`TextDataConfig`), the SmolLM2 experiments with their own data (WikiText-2, Tiny Shakespeare).
    """

    seq_len: int = option(64, "tokens per training window (>= 2)")
    batch_size: int = option(32, "sequences per training batch (>= 1)")

    def __post_init__(self) -> None:
        self.at_least(2, "seq_len")
        self.at_least(1, "batch_size")


@dataclasses.dataclass(frozen=True)
class TextDataConfig(DataConfig):
    """:class:`DataConfig` on the byte corpus. Defaults: the built-in corpus (no download, the same bytes on
    every machine with the same Python), all of it, and 512 held-out windows (32,768 predicted bytes, the
    measured main job's evaluation)."""

    text: str | None = option(None, "UTF-8 text file to train on (default: the built-in docstring corpus)")
    max_bytes: int | None = option(None, "truncate the corpus to this many bytes, for quick runs (>= 1)")
    eval_windows: int = option(512, "held-out windows of --seq-len tokens for the final perplexities")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least(1, "max_bytes")
        self.at_least(0, "eval_windows")


@dataclasses.dataclass(frozen=True)
class SparsityConfig(Section):
    """N:M sparsity, Annealing SR-STE and SLoRB.

    Defaults and why:
      n, m = 2, 4: the pattern sparse tensor cores run.
      max_decay (λ_max) = 0.1: the decay must suit the budget. Over a few hundred steps, λ_max 1e-3 leaves
        the masks flipping and AST-Naive loses to a fixed mask; 0.1 was best of 1e-3 .. 0.1
        (``docs/results-ast-main.md``). The public recipe's 1e-4 is tuned for 40k steps.
      ramp_steps (T0) = 100: the measured main job's ramp, a third of its 300 steps.
      mask_every = 10: the paper's refresh interval.
      slorb_k = 16: the paper's SLoRB block size.
    """

    n: int = option(2, "kept weights per group (N of N:M, 0 < N < M)")
    m: int = option(4, "group size along a kernel's input (M of N:M, >= 2)")
    max_decay: float = option(0.1, "lambda_max of Annealing SR-STE (finite, >= 0; see docs/maths-ast.md)")
    ramp_steps: int = option(100, "T0: steps over which lambda ramps up to lambda_max (>= 0)")
    mask_every: int = option(10, "mask refresh interval in steps (>= 1)")
    slorb_k: int = option(16, "SLoRB block size k where SLoRB is used (AST-Boosted; >= 1)")

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise ValueError(f"--n and --m need 0 < n < m, got n={self.n}, m={self.m}")
        self.finite("max_decay")
        self.at_least(0, "ramp_steps")
        self.at_least(1, "mask_every", "slorb_k")


@dataclasses.dataclass(frozen=True)
class DistillConfig(Section):
    """Weights of the distillation loss ``w_kl·T²·KL(p_t || p_s) + w_ce·CE``.

    Defaults: 0.67 / 0.33 at temperature 2, the public AST recipe.
    """

    w_kl: float = option(0.67, "weight of the KL distillation loss (finite, >= 0)")
    w_ce: float = option(0.33, "weight of the cross-entropy loss (finite, >= 0; w_kl + w_ce > 0)")
    temperature: float = option(2.0, "distillation temperature (finite, > 0)")

    def __post_init__(self) -> None:
        self.finite("w_kl", "w_ce")
        self.finite("temperature", positive=True)
        if self.w_kl + self.w_ce == 0:
            raise ValueError("--w-kl and --w-ce are both 0: the loss would be zero")

    def loss(self, **overrides: Any) -> LossConfig:
        """The :class:`ast_jax.distill.LossConfig` of these weights (``overrides``: e.g. ``kl_kind``)."""
        return LossConfig(w_kl=self.w_kl, w_ce=self.w_ce, temperature=self.temperature, **overrides)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    """AdamW (sparse: :func:`ast_jax.optim.sparse_adamw`) with linear warm-up then cosine decay.

    The schedule of a run of ``S`` steps (built by :func:`ast_jax.loop.build_schedule`): warm-up over
    ``W = max(1, min(warmup_steps, S // 10))`` steps (0 when ``warmup_steps`` is 0), then cosine to
    ``lr·min_lr_ratio``, reached at step ``S + schedule_tail``. The dense teacher uses the same settings with
    its own ``--teacher-lr`` and ``--teacher-min-lr-ratio``.

    Defaults and why:
      lr = 1e-3: the measured main job's retraining rate (5e-4 was worse). A pretrained LLM wants about 1e-4
        (the SmolLM2 runs pass ``--lr 1e-4``).
      warmup_steps = 100: the measured teacher's warm-up; the cap at a tenth of the run gives the main job's
        30 of 300 retraining steps, and keeps short smoke runs training.
      min_lr_ratio = 0.1: the public recipe's 2e-4 -> 2e-5.
      schedule_tail = 1: the measured main job's schedule ends one step after the last update, so the last
        update still has a learning rate above the floor (the SmolLM2 runs used 0).
      weight_decay = 0.1: nanoGPT's and the public AST recipe's, on matrices only (never biases or norms).
      b2 = 0.99: the measured main job's; over a few hundred steps the second moment should forget faster
        than with 0.999 (the SmolLM2 runs used 0.999).
    """

    lr: float = option(1e-3, "peak learning rate: warm-up, then cosine to lr*min_lr_ratio (finite, > 0)")
    warmup_steps: int = option(
        100, "learning-rate warm-up steps, at most a tenth of the run and at least 1 (0 = none)"
    )
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak (0 .. 1)")
    schedule_tail: int = option(
        1, "the cosine reaches its floor this many steps after the last update (>= 0)"
    )
    weight_decay: float = option(0.1, "decoupled weight decay of the matrices (finite, >= 0)")
    b2: float = option(0.99, "AdamW second-moment decay (0 <= b2 < 1)")

    def __post_init__(self) -> None:
        self.finite("lr", positive=True)
        self.finite("weight_decay")
        self.fraction("min_lr_ratio")
        self.at_least(0, "warmup_steps", "schedule_tail")
        self.require(0.0 <= self.b2 < 1.0, "b2", "in [0, 1)")

    def warmup_for(self, steps: int) -> int:
        """Warm-up length of a run of ``steps`` steps (see the class docstring)."""
        return max(1, min(self.warmup_steps, steps // 10)) if self.warmup_steps else 0


@dataclasses.dataclass(frozen=True)
class TeacherConfig(Section):
    """The dense teacher's CE training (flags ``--teacher-steps``, ``--teacher-lr``, ...).

    Defaults: 3,000 steps at peak lr 3e-3, cosine to 5% of it: the measured main job's teacher, which
    flattened after 2,800 steps (the main job stops it there; ``ast_jax.train`` runs all of ``steps``).
    """

    FLAG_PREFIX: ClassVar[str] = "teacher_"

    steps: int = option(3000, "most dense teacher training steps (0 = use the random init)")
    lr: float = option(3e-3, "teacher peak learning rate (finite, > 0)")
    min_lr_ratio: float = option(0.05, "teacher final learning rate as a fraction of its peak (0 .. 1)")

    def __post_init__(self) -> None:
        self.at_least(0, "steps")
        self.finite("lr", positive=True)
        self.fraction("min_lr_ratio")


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    """Budget, seed and reporting.

    Defaults: 300 retraining steps, the measured main job's budget (about a tenth of its teacher's); seed 0;
    losses read back every 10 steps (a host round trip that costs little against 10 steps); progress shown.
    """

    steps: int = option(300, "sparse retraining steps (>= 1)")
    seed: int = option(0, "seed of the initialisation, the batch order and the RNG (>= 0)")
    log_every: int = option(10, "read the losses back and report progress every this many steps (>= 1)")
    progress: bool = option(True, "show progress (bars, or lines for ast_jax.train)")
    json: str | None = option(None, "write the results to this JSON file")

    def __post_init__(self) -> None:
        self.at_least(1, "steps", "log_every")
        self.at_least(0, "seed")


def check_gpt_widths(model: ModelConfig, sparsity: SparsityConfig, *, slorb: bool) -> None:
    """Cross-section checks of the byte GPT-2: heads divide the width; every sparse kernel's input (d_model or
    d_mlp wide) is cut into groups of ``m`` (and SLoRB blocks of ``k`` when ``slorb``)."""
    if model.d_model % model.n_head:
        raise ValueError(f"--d-model {model.d_model} is not divisible by --n-head {model.n_head}")
    d_mlp = 4 * model.d_model if model.d_mlp is None else model.d_mlp
    for name, width in (("--d-model", model.d_model), ("--d-mlp", d_mlp)):
        if width % sparsity.m:
            raise ValueError(f"{name} {width} is not a multiple of --m {sparsity.m}")
        if slorb and width % sparsity.slorb_k:
            raise ValueError(f"--slorb-k {sparsity.slorb_k} does not divide {name} {width}")


def check_output(flag: str, path: str | None, *, directory: bool = False) -> None:
    """Before any work: ``ValueError`` naming ``flag`` unless ``path`` (a file, or with ``directory`` a
    directory; ``None``/empty = no output) can be written. Creates the directory it would be written in."""
    from pathlib import Path

    from ast_jax.checkpoint import ensure_writable_dir

    if not path:
        return
    if not directory and Path(path).is_dir():
        raise ValueError(f"{flag} {path!r} is a directory, not a file")
    try:
        ensure_writable_dir(path if directory else Path(path).absolute().parent)
    except ValueError as e:
        raise ValueError(f"{flag} {path!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# The flat command line of a nested config


def _sections(cls: type) -> list[tuple[str, type]]:
    """``(name, section class)`` of a :class:`Config` (each field's ``default_factory``)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a section needs default_factory=<its section class>")
        out.append((f.name, f.default_factory))
    return out


def _leaves(section_cls: type) -> list[tuple[str, str, Any, dataclasses.Field]]:
    """``(flag name, field name, type, field)`` of every field of a section class."""
    hints = typing.get_type_hints(section_cls)
    prefix = getattr(section_cls, "FLAG_PREFIX", "")
    return [(prefix + f.name, f.name, hints[f.name], f) for f in dataclasses.fields(section_cls)]


class Config:
    """Base of an entry point's config: a frozen dataclass whose fields are sections; one flag per leaf."""

    @classmethod
    def flag_fields(cls) -> dict[str, tuple[str, str]]:
        """``{flag name: (section, field)}``; a flag name given twice is a bug, caught here."""
        out: dict[str, tuple[str, str]] = {}
        for section, section_cls in _sections(cls):
            for flag, name, _, _ in _leaves(section_cls):
                if flag in out:
                    raise TypeError(f"{cls.__name__}: flag --{flag} is defined by two sections")
                out[flag] = (section, name)
        return out

    @classmethod
    def from_flags(cls, **flags: Any) -> Self:
        """The config with the given flat settings (``lr=1e-4, teacher_steps=0``), defaults elsewhere;
        ``TypeError`` for an unknown name, ``ValueError`` (naming the flag) for an impossible value."""
        where = cls.flag_fields()
        unknown = sorted(set(flags) - set(where))
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}")
        parts: dict[str, dict[str, Any]] = {section: {} for section, _ in _sections(cls)}
        for flag, value in flags.items():
            section, name = where[flag]
            parts[section][name] = value
        return cls(**{section: section_cls(**parts[section]) for section, section_cls in _sections(cls)})

    def flags(self) -> dict[str, Any]:
        """The flat ``{flag name: value}`` view (what JSON summaries and checkpoints record)."""
        out = {}
        for section, section_cls in _sections(type(self)):
            for flag, name, _, _ in _leaves(section_cls):
                out[flag] = getattr(getattr(self, section), name)
        return out

    def replace(self, **flags: Any) -> Self:
        """A copy with some flat settings changed (validated like :meth:`from_flags`)."""
        return type(self).from_flags(**{**self.flags(), **flags})

    @classmethod
    def default_flags(cls) -> dict[str, Any]:
        """The default of every flag."""
        return cls.from_flags().flags()

    @classmethod
    def parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
        """The flat command line: one ``--flag`` per leaf field, with its help text and default."""
        fields = []
        for _, section_cls in _sections(cls):
            for flag, _, tp, f in _leaves(section_cls):
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                fields.append((flag, tp, dataclasses.field(default=default, metadata=f.metadata)))
        cls.flag_fields()  # refuses a flag defined twice
        return config_parser(dataclasses.make_dataclass(cls.__name__, fields), prog, description)
