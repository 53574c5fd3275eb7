"""docs/results-lidu.md is exactly what benchmarks/lidu_report.py writes from the committed JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
