"""The synthetic study: does LiDu track per-user NDCG@K better than label-free baselines, for which source?

Pipeline (one function per arrow): `lidu_jax.synthetic.generate` -> BPR-MF / Bayesian MF trained with
`lidu_jax.training.fit` -> per-item score distributions from each source in `lidu_jax.distributions` ->
LiDu variants and baselines per user -> Kendall tau / Spearman / C-index against NDCG@K with bootstrap
intervals (`lidu_jax.evaluation`), for two ground truths: the true-preference top-N (primary) and the random
held-out interactions (confounded by how many items each user has held out; see
``docs/results-lidu-synthetic.md``).

Run ``python -m lidu_jax --help``; every flag is a field of `StudyConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax import baselines, distributions, evaluation, metrics
from lidu_jax._cli import config_parser
from lidu_jax.estimators import lidu, lidu_from_samples
from lidu_jax.models.mf import BayesianMFConfig, MFConfig, make_bayesian_mf, make_bpr_mf
from lidu_jax.synthetic import SyntheticConfig, generate
from lidu_jax.training import fit

SOURCES = ("ensemble", "bootstrap", "snapshot", "dropout", "bayesian")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Settings of the synthetic study; each field is the command-line flag ``--field-name``.

    Attributes:
      n_users, n_items, true_dim, activity_median, activity_sigma, data_seed: the generator
      (`SyntheticConfig`).
      model_dim, epochs, lr, l2, batch_size: BPR-MF training.
      n_models: ensemble / bootstrap size, number of snapshots, and (x4) MC-dropout passes.
      dropout: user-factor dropout rate of the MC-dropout model.
      sources: comma-separated subset of ensemble, bootstrap, snapshot, dropout, bayesian (the default two are
        the sources that make LiDu informative here; all five take about twice as long).
      k: list length K of LiDu and NDCG@K.
      true_top: number of true-preference items that count as relevant.
      grid_size: grid cells of the exact estimator; kde_grid_size: of the KDE variant (0 = skip KDE).
      n_boot: bootstrap resamples over users for the intervals.
      seed: training / sampling seed.
      prng: JAX PRNG implementation of the keys ("threefry2x32", or "rbg" which compiles faster on CPU).
      plot: PNG path of the binned "uncertainty vs NDCG" plot ("" = none).
      json: optional JSON output path.
      progress: show progress bars.
    """

    n_users: int = 600
    n_items: int = 400
    true_dim: int = 8
    activity_median: float = 20.0
    activity_sigma: float = 0.8
    min_activity: int = 6
    max_activity: int = 150
    data_seed: int = 0
    model_dim: int = 16
    epochs: int = 40
    lr: float = 0.01
    l2: float = 1e-4
    batch_size: int = 512
    n_models: int = 8
    dropout: float = 0.2
    sources: str = "ensemble,bayesian"
    k: int = 10
    true_top: int = 20
    grid_size: int = 512
    kde_grid_size: int = 128
    n_boot: int = 500
    seed: int = 0
    prng: str = "threefry2x32"
    plot: str = "lidu_synthetic.png"
    json: str | None = None
    progress: bool = True

    def source_list(self) -> tuple[str, ...]:
        names = tuple(s.strip() for s in self.sources.split(",") if s.strip())
        bad = [s for s in names if s not in SOURCES]
        if bad or not names:
            raise ValueError(f"sources must be a comma-separated subset of {SOURCES}, got {self.sources!r}")
        return names


def _check(config: StudyConfig) -> None:
    config.source_list()
    if config.k < 1 or config.k + 1 > config.n_items:
        raise ValueError(f"k must be in [1, n_items - 1], got {config.k}")
    if config.n_models < 2 or config.epochs < 1 or config.n_boot < 1:
        raise ValueError(f"need n_models >= 2, epochs >= 1, n_boot >= 1, got {config}")
    if config.n_models > config.epochs:
        raise ValueError("n_models must be <= epochs (the snapshot source takes the last n_models epochs)")


def _distribution(
    name: str, config: StudyConfig, split, key: jax.Array, users: np.ndarray
) -> distributions.ScoreDistribution:
    """Train what the source needs and return its score distribution for ``users``."""
    n_train = int(split.train_users.shape[0])
    mf_cfg = MFConfig(dim=config.model_dim, lr=config.lr, l2=config.l2, batch_size=config.batch_size)
    model = make_bpr_mf(split, mf_cfg)
    pb = config.progress
    if name == "ensemble":
        params = distributions.deep_ensemble(model, key, config.n_models, n_train, config.epochs, progress=pb)
        return distributions.from_arrays(samples=distributions.stacked_samples(model, params, users))
    if name == "bootstrap":
        params = distributions.bootstrap(model, key, config.n_models, n_train, config.epochs, progress=pb)
        return distributions.from_arrays(samples=distributions.stacked_samples(model, params, users))
    if name == "snapshot":
        params = distributions.snapshot_ensemble(
            model, key, n_train, config.epochs, config.n_models, progress=pb
        )
        return distributions.from_arrays(samples=distributions.stacked_samples(model, params, users))
    if name == "dropout":
        model = make_bpr_mf(split, dataclasses.replace(mf_cfg, dropout=config.dropout))
        params, _ = fit(model, key[None], jnp.ones((1, n_train)), config.epochs, progress=pb)
        one = jax.tree.map(lambda x: x[0], params)
        ks = jax.random.fold_in(key, 1)
        samples = distributions.mc_dropout_samples(model, one, users, 4 * config.n_models, ks)
        return distributions.from_arrays(samples=samples)
    # bayesian: analytic Gaussian posterior; posterior draws only feed the sample-based baselines.
    bcfg = BayesianMFConfig(dim=config.model_dim, lr=config.lr, batch_size=config.batch_size)
    bmodel = make_bayesian_mf(split, bcfg)
    params, _ = fit(bmodel, key[None], jnp.ones((1, n_train)), config.epochs, progress=pb)
    one = jax.tree.map(lambda x: x[0], params)
    mean, std = distributions.bayesian_gaussian(one, users)
    draws = distributions.mc_dropout_samples(bmodel, one, users, config.n_models, jax.random.fold_in(key, 1))
    return distributions.ScoreDistribution(mean, std, draws)


def _estimators(
    dist, config: StudyConfig, cand: np.ndarray, split
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


def run(config: StudyConfig = StudyConfig()) -> dict[str, Any]:
    """Run the study and return ``{"estimators": <primary source, true-preference NDCG>, "sources": {...}}``.

    Prints a table per source and ground truth; writes the plot and (optionally) the JSON file.
    """
    _check(config)
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
    train = split.train_matrix()
    cand = ~train
    test = split.test_matrix()
    key = jax.random.key(config.seed, impl=config.prng)
    sources: dict[str, Any] = {}
    primary = None
    for name in config.source_list():
        dist = _distribution(name, config, split, jax.random.fold_in(key, SOURCES.index(name)), users)
        unc, _ = _estimators(dist, config, cand, split)
        ndcg_true = np.asarray(metrics.ndcg_at_k(dist.mean, data.true_relevant, config.k, exclude=train))
        ndcg_held = np.asarray(metrics.ndcg_at_k(dist.mean, test, config.k, exclude=train))
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
        shown = {
            n: unc[n] for n in ("LiDu", "sampled top-K instability", "mean std of top-K", "user activity")
        }
        shown = {n: v for n, v in shown.items() if v is not None and n in unc}
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
            base = {n: r for n, r in est.items() if not n.startswith("LiDu")}
            best = max(base, key=lambda n: base[n]["kendall_tau"])
            wins = all(lt["kendall_tau"] >= r["kendall_tau"] for r in base.values())
            lines.append(
                f"  {name:<9} {truth:<15} LiDu {lt['kendall_tau']:+.3f} "
                f"[{lt['ci'][0]:+.3f}, {lt['ci'][1]:+.3f}]  best baseline {best} "
                f"{base[best]['kendall_tau']:+.3f}  LiDu >= all baselines: {wins}"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    return config_parser(StudyConfig, "python -m lidu_jax", __doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: parse flags into a `StudyConfig` and `run` it."""
    args = _parser().parse_args(argv)
    return run(StudyConfig(**vars(args)))
