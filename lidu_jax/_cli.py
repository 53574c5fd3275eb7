"""Command lines built from config dataclasses: one ``--flag-name`` per field.

Each package carries its own copy of this small module (``ast_jax._cli``, ``lidu_jax._cli``) so that either
package can be used without the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
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


def config_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An `argparse` parser with one flag per field of the dataclass ``cls``.

    ``field_name`` becomes ``--field-name`` with the field's default; ``bool`` fields get ``--x/--no-x``
    (a ``no_x`` field: the switch ``--no-x``);
    ``T | None`` fields also accept ``none``; a field's ``metadata["help"]`` is its help text. Parse with
    ``cls(**vars(parser.parse_args(argv)))`` so the dataclass validates the values.
    """
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _base_type(hints[f.name])
        help_text = f.metadata.get("help", " ")  # a non-empty help lets the formatter show the default
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
