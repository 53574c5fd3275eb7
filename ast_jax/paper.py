"""The variants of the SmolLM2 experiments, the AST paper's numbers for them, and the markdown tables that put
ours beside the paper's (:func:`format_markdown`, written by ``python -m ast_jax.experiments --markdown``)."""

from __future__ import annotations

from typing import Any

__all__ = ["ABLATION", "CONTROL", "DESCRIPTION", "GROUPS", "ONESHOT", "PAPER", "RETRAIN", "format_markdown"]

ONESHOT = ("dense", "magnitude", "wanda", "sparsegpt")
RETRAIN = ("fixed_ce", "fixed_kl", "static_srste", "ast_naive", "ast_boosted", "gmp")
ABLATION = ("ast_reverse_kl", "ast_ce", "ast_hidden_mse")
CONTROL = ("dense_ce", "dense_kl")
GROUPS = {
    "oneshot": ONESHOT,
    "retrain": RETRAIN,
    "ablation": ABLATION,
    "control": CONTROL,
    "all": ONESHOT + RETRAIN + ABLATION,
}

# The paper's WikiText-2 perplexities (2:4), GPT-2 124M unless noted; for shape comparison only.
PAPER = {
    "dense": "29.95 (OPT-125M 27.76)",
    "magnitude": "–",
    "wanda": "115.64 (OPT-125M 60.91)",
    "sparsegpt": "50.09 (OPT-125M 45.58)",
    "fixed_ce": "32.84 (fixed mask)",
    "fixed_kl": "–",
    "static_srste": "39.29",
    "ast_naive": "32.23 (forward KL)",
    "ast_boosted": "31.13",
    "gmp": "33.48",
    "ast_reverse_kl": "32.20",
    "ast_ce": "40.34 (no distillation)",
    "ast_hidden_mse": "41.19–44.87 (layer-wise losses)",
    "dense_ce": "–",
    "dense_kl": "–",
}
DESCRIPTION = {
    "dense": "dense teacher (no pruning)",
    "magnitude": "one-shot magnitude 2:4",
    "wanda": "one-shot Wanda 2:4",
    "sparsegpt": "one-shot SparseGPT 2:4",
    "fixed_ce": "fixed one-shot mask, CE only",
    "fixed_kl": "fixed one-shot mask, KL + CE",
    "static_srste": "static SR-STE (constant λ), KL + CE",
    "ast_naive": "AST-Naive: annealing SR-STE, mask refresh, KL + CE",
    "ast_boosted": "AST-Boosted: AST-Naive + SLoRB",
    "gmp": "gradual magnitude pruning, KL + CE",
    "ast_reverse_kl": "AST, reverse KL + CE",
    "ast_ce": "AST, CE only (no distillation)",
    "ast_hidden_mse": "AST, forward KL + CE + hidden-state MSE",
    "dense_ce": "control: dense fine-tune (no pruning), CE only",
    "dense_kl": "control: dense fine-tune (no pruning), KL + CE",
}


def format_markdown(results: dict[str, Any]) -> str:
    """The three result tables (one-shot, retraining, distillation ablation) with the paper's numbers."""
    cfg = results["config"]
    v = results["variants"]
    lines = [
        f"Device: {results['device']}. Model: SmolLM2-135M-Instruct ({results['model']['n_layers']} layers, "
        f"{results['model']['params']:,} params). Evaluation: {results['protocol']['eval']}.",
        "",
    ]
    dense = v.get("dense", {}).get("perplexity")

    def row(name: str, cols: list[str]) -> str:
        e = v[name]
        gap = f"{e['perplexity'] / dense:.2f}x" if dense else "–"
        return (
            "| "
            + " | ".join([f"`{name}`", DESCRIPTION[name], f"{e['perplexity']:.2f}", gap, *cols, PAPER[name]])
            + " |"
        )

    one = [n for n in ONESHOT if n in v]
    if one:
        lines += [
            "| variant | what | perplexity | vs dense | strict 2:4 | wall (s) | paper (GPT-2 124M) |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in one:
            e = v[n]
            strict = "–" if n == "dense" else str(e.get("strict_nm"))
            lines.append(row(n, [strict, f"{e['wall_s']:.1f}"]))
        lines.append("")
    for title, names in (
        ("retraining", RETRAIN),
        ("distillation ablation", ("ast_naive", *ABLATION)),
        ("dense fine-tuning controls", CONTROL),
    ):
        names = [n for n in names if n in v]
        if not names:
            continue
        e0 = v[names[0]]
        lines += [
            f"{title.capitalize()}: {cfg['steps']} steps × {cfg['batch_size']} × {cfg['seq_len']} tokens = "
            f"{e0['tokens_seen']:,} tokens per run, lr {cfg['lr']}, λ_max {cfg['max_decay']}, "
            f"T0 {cfg['ramp_steps']} steps, masks refreshed every {cfg['mask_every']} steps, "
            f"mask init {cfg['mask_init']}, dtype {cfg['dtype']}.",
            "",
            "| variant | what | perplexity | vs dense | strict 2:4 | flip rate (last refresh) | "
            "non-zero params | train wall (s) | s/step | paper (GPT-2 124M) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in names:
            e = v[n]
            lines.append(
                row(
                    n,
                    [
                        str(e["strict_nm"]),
                        f"{e['flip_rate_last_refresh']:.2e}",
                        f"{e['params_nonzero']:,}",
                        f"{e['train_wall_s']:.0f}",
                        f"{e['step_s']:.3f}",
                    ],
                )
            )
        lines.append("")
    return "\n".join(lines)
