"""The converters as datatrove pipeline steps (data_prep/pipeline.py): datatrove's executors
give the shards our own command lines give, byte for byte, and resume what they did not
finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dill
import pytest
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

from data_prep import conversations, interleaved, pairs, video
from data_prep.pipeline import Convert
from tests.test_bad_input import RED
from tests.test_corpus import files, mmc4_corpus, summary
from tests.test_corpus_damage import llava_corpus
from tests.test_data import solid

ROOT = Path(__file__).resolve().parents[1]


def pairs_inputs(root: Path) -> list[str]:
    for f in range(3):
        folder = root / f"pairs_{f}"
        folder.mkdir()
        for i in range(4):
            (folder / f"{i}.png").write_bytes(solid((40 * i, 60 * f, 90)))
            (folder / f"{i}.txt").write_text(f"picture {i} of folder {f}")
    return ["--folder", str(root / "pairs_*")]


def obelics_inputs(root: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "imgs").mkdir()
    (root / "imgs" / "x.png").write_bytes(solid(RED))
    for f in range(3):
        rows = [{"texts": [f"doc {f} {d}", None], "images": [None, "x.png"]} for d in range(5)]
        pq.write_table(pa.Table.from_pylist(rows), root / f"o_{f}.parquet")
    return ["obelics", "--parquet", str(root / "o_*.parquet"), "--images", str(root / "imgs")]


def frame_inputs(root: Path) -> list[str]:
    for f in range(3):
        clip = root / f"frames_{f}" / "clip"
        clip.mkdir(parents=True)
        for i in range(4):
            (clip / f"{i:03d}.png").write_bytes(solid((60 * i, 50 * f, 0)))
        (clip / "caption.txt").write_text(f"four frames of folder {f}")
    return ["--frames", str(root / "frames_*"), "--num-frames", "2"]


def mmc4_inputs(root: Path) -> list[str]:
    spec = mmc4_corpus(root, inputs=3, docs=4)
    return ["mmc4", "--jsonl", spec, "--images", str(root / "imgs" / "{stem}")]


def llava_inputs(root: Path) -> list[str]:
    return ["--llava", llava_corpus(root, files=3, records=10), "--images", str(root / "images")]


CONVERTERS = {
    "pairs": (pairs_inputs, pairs.main),
    "mmc4": (mmc4_inputs, interleaved.main),
    "obelics": (obelics_inputs, interleaved.main),
    "video": (frame_inputs, video.main),
    "conversations": (llava_inputs, conversations.main),
}
"""A converter's name -> (inputs of 3 files or folders, so two tasks split them unevenly; its
command line's ``main``)."""


@pytest.mark.parametrize("name", list(CONVERTERS))
def test_every_converter_as_a_step_writes_what_its_command_line_writes(name, tmp_path):
    make_inputs, main = CONVERTERS[name]
    argv = [*make_inputs(tmp_path), "--items-per-shard", "2", "--max-skip-ratio", "1"]
    main([*argv, "--out", str(tmp_path / "command")])
    step_argv = argv[1:] if name in ("mmc4", "obelics") else argv  # the name says which
    step = Convert(name, *step_argv, "--out", str(tmp_path / "tasks"))
    LocalPipelineExecutor([step], tasks=2, workers=1, logging_dir=str(tmp_path / "logs")).run()
    written = files(tmp_path / "command")
    assert len(written) >= 3 and files(tmp_path / "tasks") == written
    prefix = {"mmc4": "mmc4", "obelics": "obelics"}.get(name, name)
    assert summary(tmp_path / "tasks", prefix) == summary(tmp_path / "command", prefix)
    stats = json.loads((tmp_path / "logs" / "stats.json").read_text())
    counted = {s["name"]: s["stats"] for s in stats}
    step_stats = next(v for k, v in counted.items() if "flamingo shards" in k)
    assert step_stats["inputs"] == 3


def mmc4_step(root: Path, out: Path) -> Convert:
    images = str(root / "imgs" / "{stem}")
    spec = str(root / "docs_*.jsonl")
    return Convert("mmc4", "--jsonl", spec, "--images", images, "--out", str(out))


def test_two_tasks_on_two_workers_equal_workers_and_parts(tmp_path):
    spec = mmc4_corpus(tmp_path)
    images = str(tmp_path / "imgs" / "{stem}")
    argv = ["mmc4", "--jsonl", spec, "--images", images]
    interleaved.main([*argv, "--out", str(tmp_path / "workers"), "--workers", "2"])
    interleaved.main([*argv, "--out", str(tmp_path / "parts"), "--part", "0/2"])
    interleaved.main([*argv, "--out", str(tmp_path / "parts"), "--part", "1/2"])
    executor = LocalPipelineExecutor(
        [mmc4_step(tmp_path, tmp_path / "tasks")],
        tasks=2,
        workers=2,
        logging_dir=str(tmp_path / "logs"),
    )
    executor.run()
    written = files(tmp_path / "workers")
    assert len(written) == 4 and files(tmp_path / "tasks") == written
    assert files(tmp_path / "parts") == written
    assert summary(tmp_path / "tasks") == summary(tmp_path / "workers")
    assert sorted(os.listdir(tmp_path / "logs" / "completions")) == ["00000", "00001"]


KILLED_RUN = """
import os, signal, sys
from datatrove.executor import LocalPipelineExecutor
from data_prep.pipeline import Convert

def killed_in_task_1(data, rank, world_size):
    if rank == 1:  # after task 1 converted its inputs, before datatrove marks it complete
        os.killpg(os.getpgid(0), signal.SIGKILL)
    yield from data or ()

root, out, logs = sys.argv[1:]
step = Convert("mmc4", "--jsonl", f"{root}/docs_*.jsonl", "--images", f"{root}/imgs/{{stem}}",
               "--out", out)
LocalPipelineExecutor([step, killed_in_task_1], tasks=2, workers=1, logging_dir=logs).run()
"""


def test_a_relaunch_after_a_killed_task_redoes_that_task_only(tmp_path):
    mmc4_corpus(tmp_path)
    out, logs = tmp_path / "tasks", tmp_path / "logs"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    job = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(out), str(logs)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == -9, job.stderr[-3000:]
    assert sorted(os.listdir(logs / "completions")) == ["00000"]
    first = (logs / "stats" / "00000.json").stat().st_mtime_ns
    assert not (out / "mmc4-summary.json").exists()
    LocalPipelineExecutor(
        [mmc4_step(tmp_path, out)], tasks=2, workers=1, logging_dir=str(logs)
    ).run()
    assert sorted(os.listdir(logs / "completions")) == ["00000", "00001"]
    assert (logs / "stats" / "00000.json").stat().st_mtime_ns == first  # task 0 not run again
    interleaved.main(
        ["mmc4", "--jsonl", str(tmp_path / "docs_*.jsonl"), "--images"]
        + [str(tmp_path / "imgs" / "{stem}"), "--out", str(tmp_path / "fresh")]
    )
    assert files(out) == files(tmp_path / "fresh")
    assert summary(out) == summary(tmp_path / "fresh")


def test_a_slurm_array_runs_the_pickled_step(tmp_path, monkeypatch):
    """No Slurm here: a stand-in ``sbatch`` takes the job script, then each array task runs
    as Slurm would start it (``SLURM_ARRAY_TASK_ID``, the pickled executor)."""
    mmc4_corpus(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        f'#!/bin/sh\ncp "$2" {tmp_path}/submitted.slurm\necho "Submitted batch job 4242"\n'
    )
    sbatch.chmod(0o755)
    scontrol = bin_dir / "scontrol"  # `scontrol show hostnames NODELIST`, for a task's hosts
    scontrol.write_text('#!/bin/sh\necho "$3"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    logs = tmp_path / "logs"
    executor = SlurmPipelineExecutor(
        [mmc4_step(tmp_path, tmp_path / "tasks")],
        tasks=3,
        time="01:00:00",
        partition="cpu",
        cpus_per_task=2,
        logging_dir=str(logs),
        venv_path=str(ROOT / ".venv" / "bin" / "activate"),
    )
    executor.run()
    script = (logs / "launch_script.slurm").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=cpu" in script
    assert f"launch_pickled_pipeline {logs / 'executor.pik'}" in script
    assert f"source {ROOT / '.venv' / 'bin' / 'activate'}" in script
    monkeypatch.setenv("SLURM_NODELIST", "node0")
    for task in range(3):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        with open(logs / "executor.pik", "rb") as f:
            dill.load(f).run()
    assert sorted(os.listdir(logs / "completions")) == ["00000", "00001", "00002"]
    interleaved.main(
        ["mmc4", "--jsonl", str(tmp_path / "docs_*.jsonl"), "--images"]
        + [str(tmp_path / "imgs" / "{stem}"), "--out", str(tmp_path / "fresh")]
    )
    assert files(tmp_path / "tasks") == files(tmp_path / "fresh")


def test_a_bad_step_fails_before_any_task_starts(tmp_path):
    mmc4_corpus(tmp_path, inputs=1)
    spec = str(tmp_path / "docs_*.jsonl")
    with pytest.raises(ValueError, match="--part: the executor splits"):
        Convert("mmc4", "--jsonl", spec, "--images", "x", "--out", "o", "--part", "0/2")
    with pytest.raises(ValueError, match="unknown converter 'laion'"):
        Convert("laion", "--out", "o")
    with pytest.raises(SystemExit):  # the converter's own usage error: an input is missing
        Convert("mmc4", "--jsonl", str(tmp_path / "nope_*.jsonl"), "--images", "x", "--out", "o")


def test_a_task_that_skips_too_much_fails(tmp_path):
    (tmp_path / "a.png").write_bytes(solid(RED))
    rows = [{"image": "a.png", "caption": "kept"}] + [
        {"image": f"missing-{i}.png", "caption": "lost"} for i in range(3)
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    step = Convert(
        "pairs",
        *["--table", str(tmp_path / "t.jsonl"), "--image-root", str(tmp_path)],
        *["--out", str(tmp_path / "out")],
    )
    executor = LocalPipelineExecutor([step], tasks=1, workers=1, logging_dir=str(tmp_path / "logs"))
    with pytest.raises(RuntimeError, match="--max-skip-ratio"):
        executor.run()
    assert not (tmp_path / "logs" / "completions").exists()
    assert summary(tmp_path / "out", "pairs")["samples_written"] == 1  # written all the same
