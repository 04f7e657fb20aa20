"""Shared fixtures: the tiny config, a tiny model and processor, small PIL images."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from PIL import Image

from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "model" / "tiny.yaml"


def free_port() -> str:
    """A TCP port nothing listens on now, for a launcher's rendezvous (fixed ports collide
    when two suites run on one machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def tiny_config(*overrides: str) -> FlamingoConfig:
    return FlamingoConfig.from_yaml(TINY, overrides=list(overrides))


def build(*overrides: str, seed: int = 0) -> Flamingo:
    torch.manual_seed(seed)
    return Flamingo.from_config(tiny_config(*overrides)).eval()


def set_gates(model: Flamingo, value: float = 0.7) -> None:
    """Open the tanh gates so that images influence the text (they start at 0)."""
    with torch.no_grad():
        for block in model.lm.gated_blocks:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def padded(enc: dict) -> torch.Tensor:
    """A batch's flat media (``pixel_values`` with ``media_slots``) in the padded layout
    (B, N, F, C, H, W), zero-filled slots: what ``Flamingo.encode_media`` also accepts."""
    from flamingo.media import place_in_slots

    return place_in_slots(enc["pixel_values"], enc["media_slots"])


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> Image.Image:
    return Image.new("RGB", size, colour)


def noise_image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(arr.numpy())


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


# The longest test (an offloaded two-rank run that compiles CPU Adam) takes ~2 minutes here.
TEST_LIMIT_S = float(os.environ.get("FLAMINGO_TEST_LIMIT_S", 900))


@pytest.fixture(autouse=True)
def time_limit(request):
    """Fail a test that runs past TEST_LIMIT_S instead of letting it hold the whole suite
    (CI ends a run that goes past its limit with nothing to read): the alarm raises in the
    test's own frame, so the failure shows where it waited, and the test's cleanup (the
    process groups of tests/processes.py) runs."""

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.nodeid} ran past {TEST_LIMIT_S:g} s (tests/conftest.py)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session", autouse=True)
def no_stale_extension_locks():
    """Every later build of such an op (another torch, another Python) would wait on a
    stale lock forever, and hang the DeepSpeed tests: remove them before the session."""
    from flamingo.training.engine import extensions_dir

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


COMMIT = "a" * 40
OTHER = "b" * 40


def lay_out(cache, repo_id: str, source, commit: str = COMMIT, main: bool = True) -> None:
    """``source``'s files as the snapshot ``commit`` of ``repo_id`` in a Hub cache (blobs,
    snapshot links, and ``refs/main`` when ``main``)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        name = path.name if source.is_file() else str(path.relative_to(source))
        blob = repo / "blobs" / f"{commit[:8]}-{name.replace('/', '-')}"
        shutil.copy(path, blob)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLAMINGO_CACHE", str(tmp_path / "flamingo-cache"))
    return cache


def tokenizer_with_image(bos: bool = False):
    """The packaged tiny tokenizer with ``<image>`` and ``<pad>`` added, as the ``llava-hf`` and
    BLIP-2 repos' tokenizers have them (their LMs hold the rows), padding on the left. With
    ``bos``, it starts every text with its start token, as OPT's (``</s>``) and Llama's do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from flamingo.tokens import IMAGE, TINY_TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE], "pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    if bos:
        start = tokenizer.bos_token
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{start} $A",
            pair=f"{start} $A $B",
            special_tokens=[(start, tokenizer.bos_token_id)],
        )
    return tokenizer
