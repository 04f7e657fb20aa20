"""examples/quickstart.ipynb runs top to bottom against a tiny checkpoint."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT, build, set_gates


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    model = build()
    set_gates(model, 0.5)
    model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setenv("FLAMINGO_CHECKPOINT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    try:
        client.execute()
    except Exception as e:  # show the failing cell's traceback
        pytest.fail(f"notebook failed: {e}")
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert "caption:" in outputs and "answer:" in outputs and "' green'" in outputs
