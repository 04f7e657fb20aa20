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


# -- ranks forked from a process that has done the imports ----------------------------------------

PRELOAD = ["train", "deepspeed", "tests.processes"]
"""What the fork server imports once: ``train`` (torch, transformers, the model), DeepSpeed."""

IMPORT_TIME_VARIABLES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
"""Environment variables read when a library is imported: a rank forked from the server sees
the values the server was started with, so a launch may not change them."""

_server: dict[str, object] = {}


def _context():
    """The fork server, started on first use with the test process's environment."""
    if not _server:
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _server.update(context=context, env=dict(os.environ))
    return _server["context"]


def _rank(rank: int, world: int, port: str, argv: list[str], env: dict, cwd: str, log: str):
    """One rank, as torchrun starts it (its variables, the program as ``__main__``), in a
    process group of its own, its output in ``log``; its exit code is the program's."""
    import runpy
    import sys

    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    ranks = {"RANK": rank, "LOCAL_RANK": rank, "GROUP_RANK": 0, "ROLE_RANK": rank}
    sizes = {"WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "GROUP_WORLD_SIZE": 1}
    os.environ.update({k: str(v) for k, v in {**ranks, **sizes, "ROLE_WORLD_SIZE": world}.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # libgomp read it at import
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


def fork_ranks(
    argv: list[str], nprocs: int, timeout: float, cwd, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROCS ARGV`` (``ARGV``: ``script.py ...`` or ``-m module
    ...``), each rank forked from a server that has imported torch, transformers, DeepSpeed and
    the model once for the whole session: a launch starts in about 2 s instead of 9 on two
    cores (each torchrun rank imports them again). The ranks meet as torchrun's do (``env://``,
    rank 0 holds the store) and run the same program; the launchers themselves are tested with
    the real ones. As with torchrun, a rank that fails ends the others; the return code is the
    first failure's, the output each rank's in turn. Past ``timeout`` every rank's group is
    killed and ``AssertionError`` raised with the end of the output."""
    from tests.helpers import free_port

    context = _context()
    changed = sorted(
        k
        for k in set(env) | set(_server["env"])
        if k.startswith(IMPORT_TIME_VARIABLES) and env.get(k) != _server["env"].get(k)
    )
    assert not changed, f"{changed} are read at import: launch with run_group and torchrun"
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        paths = [os.path.join(logs, f"rank{r}.log") for r in range(nprocs)]
        ranks = [
            context.Process(target=_rank, args=(r, nprocs, port, argv, env, str(cwd), paths[r]))
            for r in range(nprocs)
        ]
        for proc in ranks:
            proc.start()
        late = _wait(ranks, timeout)
        output = ""
        for path in paths:
            with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as f:
                output += f.read()
    if late:
        raise AssertionError(f"{' '.join(argv[:4])} ... ran past {timeout:g} s:\n{output[-6000:]}")
    codes = [p.exitcode for p in ranks]
    code = next((c for c in codes if c and c > 0), next((c for c in codes if c), 0))
    return subprocess.CompletedProcess(argv, code, output, "")


def _wait(ranks: list, timeout: float) -> bool:
    """Wait for every rank; after a failure the others get 1 s, then they are killed. Every
    rank's group is killed on the way out (data workers included). True when time ran out."""
    import multiprocessing.connection
    import time

    deadline, grace = time.monotonic() + timeout, None
    try:
        while any(p.exitcode is None for p in ranks):
            if any(p.exitcode for p in ranks) and grace is None:
                grace = time.monotonic() + 1
            left = min(deadline, grace or deadline) - time.monotonic()
            if left <= 0:
                return grace is None or grace > deadline
            running = [p.sentinel for p in ranks if p.exitcode is None]
            multiprocessing.connection.wait(running, timeout=left)
        return False
    finally:
        for proc in ranks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join(timeout=60)
