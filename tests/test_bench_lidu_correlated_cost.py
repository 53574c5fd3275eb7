"""benchmarks/bench_lidu_correlated_cost.py at a tiny size: both timings and their ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_lidu_correlated_cost as bench


def test_members_move_items_together():
    s = bench.members(5, 3, 500)
    assert s.shape == (5, 3, 500) and s.dtype == np.float32
    # The shared item factor makes two users' deviations from the member mean correlated across items.
    dev = s - s.mean(0)
    r = np.corrcoef(dev[:, 0].ravel(), dev[:, 1].ravel())[0, 1]
    assert r > 0.3


def test_tiny_run_writes_both_timings_and_their_ratio(tmp_path):
    out = bench.main(["--users", "8", "--items", "40", "--repeats", "1", "--json", str(tmp_path / "c.json")])
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["n_draws"] == 8 and set(saved["median_s"]) == {"exact", "correlated"}
    med = saved["median_s"]
    assert saved["ratio_correlated_over_exact"] == med["correlated"] / med["exact"]  # JSON keeps floats exact
    assert out["ratio_correlated_over_exact"] > 0
