"""Shared fixtures: the tiny config, a tiny model and processor, an offline Hub cache, the guards
every test runs under (time limit, deprecations, stale build locks). Helpers: tests/helpers."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest

from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor
from tests.helpers import build, tiny_config
from tests.time_limit import time_limit  # noqa: F401 (an autouse fixture: every test's limit)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_transformers_deprecations():
    """Fail a test whose code meets a deprecation transformers announces through its logger
    (``warning_once``: ``output.past_key_values`` from 5.24 on). Those announced as
    ``FutureWarning``/``DeprecationWarning`` are errors already (pyproject's filterwarnings)."""
    import transformers.utils.logging as hf_logging

    hf_logging.warning_once.cache_clear()  # once per test, not once per process
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    yield
    logger.removeHandler(records)
    found = [m for m in records.messages if "deprecat" in m.lower()]
    if found:
        pytest.fail(f"transformers announced a deprecation: {found}")


def stale_extension_locks(root: Path) -> list[Path]:
    """Lock files of torch C++-extension builds (DeepSpeed's CPU ops) older than every
    library their build directory holds: the build finished and its process was killed
    before it let go (a test that kills a rank), so the lock will never be released."""
    stale = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        built = list(lock.parent.glob("*.so"))
        if built and all(lib.stat().st_mtime > lock.stat().st_mtime for lib in built):
            stale.append(lock)
    return stale


@pytest.fixture(scope="session", autouse=True)
def no_stale_extension_locks():
    """Every later build of such an op (another torch, another Python) would wait on a
    stale lock forever, and hang the DeepSpeed tests: remove them before the session."""
    from flamingo.training.ops import extensions_dir

    for lock in stale_extension_locks(extensions_dir()):
        lock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def cfg() -> FlamingoConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def processor(cfg: FlamingoConfig) -> FlamingoProcessor:
    return FlamingoProcessor.from_config(cfg)


@pytest.fixture
def model() -> Flamingo:
    return build()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLAMINGO_CACHE", str(tmp_path / "flamingo-cache"))
    return cache
