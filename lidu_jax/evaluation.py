"""How well does a label-free uncertainty track per-user performance? Correlations with bootstrap intervals,
a text table, a JSON file and a binned plot, shared by the synthetic and the real-data studies.

Convention: every estimator returns one uncertainty per user, higher = more uncertain, so a useful estimator
has a positive rank correlation between ``-uncertainty`` and performance (e.g. NDCG@10).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from lidu_jax import metrics

__all__ = [
    "PLOTTED",
    "best_baseline",
    "evaluate_estimators",
    "format_table",
    "json_safe",
    "kendall_or_nan",
    "plot_binned",
    "spearman_or_nan",
    "write_atomically",
    "write_json",
]

# The estimators the studies draw in their binned plots (those present in a run).
PLOTTED = ("LiDu", "sampled top-K instability", "mean std of top-K", "user activity")


def _stats(pred: np.ndarray, perf: np.ndarray) -> tuple[float, float, float]:
    """(Kendall tau-b, Spearman rho, C-index) of ``pred`` vs ``perf``; C-index derived from tau-b (one
    Kendall pass for both; `lidu_jax.metrics.c_index` states the relation)."""
    tau = stats.kendalltau(pred, perf).statistic
    rho = stats.spearmanr(pred, perf).statistic
    tau = 0.0 if np.isnan(tau) else float(tau)
    rho = 0.0 if np.isnan(rho) else float(rho)
    n = pred.size
    c = metrics._c_index_from_tau(
        tau, n * (n - 1) / 2.0, metrics._tied_pairs(pred), metrics._tied_pairs(perf)
    )
    return tau, rho, float(c)


def _rank_correlation_or_nan(x: np.ndarray, y: np.ndarray, fn, min_points: int) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < min_points or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what scipy warns about (ties, NaN) ends as a NaN, reported as such
        return float(fn(x, y).statistic)


def kendall_or_nan(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b of ``x`` vs ``y`` (both ``(n,)``); NaN where it is undefined: fewer than 2 points, or
    either side constant (unlike `lidu_jax.metrics.kendall_tau`, which calls that 0).

    For correlations across models or checkpoints, where "undefined" must stay distinguishable from 0.
    """
    return _rank_correlation_or_nan(x, y, stats.kendalltau, 2)


def spearman_or_nan(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho of ``x`` vs ``y`` (both ``(n,)``); NaN where it is undefined: fewer than 3 points, or
    either side constant."""
    return _rank_correlation_or_nan(x, y, stats.spearmanr, 3)


_VECTORISED_MAX_USERS = 3000


def _bootstrap_stats_vectorised(pred: np.ndarray, perf: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(tau_b, rho, C) on every bootstrap resample at once, from per-user draw counts ``(n_boot, U)``.

    A resample holding user i ``c_i`` times has, over its ``N(N-1)/2`` pairs, ``S = 1/2 c^T (Sx*Sy) c`` with
    ``Sx_ij = sign(x_i - x_j)``, and ``1/2 (c^T Tx c - N)`` pairs tied in x (``Tx_ij = [x_i == x_j]``), so
    ``tau_b = S / sqrt((n0 - n1)(n0 - n2))``. Spearman's rho is the count-weighted Pearson correlation of the
    mid-ranks ``r_i = sum_j c_j [x_j < x_i] + (sum_j c_j [x_j == x_i] + 1) / 2``. Matches `_stats` per
    resample.
    """
    n_tot = counts.sum(1)
    sx = np.sign(pred[:, None] - pred[None, :])
    sy = np.sign(perf[:, None] - perf[None, :])
    tx = (sx == 0).astype(np.float64)
    ty = (sy == 0).astype(np.float64)
    s = 0.5 * np.einsum("bi,ij,bj->b", counts, sx * sy, counts, optimize=True)
    n0 = n_tot * (n_tot - 1) / 2
    n1 = 0.5 * (np.einsum("bi,ij,bj->b", counts, tx, counts, optimize=True) - n_tot)
    n2 = 0.5 * (np.einsum("bi,ij,bj->b", counts, ty, counts, optimize=True) - n_tot)
    denom = np.sqrt(np.maximum(n0 - n1, 0) * np.maximum(n0 - n2, 0))
    tau = np.where(denom > 0, s / np.where(denom > 0, denom, 1), 0.0)
    c = metrics._c_index_from_tau(tau, n0, n1, n2)

    def ranks(sgn, ties):
        return counts @ (sgn > 0).T.astype(np.float64) + (counts @ ties.T + 1) / 2

    rx, ry = ranks(sx, tx), ranks(sy, ty)
    w = counts / n_tot[:, None]
    mx, my = (w * rx).sum(1, keepdims=True), (w * ry).sum(1, keepdims=True)
    cov = (w * (rx - mx) * (ry - my)).sum(1)
    vx, vy = (w * (rx - mx) ** 2).sum(1), (w * (ry - my) ** 2).sum(1)
    rho = np.where((vx > 0) & (vy > 0), cov / np.sqrt(np.maximum(vx * vy, 1e-300)), 0.0)
    return np.stack([tau, rho, c], axis=1)


def evaluate_estimators(
    uncertainties: Mapping[str, np.ndarray],
    performance: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    reference: str | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Rank correlations of ``-uncertainty`` with ``performance`` per estimator, with bootstrap intervals.

    All estimators are evaluated on the same ``n_boot`` resamples of the users (paired bootstrap), so their
    intervals and the differences to ``reference`` are comparable.

    Args:
      uncertainties: name -> ``(U,)`` uncertainty per user (higher = more uncertain).
      performance: ``(U,)`` per-user performance (e.g. NDCG@10).
      n_boot: bootstrap resamples over users.
      seed: resampling seed.
      reference: optional estimator name; adds ``tau_diff`` = tau(name) - tau(reference) with its interval.
      level: interval coverage.

    Returns:
      ``{"estimators": {name: {"kendall_tau", "ci", "spearman", "spearman_ci", "c_index", "c_index_ci"
      [, "tau_diff", "tau_diff_ci"]}}, "n_users", "n_boot", "level", "reference"}``; ``ci`` is the Kendall tau
      interval.
    """
    perf = np.asarray(performance, np.float64)
    if perf.ndim != 1 or perf.size < 3:
        raise ValueError(f"performance must be 1-D with >= 3 users, got shape {perf.shape}")
    if not np.all(np.isfinite(perf)):
        raise ValueError("performance must be finite")
    if not uncertainties:
        raise ValueError("uncertainties must name at least one estimator")
    preds = {}
    for name, u in uncertainties.items():
        u = np.asarray(u, np.float64)
        if u.shape != perf.shape:
            raise ValueError(f"uncertainties[{name!r}] has shape {u.shape}, expected {perf.shape}")
        if not np.all(np.isfinite(u)):
            raise ValueError(f"uncertainties[{name!r}] contains NaN or inf")
        preds[name] = -u
    if reference is not None and reference not in preds:
        raise ValueError(f"reference {reference!r} is not an estimator name")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, perf.size, size=(n_boot, perf.size))
    if perf.size <= _VECTORISED_MAX_USERS:
        counts = np.stack([np.bincount(i, minlength=perf.size) for i in idx]).astype(np.float64)
        boot = {name: _bootstrap_stats_vectorised(p, perf, counts) for name, p in preds.items()}
    else:
        boot = {name: np.array([_stats(p[i], perf[i]) for i in idx]) for name, p in preds.items()}
    q = [(1 - level) / 2, 1 - (1 - level) / 2]

    def interval(v: np.ndarray) -> list[float]:
        lo, hi = np.quantile(v, q)
        return [float(lo), float(hi)]

    out: dict[str, Any] = {}
    for name, p in preds.items():
        tau, rho, c = _stats(p, perf)
        b = boot[name]
        row = {
            "kendall_tau": tau,
            "ci": interval(b[:, 0]),
            "spearman": rho,
            "spearman_ci": interval(b[:, 1]),
            "c_index": c,
            "c_index_ci": interval(b[:, 2]),
        }
        if reference is not None:
            row["tau_diff"] = tau - _stats(preds[reference], perf)[0]
            row["tau_diff_ci"] = interval(b[:, 0] - boot[reference][:, 0])
        out[name] = row
    return {
        "estimators": out,
        "n_users": int(perf.size),
        "n_boot": n_boot,
        "level": level,
        "reference": reference,
    }


def best_baseline(estimators: Mapping[str, Mapping[str, Any]], reference: str = "LiDu") -> tuple[str, bool]:
    """``(name, reference_wins)``: the baseline (an estimator whose name does not start with "LiDu") with the
    highest Kendall tau in ``estimators`` (the ``"estimators"`` of an `evaluate_estimators` result), and
    whether ``reference`` has a tau >= every baseline's."""
    base = {n: r for n, r in estimators.items() if not n.startswith("LiDu")}
    if not base:
        raise ValueError("estimators has no baseline (every name starts with 'LiDu')")
    best = max(base, key=lambda n: base[n]["kendall_tau"])
    tau = estimators[reference]["kendall_tau"]
    return best, all(tau >= r["kendall_tau"] for r in base.values())


def format_table(result: Mapping[str, Any], *, title: str | None = None, sort: bool = True) -> str:
    """A fixed-width text table of an `evaluate_estimators` result (sorted by Kendall tau, best first)."""
    rows = list(result["estimators"].items())
    if sort:
        rows.sort(key=lambda kv: -kv[1]["kendall_tau"])
    has_diff = any("tau_diff" in r for _, r in rows)
    width = max(len("estimator"), *(len(n) for n, _ in rows))
    head = f"{'estimator':<{width}}  {'Kendall tau [95% CI]':<24}  {'Spearman':>8}  {'C-index':>7}"
    if has_diff:
        head += f"  {'tau - ' + str(result.get('reference')):<26}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for name, r in rows:
        ci = r["ci"]
        line = (
            f"{name:<{width}}  {r['kendall_tau']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]    "
            f"{r['spearman']:+8.3f}  {r['c_index']:7.3f}"
        )
        if has_diff:
            d = r["tau_diff_ci"]
            line += f"  {r['tau_diff']:+.3f} [{d[0]:+.3f}, {d[1]:+.3f}]"
        lines.append(line)
    lines.append(f"(n_users={result['n_users']}, bootstrap resamples={result['n_boot']})")
    return "\n".join(lines)


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN / inf floats as None, for payloads that may hold undefined statistics (strict JSON has
    no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    return obj


def write_json(result: Mapping[str, Any], path: str | Path, **extra: Any) -> Path:
    """Write ``result`` plus ``extra`` top-level keys (e.g. the config) as indented JSON; returns the path.

    The file is written beside ``path`` and renamed over it, so an interrupted write leaves the earlier
    file (an hour-long run's result, or the one `--dynamics-merge` extends) whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(_to_jsonable(result))
    payload.update(_to_jsonable(extra))
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n"))
    return path


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``: a reader (or a
    later run) sees the earlier file or the whole new one, never a part; the temporary file never stays."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_binned(
    uncertainties: Mapping[str, np.ndarray] | np.ndarray,
    performance: np.ndarray,
    path: str | Path,
    *,
    n_bins: int = 10,
    ylabel: str = "NDCG@10",
    title: str | None = None,
) -> Path:
    """Mean performance (± 1 standard error) per uncertainty quantile bin, one line per estimator; PNG.

    Users are split into ``n_bins`` equal-count bins by each estimator's uncertainty (bin 1 = most certain).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(uncertainties, Mapping):
        uncertainties = {"LiDu": np.asarray(uncertainties)}
    perf = np.asarray(performance, np.float64)
    if n_bins < 2 or n_bins > perf.size:
        raise ValueError(f"n_bins must be in [2, n_users={perf.size}], got {n_bins}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    centers = np.arange(1, n_bins + 1)
    for name, u in uncertainties.items():
        u = np.asarray(u, np.float64)
        if u.shape != perf.shape:
            raise ValueError(f"uncertainties[{name!r}] has shape {u.shape}, expected {perf.shape}")
        bins = np.array_split(np.argsort(u, kind="stable"), n_bins)
        means = np.array([perf[b].mean() for b in bins])
        ses = np.array([perf[b].std(ddof=1) / np.sqrt(len(b)) if len(b) > 1 else 0.0 for b in bins])
        ax.errorbar(centers, means, yerr=ses, marker="o", capsize=3, label=name)
    ax.set_xlabel("uncertainty quantile bin (1 = most certain)")
    ax.set_ylabel(f"mean {ylabel}")
    ax.set_xticks(centers)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
