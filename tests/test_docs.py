"""The README and the docs site: short, built strictly, and their commands run as written.

The README's first Python block runs in tests/test_package.py; here its training block runs
verbatim (in a scratch folder), and every other command it shows (they need data, the Hub or
GPUs) is at least parsed by the program it calls, so a flag or path that drifts fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.helpers.docs import blocks, check_command, commands

README = ROOT / "README.md"


def readme(language: str) -> list[str]:
    """The README's blocks in ``language`` (the docs pages' reader, tests/helpers/docs.py)."""
    return [block.code for block in blocks(README) if block.language == language]


def test_the_readme_is_short_and_indexes_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", text))
    assert set(pages) - {"index.md"} <= linked, set(pages) - linked


def test_the_site_builds_strictly(tmp_path):
    """mkdocs.yml is strict and validates links, anchors and pages missing from the nav."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "results" / "index.html").is_file()


def test_the_readme_training_block_runs_as_written(tmp_path, monkeypatch):
    """The first training run of the quick start: the tiny shards, 20 steps, a resume to 40,
    in a folder of its own (the configs and train.py linked in), each command as written."""
    import train
    from data_prep import tiny

    (block,) = [b for b in readme("bash") if "data_prep.tiny" in b]
    for name in ("configs", "train.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in commands(block):
        if argv[:3] == ["python", "-m", "data_prep.tiny"]:
            tiny.main(argv[3:])
        else:
            assert argv[:2] == ["python", "train.py"], argv
            train.main(argv[2:])
        ran.append(argv)
    assert len(ran) == 3
    steps = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").glob("step-*"))
    assert steps[-1] == "step-00000040", steps
    assert (tmp_path / "runs" / "tiny" / "model" / "config.json").is_file()


def test_the_readme_commands_that_need_data_or_gpus_parse():
    """Each other command is parsed by the program it runs (flags, config files and their
    overrides, task names, converter names); the Hub, GPUs and the datasets are not here."""
    seen = set()
    for block in readme("bash"):
        for argv in commands(block):
            if argv[0] == "make" or "data_prep.tiny" in argv or "train.py" in argv[:2]:
                continue  # the Makefile's targets (CI, the demo's test); the run above
            seen.add(check_command(argv))
    assert seen == {"eval.run", "deepspeed", "lmms_eval", "data_prep.pairs"} | {
        "data_prep.interleaved",
        "flamingo.convert",
    }


def test_the_readme_hub_block_names_a_known_release():
    """The by-name block needs the Hub: it compiles, and its id is one the loader knows."""
    from flamingo.hub import OPENFLAMINGO_RELEASES

    python = readme("python")
    hub = [b for b in python if "from_pretrained(name" in b]
    assert len(hub) == 1
    compile(hub[0], "README.md", "exec")
    (name,) = re.findall(r'name = "([^"]+)"', hub[0])
    assert name in OPENFLAMINGO_RELEASES


def test_convert_without_arguments_names_what_its_usage_shows(capsys):
    """It said `required: source`, a name its usage did not show."""
    from flamingo.convert.__main__ import main

    with pytest.raises(SystemExit) as ended:
        main([])
    err = capsys.readouterr().err
    assert ended.value.code == 2
    assert "[-h] FORMAT ..." in err and "required: FORMAT" in err
    assert "source" not in err


def test_a_user_error_ends_in_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    """Config, path and input errors were right but buried under a 13-16 line traceback."""
    done = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/train/tiny.yaml"]
        + ["datasets.0.shards=/nowhere/x-{0..1}.tar"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "datasets.0 (interleaved): 2 of 2 shards" in errors[0]

    from flamingo import cli

    def main():
        raise ValueError("optim.lr: expected a number, got 'fast'")

    with pytest.raises(SystemExit) as ended:
        cli.run(main, ["prog"])
    assert ended.value.code == 2 and "error: optim.lr" in capsys.readouterr().err
    with pytest.raises(ValueError, match="optim.lr"):  # the traceback, on request
        cli.run(main, ["prog", "--debug"])
    monkeypatch.setenv("FLAMINGO_DEBUG", "1")
    with pytest.raises(ValueError, match="optim.lr"):
        cli.run(main, ["prog"])

    def bug():
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        cli.run(bug, ["prog"])
