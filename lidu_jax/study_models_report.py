"""What the models protocol (`lidu_jax.study_models`) writes for a reader: the tables of
``models_<data>.md`` (`markdown`) and the scatter plot of ``models_<data>.png`` (`_plot`), both from the
protocol's result dict alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lidu_jax.study_models_population import DIAGNOSTICS, SCALE_FREE

__all__ = ["markdown"]


def _f(v: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if v is None or not np.isfinite(v) else format(v, fmt)


def _order(table: dict[str, dict[str, Any]]) -> list[str]:
    ref = ("oracle", "random choice")
    est = [e for e in table if e not in ref]
    est.sort(key=lambda e: -(table[e]["kendall_tau"] if _finite(table[e]["kendall_tau"]) else -2.0))
    return [*est, *ref]


def _finite(v: Any) -> bool:
    return v is not None and np.isfinite(v)


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``models_<data>.md``: selection across models, within families, diagnostics, models."""
    k, sel = result["k"], result["selection"]
    lines = [
        f"# Model selection by mean uncertainty on {result['dataset']} ({len(result['models'])} models, "
        f"{result['n_models']}-seed ensembles, {result['n_users']} users, K={k})",
        "",
        f"Kendall tau of -mean uncertainty vs mean NDCG@{k} across models (95% bootstrap interval over "
        f"models, {result['n_boot']} resamples); regret = best mean NDCG@{k} - that of the least uncertain "
        f"model. `{SCALE_FREE}` is the pre-declared scale-free form (every model at the population's "
        f"median spread ratio {result['scale_free']['target_spread_ratio']:.3f}).",
    ]
    if result["skipped_families"]:
        lines += ["", "Skipped: " + "; ".join(f"{f}: {r}" for f, r in result["skipped_families"].items())]
    lines += [
        "",
        f"| estimator | tau vs NDCG@{k} [95% CI] | tau vs Recall@{k} | chosen | regret | regret / best |",
        "|---|---|---|---|---|---|",
    ]
    for e in _order(sel):
        r = sel[e]
        ci = f" [{_f(r['ci'][0])}, {_f(r['ci'][1])}]" if r["ci"] else ""
        tie = len(r["chosen"]) == len(result["models"]) > 1
        chosen = "all (tied)" if tie else ", ".join(r["chosen"]) or "-"
        lines.append(
            f"| {e} | {_f(r['kendall_tau'])}{ci} | {_f(r['kendall_tau_recall'])} | {chosen} "
            f"| {_f(r['regret'], '.4f')} | {_f(r['regret_fraction'], '.1%')} |"
        )
    fams = list(result["within_family"])
    lines += [
        "",
        "## Within each family: tau / regret",
        "",
        "| estimator | " + " | ".join(fams) + " |",
        "|---|" + "---|" * len(fams),
    ]
    for e in _order(sel):
        cells = []
        for f in fams:
            r = result["within_family"][f][e]
            cells.append(f"{_f(r['kendall_tau'])} / {_f(r['regret'], '.4f')}")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Label-free diagnostics: Kendall tau with mean NDCG / with mean LiDu",
        "",
        "| diagnostic | all | " + " | ".join(fams) + " |",
        "|---|---|" + "---|" * len(fams),
    ]
    for d in DIAGNOSTICS:
        cells = [
            f"{_f(result['diagnostics_tau'][g][d]['tau_vs_ndcg'])} / "
            f"{_f(result['diagnostics_tau'][g][d]['tau_vs_mean_lidu'])}"
            for g in ["all", *fams]
        ]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Models",
        "",
        f"| model | family | dim | epochs | regularisation | training | NDCG@{k} | Recall@{k} | mean LiDu "
        f"| {SCALE_FREE} | ensemble spread | item spread | spread ratio | train loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        d = r["diagnostics"]
        lines.append(
            f"| {r['name']} | {r['family']} | {r['dim']} | {r['epochs']} | {r['regularisation']} | "
            f"{r['training']} | {r['mean_ndcg']:.4f} | {r['mean_recall']:.4f} | {r['means']['LiDu']:.3f} | "
            f"{_f(r['means'][SCALE_FREE], '.3f')} | {_f(d['ensemble_spread'], '.4f')} | "
            f"{_f(d['item_spread'], '.4f')} | {_f(d['spread_ratio'], '.4f')} | {_f(d['train_loss'], '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    """Mean NDCG@K vs mean LiDu, and vs its `SCALE_FREE` form, one point per model (colour: family; marker:
    under / normal / over-trained; black edge: strong regularisation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    fams = list(result["within_family"])
    markers = {"under": "v", "normal": "o", "over": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for ax, est in zip(axes, ("LiDu", SCALE_FREE), strict=True):
        labelled = set()
        for r in result["models"]:
            c = fams.index(r["family"])
            ax.scatter(
                r["means"][est],
                r["mean_ndcg"],
                color=f"C{c}",
                marker=markers[r["training"]],
                edgecolors="k" if r["regularisation"] == "strong" else "none",
                label=None if r["family"] in labelled else r["family"],
            )
            labelled.add(r["family"])
        tau = result["selection"][est]["kendall_tau"]
        ax.set_xlabel(f"mean {est}")
        ax.set_ylabel(f"mean NDCG@{k}")
        ax.set_title(f"{result['dataset']}: tau(-{est}, NDCG) = {_f(tau)}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="v under, o normal, ^ over; black edge: strong reg.", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
