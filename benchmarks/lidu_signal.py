"""Where does exact LiDu's user-to-user signal go on large sparse catalogues? (issue 16, the analysis)

    python benchmarks/lidu_signal.py --data ml-100k --json docs/measured/lidu_signal_ml-100k.json
    python benchmarks/lidu_signal.py --data beauty --max-eval-users 4000 --json ...

One BPR-MF deep ensemble per dataset (the grid settings: ``--n-models`` seeds, ``--epochs``), then per user
-log P(L) split into the terms that make it up, each scored by its own Kendall tau against NDCG@10 (paired
bootstrap intervals over users, `lidu_jax.evaluation`):

- ``set``: -log Pr[min_L S > max_rest S], the list-versus-rest boundary (LiDu with ``ordered=False``);
- ``order``: -log P(L) - set = -log Pr[S_l1 > ... > S_lK | L is the top set], the within-list order;
- ``position k``: -log P(l_1..l_k) + log P(l_1..l_(k-1)), the increment of the k-th position;
- ``near-tied rest``: sum over non-list candidates j of Pr[S_j > S_lK] = Phi((mu_j - mu_lK) / sqrt(s_j^2 +
  s_lK^2)), the expected number of left-out items above the last listed one;
- ``adjacent swaps``: sum_k Pr[S_l(k+1) > S_lk], the expected number of inverted neighbours in the list;
- ``mean std of top-K`` (raw score units) and the same divided by the std of the user's candidate means
  (``scale-free std``): LiDu is invariant to a per-user affine map of the scores, so it can only use the
  second; comparing the two says whether the signal is in the user's absolute score scale;
- ``user scale``: the std of the user's candidate means alone;
- ``Gaussian self-agreement``: 1 - E|top-K(S) ∩ L| / K under the same independent Gaussians LiDu uses,
  by Monte Carlo (the expected agreement of the list with itself, issue 16's suggestion);
- ``rank-discounted LiDu``: sum_k position_k / log2(k + 1).

Also written: the variance of LiDu across users split into var(set) + var(order) + 2 cov, and the Kendall tau
of every term with the user's history length (a label-free covariate). Settings are the grid's, nothing tuned
on NDCG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from scipy import stats

from lidu_jax import evaluation, metrics
from lidu_jax.estimators import lidu, top_k_rankings
from lidu_jax.study import _eval_users
from lidu_jax.study_cells import build_source, load_data
from lidu_jax.study_config import RealDataStudyConfig


@jax.jit
def _tie_terms(mean: jax.Array, std: jax.Array, cand: jax.Array, rank: jax.Array):
    """``(near-tied rest (U,), adjacent swaps (U,))`` of the lists ``rank (U, K)``."""
    mu_l = jnp.take_along_axis(mean, rank, axis=1)
    sd_l = jnp.take_along_axis(std, rank, axis=1)
    in_list = jnp.zeros(mean.shape, bool).at[jnp.arange(mean.shape[0])[:, None], rank].set(True)
    rest = cand & ~in_list
    z = (mean - mu_l[:, -1:]) / jnp.sqrt(std**2 + sd_l[:, -1:] ** 2)
    near = jnp.sum(jnp.where(rest, ndtr(z), 0.0), axis=1)
    swaps = jnp.sum(
        ndtr((mu_l[:, 1:] - mu_l[:, :-1]) / jnp.sqrt(sd_l[:, 1:] ** 2 + sd_l[:, :-1] ** 2)), axis=1
    )
    return near, swaps


def _self_agreement(mean, std, cand, rank, key, n_draws: int) -> np.ndarray:
    """``(U,)`` 1 - E|top-K(S) ∩ L| / K, S ~ N(mean, std^2) independently, ``n_draws`` draws."""
    k = rank.shape[1]

    @jax.jit
    def one(key):
        s = mean + std * jax.random.normal(key, mean.shape)
        top = jax.lax.top_k(jnp.where(cand, s, -jnp.inf), k)[1]
        return jnp.sum(top[:, :, None] == rank[:, None, :], axis=(1, 2)) / k

    agree = jnp.mean(jnp.stack([one(kk) for kk in jax.random.split(key, n_draws)]), axis=0)
    return np.asarray(1.0 - agree, np.float64)


def analyse(config: RealDataStudyConfig, n_draws: int, n_boot: int) -> dict:
    """Train the ensemble of ``config`` and measure every term per user; returns the JSON payload."""
    t0 = time.perf_counter()
    split = load_data(config)
    users = _eval_users(split, config)  # the study's rule, so the users are the grid's
    key = jax.random.key(config.seed)
    scorer, _, _ = build_source(split, config, jax.random.fold_in(key, 1))
    t_train = time.perf_counter() - t0
    train, test = split.train_matrix(), split.test_matrix()
    k, g = config.k, config.grid_size
    cols: dict[str, list[np.ndarray]] = {}
    ndcg_all = []
    for c, start in enumerate(range(0, users.size, config.chunk)):
        u = users[start : start + config.chunk]
        mean, std, _ = scorer(u)
        cand = jnp.asarray(~train[u])
        rank = top_k_rankings(mean, k, cand)
        kw = dict(candidates=cand, grid_size=g, chunk_size=u.size)
        prefix = [np.zeros(u.size)]
        for kk in range(1, k + 1):
            prefix.append(np.asarray(lidu(mean, std, kk, **kw)[0], np.float64))
        full = prefix[-1]
        set_term = np.asarray(lidu(mean, std, k, ordered=False, **kw)[0], np.float64)
        near, swaps = _tie_terms(mean, std, cand, rank)
        sd_l = np.asarray(jnp.take_along_axis(std, rank, axis=1), np.float64).mean(axis=1)
        mu = np.asarray(mean, np.float64)
        cm = np.asarray(cand)
        scale = np.array([mu[i, cm[i]].std() for i in range(u.size)])
        row = {
            "LiDu (exact)": full,
            "set (list vs rest)": set_term,
            "order (within list)": full - set_term,
            "near-tied rest": np.asarray(near, np.float64),
            "adjacent swaps": np.asarray(swaps, np.float64),
            "mean std of top-K (raw)": sd_l,
            "scale-free std of top-K": sd_l / scale,
            "user scale (std of means)": scale,
            "Gaussian self-agreement": _self_agreement(
                mean, std, cand, rank, jax.random.fold_in(key, 100 + c), n_draws
            ),
            "rank-discounted LiDu": sum(
                (prefix[kk] - prefix[kk - 1]) / np.log2(kk + 1) for kk in range(1, k + 1)
            ),
        }
        for kk in (1, 2, 5, k):
            row[f"position {kk}"] = prefix[kk] - prefix[kk - 1]
        for n, v in row.items():
            cols.setdefault(n, []).append(v)
        rel = jnp.asarray(test[u])
        ndcg_all.append(np.asarray(metrics.ndcg_at_k(mean, rel, k, candidates=cand), np.float64))
    unc = {n: np.concatenate(v) for n, v in cols.items()}
    ndcg = np.concatenate(ndcg_all)
    ev = evaluation.evaluate_estimators(unc, ndcg, n_boot=n_boot, seed=config.seed, reference="LiDu (exact)")
    activity = split.user_activity()[users]
    lid, st, od = unc["LiDu (exact)"], unc["set (list vs rest)"], unc["order (within list)"]
    return {
        "dataset": split.name,
        "n_users": int(users.size),
        "n_items": int(split.n_items),
        "mean_ndcg": float(ndcg.mean()),
        "frac_users_with_hit": float(np.mean(ndcg > 0)),
        "config": {
            "model": config.model,
            "n_models": config.n_models,
            "epochs": config.epochs,
            "k": k,
            "grid": g,
        },
        "tau_vs_ndcg": {
            n: {"tau": r["kendall_tau"], "ci": r["ci"], "diff_vs_lidu_ci": r.get("tau_diff_ci")}
            for n, r in ev["estimators"].items()
        },
        "variance": {
            "var_lidu": float(lid.var()),
            "var_set": float(st.var()),
            "var_order": float(od.var()),
            "two_cov": float(2 * np.cov(st, od)[0, 1]),
        },
        "means": {n: float(v.mean()) for n, v in unc.items()},
        "tau_vs_history_length": {n: float(stats.kendalltau(v, activity).statistic) for n, v in unc.items()},
        "tau_vs_lidu": {n: float(stats.kendalltau(v, lid).statistic) for n, v in unc.items()},
        "seconds": {"train": t_train, "total": time.perf_counter() - t0},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="ml-100k")
    p.add_argument("--model", default="bpr")
    p.add_argument("--n-models", type=int, default=5)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--max-eval-users", type=int, default=0)
    p.add_argument("--grid", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--draws", type=int, default=64, help="Monte Carlo draws of the Gaussian self-agreement")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--json", default="")
    a = p.parse_args()
    config = RealDataStudyConfig(
        data=a.data,
        model=a.model,
        source="ensemble",
        n_models=a.n_models,
        epochs=a.epochs,
        max_eval_users=a.max_eval_users,
        grid_size=a.grid,
        chunk=a.chunk,
        progress=False,
    )
    out = analyse(config, a.draws, a.n_boot)
    print(
        f"{out['dataset']}: {out['n_users']} users x {out['n_items']} items, mean NDCG@10 "
        f"{out['mean_ndcg']:.4f}, users with a hit {out['frac_users_with_hit']:.3f}"
    )
    print(f"{'term':30s} {'tau vs NDCG':>12s} {'95% CI':>18s} {'tau vs LiDu':>12s} {'tau vs |hist|':>14s}")
    for n, r in sorted(out["tau_vs_ndcg"].items(), key=lambda x: -x[1]["tau"]):
        ci = r["ci"]
        print(
            f"{n:30s} {r['tau']:+12.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] {out['tau_vs_lidu'][n]:+12.3f} "
            f"{out['tau_vs_history_length'][n]:+14.3f}"
        )
    print("variance across users:", {n: round(v, 3) for n, v in out["variance"].items()})
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
