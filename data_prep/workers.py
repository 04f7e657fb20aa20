"""Worker processes that end with the process that started them.

A converter's workers are a ``ProcessPoolExecutor``'s. If the converter is killed with
SIGKILL (an out-of-memory kill, ``kill -9``, a scheduler's hard stop), nothing tells the pool:
its workers would finish what was handed to them, writing into the output while the user
restarts, then wait forever holding their memory. Each worker here ends itself as soon as its
parent is gone: at once on Linux (the kernel's parent-death signal), else within a second (a
watcher thread that sees the worker re-parented).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(POLL_S)


def end_with_parent(parent: int) -> None:
    """(In a worker, at its start) End this process when process ``parent`` ends."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl: the watcher alone
            pass
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="end-with-parent").start()


def run_all(
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    workers: int,
    done: Callable[[Any], None] = lambda result: None,
) -> None:
    """``fn(task)`` for every task in ``workers`` processes (spawned: they start clean, with no
    copy of the parent's threads or open files, and import ``fn``'s module again);
    ``done(result)`` as each finishes. The first error stops the run with its traceback, and
    the tasks not yet started are dropped."""
    tasks = list(tasks)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(workers, len(tasks)),
        mp_context=context,
        initializer=end_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        pending: set[Future] = {pool.submit(fn, t) for t in tasks}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    done(future.result())  # a worker's error stops the run
        except BaseException:
            for future in pending:
                future.cancel()
            raise
