"""Text data for the small AST runs: a built-in corpus every machine has, byte tokens, exact-resume batches.

The built-in corpus is the docstrings (module, class and function) of the public pure-Python modules of the
running interpreter's standard library, read with ``ast`` from the ``.py`` files in sorted file order. It
needs no download, is real English technical prose (0.79 MB on CPython 3.11.7) and is the same on every
machine with the same Python version. ``--text PATH`` replaces it with the user's own UTF-8 text.

Tokens are bytes (vocabulary 256), so any text works and decoding is exact. The split is deterministic: the
text is cut into blocks of ``block_bytes`` and every ``round(1 / heldout_fraction)``-th block is held out,
so both parts sample the whole corpus. Training batches are a pure function of an integer ``position``
(:func:`batch_at`), so a run's data stream is resumed exactly by storing that integer.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import sysconfig
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = [
    "VOCAB_SIZE",
    "BatchIterator",
    "TextData",
    "batch_at",
    "builtin_corpus",
    "decode",
    "encode",
    "eval_batches",
    "load_text_data",
    "split_tokens",
]

VOCAB_SIZE = 256


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as a ``uint8`` array ``(N,)``."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: np.ndarray) -> str:
    """Inverse of :func:`encode` (invalid UTF-8 sequences, e.g. from sampling, become U+FFFD)."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


def builtin_corpus(max_bytes: int | None = None) -> str:
    """Docstrings of the public ``.py`` modules of this Python's standard library, in sorted file order.

    Each docstring is followed by a blank line. ``max_bytes`` truncates the result (for quick tests).
    """
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise ValueError(f"no standard-library sources found under {lib}; pass a text file instead")
    parts: list[str] = []
    size = 0
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a damaged or non-UTF-8 file must not break the corpus; skipping keeps it deterministic
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc + "\n\n")
                    size += len(parts[-1])
        if max_bytes is not None and size >= max_bytes:
            break
    text = "".join(parts)
    return text if max_bytes is None else text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def split_tokens(
    tokens: np.ndarray, heldout_fraction: float = 0.1, block_bytes: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split: every ``round(1/heldout_fraction)``-th block of ``block_bytes`` is held out.

    Returns ``(train (N_train,), heldout (N_heldout,))`` ``uint8`` arrays (blocks concatenated in order).
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    every = max(round(1 / heldout_fraction), 2)
    n_blocks = -(-len(tokens) // block_bytes)
    held = np.zeros(len(tokens), bool)
    for b in range(every - 1, n_blocks, every):
        held[b * block_bytes : (b + 1) * block_bytes] = True
    return tokens[~held], tokens[held]


@dataclasses.dataclass(frozen=True)
class TextData:
    """Byte tokens of a corpus, split into ``train`` and ``heldout`` (``uint8`` arrays), and where it came
    from."""

    train: np.ndarray
    heldout: np.ndarray
    source: str

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE


def load_text_data(
    text_path: str | pathlib.Path | None = None,
    *,
    heldout_fraction: float = 0.1,
    block_bytes: int = 2048,
    max_bytes: int | None = None,
    tokenizer: Any = None,
) -> TextData:
    """The built-in corpus (``text_path=None``) or a user's UTF-8 text file, tokenised and split.

    Tokens are bytes unless ``tokenizer`` (a :class:`~ast_jax.tokenizer.TextTokenizer` or a
    ``tokenizers.Tokenizer``, see :func:`ast_jax.tokenizer.encode`) is given: then its ids (int32, no special
    tokens), and ``block_bytes`` counts tokens.
    """
    if text_path is None:
        text, source = builtin_corpus(max_bytes), "python-stdlib-docstrings"
    else:
        path = pathlib.Path(text_path)
        if not path.is_file():
            raise ValueError(f"text_path {str(path)!r} is not a file")
        text, source = path.read_text(encoding="utf-8", errors="replace"), str(path)
        if max_bytes is not None:
            text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    if tokenizer is None:
        tokens = encode(text)
    else:
        from ast_jax.tokenizer import encode as token_ids

        tokens = token_ids(tokenizer, text)
    train, heldout = split_tokens(tokens, heldout_fraction, block_bytes)
    return TextData(train=train, heldout=heldout, source=source)


def _check_window(tokens: np.ndarray, seq_len: int, name: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{name} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")


def batch_at(
    tokens: np.ndarray, position: int, batch_size: int, seq_len: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Training batch number ``position``: ``{"inputs", "targets"}``, int32 ``(batch_size, seq_len)`` each.

    Window starts are drawn uniformly by ``np.random.default_rng([seed, position])``, so the batch depends on
    ``(seed, position)`` only; ``targets`` are ``inputs`` shifted by one token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    _check_window(tokens, seq_len, "training tokens")
    rng = np.random.default_rng([seed, position])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class BatchIterator:
    """Infinite iterator over :func:`batch_at` batches; ``position`` is the next batch's index (checkpoint it,
    and build a new iterator with ``position=saved`` to resume exactly)."""

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, position: int = 0
    ) -> None:
        _check_window(tokens, seq_len, "training tokens")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.position = int(position)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = batch_at(self.tokens, self.position, self.batch_size, self.seq_len, self.seed)
        self.position += 1
        return batch


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_windows: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Non-overlapping windows over ``tokens`` in order (the tail shorter than a window is dropped), grouped
    into batches of at most ``batch_size``; each window predicts ``seq_len`` tokens. Deterministic."""
    _check_window(tokens, seq_len, "evaluation tokens")
    n_windows = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    starts = np.arange(n_windows) * seq_len
    for i in range(0, n_windows, batch_size):
        s = starts[i : i + batch_size]
        windows = tokens[s[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
        yield {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
