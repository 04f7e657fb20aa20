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


def test_the_notebook_finds_the_demo_model_from_any_folder(monkeypatch):
    """It pointed at runs/demo/flamingo, relative to the working directory: the demo writes
    its model to runs/demo/flamingo/model, and Jupyter runs a notebook in its own folder."""
    from pathlib import Path

    from demo.run import DEFAULT_OUT

    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    first = next(cell for cell in nb.cells if cell.cell_type == "code")
    monkeypatch.delenv("FLAMINGO_CHECKPOINT", raising=False)
    monkeypatch.chdir(ROOT / "examples")
    namespace: dict = {}
    exec(first.source, namespace)
    assert Path(namespace["CHECKPOINT"]) == ROOT / DEFAULT_OUT / "flamingo" / "model"


def test_the_docs_llava_stage_2_reads_what_the_converter_writes():
    """The docs' LLaVA stage-2 command read shards/llava-*.tar; the conversations converter,
    as the docs run it (--out shards/llava), writes shards/llava/conversations-*.tar."""
    import fnmatch
    import re

    from data_prep.conversations import make_parser

    readme = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    (command,) = re.findall(r"python -m data_prep\.conversations [^\n]*", readme)
    args = make_parser().parse_args(command.split()[3:])
    written = f"{args.out}/{args.prefix}-00000.tar"
    (stage2,) = re.findall(r'kind: conversation, shards: "([^"]+)"', readme)
    assert fnmatch.fnmatch(written, stage2), (written, stage2)
