"""Does LiDu reveal a recommender's inner state through training and inference? (the dynamics protocol)

    python -m lidu_jax.study --protocol dynamics --data ml-100k --epochs 20 --out-dir runs/dynamics

`run_dynamics_protocol` takes one data set (``config.data``) and, for every family of
`lidu_jax.study_config.MODELS` (bpr, lightgcn, mlp, sasrec; sasrec only on time-ordered data, otherwise the
reason is recorded):

1. **Training.** An ensemble of ``config.n_models`` seeds, trained at once with `jax.vmap` exactly as the
   study's ``--source ensemble`` cell (`lidu_jax.study_cells.build_source`), for ``config.epochs`` epochs
   (>= 10). After every epoch, on a seeded subset of ``config.dynamics_users`` users with a held-out item:
   mean LiDu (exact grid estimator, ``-log P`` of each user's top-K list), mean NDCG@K, the mean ensemble
   std over the candidates, the mean std of the top-K items and the mean training loss. Across the
   checkpoints: Kendall tau and Spearman rho of ``-mean LiDu`` vs ``mean NDCG@K`` (and of ``-baseline`` vs
   ``mean NDCG@K`` for the two std baselines).
2. **Inference.** On each final ensemble, per user, three changes to what the model sees or may
   recommend, each compared with the unchanged model on the same users (see `CHANGES` and
   `HIDE_MEANS` / `ADD_MEANS` for what each means per family):

   * ``hide``: a seeded ``hide_fraction`` of the user's training items is taken out of its history;
   * ``add``: ``add_fraction * |profile|`` random items (uniform over the items that are neither training
     nor held-out items of the user) are added to its history;
   * ``candidates_<c>``: the candidate set shrinks to the user's top-K list plus ``c - K`` other
     non-training items drawn uniformly (as in `lidu_jax.study_cells.run_sweeps`).

   The visible history is always excluded from the candidates and NDCG@K is always against the held-out
   test item. Per change: mean LiDu and mean NDCG@K before and after, and across users the Kendall tau /
   Spearman rho of ``-ΔLiDu`` vs ``ΔNDCG`` (positive = LiDu falls where NDCG rises: they agree), the Kendall
   tau of ``sign(-ΔLiDu)`` vs ``sign(ΔNDCG)``, and the sign agreement rate over the users whose NDCG moved.
3. **Files.** ``<out_dir>/dynamics_<data>.json`` (the returned dict), ``dynamics_<data>.md`` (two tables)
   and ``dynamics_<data>.png`` (mean LiDu and mean NDCG vs epoch per family, and a bar panel of the
   inference-change correlations; skipped, with the reason in the JSON, when matplotlib is missing).

Its own settings are the ``dynamics_*`` options of `RealDataStudyConfig` (read with ``getattr(config,
name, default)``, so a config class without them still runs): ``dynamics_hide_fraction`` (0.5),
``dynamics_add_fraction`` (0.5), ``dynamics_candidates`` ("100,1000"), ``dynamics_families``
("bpr,lightgcn,mlp,sasrec") and ``dynamics_merge`` (False: with it, the families of an earlier run in the
same ``out_dir`` with equal settings are kept, so a slow family can run on its own later).

Where the code is: this module is the protocol (its settings, one family's training and changes, the run);
the users, their history changes and the per-user measures are `lidu_jax.study_dynamics_users`, the scorers
that take a changed history `lidu_jax.study_dynamics_scorers`, the tables and plot
`lidu_jax.study_dynamics_report`. Their public names are importable from here as well.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import evaluation
from lidu_jax.models.base import RecModel
from lidu_jax.study_cells import build_source, load_data, score_stacked
from lidu_jax.study_config import MODELS, RealDataStudyConfig, config_defaults, setting_difference
from lidu_jax.study_dynamics_report import _plot, markdown
from lidu_jax.study_dynamics_scorers import _history_scores
from lidu_jax.study_dynamics_users import (
    ADD_MEANS,
    CANDIDATES_MEAN,
    CHANGES,
    HIDE_MEANS,
    _candidates,
    _per_user,
    _pick_users,
    _rho,
    _shrunk_candidates,
    _tau,
    _Users,
    compare,
)
from lidu_jax.study_dynamics_users import _visible_sequences as _visible_sequences  # the tests use it
from lidu_jax.training import failure_context
from lidu_jax.types import InteractionSplit

__all__ = [
    "ADD_MEANS",
    "CANDIDATES_MEAN",
    "CHANGES",
    "DEFAULTS",
    "HIDE_MEANS",
    "DynamicsSettings",
    "compare",
    "dynamics_settings",
    "markdown",
    "run_dynamics_protocol",
]

MIN_EPOCHS = 10
DEFAULTS: dict[str, Any] = {
    "dynamics_hide_fraction": 0.5,
    "dynamics_add_fraction": 0.5,
    "dynamics_candidates": "100,1000",
    "dynamics_families": ",".join(MODELS),
    "dynamics_merge": False,
}
# Config fields that change no number of the protocol: where files go, how they are chunked or shown,
# which families run now, and the user-protocol fields the protocol ignores.
_MERGE_IGNORED = frozenset(
    {
        "out_dir",
        "json",
        "progress",
        "chunk",
        "dynamics_families",
        "dynamics_merge",
        "model",
        "source",
        "resume",
        "keep_checkpoint",
    }
)


# ------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class DynamicsSettings:
    """The protocol's own settings, checked: ``hide_fraction`` in (0, 1), ``add_fraction`` in (0, 1],
    ``candidate_sizes`` each > ``k``, ``families`` a non-empty subset of `MODELS` in their order."""

    hide_fraction: float
    add_fraction: float
    candidate_sizes: tuple[int, ...]
    families: tuple[str, ...]


def _option(config: RealDataStudyConfig, name: str) -> Any:
    return getattr(config, name, DEFAULTS[name])


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def dynamics_settings(config: RealDataStudyConfig) -> DynamicsSettings:
    """The checked protocol settings of ``config``; a ``ValueError`` naming the flag on a bad one.

    Checked before any data is loaded or model trained: ``--epochs >= 10`` (one checkpoint per epoch, at
    least 10), ``--dynamics-users >= 2`` (correlations over users), the fractions, the candidate sizes
    (> ``--k``) and the family names.
    """
    if config.epochs < MIN_EPOCHS:
        raise ValueError(
            f"--epochs must be >= {MIN_EPOCHS} for the dynamics protocol (one checkpoint per epoch, at "
            f"least {MIN_EPOCHS}), got {config.epochs}"
        )
    if config.dynamics_users < 2:
        raise ValueError(
            f"--dynamics-users must be >= 2 for per-user correlations, got {config.dynamics_users}"
        )
    hide = _option(config, "dynamics_hide_fraction")
    if isinstance(hide, bool) or not isinstance(hide, int | float) or not 0.0 < hide < 1.0:
        raise ValueError(f"--dynamics-hide-fraction must be in (0, 1), got {hide!r}")
    add = _option(config, "dynamics_add_fraction")
    if isinstance(add, bool) or not isinstance(add, int | float) or not 0.0 < add <= 1.0:
        raise ValueError(f"--dynamics-add-fraction must be in (0, 1], got {add!r}")
    sizes = _int_list(_option(config, "dynamics_candidates"), "--dynamics-candidates")
    if not sizes or any(c <= config.k for c in sizes):
        raise ValueError(
            f"--dynamics-candidates must be one or more sizes > --k={config.k}, "
            f"got {_option(config, 'dynamics_candidates')!r}"
        )
    names = [f.strip() for f in str(_option(config, "dynamics_families")).split(",") if f.strip()]
    bad = sorted(set(names) - set(MODELS))
    if not names or bad:
        raise ValueError(
            f"--dynamics-families must be a non-empty subset of {','.join(MODELS)}, got "
            f"{_option(config, 'dynamics_families')!r}"
        )
    families = tuple(m for m in MODELS if m in names)
    return DynamicsSettings(float(hide), float(add), tuple(dict.fromkeys(sizes)), families)


# ------------------------------------------------------------------------------------------ one family


def _trajectory(log: list[dict[str, float]]) -> dict[str, Any]:
    """Correlations across checkpoints of ``-mean LiDu`` (and of each ``-baseline``) with mean NDCG@K."""
    nd = np.array([r["mean_ndcg"] for r in log])
    out: dict[str, Any] = {"n_checkpoints": len(log), "log": log}
    lid = np.array([r["mean_lidu"] for r in log])
    out["kendall_tau_neg_lidu_vs_ndcg"] = _tau(-lid, nd)
    out["spearman_neg_lidu_vs_ndcg"] = _rho(-lid, nd)
    out["baselines"] = {}
    for name in ("mean_std", "mean_top_k_std"):
        v = np.array([r[name] for r in log])
        out["baselines"][name] = {
            "kendall_tau_neg_vs_ndcg": _tau(-v, nd),
            "spearman_neg_vs_ndcg": _rho(-v, nd),
        }
    return out


def _run_family(
    family: str,
    split: InteractionSplit,
    config: RealDataStudyConfig,
    s: DynamicsSettings,
    us: _Users,
    key: jax.Array,
) -> dict[str, Any]:
    cfg = dataclasses.replace(
        config, model=family, source="ensemble", dynamics=False, sweeps=False, json=None
    )
    base_cand = _candidates(us, "base")
    log: list[dict[str, float]] = []

    def make_callback(model: RecModel):
        def callback(epoch: int, params, losses) -> None:
            scores = score_stacked(model, params, us.ids, config.chunk, when=f"after epoch {epoch}")
            r = _per_user(scores, base_cand, us.test, config)
            log.append(
                {
                    "epoch": epoch,
                    "mean_lidu": float(r["lidu"].mean()),
                    "mean_ndcg": float(r["ndcg"].mean()),
                    "mean_std": float(r["mean_std"].mean()),
                    "mean_top_k_std": float(r["top_k_std"].mean()),
                    "loss": float(jnp.mean(losses)),
                }
            )

        return callback

    t0 = time.perf_counter()
    context = (
        f"dynamics protocol {split.name}/{family}: --seed {config.seed}, "
        f"--lr {config.lr or 'the model default'}, --epochs {config.epochs}"
    )
    with failure_context(context):
        _, model, params = build_source(split, cfg, jax.random.fold_in(key, 1), make_callback)
    t1 = time.perf_counter()
    base_scores = score_stacked(model, params, us.ids, config.chunk)
    before = _per_user(base_scores, base_cand, us.test, config)
    changed = _history_scores(family, model, params, split, us, base_scores, config.chunk)
    inference: dict[str, Any] = {}
    for change, means in (("hide", HIDE_MEANS), ("add", ADD_MEANS)):
        after = _per_user(changed[change], _candidates(us, change), us.test, config)
        inference[change] = compare(before, after, means[family])
    rng = np.random.default_rng([config.seed, 3])
    for size in s.candidate_sizes:
        used = min(size, split.n_items)
        cand = _shrunk_candidates(before["top"], base_cand, used, config.k, rng)
        after = _per_user(base_scores, cand, us.test, config)
        row = compare(before, after, CANDIDATES_MEAN)
        inference[f"candidates_{size}"] = {"size": size, "size_used": used, **row}
    t2 = time.perf_counter()
    return {
        "model": model.name,
        "training": _trajectory(log),
        "inference": inference,
        "seconds": {"train_with_checkpoints": round(t1 - t0, 1), "inference_changes": round(t2 - t1, 1)},
    }


# ------------------------------------------------------------------------------------------ the protocol


def _config_dict(config: RealDataStudyConfig) -> dict[str, Any]:
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d.update({n: _option(config, n) for n in DEFAULTS})
    return d


def _earlier_families(path: Path, header: dict[str, Any], config: RealDataStudyConfig) -> dict[str, Any]:
    """The families of the earlier run at ``path`` that ``--dynamics-merge`` keeps.

    Every family's numbers depend only on the shared settings (each family trains from the same key and
    draws its own candidate rng), so a family run alone equals the same family run with the others; the
    earlier run is kept only if those settings are equal. ``ValueError`` naming the first that differs.
    """
    if not path.is_file():
        raise ValueError(f"--dynamics-merge: no earlier run at {path} to merge into")
    try:
        earlier = json.loads(path.read_text())
        families, old_config = earlier["families"], earlier["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--dynamics-merge: {path} is not a dynamics protocol result ({e})") from None
    if isinstance(earlier.get("settings"), dict):
        earlier["settings"] = {k: v for k, v in earlier["settings"].items() if k != "families"}
    for key, value in header.items():
        if earlier.get(key) != value:
            raise ValueError(
                f"--dynamics-merge: {path} was run with {key}={earlier.get(key)!r}, this run has {value!r}"
            )
    # An option added since the earlier run is absent from its config: it ran as the option's default does.
    now = evaluation.json_safe(_config_dict(config))
    diff = setting_difference(old_config, now, _MERGE_IGNORED, evaluation.json_safe(config_defaults()))
    if diff is not None:
        raise ValueError(f"--dynamics-merge: {path} {diff}")
    return families


def run_dynamics_protocol(config: RealDataStudyConfig, *, split: InteractionSplit | None = None) -> dict:
    """The dynamics protocol on ``config.data`` (see the module docstring); returns the JSON payload.

    Args:
      config: the study settings; used: ``data`` (and its loading flags), ``n_models``, ``epochs`` (>= 10),
        ``dim``, ``lr``, ``batch_size``, ``k``, ``grid_size``, ``dynamics_users`` (>= 2), ``chunk``,
        ``seed``, ``out_dir``, ``progress``, and the optional ``dynamics_*`` settings of `DEFAULTS`.
        ``model``, ``source`` and the other extras are ignored: every family is trained as an ensemble.
      split: the data, already loaded (``config.data`` is then only its label).

    Returns:
      ``{"dataset", "n_users", "n_items", "k", "n_models", "epochs", "seed", "settings", "families",
      "seconds", "files", "config"}`` (and ``"merged": {"kept", "run"}`` with ``dynamics_merge``: the
      families kept from the earlier run and those run now). ``families[f]`` is ``{"skipped": reason}``
      or ``{"model", "training", "inference", "seconds"}``: ``training`` has ``n_checkpoints``, ``log``
      (one row per epoch: ``epoch, mean_lidu, mean_ndcg, mean_std, mean_top_k_std, loss``),
      ``kendall_tau_neg_lidu_vs_ndcg``, ``spearman_neg_lidu_vs_ndcg`` and ``baselines[name]``;
      ``inference[change]`` (``hide``, ``add``, ``candidates_<c>``) is `compare`'s summary.

    Raises:
      ValueError: a bad protocol setting (before any data is loaded), or ``k`` not below the number of
        items, or with ``dynamics_merge`` no earlier result or one whose settings differ (before any
        training).
      lidu_jax.training.TrainingFailedError: an ensemble diverged.
    """
    t0 = time.perf_counter()
    s = dynamics_settings(config)
    split = load_data(config) if split is None else split
    if config.k >= split.n_items:
        raise ValueError(f"--k={config.k} must be < the number of items ({split.n_items}) of {split.name}")
    us = _pick_users(split, config, s)
    if us.ids.size < 2:
        raise ValueError(f"{split.name} has {us.ids.size} user(s) with a held-out item; need >= 2")
    out = Path(config.out_dir)
    stem = f"dynamics_{split.name}"
    header = {
        "dataset": split.name,
        "n_users": int(us.ids.size),
        "n_items": int(split.n_items),
        "k": config.k,
        "n_models": config.n_models,
        "epochs": config.epochs,
        "seed": config.seed,
    }
    earlier: dict[str, Any] = {}
    if _option(config, "dynamics_merge"):
        # The families differ by design; every other protocol setting must match.
        settings = evaluation.json_safe(dataclasses.asdict(s))
        del settings["families"]
        earlier = _earlier_families(out / f"{stem}.json", {**header, "settings": settings}, config)
    key = jax.random.key(config.seed)
    families: dict[str, Any] = {}
    for family in s.families:
        if family == "sasrec" and split.train_sequences is None:
            families[family] = {"skipped": f"sasrec needs time-ordered data; {split.name!r} has no order"}
            continue
        families[family] = _run_family(family, split, config, s, us, key)
        if config.progress:
            print(f"dynamics {split.name}/{family}: {families[family]['seconds']}", flush=True)
    merged = {f: families.get(f, earlier.get(f)) for f in MODELS if f in families or f in earlier}
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        **header,
        "settings": dataclasses.asdict(dataclasses.replace(s, families=tuple(merged))),
        "families": merged,
    }
    if earlier:
        result["merged"] = {"kept": [f for f in merged if f not in families], "run": list(families)}
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md")}
    try:
        _plot(result, out / f"{stem}.png")
        files["plot"] = str(out / f"{stem}.png")
    except ImportError as e:
        files["plot"] = None
        result["plot_skipped"] = f"matplotlib is not importable: {e}"
    result["files"] = files
    (out / f"{stem}.md").write_text(markdown(result))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["config"] = _config_dict(config)
    evaluation.write_json(evaluation.json_safe(result), out / f"{stem}.json")
    print(f"dynamics {split.name}: {result['seconds']} s; wrote {', '.join(f for f in files.values() if f)}")
    return result
