"""benchmarks/bench_lidu_gpu.py at a tiny size on the CPU: its JSON, the CPU agreement, and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _subproc import REPO, jax_env

SCRIPT = REPO / "benchmarks" / "bench_lidu_gpu.py"
TINY = ["--users", "600", "--items", "300", "--grid", "64", "--chunk-size", "256", "--check-users", "100",
        "--cpu-users", "200", "--numpy-users", "3"]  # fmt: skip


def _run(out: Path, cache: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the script with ``TINY`` plus ``extra`` on one CPU device; its completed process and JSON."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--json", str(out), *extra],
        env=jax_env(1, cache),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, jax_subprocess_cache) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("bench_lidu_gpu") / "tiny.json"
    proc, result = _run(out, jax_subprocess_cache)
    return proc, result, jax_subprocess_cache


def test_tiny_run_reports_everything_and_agrees(tiny_run):
    proc, result, _ = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result["stage"] == "done"
    assert {"device_kind", "platform", "jax_version", "accelerator"} <= result["device"].keys()
    assert result["device"]["platform"] == "cpu" and not result["device"]["accelerator"]
    chunked = result["chunked"]
    for key in ("users_per_s", "compile_s", "first_call_s", "generation_s", "lidu_s", "peak_memory"):
        assert key in chunked
    assert chunked["users_done"] == 600 and chunked["complete"] and chunked["finite"]
    assert chunked["peak_memory"] is None  # the CPU keeps no memory_stats
    assert chunked["loop_backend_compiles"] == 0  # one compilation, before the timed loop
    assert result["cpu"]["users"] == 256 and result["cpu"]["cores"] >= 1 and result["cpu"]["users_per_s"] > 0
    agree = result["agreement"]
    assert agree["users"] == 100 and agree["max_abs"] <= 1e-4 and agree["max_rel"] <= 1e-4
    assert result["numpy_check"]["max_abs"] <= 1e-4
    assert result["speedup"] > 0
    assert result["goals"]["agreement"] == "PASS"
    assert set(result["goals"]) == {"agreement", "speedup", "compile"}
    assert "agreement with the CPU on 100 users" in proc.stdout and "no accelerator" in proc.stdout


def test_failed_agreement_exits_nonzero(tiny_run, tmp_path):
    _, _, cache = tiny_run  # second run of the same shapes: compiled programs come from the shared cache
    proc, result = _run(tmp_path / "bad.json", cache, "--perturb", "1e-3", "--numpy-users", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert result["goals"]["agreement"] == "FAIL"
    assert result["agreement"]["max_abs"] == pytest.approx(1e-3, rel=1e-3)
