"""The checkpoint directory format: file names, ``config.json``, and tensor files.

A checkpoint directory holds

* ``config.json``: the full model config (where the frozen parts come from) plus format
  metadata and the special-token ids the weights were trained with;
* ``model.safetensors``: the trainable weights only (resampler, gated blocks, new token rows);
* ``frozen.safetensors``, only when needed: frozen weights that cannot be rebuilt from a source,
  i.e. a randomly initialised tower or LM (tests, toy runs) or an LM input embedding that the
  checkpoint's training changed (``lm.save_input_embeddings``, set by the OpenFlamingo import);
* the tokenizer files and ``processor_config.json``.

This module knows files, not models: :class:`~flamingo.model.Flamingo` says which tensors go
into which file (``trainable_state_dict``, ``frozen_state_dict``) and calls it, so the import
graph stays a tree (config <- checkpoint <- processing, model). Loading checks strictly: a
missing, unexpected or mis-shaped tensor is an error naming it. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flamingo.config import FlamingoConfig, library_version
from flamingo.tokens import TINY_TOKENIZER

TRAINABLE_NAME = "model.safetensors"
FROZEN_NAME = "frozen.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_FORMAT = "flamingo"
CHECKPOINT_FORMAT_VERSION = 1
RETIRED_MODEL_KEYS = ("gradient_checkpointing",)
"""Model-config keys that earlier versions wrote and that are now set elsewhere (activation
checkpointing is the training engine's: ``engine.activation_checkpointing``); dropped on read."""


def model_config_from_dict(data: dict[str, Any]) -> FlamingoConfig:
    """The model config a checkpoint saved, written by this or an earlier version."""
    return FlamingoConfig.from_dict({k: v for k, v in data.items() if k not in RETIRED_MODEL_KEYS})


SOURCE_FIELDS = ("vision.pretrained", "lm.name_or_path", "lm.tokenizer")
"""Config fields that name where frozen weights or a tokenizer come from: a Hub id, a tag,
or a local path."""


def with_sources_resolved(cfg: FlamingoConfig) -> FlamingoConfig:
    """``cfg`` with the relative local paths of :data:`SOURCE_FIELDS` made absolute, so a
    checkpoint written from a training directory loads from anywhere (cluster users keep
    pre-downloaded weights in local folders). Hub ids and tags (no such path here) stay."""
    changes = {}
    for dotted in SOURCE_FIELDS:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        local = isinstance(value, str) and value != TINY_TOKENIZER and Path(value).exists()
        if local and not Path(value).is_absolute():
            changes[dotted] = str(Path(value).resolve())
    return cfg.replace(changes) if changes else cfg


def write_checkpoint_config(directory: Path, cfg: FlamingoConfig, extra: dict[str, Any]) -> None:
    """Write ``config.json`` atomically: the model config (local source paths made absolute,
    :func:`with_sources_resolved`) plus format metadata."""
    cfg = with_sources_resolved(cfg)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "library_version": library_version(),
        **extra,
        "config": cfg.to_dict(),
    }
    tmp = directory / (CHECKPOINT_CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(directory / CHECKPOINT_CONFIG)


def read_checkpoint_config(directory: str | Path) -> tuple[FlamingoConfig, dict[str, Any]]:
    """Read and validate a checkpoint directory's ``config.json``: ``(config, metadata)``."""
    directory = Path(directory)
    path = directory / CHECKPOINT_CONFIG
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    if not path.is_file():
        raise ValueError(f"{directory} is not a flamingo checkpoint: it has no {CHECKPOINT_CONFIG}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f'{path} is not a flamingo checkpoint config (no "format": "{CHECKPOINT_FORMAT}"); '
            "for an OpenFlamingo checkpoint use `python -m flamingo.convert openflamingo`"
        )
    version = meta.get("format_version")
    written_by = meta.get("library_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {version!r} (written by flamingo {written_by}); "
            f"flamingo {library_version()} reads format <= {CHECKPOINT_FORMAT_VERSION}: upgrade"
        )
    try:
        cfg = model_config_from_dict(meta["config"])
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"{path}: incompatible model config (written by flamingo {written_by}, this is "
            f"{library_version()}): {e}"
        ) from e
    return cfg, meta


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, str(tmp))
    tmp.replace(path)


def load_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint directory is incomplete")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated?): {e}") from e
    # an empty tensor the model no longer holds as a parameter (no new token rows, saved by
    # earlier versions) carries nothing
    tensors = {k: t for k, t in tensors.items() if k in expected or t.numel()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model built from its config.json: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}"
            )
    return tensors
