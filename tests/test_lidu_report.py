"""docs/results-lidu.md is exactly what benchmarks/lidu_report.py writes from the committed JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_results_page_is_generated_from_the_committed_json():
    # A hand edit of the page, or JSON committed without regenerating it, makes the two disagree.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lidu_report.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_verdicts_follow_the_paired_interval():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import lidu_report
    finally:
        sys.path.pop(0)
    # tau_diff = tau(baseline) - tau(LiDu): above 0 = LiDu behind, below 0 = ahead, containing 0 = tie
    assert lidu_report._verdict({"tau_diff_ci": [0.01, 0.05]}) == "L"
    assert lidu_report._verdict({"tau_diff_ci": [-0.05, -0.01]}) == "W"
    assert lidu_report._verdict({"tau_diff_ci": [-0.01, 0.02]}) == "T"


def test_a_sample_run_must_be_its_grid_cell_on_fewer_users(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import lidu_report
    finally:
        sys.path.pop(0)
    import json
    import shutil

    (tmp_path / "grid").mkdir()
    (tmp_path / "correlated_sample").mkdir()
    src = ROOT / "docs" / "measured" / "lidu16" / "grid" / "beauty_bpr_ensemble.json"
    shutil.copy(src, tmp_path / "grid" / src.name)
    cell = json.loads(src.read_text())
    sample = dict(cell, config=dict(cell["config"], max_eval_users=5000, lidu_variants="exact,correlated"))
    (tmp_path / "correlated_sample" / src.name).write_text(json.dumps(sample))
    assert list(lidu_report._sample_cells(tmp_path)) == [("beauty", "bpr")]
    # A different ensemble (here: more epochs) is not the grid's model: refused, naming the setting.
    sample["config"]["epochs"] += 1
    (tmp_path / "correlated_sample" / src.name).write_text(json.dumps(sample))
    with pytest.raises(
        ValueError, match="differs from its grid cell, which was run with --epochs=15, this run has 16"
    ):
        lidu_report._sample_cells(tmp_path)
