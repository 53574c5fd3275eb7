"""The settings of the real-data LiDu study (`lidu_jax.study`): `RealDataStudyConfig`, one field per
command-line flag, and the checks that reject an impossible value on construction with a ``ValueError`` naming
the flag, before any data is loaded or any model trained.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Collection, Mapping
from typing import Any

from lidu_jax._cli import option

__all__ = [
    "DATASETS",
    "LIDU_VARIANT_FLAGS",
    "MODELS",
    "POPULATIONS",
    "PROTOCOLS",
    "SOURCES",
    "SPLITS",
    "RealDataStudyConfig",
    "config_defaults",
    "setting_difference",
]

DATASETS = ("ml-100k", "lastfm", "beauty")
MODELS = ("bpr", "lightgcn", "mlp", "sasrec")
SOURCES = ("ensemble", "bootstrap", "snapshot", "mc_dropout", "bayesian")
LIDU_VARIANT_FLAGS = ("exact", "unordered", "top3", "sequential", "pairwise", "correlated", "agreement")
SPLITS = ("leave_last_out", "random")
PROTOCOLS = ("users", "models", "dynamics")
POPULATIONS = ("full", "small")  # their tables: lidu_jax.study_models.POPULATIONS
_USERS_VARIANTS = "exact,unordered,top3,sequential,pairwise"
_SEED_MAX = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class RealDataStudyConfig:
    """Settings of one study run; each field is the command-line flag ``--field-name`` (its help text says
    what it is, its unit and its valid range). Values are checked on construction: an impossible value is a
    ``ValueError`` naming the flag."""

    protocol: str = option(
        "users",
        f"what is evaluated: one of {', '.join(PROTOCOLS)} (users = per-user LiDu of one cell; models = "
        "model selection by mean uncertainty over a population of recommenders, lidu_jax.study_models; "
        "dynamics = LiDu over training and inference changes, lidu_jax.study_dynamics)",
    )
    population: str = option(
        "full",
        f"with --protocol models: the population table, one of {', '.join(POPULATIONS)} (full = 6 models per "
        "family; small = tiny dims and epochs, for tests)",
    )
    population_families: str = option(
        ",".join(MODELS),
        f"with --protocol models: comma-separated families of the population, a subset of {','.join(MODELS)} "
        "(sasrec is skipped, with a note, on data without time order)",
    )
    data: str = option(
        "ml-100k",
        f"data set: one of {', '.join(DATASETS)} (located as in lidu_jax.datasets), or the path of an "
        "interaction file (table 'user item [rating [timestamp]]' or one 'user item1 item2 ...' line per "
        "user)",
    )
    model: str = option(
        "bpr",
        f"recommender: one of {', '.join(MODELS)} (bpr = BPR-MF, mlp = NeuMF-style, sasrec = sequential)",
    )
    source: str = option(
        "ensemble",
        f"where the per-item score distribution comes from: one of {', '.join(SOURCES)} (mc_dropout needs "
        "bpr, mlp or sasrec; bayesian is Bayesian MF and needs --model bpr)",
    )
    all: bool = option(
        False,
        "run the whole grid (every data set x every model) with --source, BPR cells with --dynamics and "
        "--sweeps; --data and --model are then ignored",
    )
    split: str = option(
        "leave_last_out",
        f"held-out items: one of {', '.join(SPLITS)} (leave_last_out = each user's latest interaction; "
        "random = a seeded 20%% of each user's items)",
    )
    min_rating: float | None = option(
        None, "implicit-feedback threshold: keep ratings >= this (none = every interaction is a positive)"
    )
    k_core: int = option(
        5, "k-core filter: users and items with fewer interactions are dropped (>= 0; 0 = off)"
    )
    n_models: int = option(
        0,
        "distribution size: ensemble members, bootstrap copies or last-epoch snapshots (>= 2; 0 = the "
        "protocol's default: 5 for users and dynamics, 3 seeds per model for models)",
    )
    n_samples: int = option(10, "MC-dropout passes / Bayesian posterior draws (>= 2)")
    dropout: float = option(0.2, "dropout rate of the mc_dropout model, in [0, 1)")
    epochs: int = option(20, "training epochs (>= 1; >= --n-models for --source snapshot)")
    dim: int = option(0, "embedding width of the model (>= 0; 0 = the model's default)")
    lr: float = option(0.0, "Adam learning rate (finite, > 0; 0 = the model's default)")
    batch_size: int = option(0, "training batch size (>= 0; 0 = the model's default)")
    k: int = option(10, "list length K of LiDu, NDCG@K and Recall@K (>= 1, < the number of items)")
    grid_size: int = option(256, "grid cells of the exact LiDu estimator (>= 8)")
    lidu_variants: str | None = option(
        None,
        f"comma-separated LiDu variants besides the exact one, a subset of {','.join(LIDU_VARIANT_FLAGS)} "
        f"(none = the protocol's default: {_USERS_VARIANTS} for users and dynamics, exact,pairwise for "
        "models)",
    )
    max_eval_users: int = option(
        0, "evaluate a seeded random subset of this many users (>= 0; 0 = every user with a held-out item)"
    )
    chunk: int = option(256, "users per scoring / estimation chunk; bounds memory (>= 1)")
    n_boot: int = option(200, "bootstrap resamples over users for the 95%% intervals (>= 1)")
    dynamics: bool = option(
        False, "track mean LiDu and mean NDCG@K during training (needs --source ensemble or bootstrap)"
    )
    dynamics_every: int = option(2, "with --dynamics: log every this many epochs (>= 1)")
    dynamics_users: int = option(500, "users scored for --dynamics and --sweeps (>= 1)")
    dynamics_hide_fraction: float = option(
        0.5, "with --protocol dynamics: fraction of each user's training items hidden at inference, in (0, 1)"
    )
    dynamics_add_fraction: float = option(
        0.5,
        "with --protocol dynamics: random items added to each user's history, as a fraction of its profile, "
        "in (0, 1]",
    )
    dynamics_candidates: str = option(
        "100,1000",
        "with --protocol dynamics: comma-separated candidate-set sizes (each > --k; capped by the number of "
        "items)",
    )
    dynamics_families: str = option(
        "bpr,lightgcn,mlp,sasrec",
        "with --protocol dynamics: comma-separated families, a subset of bpr,lightgcn,mlp,sasrec (sasrec is "
        "skipped, with the reason, on data without time order)",
    )
    sasrec_pack: bool = option(
        False,
        "train SASRec on packed rows (several users' sequences side by side in a row of its max_len, "
        "attention kept within each user): the same model and loss, batches of whole rows; several times "
        "faster where histories are much shorter than max_len (Beauty: 7 of 50 real positions on average)",
    )
    resume: bool = option(
        False,
        "with --protocol models: continue the interrupted run saved in <out-dir>/models_<data>.ckpt (its "
        "finished training runs are restored and an unfinished one continues from its last saved epoch, "
        "after checking that their settings equal these)",
    )
    keep_checkpoint: bool = option(
        False,
        "with --protocol models: keep <out-dir>/models_<data>.ckpt after the result is written, so that a "
        "later --resume can add families at the end of --population-families without training the others "
        "again",
    )
    dynamics_merge: bool = option(
        False,
        "with --protocol dynamics: keep the other families of the earlier <out-dir>/dynamics_<data>.json "
        "(its settings must equal these: a differing one is named and nothing runs); the families run now "
        "replace theirs",
    )
    sweeps: bool = option(False, "also compute LiDu for the list lengths --sweep-ks and candidate sizes")
    sweep_ks: str = option("1,3,5,10,20", "with --sweeps: comma-separated list lengths K (each >= 1)")
    sweep_candidates: str = option(
        "100,300,1000,0",
        "with --sweeps: comma-separated candidate-set sizes (each > --k; 0 = all non-training items)",
    )
    seed: int = option(0, f"seed of training, sampling and the user subset (0 .. {_SEED_MAX})")
    out_dir: str = option("runs/lidu_study", "directory for the tables, plots and JSON (created if missing)")
    json: str | None = option(
        None, "JSON path of a single run (none = <out-dir>/<data>_<model>_<source>.json)"
    )
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        # The protocol's defaults are resolved here, so every later reader sees concrete values.
        if self.n_models == 0 and not isinstance(self.n_models, bool):
            object.__setattr__(self, "n_models", 3 if self.protocol == "models" else 5)
        if self.lidu_variants is None:
            variants = "exact,pairwise" if self.protocol == "models" else _USERS_VARIANTS
            object.__setattr__(self, "lidu_variants", variants)
        _check(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_defaults() -> dict[str, Any]:
    """Every `RealDataStudyConfig` field's default, by field name (what an option added after an earlier run
    is compared as: that run behaved as the option's default does)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(RealDataStudyConfig)
        if f.default is not dataclasses.MISSING
    }


def setting_difference(
    recorded: Mapping[str, Any],
    now: Mapping[str, Any],
    ignored: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> str | None:
    """How an earlier run's recorded settings differ from this run's, for the protocols that extend or resume
    an earlier run: ``"was run with --k=5, this run has 4"`` for the first differing setting by name, or None.

    ``recorded`` and ``now`` map config field names to values in JSON form (tuples as lists); fields in
    ``ignored`` are not compared. A field absent from ``recorded`` is compared as ``defaults[field]`` (an
    option added after that run, which behaved as its default does) when ``defaults`` is given, else as None.
    """
    fill = defaults or {}
    for key in sorted((set(recorded) | set(now)) - set(ignored)):
        old = recorded[key] if key in recorded else fill.get(key)
        if old != now.get(key):
            return f"was run with {_flag(key)}={old!r}, this run has {now.get(key)!r}"
    return None


def _int_list(config: RealDataStudyConfig, name: str) -> list[int]:
    text = getattr(config, name)
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{_flag(name)} must be comma-separated integers, got {text!r}") from None


def _check(config: RealDataStudyConfig) -> None:
    """ValueError naming the flag of the first impossible setting of ``config``."""
    c = config
    for name, choices in (
        ("protocol", PROTOCOLS), ("population", POPULATIONS), ("model", MODELS), ("source", SOURCES),
        ("split", SPLITS),
    ):  # fmt: skip
        if getattr(c, name) not in choices:
            raise ValueError(f"{_flag(name)} must be one of {', '.join(choices)}, got {getattr(c, name)!r}")
    if not c.all and c.data not in DATASETS and not os.path.isfile(c.data):
        raise ValueError(
            f"--data must be one of {', '.join(DATASETS)} or an existing interaction file, got {c.data!r}"
        )
    if c.source == "bayesian" and c.model != "bpr":
        raise ValueError("--source bayesian is Bayesian MF: use it with --model bpr")
    if c.source == "mc_dropout" and c.model == "lightgcn":
        raise ValueError("--source mc_dropout needs a model with dropout (bpr, mlp, sasrec), not lightgcn")
    for name, low in (
        ("k_core", 0), ("n_models", 2), ("n_samples", 2), ("epochs", 1), ("dim", 0), ("batch_size", 0),
        ("k", 1), ("grid_size", 8), ("max_eval_users", 0), ("chunk", 1), ("n_boot", 1),
        ("dynamics_every", 1), ("dynamics_users", 1),
    ):  # fmt: skip
        v = getattr(c, name)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise ValueError(f"{_flag(name)} must be an integer >= {low}, got {v!r}")
    if not (isinstance(c.seed, numbers.Integral) and 0 <= c.seed <= _SEED_MAX):
        raise ValueError(f"--seed must be an integer in [0, {_SEED_MAX}], got {c.seed!r}")
    if c.source == "snapshot" and c.n_models > c.epochs:
        raise ValueError(f"--source snapshot: --n-models={c.n_models} must be <= --epochs={c.epochs}")
    if not (math.isfinite(c.lr) and c.lr >= 0):
        raise ValueError(f"--lr must be finite and > 0 (or 0 for the model's default), got {c.lr}")
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {c.dropout}")
    if c.min_rating is not None and not math.isfinite(c.min_rating):
        raise ValueError(f"--min-rating must be finite (or none), got {c.min_rating}")
    bad = {v.strip() for v in c.lidu_variants.split(",")} - set(LIDU_VARIANT_FLAGS) - {""}
    if bad:
        raise ValueError(
            f"--lidu-variants must be a subset of {','.join(LIDU_VARIANT_FLAGS)}, got {sorted(bad)}"
        )
    ks = _int_list(c, "sweep_ks")
    if not ks or min(ks) < 1:
        raise ValueError(f"--sweep-ks must be one or more list lengths >= 1, got {c.sweep_ks!r}")
    sizes = _int_list(c, "sweep_candidates")
    if (c.sweeps or c.all) and (not sizes or min(sizes) < 0 or any(0 < s <= c.k for s in sizes)):
        raise ValueError(
            f"--sweep-candidates must be sizes > --k={c.k} (or 0 = all items), got {c.sweep_candidates!r}"
        )
    if c.dynamics and c.source not in ("ensemble", "bootstrap"):
        raise ValueError("--dynamics needs a stacked source: --source ensemble or bootstrap")
    if not c.out_dir or (os.path.exists(c.out_dir) and not os.path.isdir(c.out_dir)):
        raise ValueError(f"--out-dir must be a directory (it is created if missing), got {c.out_dir!r}")
    if c.json is not None and (not c.json or os.path.isdir(c.json)):
        raise ValueError(f"--json must be a file path, got {c.json!r}")
    if c.protocol == "models":
        from lidu_jax.study_models import check_models_config  # it imports this module

        check_models_config(c)
