"""Checkpoints: ``save_pretrained`` / ``from_pretrained`` (and foreign formats in ``convert``).

A checkpoint directory holds

* ``config.json``: the full model config (where the frozen parts come from) plus format
  metadata and the special-token ids the weights were trained with;
* ``model.safetensors``: the trainable weights only (resampler, gated blocks, new token rows);
* ``frozen.safetensors``, only when needed: frozen weights that cannot be rebuilt from a source,
  i.e. a randomly initialised tower or LM (tests, toy runs) or an LM input embedding that the
  checkpoint's training changed (``lm.save_input_embeddings``, set by the OpenFlamingo import);
* the tokenizer files and ``processor_config.json``.

Loading rebuilds the frozen parts from their sources and loads strictly: a missing, unexpected
or mis-shaped tensor is an error naming it. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flamingo.config import read_checkpoint_config, write_checkpoint_config
from flamingo.model import Flamingo
from flamingo.processing import FlamingoProcessor

TRAINABLE_NAME = "model.safetensors"
FROZEN_NAME = "frozen.safetensors"


# -- which tensors go where -------------------------------------------------------------------


def trainable_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def frozen_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """Frozen tensors a checkpoint must carry because no source can rebuild them."""
    cfg = model.cfg
    prefixes = []
    if cfg.vision.pretrained is None:
        prefixes.append("vision.")
    if cfg.lm.architecture is not None:
        prefixes.append("lm.hf.")
    names = []
    if cfg.lm.save_input_embeddings and cfg.lm.architecture is None:
        embed = model.lm.hf.get_input_embeddings().weight
        names = [f"lm.hf.{n}" for n, p in model.lm.hf.named_parameters() if p is embed]
    params = {n: p for n, p in model.named_parameters(remove_duplicate=True) if not p.requires_grad}
    return {n: p.detach() for n, p in params.items() if n.startswith(tuple(prefixes)) or n in names}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, str(tmp))
    tmp.replace(path)


def _load_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint directory is incomplete")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated?): {e}") from e
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


# -- save / load --------------------------------------------------------------------------------


def save_pretrained(
    model: Flamingo, directory: str | Path, processor: FlamingoProcessor | None = None
) -> Path:
    """Write ``model`` (and its tokenizer / processor files) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(trainable_state_dict(model), directory / TRAINABLE_NAME)
    frozen = frozen_state_dict(model)
    if frozen:
        _save_tensors(frozen, directory / FROZEN_NAME)
    elif (directory / FROZEN_NAME).exists():
        (directory / FROZEN_NAME).unlink()
    (processor or FlamingoProcessor.from_config(model.cfg)).save_pretrained(directory)
    # config.json last: its presence marks a complete checkpoint.
    special = {"new_ids": list(model.special_tokens.new_ids)}
    write_checkpoint_config(directory, model.cfg, {"special_tokens": special})
    return directory


def from_pretrained(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> Flamingo:
    """Rebuild a model from a checkpoint directory; ``dtype``/``device`` cast and move it all."""
    directory = Path(directory)
    cfg, meta = read_checkpoint_config(directory)
    cfg.lm.tokenizer = str(directory)  # the tokenizer saved with the weights
    model = Flamingo.from_config(cfg)
    saved = meta.get("special_tokens", {})
    if saved and list(saved.get("new_ids", [])) != list(model.special_tokens.new_ids):
        raise ValueError(
            f"{directory}: the tokenizer gives new-token ids {list(model.special_tokens.new_ids)} "
            f"but the weights were saved for {saved.get('new_ids')}"
        )
    tensors = _load_tensors(directory / TRAINABLE_NAME, trainable_state_dict(model))
    frozen_expected = frozen_state_dict(model)
    if frozen_expected:
        tensors.update(_load_tensors(directory / FROZEN_NAME, frozen_expected))
    _, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected  # keys were checked above
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return model.to(device=device, dtype=dtype).eval()
