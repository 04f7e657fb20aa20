"""Child processes that leave nothing behind: each command runs in a process group of its own,
and whatever of the group is still alive when the test is done with it is killed.

A launcher that exits, or is killed on a timeout, can leave its ranks (and their data workers)
running: a rank whose peer died waits in a collective, and DeepSpeed's shared-memory
all-reduce waits by spinning. On a 2-core machine two such orphans starve every later test
until the CI's own limit ends the run with no failure to read. Through these helpers a hung
launch fails its own test, with its output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process still in ``proc``'s group (``proc`` leads it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def process_group(cmd: list[str], **popen) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(cmd, **popen)`` as the leader of a new group, killed whole (and
    reaped) on the way out, whatever the test did with it."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        kill_group(proc)
        proc.wait(timeout=60)


def run_group(cmd: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` in a group of
    its own. It waits for ``cmd`` itself, not for the end of its output (a rank left running
    holds a pipe open): the output goes through files, read once the group is killed. On the
    timeout ``AssertionError`` is raised with the end of what it printed."""
    late = False
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with process_group(cmd, stdout=out, stderr=err, **popen) as proc:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                late = True
        stdout, stderr = (f.seek(0) or f.read().decode(errors="replace") for f in (out, err))
    if late:
        raise AssertionError(
            f"{' '.join(cmd[:6])} ... ran past {timeout:g} s, killed with its group:\n"
            f"{stdout[-3000:]}{stderr[-3000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
