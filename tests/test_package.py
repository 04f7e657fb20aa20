"""Package guardrails: light imports, public names, the demo runs."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_import_flamingo_pulls_no_deepspeed_or_webdataset():
    code = (
        "import sys, flamingo; from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor; "
        "bad = [m for m in ('deepspeed', 'webdataset', 'accelerate') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_runs_a_real_forward_pass():
    result = subprocess.run(
        [sys.executable, "-m", "flamingo.demo"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("pixel_values", "media_latents", "logits", "trainable", "attn_gate"):
        assert expected in out, expected


def test_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    code += "\nassert out.logits.shape[:2] == batch['input_ids'].shape\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
