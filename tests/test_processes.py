"""The test suite's own guards: a launch that hangs fails its test and leaves no process
behind (tests/processes.py), and a test that hangs fails at the suite's time limit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import ROOT
from tests.processes import process_group, run_group

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
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", str(tmp_path)]
    cmd += ["-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    done = run_group(cmd, 120, cwd=ROOT, env=env)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "ran past 2 s" in done.stdout and "1 failed" in done.stdout
