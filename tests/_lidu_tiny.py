"""The tiny interaction file and the study flags that the lidu command-line tests share (the
``lidu_tiny_file`` fixture of ``conftest.py`` writes the file once per session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Small enough that a whole study cell runs in seconds: two-seed ensembles, a coarse grid, exact LiDu only.
TINY_STUDY_FLAGS = [
    "--k-core", "2", "--n-models", "2", "--k", "5", "--grid-size", "32", "--n-boot", "20",
    "--lidu-variants", "exact",
]  # fmt: skip


def write_tiny_file(path: Path) -> Path:
    """60 users x 40 items, one "user item1 item2 ..." line per user (time-ordered); user u prefers items of
    group u % 4, so the models have something to learn. Returns ``path``."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, 61):
        group = np.arange(40)[np.arange(40) % 4 == u % 4]
        items = dict.fromkeys(int(i) + 1 for i in rng.choice(group, 8, replace=False))
        lines.append(" ".join(map(str, [u, *items])))
    path.write_text("\n".join(lines) + "\n")
    return path


def study_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """``python -m lidu_jax.study`` arguments: a tiny run on ``data`` writing to ``out``, then ``extra``."""
    return ["--data", str(data), *TINY_STUDY_FLAGS, *extra, "--out-dir", str(out), "--no-progress"]
