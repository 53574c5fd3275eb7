"""Flax models of ``ast_jax`` and loaders of pretrained checkpoints.

``from_pretrained(path)`` (see :mod:`ast_jax.models.hf`) loads a Hugging Face model directory; it is imported
lazily so that ``import ast_jax.models.llama`` stays cheap.
"""

from typing import Any

__all__ = ["from_pretrained"]


def from_pretrained(path: Any, **kwargs: Any) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """Load a Hugging Face model directory: ``(model, params, tokenizer, hf_config)``.

    See :func:`ast_jax.models.hf.from_pretrained` for the arguments.
    """
    from ast_jax.models.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
