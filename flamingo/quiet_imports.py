"""Imports of our dependencies without what they pull in for features we never use.

open_clip imports timm, and timm's ``timm.utils.summary`` imports ``wandb`` whenever it is
installed, for one option of its CSV summary writer (``log_wandb``). On this project's 2-core
machine that import costs about 0.4 s (``import train``: 4.3 s with it, 3.9 s deferred; 1.1 s
under ``-X importtime``), paid by every process that builds a model: each rank of a launch,
each eval, each test that starts one. :func:`deferring_wandb` imports timm with ``wandb`` unimportable for
that moment only, then gives timm's summary module a stand-in that imports the real ``wandb``
at its first use. Nothing else changes: ``import wandb`` anywhere afterwards is the real import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class DeferredModule:
    """A module imported at its first attribute access (then it is the real one)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


@contextmanager
def deferring_wandb() -> Iterator[None]:
    """Run the enclosed imports (open_clip's, which import timm) without importing wandb."""
    if "wandb" in sys.modules or "timm.utils.summary" in sys.modules:
        yield  # too late, or already imported: nothing to save
        return
    installed = importlib.util.find_spec("wandb") is not None
    sys.modules["wandb"] = None  # type: ignore[assignment]  # `import wandb` raises ImportError
    try:
        yield
    finally:
        if sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    summary = sys.modules.get("timm.utils.summary")
    if installed and summary is not None:
        summary.wandb = DeferredModule("wandb")  # type: ignore[attr-defined]
