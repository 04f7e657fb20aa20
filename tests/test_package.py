"""Package guardrails: light imports, public names, the demo runs."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_import_flamingo_pulls_no_deepspeed_or_webdataset():
    heavy = ("deepspeed", "webdataset", "accelerate")

    def imported(imports: str) -> set[str]:
        code = f"import sys; {imports}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr
        return set(filter(None, result.stdout.strip().split(",")))

    # transformers 4.x imports accelerate itself (modeling_utils): not ours to avoid
    by_transformers = imported("from transformers import AutoModelForCausalLM, PreTrainedModel")
    ours = imported("import flamingo; from flamingo import Flamingo, FlamingoConfig")
    assert not ours - by_transformers, f"import flamingo pulls {sorted(ours - by_transformers)}"


def test_demo_runs_a_real_forward_pass():
    result = subprocess.run(
        [sys.executable, "-m", "demo.model_smoke"],
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
