"""Tokenizers for ``ast_jax`` models, built with the ``tokenizers`` package.

* GGUF, byte-level BPE (``tokenizer.ggml.model == "gpt2"``): the file carries the vocabulary strings (in the
  byte-to-unicode alphabet of GPT-2, where a space is ``Ġ``), the ranked merges as ``"left right"`` strings,
  a type per token (3 = control/special) and a ``tokenizer.ggml.pre`` tag naming the pre-tokenizer regex.
* GGUF, SentencePiece BPE (``tokenizer.ggml.model == "llama"``): the file carries pieces (a space is ``▁``),
  a score per piece and a type per piece (6 = byte ``<0xNN>``), but no merges. SentencePiece BPE merges the
  adjacent pair whose concatenation is the highest-scoring piece, so the merges are derived from the scores.
* Hugging Face directories: ``tokenizer.json`` (+ ``tokenizer_config.json`` for BOS/EOS and whether a BOS is
  prepended), wrapped in :class:`TextTokenizer`.

:func:`tokenizer_from_gguf` returns a plain ``tokenizers.Tokenizer`` (what existing callers use);
:class:`TextTokenizer` adds the BOS/EOS ids and the ``add_bos`` rule on top of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "TextTokenizer",
    "encode",
    "spm_tokenizer_from_metadata",
    "text_tokenizer_from_gguf",
    "tokenizer_from_gguf",
    "tokenizer_from_hf_dir",
    "tokenizer_from_metadata",
]

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

    ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (:func:`tokenizer_from_metadata`). ``"llama"``:
    SentencePiece BPE with byte fallback (:func:`spm_tokenizer_from_metadata`); when the file asks for a BOS
    (``tokenizer.ggml.add_bos_token``, default True for SentencePiece as in llama.cpp) it is added by the
    tokenizer's post-processor, i.e. by ``tok.encode(text)`` but not by :func:`encode` (which passes
    ``add_special_tokens=False``). Use :func:`text_tokenizer_from_gguf` for a :class:`TextTokenizer`.
    """
    return _gguf_tokenizer(source)[0]


def text_tokenizer_from_gguf(source: Any) -> TextTokenizer:
    """:class:`TextTokenizer` of a GGUF file: :func:`tokenizer_from_gguf` plus
    ``tokenizer.ggml.bos_token_id``, ``eos_token_id`` and ``add_bos_token``
    (default True for ``"llama"``, False for ``"gpt2"``)."""
    inner, bos, eos, add_bos = _gguf_tokenizer(source)
    return TextTokenizer(inner, bos_id=bos, eos_id=eos, add_bos=add_bos and bos is not None)


def _gguf_tokenizer(source: Any) -> tuple[Any, int | None, int | None, bool]:
    import gguf

    reader = source if isinstance(source, gguf.GGUFReader) else _open_reader(source)
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        return default if field is None else field.contents()

    model = get("tokenizer.ggml.model")
    tokens = get("tokenizer.ggml.tokens")
    bos, eos = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    bos = None if bos is None else int(bos)
    eos = None if eos is None else int(eos)
    if model == "gpt2":
        # A vocabulary without merges (one token per byte) is stored without the key: the gguf writer cannot
        # write an empty array.
        merges = get("tokenizer.ggml.merges", [])
        if tokens is None:
            raise ValueError("GGUF file lacks tokenizer.ggml.tokens")
        tok = tokenizer_from_metadata(
            tokens, merges, get("tokenizer.ggml.token_type"), pre=get("tokenizer.ggml.pre", "gpt2")
        )
        return tok, bos, eos, bool(get("tokenizer.ggml.add_bos_token", False))
    if model == "llama":
        scores = get("tokenizer.ggml.scores")
        if tokens is None or scores is None:
            raise ValueError("GGUF file lacks tokenizer.ggml.tokens or tokenizer.ggml.scores")
        add_bos = bool(get("tokenizer.ggml.add_bos_token", True)) and bos is not None
        tok = spm_tokenizer_from_metadata(
            tokens,
            scores,
            get("tokenizer.ggml.token_type"),
            add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
            bos_id=bos if add_bos else None,
        )
        return tok, bos, eos, add_bos
    raise ValueError(
        f"tokenizer.ggml.model is {model!r}; supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)"
    )


# GGUF token types of SentencePiece vocabularies that are ordinary pieces, i.e. results of BPE merges.
_SPM_NORMAL_TYPES = (0, 1)
_SPM_UNKNOWN, _SPM_BYTE = 2, 6


def spm_tokenizer_from_metadata(
    tokens: Sequence[str],
    scores: Sequence[float],
    token_types: Sequence[int] | None = None,
    *,
    add_space_prefix: bool = True,
    bos_id: int | None = None,
) -> Any:
    """Build a SentencePiece-BPE ``tokenizers.Tokenizer`` from GGUF ``"llama"`` vocabulary metadata.

    Merges: a pair ``(a, b)`` is a merge when ``a + b`` is an ordinary piece; merges are ranked by the score
    of ``a + b`` (highest first), splits of one piece by the longer left part first (the order of
    ``transformers``' SentencePiece conversion). Text is normalised by replacing ``" "`` with ``"▁"`` and,
    with ``add_space_prefix``, prepending ``"▁"``; characters outside the vocabulary fall back to their UTF-8
    byte pieces ``<0xNN>`` (type 6). Types 3 (control) and 4 (user-defined) are matched whole in the text.
    With ``bos_id``, the post-processor prepends that token when ``encode`` is called with special tokens.

    Args:
      tokens: pieces, ``tokens[i]`` is the string of id ``i``.
      scores: score of each piece (SentencePiece log-probability; for BPE, higher means merged earlier).
      token_types: GGUF type per piece (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte); all normal
        when ``None``.

    Returns:
      A ``tokenizers.Tokenizer``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    n = len(tokens)
    if len(scores) != n:
        raise ValueError(f"scores has {len(scores)} entries for {n} tokens")
    types = [1] * n if token_types is None else [int(t) for t in token_types]
    if len(types) != n:
        raise ValueError(f"token_types has {len(types)} entries for {n} tokens")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != n:
        raise ValueError("tokens contains duplicate strings; a BPE vocabulary must be one-to-one")
    candidates = []
    for i, piece in enumerate(tokens):
        if types[i] not in _SPM_NORMAL_TYPES:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                candidates.append((-float(scores[i]), -cut, vocab[left], vocab[right], left, right))
    candidates.sort()
    merges = [(c[4], c[5]) for c in candidates]
    unk = next((tokens[i] for i, t in enumerate(types) if t == _SPM_UNKNOWN), None)
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    added = [
        AddedToken(tokens[i], special=t == 3, normalized=False) for i, t in enumerate(types) if t in (3, 4)
    ]
    if added:
        tok.add_tokens(added)
    if bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return tok


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the BOS/EOS ids and the BOS rule of its model.

    Attributes:
      inner: the wrapped ``tokenizers.Tokenizer``.
      bos_id, eos_id: special token ids (``None`` when the model has none); ``eos_ids`` lists every id that
        ends generation (Llama-3 has several), ``eos_ids[0] == eos_id``.
      add_bos: whether :meth:`encode` prepends ``bos_id`` by default (LLaMA-2/Mistral yes; GPT-2, SmolLM2,
        Qwen2 no).
    """

    def __init__(
        self,
        inner: Any,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = False,
        eos_ids: Sequence[int] = (),
    ):
        if add_bos and bos_id is None:
            raise ValueError("add_bos=True needs a bos_id")
        self.inner = inner
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_id = None if eos_id is None else int(eos_id)
        ids = [int(i) for i in eos_ids]
        if self.eos_id is not None and self.eos_id not in ids:
            ids.insert(0, self.eos_id)
        self.eos_ids = tuple(ids)
        self.add_bos = bool(add_bos)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"add_bos={self.add_bos})"
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        """Id of the token string ``token``, ``None`` if it is not in the vocabulary."""
        return self.inner.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> np.ndarray:
        """Token ids ``(n,)`` int32 of ``text``, ``bos_id`` first when ``add_bos`` (default ``self.add_bos``).

        The wrapped tokenizer's post-processor is bypassed (``add_special_tokens=False``) so the BOS rule is
        this object's alone and never doubled.
        """
        ids = self.inner.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos requested but the tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a 1-D sequence of ints)."""
        return self.inner.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens
        )


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _token_string(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict {"content": ...}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _post_processor_bos(post: Any) -> str | None:
    """The token a tokenizer.json post-processor puts before the text, if any."""
    if not isinstance(post, Mapping):
        return None
    kind = post.get("type")
    if kind == "Sequence":
        for p in post.get("processors", []):
            found = _post_processor_bos(p)
            if found is not None:
                return found
        return None
    if kind == "TemplateProcessing":
        single = post.get("single") or []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"].get("id")
        return None
    if kind in ("BertProcessing", "RobertaProcessing"):
        cls = post.get("cls")
        return cls[0] if cls else None
    return None


def tokenizer_from_hf_dir(path: Any) -> TextTokenizer:
    """:class:`TextTokenizer` of a Hugging Face model directory.

    Reads ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``). BOS/EOS: ``bos_token``/``eos_token`` of
    ``tokenizer_config.json`` (or ``special_tokens_map.json``), else ``bos_token_id``/``eos_token_id`` of
    ``generation_config.json`` then ``config.json`` (a list of EOS ids goes to ``eos_ids``). ``add_bos``:
    ``add_bos_token`` of ``tokenizer_config.json`` when present, else whether the ``tokenizer.json``
    post-processor starts the sequence with the BOS token (Llama-3 style), else False.
    """
    from tokenizers import Tokenizer

    path = os.fspath(path)
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise ValueError(f"{path} has no tokenizer.json")
    inner = Tokenizer.from_file(tj)
    tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    smap = _read_json(os.path.join(path, "special_tokens_map.json"))
    gen = _read_json(os.path.join(path, "generation_config.json"))
    mcfg = _read_json(os.path.join(path, "config.json"))

    def special(name: str) -> list[int]:
        text = _token_string(tcfg.get(f"{name}_token")) or _token_string(smap.get(f"{name}_token"))
        if text is not None and inner.token_to_id(text) is not None:
            return [int(inner.token_to_id(text))]
        for source in (gen, mcfg):
            value = source.get(f"{name}_token_id")
            if value is not None:
                return [int(v) for v in value] if isinstance(value, list) else [int(value)]
        return []

    bos, eos = special("bos"), special("eos")
    bos_id = bos[0] if bos else None
    extra_eos = gen.get("eos_token_id", mcfg.get("eos_token_id"))
    eos_ids = list(eos) + [
        int(v) for v in (extra_eos if isinstance(extra_eos, list) else []) if int(v) not in eos
    ]
    if "add_bos_token" in tcfg:
        add_bos = bool(tcfg["add_bos_token"])
    else:
        with open(tj, encoding="utf-8") as fh:
            first = _post_processor_bos(json.load(fh).get("post_processor"))
        add_bos = first is not None and bos_id is not None and inner.token_to_id(first) == bos_id
    return TextTokenizer(
        inner,
        bos_id=bos_id,
        eos_id=eos[0] if eos else None,
        add_bos=add_bos and bos_id is not None,
        eos_ids=eos_ids,
    )


def encode(tokenizer: Any, text: str, add_bos: bool | None = False) -> np.ndarray:
    """Token ids of ``text`` as an int32 array of shape ``(n_tokens,)``, no special tokens but a BOS when
    ``add_bos`` (``None``: the tokenizer's own rule).

    ``tokenizer``: a :class:`TextTokenizer`, or a ``tokenizers.Tokenizer``, which knows no BOS: asking it
    for one is a ``ValueError``.
    """
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer.encode(text, add_bos=add_bos)
    if add_bos:
        raise ValueError(
            "add_bos needs a tokenizer that knows its BOS token (ast_jax.tokenizer.TextTokenizer)"
        )
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def _open_reader(path: str | os.PathLike) -> Any:
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    return gguf.GGUFReader(path)
