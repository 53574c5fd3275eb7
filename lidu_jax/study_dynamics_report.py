"""What the dynamics protocol (`lidu_jax.study_dynamics`) writes for a reader: the two tables of
``dynamics_<data>.md`` (`markdown`) and the figure of ``dynamics_<data>.png`` (`_plot`), both from the
protocol's result dict alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lidu_jax.study_dynamics_users import ADD_MEANS, CANDIDATES_MEAN, HIDE_MEANS

__all__ = ["markdown"]


def _fmt(v: float | None, sign: bool = True) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if sign else f"{v:.4f}"


def markdown(result: dict[str, Any]) -> str:
    """The two tables of ``dynamics_<data>.md``: training trajectories and inference-time changes."""
    k = result["k"]
    lines = [
        f"# LiDu dynamics on {result['dataset']} ({result['n_models']}-model ensembles, {result['epochs']} "
        f"epochs, {result['n_users']} users, K={k})",
        "",
        "## Training: across checkpoints (one per epoch)",
        "",
        f"| family | checkpoints | mean LiDu first → last | mean NDCG@{k} first → last | τ(−LiDu, NDCG) "
        "| ρ(−LiDu, NDCG) | τ(−top-K std, NDCG) | τ(−mean std, NDCG) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam, res in result["families"].items():
        if "skipped" in res:
            lines.append(f"| {fam} | skipped: {res['skipped']} | | | | | | |")
            continue
        tr = res["training"]
        first, last = tr["log"][0], tr["log"][-1]
        b = tr["baselines"]
        lines.append(
            f"| {fam} | {tr['n_checkpoints']} | {first['mean_lidu']:.2f} → {last['mean_lidu']:.2f} "
            f"| {first['mean_ndcg']:.4f} → {last['mean_ndcg']:.4f} "
            f"| {_fmt(tr['kendall_tau_neg_lidu_vs_ndcg'])} | {_fmt(tr['spearman_neg_lidu_vs_ndcg'])} "
            f"| {_fmt(b['mean_top_k_std']['kendall_tau_neg_vs_ndcg'])} "
            f"| {_fmt(b['mean_std']['kendall_tau_neg_vs_ndcg'])} |"
        )
    lines += [
        "",
        "## Inference-time changes (per user, final ensemble)",
        "",
        f"| family | change | mean LiDu before → after | mean NDCG@{k} before → after | τ(−ΔLiDu, ΔNDCG) "
        "| τ(signs) | sign agreement (users whose NDCG moved) | lists changed | scores moved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fam, res in result["families"].items():
        for change, r in res.get("inference", {}).items():
            agree = "n/a" if r["sign_agreement"] is None else f"{r['sign_agreement']:.2f}"
            lines.append(
                f"| {fam} | {change} | {r['mean_lidu_before']:.2f} → {r['mean_lidu_after']:.2f} "
                f"| {r['mean_ndcg_before']:.4f} → {r['mean_ndcg_after']:.4f} "
                f"| {_fmt(r['kendall_tau_delta'])} | {_fmt(r['kendall_tau_sign'])} "
                f"| {agree} ({r['n_ndcg_changed']}) | {r['frac_lists_changed']:.2f} "
                f"| {'yes' if r['mean_abs_score_change'] > 0 else 'no'} |"
            )
    lines += [
        "",
        "What each change means per family:",
        "",
        *[f"- hide, {f}: {HIDE_MEANS[f]}" for f in result["families"] if f in HIDE_MEANS],
        *[f"- add, {f}: {ADD_MEANS[f]}" for f in result["families"] if f in ADD_MEANS],
        f"- candidates_<c>: {CANDIDATES_MEAN}",
    ]
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    """Mean LiDu and mean NDCG@K vs epoch, one panel per trained family, and a bar panel of
    ``τ(−ΔLiDu, ΔNDCG)`` and ``τ(signs)`` per family and history change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {f: r for f, r in result["families"].items() if "skipped" not in r}
    n_panels = len(trained) + 1
    n_cols = min(3, n_panels)
    n_rows = -(-n_panels // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.6 * n_rows), squeeze=False)
    flat = list(axes.ravel())
    k = result["k"]
    for ax, (fam, res) in zip(flat, trained.items(), strict=False):
        log = res["training"]["log"]
        ep = [r["epoch"] for r in log]
        ax.plot(ep, [r["mean_lidu"] for r in log], "o-", color="C0", ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean LiDu", color="C0")
        twin = ax.twinx()
        twin.plot(ep, [r["mean_ndcg"] for r in log], "s--", color="C1", ms=3)
        twin.set_ylabel(f"mean NDCG@{k}", color="C1")
        ax.set_title(f"{fam}: τ(−LiDu, NDCG) {_fmt(res['training']['kendall_tau_neg_lidu_vs_ndcg'])}")
    ax = flat[len(trained)]
    labels, delta, sign = [], [], []
    for fam, res in trained.items():
        for change in ("hide", "add"):
            r = res["inference"][change]
            labels.append(f"{fam}\n{change}")
            delta.append(r["kendall_tau_delta"] or 0.0)
            sign.append(r["kendall_tau_sign"] or 0.0)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, delta, 0.4, label="τ(−ΔLiDu, ΔNDCG)")
    ax.bar(x + 0.2, sign, 0.4, label="τ(signs)")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xticks(x, labels, fontsize=7, rotation=45, ha="right")
    ax.set_title("inference-time changes (n/a shown as 0)")
    ax.legend(fontsize=7)
    for extra in flat[len(trained) + 1 :]:
        extra.axis("off")
    fig.suptitle(f"{result['dataset']}: LiDu through training and inference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
