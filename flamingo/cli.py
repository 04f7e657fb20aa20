"""The commands' way of ending on a user's error: one line, no traceback.

A wrong config value, a path that does not exist or an input the program refuses is the
user's to fix, and the message says how; a 15-line traceback above it only buries it.
:func:`run` runs a command's ``main`` so that such an error (``ValueError``, or a missing or
unreadable file) ends with ``error: <message>`` on stderr and exit status 2, as argparse ends
a bad command line. ``--debug`` on the command line or ``FLAMINGO_DEBUG=1`` shows the
traceback instead. Anything else (a bug) keeps its traceback.

:func:`parse_first` lets a command whose imports take seconds (torch, transformers) answer
``--help`` and a bad command line before it makes them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
EXIT_USAGE = 2


def run(main: Callable[[], Any], argv: list[str] | None = None) -> Any:
    """``main()`` with user errors as one line (see the module docstring); ``argv`` defaults to
    ``sys.argv``, whose ``--debug`` is taken out before ``main`` parses it."""
    argv = sys.argv if argv is None else argv
    debug = os.environ.get("FLAMINGO_DEBUG", "") not in ("", "0")
    if "--debug" in argv[1:]:
        argv.remove("--debug")
        debug = True
    try:
        return main()
    except USER_ERRORS as e:
        if debug:
            raise
        message = str(e) or type(e).__name__
        print(
            f"error: {message}\n(--debug or FLAMINGO_DEBUG=1 shows where it came from)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE) from None


def parse_first(parse: Callable[[list[str]], Any]) -> None:
    """Parse ``sys.argv`` once before a command's heavy imports (called above them, under
    ``if __name__ == "__main__"``), so that ``--help`` and a usage error answer at once instead
    of after seconds of importing torch; ``main`` parses again (``--debug`` is left out)."""
    parse([arg for arg in sys.argv[1:] if arg != "--debug"])
