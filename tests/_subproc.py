"""Helpers for tests that start training runs in fresh Python processes (kill/resume, multi-process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One tiny run shared by the checkpoint, sharding and distributed tests. The in-process single-device run of
# these settings is compiled once per session (see the ``tiny_reference`` fixture in conftest.py); child
# processes share a persistent compilation cache.
TINY_STEPS, TINY_SAVE_EVERY = 12, 3
TINY_ARGS = [
    "--teacher-steps", "0", "--batch-size", "8", "--seq-len", "16", "--n-layer", "1", "--d-model", "32",
    "--n-head", "2", "--eval-windows", "0", "--log-every", "1", "--lr", "3e-3", "--mask-every", "2",
    "--min-shard-size", "64", "--steps", str(TINY_STEPS), "--save-every", str(TINY_SAVE_EVERY), "--keep", "2",
]  # fmt: skip


def jax_env(n_devices: int, cache_dir: Path) -> dict[str, str]:
    """Environment for a child JAX process: ``n_devices`` virtual CPU devices, a shared compile cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ast_jax.train", *args]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``python -m ast_jax.train ARGS``; stdout is a pipe (read by line), stderr goes to ``log``."""
    return subprocess.Popen(
        train_cmd(*args), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True
    )


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 240.0) -> list[str]:
    """Read ``proc``'s stdout until a line starts with ``prefix``; return the lines read."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended before printing {prefix!r}; output: {''.join(lines)}")
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"timed out waiting for {prefix!r}")


def run_to_end(args: list[str], env: dict[str, str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
