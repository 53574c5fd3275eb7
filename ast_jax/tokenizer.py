"""Byte-level BPE tokenizers rebuilt from GGUF metadata with the ``tokenizers`` package.

A GGUF file of a GPT-2-style model (``tokenizer.ggml.model == "gpt2"``) carries the whole tokenizer: the
vocabulary strings (in the byte-to-unicode alphabet of GPT-2, where a space is ``Ġ``), the ranked merges as
``"left right"`` strings, a type per token (3 = control/special) and a ``tokenizer.ggml.pre`` tag naming the
pre-tokenizer regex. This module turns that metadata into a ``tokenizers.Tokenizer`` with the same behaviour,
so text can be encoded without the original ``tokenizer.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["encode", "tokenizer_from_gguf", "tokenizer_from_metadata"]

# GGUF token types (llama.cpp's llama_token_type): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
# 6 byte. Control and user-defined tokens are matched whole in the input text before BPE.
_SPECIAL_TYPES = (3, 4)

# llama.cpp pre-tokenizer tags and what they mean. "digits" splits every digit into its own piece before the
# GPT-2 regex runs (llama.cpp's "\p{N}" expression); every entry here then applies the GPT-2 regex
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# which is what ``pre_tokenizers.ByteLevel(use_regex=True)`` implements.
_PRE_TOKENIZERS = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "jais": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "command-r": "digits",
    "codeshell": "digits",
    "exaone": "digits",
    "minerva": "digits",
}


def tokenizer_from_metadata(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None = None,
    *,
    pre: str = "gpt2",
) -> Any:
    """Build a byte-level BPE ``tokenizers.Tokenizer`` from GGUF-style vocabulary metadata.

    Args:
      tokens: the vocabulary, ``tokens[i]`` is the byte-level string of id ``i``.
      merges: ranked merge rules ``"left right"`` (rank = position in the list).
      token_types: GGUF type per token; types 3 (control) and 4 (user-defined) become special tokens that are
        matched whole in the text and never split.
      pre: the ``tokenizer.ggml.pre`` tag (``"gpt2"``, ``"smollm"``, ...), see ``_PRE_TOKENIZERS``.

    Returns:
      A ``tokenizers.Tokenizer``: ``encode(text).ids`` gives token ids, ``decode(ids)`` the text back.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; known: {sorted(_PRE_TOKENIZERS)}"
        )
    if token_types is not None and len(token_types) != len(tokens):
        raise ValueError(f"token_types has {len(token_types)} entries for {len(tokens)} tokens")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokens contains duplicate strings; a BPE vocabulary must be one-to-one")
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merge #{rank} {merge!r} is not of the form 'left right'")
        pairs.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre] == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    if token_types is not None:
        special = [tokens[i] for i, t in enumerate(token_types) if int(t) in _SPECIAL_TYPES]
        if special:
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return tok


def tokenizer_from_gguf(source: Any) -> Any:
    """The tokenizer stored in a GGUF file (path or ``gguf.GGUFReader``) as a ``tokenizers.Tokenizer``.

    Requires ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE). No BOS token is added by ``encode``; SmolLM2
    itself sets ``tokenizer.ggml.add_bos_token = False``.
    """
    import gguf

    reader = source if isinstance(source, gguf.GGUFReader) else _open_reader(source)
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        return default if field is None else field.contents()

    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    tokens = get("tokenizer.ggml.tokens")
    merges = get("tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise ValueError("GGUF file lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    return tokenizer_from_metadata(
        tokens, merges, get("tokenizer.ggml.token_type"), pre=get("tokenizer.ggml.pre", "gpt2")
    )


def encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of ``text`` as an int32 array of shape ``(n_tokens,)`` (no special tokens added)."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def _open_reader(path: str | os.PathLike) -> Any:
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    return gguf.GGUFReader(path)
