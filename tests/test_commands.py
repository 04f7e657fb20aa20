"""The commands a user types first answer at once: ``--help`` and a bad command line are
answered before torch and transformers are imported (they took 15-24 s, then 7 s here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# runs a command's entry as `python train.py ...` / `python -m eval.run ...` would, then says
# how it ended and whether torch was imported on the way
PROBE = """
import json, runpy, sys
target, argv = sys.argv[1], sys.argv[2:]
try:
    if target.endswith(".py"):
        sys.argv = [target, *argv]
        runpy.run_path(target, run_name="__main__")
    else:
        sys.argv = [target, *argv]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("command", ["train.py", "eval.run"])
@pytest.mark.parametrize(
    ("argv", "code"), [(["--help"], 0), ([], 2), (["--config", "x.yaml", "--nope"], 2)]
)
def test_help_and_usage_errors_answer_before_torch_is_imported(command, argv, code):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, command, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ended = json.loads(done.stdout.strip().splitlines()[-1])
    assert ended == {"code": code, "torch": False}, done.stderr[-2000:]
    assert ("usage:" in done.stdout + done.stderr) and "Traceback" not in done.stderr


def test_the_demo_command_describes_the_demo_make_runs(capsys):
    """``python -m flamingo.demo --help`` described an older ``make demo``; the program the
    Makefile's demo target runs now describes itself, every stage it runs included."""
    from demo import run

    recipe = (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    assert "-m demo.run" in recipe
    with pytest.raises(SystemExit) as ended:
        run.main(["--help"])
    shown = capsys.readouterr().out
    assert ended.value.code == 0 and "make demo" in shown
    for stage in run.STAGES:
        assert f"\n  {stage} " in shown, stage
