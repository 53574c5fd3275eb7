"""The two packages stay independent (neither imports the other) and the few helpers each has to carry for
that are identical copies: a copy is the price of independence, and these tests keep it from drifting."""

from __future__ import annotations

import ast
import difflib
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ast_jax", "lidu_jax")


def _diff(a: str, b: str, name_a: str, name_b: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), name_a, name_b))


def test_cli_modules_are_byte_identical():
    """``ast_jax/_cli.py`` and ``lidu_jax/_cli.py`` (config dataclass -> argparse, one error line, exit
    statuses) are one module kept in two places; a change must be made to both."""
    a, b = (REPO / "ast_jax/_cli.py").read_bytes(), (REPO / "lidu_jax/_cli.py").read_bytes()
    assert a == b, "edit both copies alike:\n" + _diff(
        a.decode(), b.decode(), "ast_jax/_cli.py", "lidu_jax/_cli.py"
    )


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_neither_package_imports_the_other(package):
    """The reason the copies exist: installing or importing one package never needs the other."""
    (other,) = set(PACKAGES) - {package}
    offenders = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in _imported_modules(path)
        if name == other or name.startswith(other + ".")
    ]
    assert not offenders, offenders


# Host <-> mesh helpers both sharding modules need (host array -> global sharded array, and back on every
# process). They live once per package: `ast_jax.sharding` and `lidu_jax.sharding`.
HOST_HELPERS = ("host_to_global", "to_host")


def test_host_helpers_are_identical_copies():
    import ast_jax.sharding
    import lidu_jax.sharding

    for name in HOST_HELPERS:
        a = inspect.getsource(getattr(ast_jax.sharding, name))
        b = inspect.getsource(getattr(lidu_jax.sharding, name))
        assert a == b, _diff(a, b, f"ast_jax.sharding.{name}", f"lidu_jax.sharding.{name}")
