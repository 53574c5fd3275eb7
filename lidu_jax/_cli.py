"""Command lines built from config dataclasses: one ``--flag-name`` per field.

Each package carries its own copy of this small module (``ast_jax._cli``, ``lidu_jax._cli``) so that either
package can be used without the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any


def _base_type(tp: Any) -> tuple[type, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _converter(tp: type, optional: bool, flag: str):
    def convert(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected {tp.__name__}, got {text!r}") from None

    return convert


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose ``--flag`` shows ``help`` (and its default) in ``--help``."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def config_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An `argparse` parser with one flag per field of the dataclass ``cls``.

    ``field_name`` becomes ``--field-name`` with the field's default; ``bool`` fields get ``--x/--no-x``
    (a ``no_x`` field: the switch ``--no-x``);
    ``T | None`` fields also accept ``none``; a field's ``metadata["help"]`` is its help text (required:
    a field without one is a ``ValueError`` here, so no flag goes undocumented). Parse with
    ``cls(**vars(parser.parse_args(argv)))`` so the dataclass validates the values.
    """
    p = _OneLineErrorParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _base_type(hints[f.name])
        help_text = f.metadata.get("help")
        if not help_text:
            raise ValueError(f"{cls.__name__}.{f.name}: no help text (metadata['help']) for {flag}")
        if tp is bool and f.name.startswith("no_"):  # "--no-x" already reads as a switch
            action = "store_false" if f.default else "store_true"
            p.add_argument(flag, dest=f.name, action=action, default=f.default, help=help_text)
        elif tp is bool:
            p.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            conv = _converter(tp, optional, flag)
            p.add_argument(
                flag, dest=f.name, type=conv, default=f.default, help=help_text, metavar=tp.__name__.upper()
            )
    return p


class _OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr (``prog: error: ...``) and exit code 2, no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_cli(
    parser: argparse.ArgumentParser,
    build: Callable[[dict[str, Any]], Any],
    body: Callable[[Any], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, build the config, run ``body(config)``; return the process exit code.

    A user error is one line on stderr (``prog: error: message``), never a traceback: exit 2 for a
    rejected flag value or setting (``ValueError``/``TypeError`` from ``build``; ``ValueError`` or
    ``OSError`` such as a missing file from ``body``); an exception carrying an ``exit_code`` attribute
    (e.g. a training failure) exits with that code. Anything else is a bug and keeps its traceback.
    """
    ns = parser.parse_args(argv)
    try:
        config = build(vars(ns))
    except (ValueError, TypeError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        code = body(config)
    except Exception as e:
        exit_code = getattr(e, "exit_code", None)
        if isinstance(exit_code, int):
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return exit_code
        if isinstance(e, (ValueError, OSError)):
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0 if code is None else int(code)
