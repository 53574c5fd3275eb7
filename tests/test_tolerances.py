"""Every float comparison in the test suite states its absolute tolerance (issue 12, item 14).

``np.testing.assert_allclose`` and ``chex.assert_trees_all_close`` default to ``atol=0``: a purely relative
check of a float32 reduction (a dot product, a sum, a std) fails wherever the value lands near zero as soon as
a BLAS kernel or XLA fusion sums in another order. This scans the source of every test module, so a new
comparison without ``atol`` fails here on every machine, not only on the one whose kernel exposes it.
"""

import ast
from pathlib import Path

TESTS = Path(__file__).parent
CHECKED = ("assert_allclose", "assert_trees_all_close")


def _missing_atol(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
        if called in CHECKED and "atol" not in {k.arg for k in node.keywords}:
            lines.append(node.lineno)
    return lines


def test_the_scanner_finds_a_comparison_without_atol():
    bad = (
        "import numpy as np\nnp.testing.assert_allclose(a, b, rtol=1e-5)\nchex.assert_trees_all_close(a, b)\n"
    )
    good = "np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)\n"
    assert _missing_atol(bad) == [2, 3]
    assert _missing_atol(good) == []


def test_every_float_comparison_states_an_absolute_tolerance():
    missing = [
        f"tests/{path.name}:{line}"
        for path in sorted(TESTS.glob("*.py"))
        for line in _missing_atol(path.read_text(encoding="utf-8"))
    ]
    assert not missing, f"float comparisons with the default atol=0: {missing}"
