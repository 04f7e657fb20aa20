"""The test suite's own guards: a launch that hangs fails its test and leaves no process
behind (tests/processes.py), ranks forked with the imports done behave as torchrun's, and a
test that hangs fails at the suite's time limit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import ROOT
from tests.processes import fork_ranks, process_group, run_group

# a parent that starts a child which outlives it, prints the child's pid, then waits
ORPHANING = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print('child', child.pid, flush=True); time.sleep({wait})"
)


def gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def child_pid(text: str) -> int:
    return int(re.search(r"child (\d+)", text).group(1))


def test_a_launch_past_its_timeout_fails_and_takes_its_children_with_it():
    cmd = [sys.executable, "-c", ORPHANING.format(wait=600)]
    with pytest.raises(AssertionError, match="ran past 3 s") as failure:
        run_group(cmd, 3)
    assert gone(child_pid(str(failure.value)))


def test_what_a_finished_launch_left_running_is_killed():
    cmd = [sys.executable, "-c", ORPHANING.format(wait=0)]
    done = run_group(cmd, 60)
    assert done.returncode == 0
    assert gone(child_pid(done.stdout))
    with process_group(cmd, stdout=subprocess.PIPE, text=True) as proc:
        pid = child_pid(proc.stdout.readline())
        proc.wait(timeout=60)
        # the leader has exited; its child runs on until the group is killed
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert gone(pid)


def test_a_test_that_hangs_fails_at_the_time_limit(tmp_path):
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(600)\n")
    env = dict(os.environ, FLAMINGO_TEST_LIMIT_S="2")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.time_limit", str(tmp_path)]
    cmd += ["-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    done = run_group(cmd, 120, cwd=ROOT, env=env)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "ran past 2 s" in done.stdout and "1 failed" in done.stdout


RANK_SCRIPT = """
import json, os, subprocess, sys, time
import torch
rank = int(os.environ["RANK"])
seen = {k: os.environ.get(k) for k in sys.argv[2:]}
seen.update(threads=torch.get_num_threads(), cwd=os.getcwd(), argv=sys.argv[1:2], main=__name__)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(seen, f)
if os.environ.get("MODE") == "fail" and rank == 1:
    raise SystemExit(3)
if os.environ.get("MODE") == "raise" and rank == 0:
    raise RuntimeError("rank 0 broke")
if os.environ.get("MODE") in ("fail", "hang"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("child", child.pid, flush=True)
    time.sleep(600)
print("done", rank)
"""


@pytest.fixture
def rank_script(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    return script


def test_forked_ranks_see_what_torchrun_gives_its_ranks(rank_script, tmp_path):
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT", "GIVEN"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GIVEN="yes")
    done = fork_ranks([str(rank_script), str(tmp_path), *names], 2, 60, tmp_path, env)
    assert done.returncode == 0 and "done 0" in done.stdout and "done 1" in done.stdout
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, ranks in enumerate(seen):
        assert (ranks["RANK"], ranks["LOCAL_RANK"]) == (str(rank), str(rank))
        assert (ranks["WORLD_SIZE"], ranks["LOCAL_WORLD_SIZE"], ranks["GIVEN"]) == ("2", "2", "yes")
        assert ranks["threads"] == 1 and ranks["cwd"] == str(tmp_path)
        assert ranks["main"] == "__main__" and ranks["argv"] == [str(tmp_path)]
    assert seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"]


def test_a_failing_rank_ends_the_others_and_its_code_is_returned(rank_script, tmp_path):
    env = dict(os.environ, MODE="fail")
    started = time.monotonic()
    done = fork_ranks([str(rank_script), str(tmp_path)], 2, 120, tmp_path, env)
    assert done.returncode == 3 and time.monotonic() - started < 60
    assert gone(child_pid(done.stdout))  # rank 0 and what it started: killed
    env["MODE"] = "raise"
    done = fork_ranks([str(rank_script), str(tmp_path)], 2, 120, tmp_path, env)
    assert done.returncode == 1 and "RuntimeError: rank 0 broke" in done.stdout


def test_forked_ranks_past_their_timeout_fail_and_take_their_children_with_them(
    rank_script, tmp_path
):
    env = dict(os.environ, MODE="hang")
    with pytest.raises(AssertionError, match="ran past 3 s") as failure:
        fork_ranks([str(rank_script), str(tmp_path)], 2, 3, tmp_path, env)
    pids = [int(pid) for pid in re.findall(r"child (\d+)", str(failure.value))]
    assert len(pids) == 2 and all(gone(pid) for pid in pids)


def test_a_launch_may_not_change_what_is_read_at_import(rank_script, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="0" if os.environ.get("HF_HUB_OFFLINE") else "1")
    with pytest.raises(AssertionError, match="HF_HUB_OFFLINE"):
        fork_ranks([str(rank_script), str(tmp_path)], 1, 60, tmp_path, env)
