"""Checkpoints by name: a local directory, or a Hugging Face Hub repo id at a revision, read
through ``huggingface_hub`` and its cache (``HF_HUB_OFFLINE=1``: only what the cache holds).

- A repo in our format (what ``Flamingo.save_pretrained`` writes) is fetched whole and loaded
  from the cache (:func:`snapshot`).
- An OpenFlamingo v2 release (:data:`OPENFLAMINGO_RELEASES`) is its ``checkpoint.pt`` and the
  model config this project keeps for it (``configs/model/openflamingo-*.yaml``): the
  checkpoint is fetched (:func:`download`), converted once by ``Flamingo.from_pretrained``
  and the result kept in :func:`converted_dir`, per commit, for the next load.
- An IDEFICS or a LLaVA repo (``config.json`` says ``"model_type": "idefics"`` or
  ``"llava"``, :func:`foreign_type`) is fetched without duplicate weight formats
  (:data:`TRANSFORMERS_FILES`), converted once and kept the same way.

The frozen tower and LM of any of them come from their own sources, through open_clip's and
transformers' loaders and the same cache.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from flamingo.config import FlamingoConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
"""Where the release configs live (a source checkout, as ``make install`` installs it)."""

OPENFLAMINGO_RELEASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": ("openflamingo-3b.yaml", ()),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": (
        "openflamingo-3b.yaml",
        ("lm.name_or_path=anas-awadalla/mpt-1b-redpajama-200b-dolly",),
    ),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": ("openflamingo-4b.yaml", ()),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": (
        "openflamingo-4b.yaml",
        ("lm.name_or_path=togethercomputer/RedPajama-INCITE-Instruct-3B-v1",),
    ),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": ("openflamingo-9b.yaml", ()),
}
"""The OpenFlamingo v2 releases: repo id -> (model config, overrides)."""


def release_config(repo_id: str, overrides: list[str] | None = None) -> FlamingoConfig:
    """The model config of an OpenFlamingo release (and dotted ``overrides`` on it)."""
    name, own = OPENFLAMINGO_RELEASES[repo_id]
    path = CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{repo_id}: its model config {path} is not here (an install without the "
            "project's configs/): convert it with python -m flamingo.convert openflamingo "
            f"{repo_id} OUT --config your-copy-of-{name}"
        )
    return FlamingoConfig.from_yaml(path, [*own, *(overrides or [])])


HUB_PROBE_S = 3.0
"""How long a Hub id waits to learn whether the Hub answers at all."""


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached from here (one TCP connection to its endpoint, at most
    :data:`HUB_PROBE_S`, once per endpoint and process: a load by id asks several times), or
    None when it can, or when ``HF_HUB_OFFLINE`` already says so. Without this, a Hub id on a
    machine without network waited ~45 s through ``huggingface_hub``'s retries, printing a
    warning for each."""
    from huggingface_hub import constants

    return None if constants.HF_HUB_OFFLINE else _probe(constants.ENDPOINT)


@functools.cache
def _probe(endpoint: str) -> str | None:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_S):
            return None
    except OSError as e:
        return f"the Hub ({endpoint}) cannot be reached: {e}"


def _fetched(repo_id: str, revision: str | None, what: str, fetch) -> Path:
    """``fetch(local_files_only)``'s path; on a machine that cannot reach the Hub, what the
    cache holds, or at once an error saying so."""
    unreachable = hub_unreachable()
    if unreachable is not None:
        try:
            return Path(fetch(True))
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
            raise FileNotFoundError(
                f"{repo_id!r} is not a local directory, {what} of it at revision "
                f"{revision or 'main'} is not in the Hugging Face cache, and {unreachable}: "
                "give a checkpoint directory, connect this machine, or fill the cache "
                "where the Hub is reachable (HF_HOME)"
            ) from None
    try:
        return Path(fetch(False))
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a Hub repo this machine can read"
        ) from e
    except (LocalEntryNotFoundError, EntryNotFoundError, RevisionNotFoundError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and {what} of it at revision "
            f"{revision or 'main'} is not in the Hugging Face cache"
            + (" (HF_HUB_OFFLINE is set: nothing is downloaded)" if offline else "")
            + ": give a checkpoint directory, or a Hub repo id reachable from here"
        ) from e


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
"""A Hub repo id, ``namespace/name``; any other name is a local path."""


def is_repo_id(name: str | Path) -> bool:
    text = str(name)
    return bool(REPO_ID.match(text)) and ".." not in text and "--" not in text


TRANSFORMERS_FILES = ["*.json", "*.model", "*.txt", "*.safetensors"]
"""What the snapshot of a repo in transformers' format (IDEFICS, LLaVA) fetches: configs,
tokenizer, weights as safetensors (such repos often hold each weight twice, also as
``pytorch_model*.bin``, fetched only where no safetensors are)."""


def foreign_type(name: str | Path, revision: str | None = None) -> str | None:
    """The ``model_type`` of a foreign checkpoint's ``config.json`` (``idefics``, ``llava``), or None
    for ours and for names with no ``config.json`` here or on the Hub (reads that one file)."""
    path = Path(name) / "config.json"
    if not Path(name).is_dir():
        if not is_repo_id(name):
            return None
        try:
            local = hub_unreachable() is not None  # no retries: the cache, or the loader says
            path = Path(
                hf_hub_download(str(name), "config.json", revision=revision, local_files_only=local)
            )
        except Exception:  # no such repo, file or revision here: the caller's loader says so
            return None
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(meta, dict) or meta.get("format") == "flamingo":
        return None
    return meta.get("model_type")


def snapshot(
    name: str | Path, revision: str | None = None, allow_patterns: list[str] | None = None
) -> Path:
    """A checkpoint directory for ``name``: a local directory as it is, else the snapshot of
    the Hub repo ``name`` (``namespace/name``) at ``revision`` (a branch, tag or commit;
    default main), of the files ``allow_patterns`` matches (default all)."""
    path = Path(name)
    if path.is_dir():
        return path
    if not is_repo_id(name):
        raise FileNotFoundError(
            f"no checkpoint directory at {path} (and {str(name)!r} is no Hub repo id, "
            "namespace/name)"
        )
    repo_id = str(name)
    return _fetched(
        repo_id,
        revision,
        "a snapshot",
        lambda local: snapshot_download(
            repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=local
        ),
    )


def transformers_snapshot(name: str | Path, revision: str | None = None) -> Path:
    """A checkpoint directory in transformers' format (IDEFICS, LLaVA): a local one as it is,
    else the Hub snapshot of its configs, tokenizer and weights (safetensors;
    ``pytorch_model*.bin`` where it has none)."""
    snap = snapshot(name, revision, TRANSFORMERS_FILES)
    if not any(snap.glob("*.safetensors")):
        snap = snapshot(name, revision, [*TRANSFORMERS_FILES, "pytorch_model*.bin"])
    return snap


def download(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a Hub repo at ``revision``, through the cache."""
    return _fetched(
        repo_id,
        revision,
        filename,
        lambda local: hf_hub_download(repo_id, filename, revision=revision, local_files_only=local),
    )


def converted_dir(repo_id: str, commit: str) -> Path:
    """Where a foreign checkpoint converted to our format is kept: ``FLAMINGO_CACHE`` (default
    ``~/.cache/flamingo``)/converted/<repo>/<commit>."""
    root = Path(os.environ.get("FLAMINGO_CACHE", Path.home() / ".cache" / "flamingo"))
    return root / "converted" / repo_id.replace("/", "--") / commit
