"""Write ``docs/results-lidu.md`` from the committed JSON of the real-data LiDu runs (issue 16).

    python benchmarks/lidu_report.py           # reads docs/measured/lidu16/, writes docs/results-lidu.md
    python benchmarks/lidu_report.py --check   # exit 1 if the committed page differs from the JSON

Every number on the page comes from a JSON file under ``docs/measured/lidu16/`` written by the commands the
page lists; nothing is typed by hand except the section text. The verdicts (LiDu ahead / tied / behind a
baseline) are computed from the paired bootstrap intervals in the JSON: ``tau_diff = tau(baseline) -
tau(LiDu)`` over the same resamples of users; "behind" = the interval lies above 0, "ahead" = below 0,
"tie" = it contains 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_NAMES = {"ml-100k": "ML-100K", "lastfm": "Last.fm", "beauty": "Beauty"}
MODEL_NAMES = {"bpr": "BPR-MF", "lightgcn": "LightGCN", "mlp": "MLP (NeuMF)", "sasrec": "SASRec"}
CELL_ORDER = [(d, m) for d in DATA_NAMES for m in MODEL_NAMES]
OURS = ("LiDu correlated (ours)", "LiDu self-agreement (ours)")

GRID_CMD = """COMMON="--source ensemble --n-models 5 --epochs 15 --n-boot 200 --no-progress \\
        --out-dir runs/grid3"
for d in ml-100k lastfm beauty; do for m in bpr lightgcn mlp sasrec; do
  v=exact,unordered,pairwise,correlated,agreement
  [ $d = beauty ] && v=exact,unordered,pairwise,agreement   # correlated added below, a cell per sitting
  python -m lidu_jax.study $COMMON --lidu-variants $v --data $d --model $m
done; done
# Beauty cells again with the correlated variant, on every user (their other estimators reproduced to the
# last digit; one sitting each, 30 to 50 minutes on 2 CPU cores):
for m in bpr lightgcn mlp sasrec; do
  python -m lidu_jax.study $COMMON --lidu-variants exact,unordered,pairwise,correlated,agreement \\
      --data beauty --model $m
done
cp runs/grid3/*_ensemble.json docs/measured/lidu16/grid/"""

SIGNAL_CMD = """python benchmarks/lidu_signal.py --data ml-100k \\
    --json docs/measured/lidu16/signal_ml-100k.json
python benchmarks/lidu_signal.py --data lastfm --json docs/measured/lidu16/signal_lastfm.json
python benchmarks/lidu_signal.py --data beauty --max-eval-users 4000 \\
    --json docs/measured/lidu16/signal_beauty.json"""

MODELS_CMD = """for d in ml-100k lastfm; do
  python -m lidu_jax.study --protocol models --data $d --out-dir runs/models --n-boot 1000
done
# Beauty: a seeded 5,000-user sample (ML-100K and Last.fm have fewer users, so --max-eval-users 5000 would
# leave their runs unchanged) and SASRec on packed rows (--sasrec-pack; padded, its 500 epochs take ~4 hours
# on 2 cores). Interrupted, the same command with --resume continues from the last saved run and epoch.
python -m lidu_jax.study --protocol models --data beauty --max-eval-users 5000 --sasrec-pack \\
    --out-dir runs/models --n-boot 1000
python benchmarks/bench_sasrec_pack.py --json docs/measured/lidu16/sasrec_pack_beauty.json
cp runs/models/models_*.json docs/measured/lidu16/; cp runs/models/models_*.png docs/figures/"""

DYN_CMD = """for d in ml-100k lastfm; do
  python -m lidu_jax.study --protocol dynamics --data $d --epochs 15 --dynamics-users 500 --out-dir runs/dyn
done
python -m lidu_jax.study --protocol dynamics --data beauty --epochs 15 --dynamics-users 500 \\
    --dynamics-families bpr,lightgcn,mlp --out-dir runs/dyn
python -m lidu_jax.study --protocol dynamics --data beauty --epochs 15 --dynamics-users 500 \\
    --dynamics-families sasrec --dynamics-merge --out-dir runs/dyn   # added to the run above
cp runs/dyn/dynamics_*.json docs/measured/lidu16/; cp runs/dyn/dynamics_*.png docs/figures/"""


def _f(v: Any, fmt: str = "+.3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _verdict(row: dict[str, Any]) -> str:
    """Baseline vs LiDu from ``tau_diff_ci`` (= tau(baseline) - tau(LiDu)): W = LiDu ahead, L = behind."""
    lo, hi = row["tau_diff_ci"]
    return "L" if lo > 0 else ("W" if hi < 0 else "T")


def _better_worse(diff_cis: list[list[float]]) -> tuple[int, int, int]:
    """``(better, worse, tied)``: paired intervals of ``tau(variant) - tau(LiDu)`` above 0 / below 0 /
    containing 0."""
    better = sum(lo > 0 for lo, _ in diff_cis)
    worse = sum(hi < 0 for _, hi in diff_cis)
    return better, worse, len(diff_cis) - better - worse


def _demote(body: list[str]) -> list[str]:
    """Headings two levels down, so an embedded page's ``#`` sits under this page's ``##`` sections."""
    return [("##" + ln) if ln.startswith("#") else ln for ln in body]


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _baselines(cell: dict[str, Any]) -> dict[str, Any]:
    return {n: r for n, r in cell["estimators"].items() if not n.startswith("LiDu")}


def _on_top(cell: dict[str, Any]) -> bool:
    tau = cell["estimators"]["LiDu"]["kendall_tau"]
    return all(r["kendall_tau"] <= tau for r in _baselines(cell).values())


def grid_section(src: Path) -> tuple[list[str], dict[str, Any]]:
    """The per-user grid: one row per cell, then the win/tie/loss matrix per baseline."""
    cells = {}
    for d, m in CELL_ORDER:
        c = _load(src / "grid" / f"{d}_{m}_ensemble.json")
        if c is not None:
            cells[(d, m)] = c
    missing = [f"{DATA_NAMES[d]} x {MODEL_NAMES[m]}" for d, m in CELL_ORDER if (d, m) not in cells]
    out = [
        "| data | model | seeds | users | NDCG@10 (most-popular) | LiDu tau [95% CI] | unordered set "
        "| correlated (ours) | self-agreement (ours) | best baseline tau [95% CI] "
        "| best - LiDu [paired 95% CI] | LiDu W/T/L |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tally: dict[str, dict[str, int]] = {}
    for (d, m), c in cells.items():
        est = c["estimators"]
        lid = est["LiDu"]
        base = _baselines(c)
        best = max(base, key=lambda n: base[n]["kendall_tau"])
        verdicts = {n: _verdict(r) for n, r in base.items()}
        for n, v in verdicts.items():
            tally.setdefault(n, {"W": 0, "T": 0, "L": 0})[v] += 1
        w, t, lo = (sum(v == x for v in verdicts.values()) for x in "WTL")
        corr, agr, uno = (
            est.get(n, {}).get("kendall_tau")
            for n in ("LiDu correlated (ours)", "LiDu self-agreement (ours)", "LiDu unordered set")
        )
        b = base[best]
        out.append(
            f"| {DATA_NAMES[d]} | {MODEL_NAMES[m]} | {c['config']['n_models']} | {c['n_users']:,} "
            f"| {c['mean_ndcg']:.4f} ({c['most_popular_ndcg']:.4f}) "
            f"| {lid['kendall_tau']:+.3f}{_ci(lid['ci'])} "
            f"| {_f(uno)} | {_f(corr)} | {_f(agr)} | {best} {b['kendall_tau']:+.3f}{_ci(b['ci'])} "
            f"| {b['tau_diff']:+.3f}{_ci(b['tau_diff_ci'])} | {w}/{t}/{lo} |"
        )
    if missing:
        out += ["", "Not measured (no JSON): " + ", ".join(missing) + "."]
    on_top = [k for k, c in cells.items() if _on_top(c)]
    all_ahead = [k for k, c in cells.items() if all(_verdict(r) == "W" for n, r in _baselines(c).items())]
    behind = [k for k, c in cells.items() if any(_verdict(r) == "L" for n, r in _baselines(c).items())]
    name = lambda ks: ", ".join(f"{DATA_NAMES[d]} x {MODEL_NAMES[m]}" for d, m in ks) or "none"
    out += [
        "",
        f"**In words.** Over the {len(cells)} measured cells, LiDu's tau is at or above every baseline's in "
        f"{len(on_top)} ({name(on_top)}); it is significantly ahead of every baseline in {len(all_ahead)} "
        f"({name(all_ahead)}); at least one baseline is significantly ahead of LiDu in {len(behind)} "
        f"({name(behind)}).",
    ]
    out += [
        "",
        "W/T/L counts the label-free baselines LiDu is significantly ahead of / tied with / significantly "
        "behind (paired 95% interval of tau(baseline) - tau(LiDu) below 0 / containing 0 / above 0).",
        "",
        "Per baseline, over the cells (W = LiDu significantly ahead, T = tie, L = significantly behind):",
        "",
        "| baseline | LiDu ahead | tie | LiDu behind |",
        "|---|---|---|---|",
    ]
    for n in sorted(tally, key=lambda n: (tally[n]["L"], -tally[n]["W"])):
        r = tally[n]
        out.append(f"| {n} | {r['W']} | {r['T']} | {r['L']} |")
    ours_rows = []
    for (d, m), c in cells.items():
        est = c["estimators"]
        cols = []
        for v in OURS:
            r = est.get(v)
            cols.append(
                "n/a | n/a"
                if r is None
                else f"{r['kendall_tau']:+.3f} | {r['tau_diff']:+.3f}{_ci(r['tau_diff_ci'])}"
            )
        ours_rows.append(
            f"| {DATA_NAMES[d]} | {MODEL_NAMES[m]} | {est['LiDu']['kendall_tau']:+.3f} | "
            + " | ".join(cols)
            + " |"
        )
    ours_words = []
    for v in OURS:
        rs = [(k, c["estimators"][v]) for k, c in cells.items() if v in c["estimators"]]
        if rs:
            better, worse, tied = _better_worse([r["tau_diff_ci"] for _, r in rs])
            mean_diff = sum(r["tau_diff"] for _, r in rs) / len(rs)
            ours_words.append(
                f"- `{v}` against exact LiDu over {len(rs)} cells: significantly better in {better}, "
                f"significantly worse in {worse}, tied in {tied}; mean difference in tau "
                f"{mean_diff:+.3f}."
            )
    no_corr = [(d, m, c["seconds"]) for (d, m), c in cells.items() if OURS[0] not in c["estimators"]]
    summary = {
        "missing": missing,
        "no_correlated": no_corr,
        "ours_words": ours_words,
        "cells": len(cells),
        "tally": tally,
        "ours_rows": [
            "| data | model | exact LiDu tau | correlated tau | correlated - exact [paired CI] "
            "| self-agreement tau | self-agreement - exact [paired CI] |",
            "|---|---|---|---|---|---|---|",
            *ours_rows,
        ],
    }
    return out, summary


def signal_section(src: Path) -> list[str]:
    """Per data set: the terms of -log P and the diagnostics, tau vs NDCG, and the variance split."""
    out: list[str] = []
    words: list[str] = []
    for d in DATA_NAMES:
        s = _load(src / f"signal_{d}.json")
        if s is None:
            out.append(f"{DATA_NAMES[d]}: not measured (no JSON).")
            continue
        v = s["variance"]
        out += [
            f"**{DATA_NAMES[d]}** ({s['n_users']:,} users x {s['n_items']:,} items, BPR-MF x"
            f"{s['config']['n_models']}, mean NDCG@10 {s['mean_ndcg']:.4f}, users with a hit "
            f"{s['frac_users_with_hit']:.1%}; var(LiDu) across users {v['var_lidu']:.1f} = var(set) "
            f"{v['var_set']:.1f} + var(order) {v['var_order']:.1f} + 2 cov {v['two_cov']:.1f}):",
            "",
            "| term | tau vs NDCG@10 [95% CI] | term - LiDu [paired CI] | tau w. LiDu | tau w. history |",
            "|---|---|---|---|---|",
        ]
        for n, r in sorted(s["tau_vs_ndcg"].items(), key=lambda x: -x[1]["tau"]):
            base = s["tau_vs_ndcg"]["LiDu (exact)"]["tau"]
            diff = "" if n == "LiDu (exact)" else f"{r['tau'] - base:+.3f}{_ci(r['diff_vs_lidu_ci'])}"
            out.append(
                f"| {n} | {r['tau']:+.3f}{_ci(r['ci'])} | {diff} | {s['tau_vs_lidu'][n]:+.3f} "
                f"| {s['tau_vs_history_length'][n]:+.3f} |"
            )
        out.append("")
        words.append(_signal_words(DATA_NAMES[d], s))
    if words:
        out += ["**In words.**", "", *[f"- {w}" for w in words], ""]
    return out


def _signal_words(name: str, s: dict[str, Any]) -> str:
    """One data set's decomposition in a sentence; every number from ``s``."""
    t = {n: r["tau"] for n, r in s["tau_vs_ndcg"].items()}
    v = s["variance"]
    top = max(t, key=t.get)
    return (
        f"{name}: the list-versus-rest boundary carries {v['var_set'] / v['var_lidu']:.0%} of LiDu's "
        f"variance across users and the within-list order {v['var_order'] / v['var_lidu']:.0%}; tau with "
        f"NDCG@10: LiDu {t['LiDu (exact)']:+.3f}, boundary {t['set (list vs rest)']:+.3f}, order "
        f"{t['order (within list)']:+.3f}, first position {t['position 1']:+.3f}; raw top-K std "
        f"{t['mean std of top-K (raw)']:+.3f} vs scale-free {t['scale-free std of top-K']:+.3f}; the "
        f"strongest term is {top} ({t[top]:+.3f})."
    )


def _compare(regret: float, reference: float) -> str:
    """How a regret compares with a reference regret, in words (lower regret = better pick)."""
    return "worse than" if regret > reference else "better than" if regret < reference else "as good as"


def models_words(res: dict[str, Any], scale_free: str) -> list[str]:
    """The model-level finding in sentences whose numbers, and every comparison, come from ``res``."""
    sel, diag = res["selection"], res["diagnostics_tau"]["all"]
    scored = {
        n: r for n, r in sel.items() if r["kendall_tau"] is not None and n not in ("oracle", "random choice")
    }
    best = max(scored, key=lambda n: scored[n]["kendall_tau"])

    def row(n: str) -> str:
        r = sel[n]
        frac = f"{r['regret_fraction']:.0%} of the best"
        return f"{r['kendall_tau']:+.3f}{_ci(r['ci'])}, regret {r['regret']:.4f} ({frac})"

    def within(n: str) -> str:
        return ", ".join(
            f"{f} {res['within_family'][f][n]['kendall_tau']:+.2f}" for f in res["within_family"]
        )

    lidu_regret, random_regret = sel["LiDu"]["regret"], sel["random choice"]["regret"]
    spread_ndcg = diag["ensemble_spread"]["tau_vs_ndcg"]
    # Over-trained = a longer run of the same (family, dim, regularisation) with a lower mean NDCG.
    runs: dict[tuple, list[dict]] = {}
    for m in res["models"]:
        runs.setdefault((m["family"], m["dim"], m["regularisation"]), []).append(m)
    ordered = [sorted(ms, key=lambda m: m["epochs"]) for ms in runs.values()]
    falls = [
        f"{later['name']} ({later['mean_ndcg']:.4f} < {earlier['mean_ndcg']:.4f})"
        for ms in ordered
        for earlier, later in itertools.pairwise(ms)
        if later["mean_ndcg"] < earlier["mean_ndcg"]
    ]
    return [
        f"**In words.** Over the {len(res['models'])} recommenders, exact LiDu's mean over users: tau with "
        f"mean NDCG@10 {row('LiDu')}, against a regret of {random_regret:.4f} for a random pick (LiDu's "
        f"pick is {_compare(lidu_regret, random_regret)} a random one); within "
        f"each family: {within('LiDu')}. The best estimator at this level is {best} ({row(best)}). "
        f"Diagnostics: across models mean LiDu has tau {diag['spread_ratio']['tau_vs_mean_lidu']:+.2f} with "
        f"the ensemble's noise-to-signal (spread) ratio; the ensemble spread has tau {spread_ndcg:+.2f} with "
        f"mean NDCG and the epochs {diag['epochs']['tau_vs_ndcg']:+.2f}"
        + (
            ", so a better-trained ensemble looks *more* uncertain."
            if spread_ndcg > 0
            else ", so here a better model does not come with a wider ensemble."
        )
        + f" The scale-free form declared before the run, `{scale_free}` (every model's stds rescaled to "
        f"the population's median spread ratio, no labels): {row(scale_free)}; within families "
        f"{within(scale_free)}. "
        + ("It is the best estimator here." if best == scale_free else f"It trails {best}.")
        + (
            f" Longer training lowered mean NDCG (over-training) in: {', '.join(falls)}."
            if falls
            else " No model was over-trained in the sense of a falling NDCG: within every training run the "
            "longest snapshot is the best."
        ),
    ]


def dynamics_words(name: str, res: dict[str, Any]) -> str:
    """Per family: the across-checkpoint tau, where mean LiDu bottoms out, and the inference-change taus."""
    parts, changes = [], []
    for fam, r in res["families"].items():
        if "skipped" in r:
            continue
        log = r["training"]["log"]
        low = min(log, key=lambda x: x["mean_lidu"])
        parts.append(
            f"{fam} {r['training']['kendall_tau_neg_lidu_vs_ndcg']:+.2f} (mean LiDu lowest at epoch "
            f"{low['epoch']} of {log[-1]['epoch']}; mean ensemble std {low['mean_std']:.3f} there, "
            f"{log[-1]['mean_std']:.3f} at the end)"
        )
        for ch in ("hide", "add"):
            t = r["inference"][ch].get("kendall_tau_delta")
            if t is not None:
                changes.append(f"{fam}/{ch} {t:+.3f}")
    return (
        f"**In words ({name}).** Across the per-epoch checkpoints, tau(-mean LiDu, mean NDCG@10): "
        f"{'; '.join(parts)}. Where the lowest LiDu comes early, mean LiDu first falls while the model "
        f"learns and then rises again with the members' spread while NDCG keeps improving (the model-level "
        f"effect of section 4). Per user, the change in LiDu under an inference-time change of the history "
        f"tracks the change in NDCG@10 weakly or not at all (tau(-dLiDu, dNDCG): {', '.join(changes)})."
    )


CORR_CMD = "python benchmarks/bench_lidu_correlated_cost.py --json docs/measured/lidu16/correlated_cost.json"

CORR_SAMPLE_CMD = """COMMON="--source ensemble --n-models 5 --epochs 15 --n-boot 200 --no-progress \\
        --out-dir runs/corr_beauty"
for m in bpr mlp lightgcn sasrec; do
  python -m lidu_jax.study $COMMON --lidu-variants exact,correlated --max-eval-users 5000 \\
      --data beauty --model $m
done
mkdir -p docs/measured/lidu16/correlated_sample
cp runs/corr_beauty/beauty_*_ensemble.json docs/measured/lidu16/correlated_sample/"""

# Settings a sample run may change against its grid cell: which users and estimators, and where it writes.
SAMPLE_MAY_DIFFER = frozenset({"max_eval_users", "lidu_variants", "out_dir", "json", "progress"})


def _sample_cells(src: Path) -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]:
    """``{(data, model): (sample run, grid cell)}`` of the correlated runs on a user sample.

    Raises:
      ValueError: a sample run without its grid cell, or trained with any other setting than that cell
        (the sample must be the grid's model, only evaluated on fewer users).
    """
    from lidu_jax import evaluation
    from lidu_jax.study_config import config_defaults, setting_difference

    defaults = evaluation.json_safe(config_defaults())
    found = {}
    for d, m in CELL_ORDER:
        smp = _load(src / "correlated_sample" / f"{d}_{m}_ensemble.json")
        if smp is None:
            continue
        cell = _load(src / "grid" / f"{d}_{m}_ensemble.json")
        if cell is None:
            raise ValueError(f"correlated_sample/{d}_{m}_ensemble.json has no grid cell to compare with")
        # An option added after one of the two runs is absent from its config: it ran as the default.
        diff = setting_difference(cell["config"], {**defaults, **smp["config"]}, SAMPLE_MAY_DIFFER, defaults)
        if diff is not None:
            raise ValueError(
                f"correlated_sample/{d}_{m}_ensemble.json differs from its grid cell, which {diff}: only the "
                "users and the estimators may change"
            )
        found[(d, m)] = (smp, cell)
    return found


def correlated_sample_section(
    src: Path, found: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]
) -> list[str]:
    """The correlated variant where it was run on a seeded user sample (``found``, from `_sample_cells`):
    exact and correlated LiDu on the same users (paired interval), next to exact LiDu on every user from
    section 1."""
    if not found:
        return []
    smp0, cell0 = next(iter(found.values()))
    cost = _load(src / "correlated_cost.json")
    per_user = cost["median_s"]["correlated"] / cost["users"] if cost else 0.0
    per_cell = (
        f" (at {per_user * 1e3:.0f} ms per user over {cost['items']:,} items, `{CORR_CMD}`: about "
        f"{per_user * cell0['n_users'] / 60:.0f} minutes per cell of {cell0['n_users']:,} users, on top of "
        "the cell)"
        if cost
        else ""
    )
    datasets = ", ".join(dict.fromkeys(DATA_NAMES[d] for d, _ in found))
    every = all(OURS[0] in cell["estimators"] for _, cell in found.values())
    why = (
        f"On {datasets} the correlated variant costs much more than the exact estimator{per_cell}, so each "
        f"cell was first run on a seeded random sample of {smp0['n_users']:,} users"
        if every
        else f"On {datasets} the correlated variant costs too much to run on every user of every "
        f"cell{per_cell}, so each cell was also run on a seeded random sample of {smp0['n_users']:,} users"
    )
    out = [
        f"{why} (`--max-eval-users`) with every other setting of the grid cell (the report refuses a run "
        "that differs): the ensemble is retrained with the cell's settings and seeds, and exact and "
        "correlated LiDu are compared on the same users and bootstrap resamples."
        + (
            " Every one of these cells has since run on every user as well (the table above), so the "
            f"sample now shows how far a {smp0['n_users']:,}-user sample's verdict can sit from the whole "
            "data's."
            if every
            else ""
        ),
        "",
        "```bash",
        CORR_SAMPLE_CMD,
        "```",
        "",
        "| data | model | users | exact LiDu tau [95% CI] | correlated tau [95% CI] | correlated - exact "
        "[paired CI] | exact LiDu tau, every user (section 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (d, m), (smp, cell) in found.items():
        ex, co = smp["estimators"]["LiDu"], smp["estimators"][OURS[0]]
        out.append(
            f"| {DATA_NAMES[d]} | {MODEL_NAMES[m]} | {smp['n_users']:,} of {cell['n_users']:,} "
            f"| {ex['kendall_tau']:+.3f}{_ci(ex['ci'])} | {co['kendall_tau']:+.3f}{_ci(co['ci'])} "
            f"| {co['tau_diff']:+.3f}{_ci(co['tau_diff_ci'])} "
            f"| {cell['estimators']['LiDu']['kendall_tau']:+.3f}{_ci(cell['estimators']['LiDu']['ci'])} |"
        )
    better, worse, tied = _better_worse(
        [smp["estimators"][OURS[0]]["tau_diff_ci"] for smp, _ in found.values()]
    )
    out += [
        "",
        f"- `{OURS[0]}` against exact LiDu on these samples, over {len(found)} cells: significantly better "
        f"in {better}, significantly worse in {worse}, tied in {tied}.",
    ]
    for (d, m), (smp, cell) in found.items():
        whole = cell["estimators"].get(OURS[0])
        if whole is not None:  # the cell also ran on every user: what the sample's smaller power hides
            part = smp["estimators"][OURS[0]]
            out.append(
                f"- {DATA_NAMES[d]} x {MODEL_NAMES[m]} also ran on every user: correlated - exact "
                f"{whole['tau_diff']:+.3f}{_ci(whole['tau_diff_ci'])} there against "
                f"{part['tau_diff']:+.3f}{_ci(part['tau_diff_ci'])} on the sample."
            )
    return [*out, ""]


def _no_correlated_line(
    rows: list[tuple[str, str, float]], cost: dict[str, Any] | None, sampled: set[tuple[str, str]]
) -> str:
    """The grid cells run without the correlated variant on every user, with what it costs (measured),
    what those cells cost without it, and which of them have it on a user sample."""
    if not rows:
        return ""
    names = ", ".join(f"{DATA_NAMES[d]} x {MODEL_NAMES[m]}" for d, m, _ in rows)
    lo, hi = min(t for *_, t in rows) / 60, max(t for *_, t in rows) / 60
    ratio = (
        f"{cost['ratio_correlated_over_exact']:.1f}x the exact estimator's time on {cost['users']} users x "
        f"{cost['items']:,} items, M = {cost['members']} (`{CORR_CMD}`)"
        if cost
        else "a multiple of the exact estimator's time"
    )
    on_sample = [f"{DATA_NAMES[d]} x {MODEL_NAMES[m]}" for d, m, _ in rows if (d, m) in sampled]
    sample = (
        f" It was run on a seeded user sample of {', '.join(on_sample)} (section 2)." if on_sample else ""
    )
    took = (
        f"this cell took {hi:.0f} minutes"
        if len(rows) == 1
        else f"these cells took {lo:.0f} to {hi:.0f} minutes each"
    )
    return (
        f"- The correlated variant on every user of {names}: it costs {ratio}, and {took} on 2 CPU cores "
        f"without it.{sample}"
    )


def _missing_families(res: dict[str, Any]) -> list[str]:
    """The families of `lidu_jax.study_config.MODELS` neither in a models run's population nor skipped."""
    from lidu_jax.study_config import MODELS

    have = set(res["population"]["table"]) | set(res.get("skipped_families", {}))
    return [f for f in MODELS if f not in have]


def _models_scope(res: dict[str, Any], src: Path) -> str:
    """A sentence on how a models run differs from the full protocol (fewer families, sampled users)."""
    parts = []
    missing = _missing_families(res)
    if missing:
        have = ", ".join(MODEL_NAMES[f] for f in res["population"]["table"])
        names = ", ".join(MODEL_NAMES[f] for f in missing)
        parts.append(
            f"only {len(res['models'])} models, the families {have} (without {names}: too slow on 2 CPU "
            "cores, section 7)"
        )
    if res["config"].get("max_eval_users"):
        parts.append(f"every model measured on the same seeded random {res['n_users']:,} users")
    if res["config"].get("sasrec_pack") and "sasrec" in res["population"]["table"]:
        parts.append(
            "SASRec trained on packed rows (`--sasrec-pack`: several users' sequences share a row, attention "
            "stays within each user, so the model and the loss are those of padded rows and only the users "
            "sharing a batch differ; the other data sets' SASRec trained on padded rows)"
            + _pack_speed(res, src)
        )
    if not parts:
        return ""
    text = "; ".join(parts)
    return f"**Scope ({DATA_NAMES[res['dataset']]}).** {text[0].upper()}{text[1:]}."


def _pack_speed(res: dict[str, Any], src: Path) -> str:
    """`benchmarks/bench_sasrec_pack.py`'s measured speed-up on the data set of ``res``, if it was run."""
    bench = _load(src / f"sasrec_pack_{res['dataset']}.json")
    if bench is None:
        return ""
    return (
        f": {bench['real_fraction_padded']:.0%} of padded positions hold an item against "
        f"{bench['real_fraction_packed']:.0%} packed, and a training epoch (d{bench['dim']}, "
        f"{bench['seeds']} seeds) took {bench['padded']['epoch_s']:.1f} s padded against "
        f"{bench['packed']['epoch_s']:.1f} s packed, {bench['speedup']:.1f}x, side by side, with NDCG@10 "
        f"{bench['padded']['ndcg10']:.4f} padded and {bench['packed']['ndcg10']:.4f} packed after "
        f"{bench['epochs']} epochs on {bench['eval_users']:,} users (`benchmarks/bench_sasrec_pack.py`)"
    )


def _models_cost(src: Path, missing: list[str]) -> str:
    """Why a large data set lacks the models protocol: its slowest ML-100K run, scaled by users per epoch."""
    ref = _load(src / "models_ml-100k.json")
    if ref is None or not missing:
        return ""
    slow = max(ref["models"], key=lambda m: m["seconds"]["train_run"])
    if slow["family"] != "sasrec":
        return ""
    minutes = slow["seconds"]["train_run"] / 60
    grids = {d: _load(src / "grid" / f"{d}_bpr_ensemble.json") for d in DATA_NAMES}
    if grids["ml-100k"] is None:
        return ""
    scale = {
        DATA_NAMES[d]: g["n_users"] / grids["ml-100k"]["n_users"]
        for d, g in grids.items()
        if g is not None and DATA_NAMES[d] in missing
    }
    big = [
        f"{name} ({x:.0f}x the users: about {x * minutes / 60:.0f} hours, counting users alone)"
        for name, x in scale.items()
        if x >= 2
    ]
    if not big:
        return ""
    return (
        f" On ML-100K the protocol took {ref['seconds'] / 60:.0f} minutes on 2 CPU cores; its slowest "
        f"training run, {slow['name'].rsplit('-e', 1)[0]}, took {minutes:.0f} minutes, and an SASRec epoch "
        f"is one pass over the users, so that run alone would take, extrapolated (not measured): "
        f"{', '.join(big)}. "
        "`--resume` continues an interrupted population: its finished training runs are restored, a run "
        "still training continues from its state saved every 10 minutes, and `--population-families` may "
        "grow at the end (`bpr,lightgcn,mlp` -> `bpr,lightgcn,mlp,sasrec`), so the missing family can be "
        "trained over several sittings."
    )


def build(src: Path) -> str:
    from lidu_jax import study_dynamics, study_models

    grid, summary = grid_section(src)
    sampled = _sample_cells(src)
    lines = [
        "# LiDu on real data: measured results",
        "",
        "<!-- generated by `python benchmarks/lidu_report.py` from docs/measured/lidu16/*.json: edit the "
        "script, not this page -->",
        "",
        "Everything below was measured on the project's 2-core CPU machine (no accelerator was lent to the "
        "sessions that ran it), with the commands listed in each section; the JSON they wrote is committed "
        "under `docs/measured/lidu16/`, and this page is regenerated from it by `python "
        "benchmarks/lidu_report.py`. LiDu is the paper's exact list probability, `-log P(L)` of the user's "
        "top-10 list under independent Gaussian item scores (mean and std across a 5-seed deep ensemble), "
        "computed on a 256-cell grid (`docs/maths-lidu.md`). NDCG@10 is leave-last-out: one held-out item "
        "per user. The first grid (3 seeds, Beauty on 500 users, 8 baselines, other distribution sources) is "
        "kept in `docs/results-lidu-v1.md`.",
        "",
        "## 1. The per-user grid: 5 seeds, every user, 14 label-free baselines",
        "",
        "```bash",
        GRID_CMD,
        "```",
        "",
        "Same settings for every cell (nothing tuned per data set): BPR-MF / LightGCN / NeuMF-style MLP / "
        "SASRec, 5-seed ensembles trained at once with `jax.vmap`, 15 epochs, every user with a held-out "
        "item, Kendall tau of -uncertainty vs per-user NDCG@10 with 200 paired bootstrap resamples over "
        "users. The 14 baselines: the 8 of the first grid (`docs/maths-lidu.md` section 5) plus NQC, WIG, "
        "user clarity, profile entropy, ensemble RBO disagreement and ensemble mutual information.",
        "",
        *grid,
        "",
        "## 2. Our two variants: correlated scores and self-agreement",
        "",
        "Both are additions of ours; the paper's exact list probability (`LiDu`) is unchanged. `LiDu "
        "correlated (ours)` (`lidu_jax.correlated`, `docs/maths-lidu.md` section 3b): the members' sample "
        "covariance with correlations shrunk by half, one orthogonal block of 8 Monte Carlo draws per user "
        "(brute-force checked in `tests/test_lidu_correlated.py`). `LiDu self-agreement (ours)` "
        "(`lidu_jax.agreement`): `1 - E|top-K(S) ∩ L|/K` under LiDu's own Gaussians, 128 draws per user, "
        "chosen from the analysis of section 3 on ML-100K, Last.fm and Beauty only (held-out data sets judge "
        "it). Same cells and resamples as section 1:",
        "",
        *summary["ours_rows"],
        "",
        *summary["ours_words"],
        "",
        *correlated_sample_section(src, sampled),
        "## 3. Where the per-user signal sits: the terms of -log P (issue 16: why it weakens on sparse data)",
        "",
        "```bash",
        SIGNAL_CMD,
        "```",
        "",
        "One BPR-MF 5-seed ensemble per data set (the grid's settings; Beauty on a seeded 4,000-user subset "
        "to keep the 10 prefix evaluations affordable). Per user, `-log P(L)` is split into the list-versus-"
        "rest boundary (`set`: the unordered top-K probability) and the within-list order (`order` = LiDu - "
        "set), and into per-position increments; the near-tied rest is the expected number of left-out items "
        "above the last listed one; the raw and scale-free std of the top-K and the user's score scale test "
        "whether the signal sits in the absolute score scale that LiDu's per-user affine invariance "
        "discards; the Gaussian self-agreement is `1 - E|top-K(S) ∩ L|/K` under LiDu's own Gaussians "
        "(definitions in the docstring of `benchmarks/lidu_signal.py`).",
        "",
        *signal_section(src),
    ]
    lines += ["## 4. Model-level selection (`--protocol models`)", "", "```bash", MODELS_CMD, "```", ""]
    for d, name in DATA_NAMES.items():
        models = _load(src / f"models_{d}.json")
        if models is None:
            lines += [f"{name}: not measured (no JSON).", ""]
            continue
        scope = _models_scope(models, src)
        lines += [*([scope, ""] if scope else []), *models_words(models, study_models.SCALE_FREE), ""]
        body = study_models.markdown(models).splitlines()
        lines += [*_demote(body), "", f"![models on {name}](figures/models_{d}.png)", ""]
    dyn = [(d, _load(src / f"dynamics_{d}.json")) for d in DATA_NAMES]
    lines += [
        "## 5. Dynamics: through training and under inference-time changes",
        "",
        "```bash",
        DYN_CMD,
        "```",
    ]
    for d, res in dyn:
        if res is None:
            lines += ["", f"{DATA_NAMES[d]}: not measured (no JSON)."]
            continue
        lines += ["", dynamics_words(DATA_NAMES[d], res)]
        body = study_dynamics.markdown(res).splitlines()
        lines += ["", *_demote(body)]
        lines += ["", f"![dynamics on {DATA_NAMES[d]}](figures/dynamics_{d}.png)"]
    gpu = _load(src / "bench_lidu_gpu.json")
    lines += [
        "",
        "## 6. On an accelerator",
        "",
        "`benchmarks/bench_lidu_gpu.py` (100,000 users x 10,000 items, K = 10, grid 256: compile time, "
        "users/s, peak device memory, agreement with a CPU recompute, ratio to the 2-core CPU) is prepared "
        "and tested on the CPU (`tests/test_bench_lidu_gpu.py`; a CPU smoke run is in "
        "`docs/measured/bench_lidu_gpu_cpu_smoke.txt`). "
        + (
            "Its accelerator output: `docs/measured/lidu16/bench_lidu_gpu.json`."
            if gpu
            else "It has **not** run on an accelerator: none was lent to the sessions that did this work."
        ),
        "",
    ]
    no_models = [DATA_NAMES[d] for d in DATA_NAMES if not (src / f"models_{d}.json").is_file()]
    partial_models = [
        f"{DATA_NAMES[d]} x {MODEL_NAMES[f]}"
        for d in DATA_NAMES
        if (res := _load(src / f"models_{d}.json")) is not None
        for f in _missing_families(res)
    ]
    no_dyn = [
        DATA_NAMES[d] if res is None else f"{DATA_NAMES[d]} x {MODEL_NAMES[f]}"
        for d, res in dyn
        for f in (MODEL_NAMES if res is None else [f for f in MODEL_NAMES if f not in res["families"]])
    ]
    no_dyn = list(dict.fromkeys(no_dyn))
    not_measured = [
        (
            f"- Grid cells without JSON: {', '.join(summary['missing'])} (2-core CPU time ran out)."
            if summary["missing"]
            else "- Grid cells without JSON: none."
        ),
        _no_correlated_line(summary["no_correlated"], _load(src / "correlated_cost.json"), set(sampled)),
        f"- Model-level protocol not run on: {', '.join(no_models + partial_models) or 'none'}."
        f"{_models_cost(src, no_models + [p.split(' x ')[0] for p in partial_models])}",
        f"- Dynamics not run on: {', '.join(no_dyn) or 'none'} (`--dynamics-families` picks the families; "
        "`--dynamics-merge` adds them to an earlier run's JSON in the same `--out-dir`, refusing one whose "
        "settings differ).",
        "- No accelerator run of `benchmarks/bench_lidu_gpu.py`." if gpu is None else "",
    ]
    # an item with nothing to say is left out rather than left as a blank line inside the list
    lines += ["## 7. Not measured (yet)", "", *[ln for ln in not_measured if ln], ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(ROOT / "docs" / "measured" / "lidu16"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results-lidu.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from what the JSON gives")
    a = p.parse_args()
    text = build(Path(a.src))
    if a.check:
        same = Path(a.out).is_file() and Path(a.out).read_text() == text
        print("up to date" if same else f"{a.out} differs from the JSON: rerun without --check")
        return 0 if same else 1
    Path(a.out).write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
