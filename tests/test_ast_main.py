"""A tiny end-to-end run of ``python -m ast_jax`` (in-process): flags, JSON keys, strict 2:4, plots."""

import json

import pytest

from ast_jax.__main__ import MainConfig, format_table, main, parse_config

TINY = [
    "--max-bytes", "30000", "--n-layer", "1", "--d-model", "16", "--n-head", "2", "--seq-len", "16",
    "--batch-size", "4", "--teacher-steps", "20", "--teacher-eval-every", "10", "--steps", "10",
    "--mask-every", "5", "--ramp-steps", "5", "--slorb-k", "4", "--eval-windows", "8", "--no-progress",
    "--fast-compile",  # compilation dominates a 10-step run on CPU
]  # fmt: skip


def test_flags_map_one_to_one_onto_the_config():
    cfg = parse_config(["--max-decay", "0.5", "--no-plots", "--text", "x.txt", "--extra-variants", "ste_kl"])
    assert cfg == MainConfig.from_flags(max_decay=0.5, no_plots=True, text="x.txt", extra_variants="ste_kl")
    assert (cfg.sparsity.max_decay, cfg.run.no_plots, cfg.data.text) == (0.5, True, "x.txt")
    assert parse_config(["--teacher-steps", "7"]).teacher.steps == 7  # the teacher's flags carry its prefix
    assert parse_config([]) == MainConfig()
    with pytest.raises(ValueError, match="extra-variants"):
        MainConfig.from_flags(extra_variants="nope")
    with pytest.raises(ValueError, match="slorb-k"):
        MainConfig.from_flags(d_model=24, slorb_k=16)


def test_tiny_main_job_writes_the_issue_keys(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main([*TINY, "--json", str(out), "--out-dir", str(tmp_path / "plots")]) == 0
    res = json.loads(out.read_text())
    assert set(res["perplexity"]) == {
        "dense",
        "magnitude_oneshot",
        "fixed_mask_ce",
        "ast_naive",
        "ast_boosted",
    }
    assert all(v > 1.0 for v in res["perplexity"].values())
    assert res["strict_2of4"] is True
    assert set(res["orderings"]) == {
        "ast_naive < fixed_mask_ce",
        "fixed_mask_ce < magnitude_oneshot",
        "ast_boosted <= ast_naive",
    }
    assert res["params"]["ast_naive"] < res["params"]["dense"] < 2 * res["params"]["ast_naive"]
    assert res["params"]["ast_boosted"] > res["params"]["ast_naive"]
    assert res["flip_rate_last_refresh"]["fixed_mask_ce"] == 0.0
    assert 0.0 <= res["flip_rate_vs_initial"]["ast_naive"] <= 1.0
    assert all((tmp_path / "plots" / f).is_file() for f in ("loss.png", "flips_decay.png"))
    table = capsys.readouterr().out
    assert "| ast_boosted |" in table and "strict 2:4 on every sparse kernel: True" in table
    assert format_table(res).count("\n") == 6
