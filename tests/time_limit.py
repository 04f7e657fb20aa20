"""The suite's time limit, a plugin of its own (no heavy import) so that the test of the limit
itself can start a pytest with it alone (tests/test_processes.py); tests/conftest.py imports the
fixture, which every test then runs under."""

from __future__ import annotations

import os
import signal

import pytest

# The longest test (an offloaded two-rank run that compiles CPU Adam) takes ~2 minutes here.
TEST_LIMIT_S = float(os.environ.get("FLAMINGO_TEST_LIMIT_S", 900))


@pytest.fixture(autouse=True)
def time_limit(request):
    """Fail a test that runs past TEST_LIMIT_S instead of letting it hold the whole suite
    (CI ends a run that goes past its limit with nothing to read): the alarm raises in the
    test's own frame, so the failure shows where it waited, and the test's cleanup (the
    process groups of tests/processes.py) runs."""

    def expire(signum, frame):
        raise TimeoutError(
            f"{request.node.nodeid} ran past {TEST_LIMIT_S:g} s (tests/time_limit.py)"
        )

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
