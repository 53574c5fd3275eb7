"""The synthetic study: does LiDu track per-user NDCG@K better than label-free baselines, for which source?

Pipeline (one function per arrow): `lidu_jax.synthetic.generate` -> BPR-MF / Bayesian MF trained with
`lidu_jax.training.fit` -> per-item score distributions from each source in `lidu_jax.distributions` ->
LiDu variants and baselines per user -> Kendall tau / Spearman / C-index against NDCG@K with bootstrap
intervals (`lidu_jax.evaluation`), for two ground truths: the true-preference top-N (primary) and the random
held-out interactions (confounded by how many items each user has held out; see
``docs/results-lidu-synthetic.md``).

Run ``python -m lidu_jax --help``; every flag is a field of `SyntheticStudyConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import baselines, distributions, evaluation, metrics
from lidu_jax._cli import config_parser, option, run_cli
from lidu_jax.estimators import lidu
from lidu_jax.models.mf import BayesianMFConfig, MFConfig, make_bayesian_mf, make_bpr_mf
from lidu_jax.samples import lidu_from_samples
from lidu_jax.synthetic import SyntheticConfig, generate
from lidu_jax.training import failure_context, fit

SOURCES = ("ensemble", "bootstrap", "snapshot", "dropout", "bayesian")
PRNGS = ("threefry2x32", "rbg", "unsafe_rbg")
_SEED_MAX = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class SyntheticStudyConfig:
    """Settings of the synthetic study; each field is the command-line flag ``--field-name`` (its help text
    says what it is, its unit and its valid range). Values are checked on construction: an impossible value
    is a ``ValueError`` naming the flag."""

    n_users: int = option(600, "generator: number of users (>= 2)")
    n_items: int = option(400, "generator: number of items (>= 2, >= --max-activity + --true-top)")
    true_dim: int = option(8, "generator: dimension of the true user/item preference factors (>= 1)")
    activity_median: float = option(20.0, "generator: median interactions per user (> 0)")
    activity_sigma: float = option(0.8, "generator: log-normal spread of the interactions per user (>= 0)")
    min_activity: int = option(6, "generator: fewest interactions per user, train + test (>= 2)")
    max_activity: int = option(150, "generator: most interactions per user (>= --min-activity)")
    data_seed: int = option(0, f"generator seed (0 .. {_SEED_MAX})")
    model_dim: int = option(16, "BPR-MF embedding width (>= 1)")
    epochs: int = option(40, "training epochs (>= 1; >= --n-models with the snapshot source)")
    lr: float = option(0.01, "Adam learning rate of BPR-MF (finite, > 0)")
    l2: float = option(1e-4, "L2 weight of BPR-MF (finite, >= 0)")
    batch_size: int = option(512, "training batch size in interactions (>= 1)")
    n_models: int = option(
        8, "ensemble / bootstrap size and number of snapshots (>= 2); MC dropout takes 4x this many passes"
    )
    dropout: float = option(0.2, "user-factor dropout rate of the dropout source, in (0, 1)")
    sources: str = option(
        "ensemble,bayesian",
        f"comma-separated subset of {','.join(SOURCES)} (the first is the primary source; all five take "
        "about twice as long as the default two)",
    )
    k: int = option(10, "list length K of LiDu and NDCG@K (1 .. --n-items - 1)")
    true_top: int = option(20, "the true-preference top-N items that count as relevant (>= 1)")
    grid_size: int = option(512, "grid cells of the exact LiDu estimator (>= 8)")
    kde_grid_size: int = option(128, "grid cells of the KDE LiDu variant (>= 8; 0 = skip the KDE variant)")
    n_boot: int = option(500, "bootstrap resamples over users for the 95%% intervals (>= 1)")
    seed: int = option(0, f"training and sampling seed (0 .. {_SEED_MAX})")
    prng: str = option(
        "threefry2x32",
        f"JAX PRNG implementation of the keys: one of {', '.join(PRNGS)} (rbg compiles faster on CPU)",
    )
    plot: str = option(
        "lidu_synthetic.png", "PNG path of the binned 'uncertainty vs NDCG' plot ('' = no plot)"
    )
    json: str | None = option(None, "JSON output path (none = no JSON file)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        _check(self)

    def source_list(self) -> tuple[str, ...]:
        """The ``sources`` field as a tuple of names, in the order given."""
        names = tuple(s.strip() for s in self.sources.split(",") if s.strip())
        bad = [s for s in names if s not in SOURCES]
        if bad or not names:
            raise ValueError(f"--sources must be a comma-separated subset of {SOURCES}, got {self.sources!r}")
        return names


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(config: SyntheticStudyConfig) -> None:
    """ValueError naming the flag of the first impossible setting of ``config``."""
    c = config
    for name, low in (
        ("n_users", 2), ("n_items", 2), ("true_dim", 1), ("min_activity", 2), ("max_activity", 2),
        ("model_dim", 1), ("epochs", 1), ("batch_size", 1), ("n_models", 2), ("k", 1), ("true_top", 1),
        ("grid_size", 8), ("kde_grid_size", 0), ("n_boot", 1),
    ):  # fmt: skip
        v = getattr(c, name)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise ValueError(f"{_flag(name)} must be an integer >= {low}, got {v!r}")
    for name in ("seed", "data_seed"):
        v = getattr(c, name)
        if not (isinstance(v, numbers.Integral) and 0 <= v <= _SEED_MAX):
            raise ValueError(f"{_flag(name)} must be an integer in [0, {_SEED_MAX}], got {v!r}")
    for name, positive in (("lr", True), ("activity_median", True), ("activity_sigma", False), ("l2", False)):
        v = getattr(c, name)
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise ValueError(f"{_flag(name)} must be finite and {'> 0' if positive else '>= 0'}, got {v}")
    sources = c.source_list()
    if c.min_activity > c.max_activity:
        raise ValueError(f"--min-activity={c.min_activity} must be <= --max-activity={c.max_activity}")
    if c.max_activity + c.true_top > c.n_items:
        raise ValueError(
            f"--max-activity + --true-top ({c.max_activity} + {c.true_top}) must be <= --n-items={c.n_items}"
        )
    if c.k >= c.n_items:
        raise ValueError(f"--k must be in [1, --n-items - 1 = {c.n_items - 1}], got {c.k}")
    if 0 < c.kde_grid_size < 8:
        raise ValueError(f"--kde-grid-size must be 0 (skip) or >= 8, got {c.kde_grid_size}")
    if "snapshot" in sources and c.n_models > c.epochs:
        raise ValueError(
            f"--n-models={c.n_models} must be <= --epochs={c.epochs} "
            "(the snapshot source takes the last --n-models epochs)"
        )
    if not (0.0 < c.dropout < 1.0 if "dropout" in sources else 0.0 <= c.dropout < 1.0):
        raise ValueError(f"--dropout must be in (0, 1) (the dropout source needs some), got {c.dropout}")
    if c.prng not in PRNGS:
        raise ValueError(f"--prng must be one of {', '.join(PRNGS)}, got {c.prng!r}")
    if c.plot and os.path.isdir(c.plot):
        raise ValueError(f"--plot must be a PNG file path (or ''), got the directory {c.plot!r}")
    if c.json is not None and (not c.json or os.path.isdir(c.json)):
        raise ValueError(f"--json must be a file path (or none), got {c.json!r}")


def _distribution(
    name: str, config: SyntheticStudyConfig, split, key: jax.Array, users: np.ndarray
) -> distributions.ScoreDistribution:
    """Train what the source needs and return its score distribution for ``users``."""
    n_train = int(split.train_users.shape[0])
    mf_cfg = MFConfig(dim=config.model_dim, lr=config.lr, l2=config.l2, batch_size=config.batch_size)
    model = make_bpr_mf(split, mf_cfg)
    pb = config.progress
    if name == "ensemble":
        params = distributions.deep_ensemble(
            model, key, n_train, config.epochs, n_models=config.n_models, progress=pb
        )
        return distributions.from_arrays(samples=distributions.stacked_samples(model, params, users))
    if name == "bootstrap":
        params = distributions.bootstrap(
            model, key, n_train, config.epochs, n_models=config.n_models, progress=pb
        )
        return distributions.from_arrays(samples=distributions.stacked_samples(model, params, users))
    if name == "snapshot":
        params = distributions.snapshot_ensemble(
            model, key, n_train, config.epochs, n_snapshots=config.n_models, progress=pb
        )
        return distributions.from_arrays(samples=distributions.stacked_samples(model, params, users))
    if name == "dropout":
        model = make_bpr_mf(split, dataclasses.replace(mf_cfg, dropout=config.dropout))
        params, _ = fit(model, key[None], jnp.ones((1, n_train)), config.epochs, progress=pb)
        one = jax.tree.map(lambda x: x[0], params)
        ks = jax.random.fold_in(key, 1)
        samples = distributions.mc_dropout_samples(model, one, users, ks, n_samples=4 * config.n_models)
        return distributions.from_arrays(samples=samples)
    # bayesian: analytic Gaussian posterior; posterior draws only feed the sample-based baselines.
    bcfg = BayesianMFConfig(dim=config.model_dim, lr=config.lr, batch_size=config.batch_size)
    bmodel = make_bayesian_mf(split, bcfg)
    params, _ = fit(bmodel, key[None], jnp.ones((1, n_train)), config.epochs, progress=pb)
    one = jax.tree.map(lambda x: x[0], params)
    mean, std = distributions.bayesian_gaussian(bmodel, one, users)
    kd = jax.random.fold_in(key, 1)
    draws = distributions.mc_dropout_samples(bmodel, one, users, kd, n_samples=config.n_models)
    return distributions.ScoreDistribution(mean, std, draws)


def _estimators(
    dist, config: SyntheticStudyConfig, cand: np.ndarray, split
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every per-user uncertainty for one source (higher = more uncertain) and the rankings used."""
    k = config.k
    lidu_v, rankings = lidu(dist.mean, dist.std, k, candidates=cand, grid_size=config.grid_size)
    out = {"LiDu": np.asarray(lidu_v, np.float64)}
    unordered, _ = lidu(dist.mean, dist.std, k, candidates=cand, grid_size=config.grid_size, ordered=False)
    out["LiDu unordered set"] = np.asarray(unordered, np.float64)
    top3, _ = lidu(dist.mean, dist.std, min(3, k), candidates=cand, grid_size=config.grid_size)
    out[f"LiDu top-{min(3, k)}"] = np.asarray(top3, np.float64)
    pairwise, _ = lidu(dist.mean, dist.std, k, candidates=cand, method="pairwise")
    out["LiDu pairwise approx."] = np.asarray(pairwise, np.float64)
    if config.kde_grid_size > 0 and dist.samples is not None:
        kde, _ = lidu_from_samples(
            dist.samples[: config.n_models], k, candidates=cand, method="kde", grid_size=config.kde_grid_size
        )
        out["LiDu KDE"] = np.asarray(kde, np.float64)
    out.update(
        baselines.all_baselines(
            dist.mean,
            dist.std,
            dist.samples,
            rankings,
            candidates=cand,
            activity=split.user_activity(),
            item_popularity=split.item_popularity(),
            key=jax.random.key(config.seed, impl=config.prng),
        )
    )
    return out, np.asarray(rankings)


def run(config: SyntheticStudyConfig = SyntheticStudyConfig()) -> dict[str, Any]:
    """Run the study and return ``{"estimators": <primary source, true-preference NDCG>, "sources": {...}}``.

    Prints a table per source and ground truth; writes the plot and (optionally) the JSON file.

    Raises:
      lidu_jax.training.TrainingFailedError: a model's training diverged (NaN/inf parameters or scores).
    """
    t0 = time.perf_counter()
    data = generate(
        SyntheticConfig(
            n_users=config.n_users,
            n_items=config.n_items,
            dim=config.true_dim,
            activity_median=config.activity_median,
            activity_sigma=config.activity_sigma,
            min_activity=config.min_activity,
            max_activity=config.max_activity,
            true_top=config.true_top,
            seed=config.data_seed,
        )
    )
    split = data.split
    users = np.arange(split.n_users)
    cand = ~split.train_matrix()  # True = may be recommended (not a training item)
    test = split.test_matrix()
    key = jax.random.key(config.seed, impl=config.prng)
    sources: dict[str, Any] = {}
    primary = None
    for name in config.source_list():
        # A diverged model fails here, before any estimator sees its scores.
        run = f"source {name}: --seed {config.seed}, --lr {config.lr}, --epochs {config.epochs}"
        with failure_context(run):
            dist = _distribution(name, config, split, jax.random.fold_in(key, SOURCES.index(name)), users)
        unc, _ = _estimators(dist, config, cand, split)
        ndcg_true = np.asarray(metrics.ndcg_at_k(dist.mean, data.true_relevant, config.k, candidates=cand))
        ndcg_held = np.asarray(metrics.ndcg_at_k(dist.mean, test, config.k, candidates=cand))
        res_true = evaluation.evaluate_estimators(
            unc, ndcg_true, n_boot=config.n_boot, seed=config.seed, reference="LiDu"
        )
        res_held = evaluation.evaluate_estimators(
            unc, ndcg_held, n_boot=config.n_boot, seed=config.seed, reference="LiDu"
        )
        print(
            evaluation.format_table(
                res_true,
                title=f"\n[{name}] -uncertainty vs NDCG@{config.k}, true-preference top-{config.true_top} "
                f"(mean NDCG {ndcg_true.mean():.3f})",
            )
        )
        print(
            evaluation.format_table(
                res_held,
                title=f"\n[{name}] -uncertainty vs NDCG@{config.k}, held-out interactions "
                f"(mean NDCG {ndcg_held.mean():.3f})",
            )
        )
        sources[name] = {
            "true_preference": res_true,
            "held_out": res_held,
            "mean_ndcg_true": float(ndcg_true.mean()),
            "mean_ndcg_held_out": float(ndcg_held.mean()),
        }
        if primary is None:
            primary = (name, unc, ndcg_true, ndcg_held)
    summary = _summary(sources)
    print("\n" + summary)
    name, unc, ndcg_true, ndcg_held = primary
    if config.plot:
        shown = {n: unc[n] for n in evaluation.PLOTTED if n in unc}
        plot = Path(config.plot)
        evaluation.plot_binned(
            shown,
            ndcg_true,
            plot,
            ylabel=f"true-preference NDCG@{config.k}",
            title=f"synthetic, {name} source",
        )
        held_plot = plot.with_name(plot.stem + "_heldout" + plot.suffix)
        evaluation.plot_binned(
            shown, ndcg_held, held_plot, ylabel=f"held-out NDCG@{config.k}", title=f"synthetic, {name} source"
        )
        print(f"plots: {plot}, {held_plot}")
    result = {
        "estimators": sources[name]["true_preference"]["estimators"],
        "primary_source": name,
        "ground_truth": f"true-preference top-{config.true_top}, NDCG@{config.k}",
        "sources": sources,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if config.json:
        evaluation.write_json(result, config.json, config=dataclasses.asdict(config))
        print(f"json: {config.json}")
    print(f"total {result['seconds']} s")
    return result


def _summary(sources: dict[str, Any]) -> str:
    lines = ["summary: Kendall tau of -LiDu vs NDCG (95% CI) and the best baseline (non-LiDu estimator)"]
    for name, res in sources.items():
        for truth in ("true_preference", "held_out"):
            est = res[truth]["estimators"]
            lt = est["LiDu"]
            best, wins = evaluation.best_baseline(est)
            lines.append(
                f"  {name:<9} {truth:<15} LiDu {lt['kendall_tau']:+.3f} "
                f"[{lt['ci'][0]:+.3f}, {lt['ci'][1]:+.3f}]  best baseline {best} "
                f"{est[best]['kendall_tau']:+.3f}  LiDu >= all baselines: {wins}"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    return config_parser(
        SyntheticStudyConfig,
        "python -m lidu_jax",
        "The synthetic LiDu study: does LiDu track per-user NDCG@K better than label-free baselines, for "
        "which score-distribution source? (data with a known true preference; BPR-MF / Bayesian MF)",
    )


def _body(config: SyntheticStudyConfig) -> None:
    run(config)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: flags -> `SyntheticStudyConfig` -> `run`; returns the exit status.

    A rejected flag value is one ``error:`` line on stderr and status 2; a diverged training run
    (`lidu_jax.training.TrainingFailedError`) is one line and status 3. Use `run` for the results.
    """
    return run_cli(_parser(), lambda values: SyntheticStudyConfig(**values), _body, argv)


def __getattr__(name: str) -> Any:
    # ``StudyConfig`` was the name of this class and of the other study's config until issue 13 gave them
    # distinct names; old imports keep working, with a warning.
    if name == "StudyConfig":
        message = f"{__name__}.StudyConfig is deprecated; use SyntheticStudyConfig"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return SyntheticStudyConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
