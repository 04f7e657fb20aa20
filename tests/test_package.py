"""Package guardrails: light imports, public names, the demo runs."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_import_flamingo_pulls_no_deepspeed_or_webdataset():
    # wandb: timm (under open_clip) imports it when installed, 1.1 s; flamingo/quiet_imports.py
    heavy = ("deepspeed", "webdataset", "accelerate", "wandb")
    # one fresh process: what transformers' own imports pull (4.x imports accelerate in
    # modeling_utils: not ours to avoid), then what importing flamingo adds to that
    code = (
        "import sys\n"
        f"heavy = {heavy!r}\n"
        "from transformers import AutoModelForCausalLM, PreTrainedModel\n"
        "before = {m for m in heavy if m in sys.modules}\n"
        "import flamingo\n"
        "from flamingo import Flamingo, FlamingoConfig\n"
        "print(','.join(sorted({m for m in heavy if m in sys.modules} - before)))\n"
        # timm's summary writer still reaches the real wandb, and importing it still works
        "import importlib.util, timm.utils.summary as summary\n"
        "if importlib.util.find_spec('wandb'):\n"
        "    import wandb\n"
        "    assert summary.wandb.log is wandb.log and wandb.__spec__ is not None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    added = result.stdout.strip()
    assert not added, f"import flamingo pulls {added}"


def test_demo_runs_a_real_forward_pass(capsys):
    from demo import model_smoke

    model_smoke.main([])
    out = capsys.readouterr().out
    for expected in ("pixel_values", "media_latents", "logits", "trainable", "attn_gate"):
        assert expected in out, expected


def test_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {"__name__": "__main__"}  # its own names: its imports must be its own
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].logits.shape[:2] == namespace["batch"]["input_ids"].shape
