"""Both quickstart notebooks execute end to end (tiny settings injected after their ``parameters`` cell)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

TINY = {
    "lidu_quickstart.ipynb": "N_USERS = 48\nN_ITEMS = 60\nN_SEEDS = 3\nEPOCHS = 2\nK = 5\nGRID_SIZE = 64",
    "ast_quickstart.ipynb": (
        "TEACHER_STEPS = 0\nSTEPS = 3\nBATCH = 8\nSEQ_LEN = 16\nD_MODEL = 32\nN_LAYER = 1\n"
        'MAX_BYTES = 20_000\nEVAL_WINDOWS = 4\nMESH = "data=-1,fsdp=1"'
    ),
}


def test_notebooks_are_generated_from_the_script(tmp_path):
    # The committed notebooks are exactly what make_notebooks.py writes (they cannot drift apart).
    script = NOTEBOOKS / "make_notebooks.py"
    code = script.read_text().replace(
        "HERE = Path(__file__).resolve().parent", f"HERE = Path({str(tmp_path)!r})"
    )
    gen = tmp_path / "gen.py"
    gen.write_text(code)
    subprocess.run([sys.executable, str(gen)], check=True, capture_output=True, timeout=120)
    for name in TINY:
        assert json.loads((tmp_path / name).read_text()) == json.loads((NOTEBOOKS / name).read_text()), name


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_executes(name, monkeypatch):
    # The kernel must import this checkout (installed or not), so its install cell is a no-op here.
    repo = str(NOTEBOOKS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    # Two virtual CPU devices: a real 2-device mesh (users / batch sharded), cheaper to compile than eight.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "pip" in first_code.source and "find_spec" in first_code.source  # Colab install cell
    assert any("default_backend" in c.source for c in nb.cells)  # TPU/GPU/CPU detection
    nb.cells.insert(params[0] + 1, new_code_cell(TINY[name]))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "already importable" in text
    if name.startswith("lidu"):
        assert "Kendall tau(-LiDu, NDCG@5)" in text
    else:
        assert "2:4 + int4 export" in text and "strict 2:4: True" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook draws its plots"
