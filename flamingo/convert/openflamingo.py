"""OpenFlamingo checkpoints (``checkpoint.pt`` of the v1/v2 releases) -> our model.

OpenFlamingo's state dict mirrors its module tree, and the names this import relies on are
load-bearing on our side too: the gated block's attribute names (``attn``, ``ff``,
``attn_gate``, ``ff_gate`` and those inside them) equal OpenFlamingo's, and ``FeedForward``
is a ``Sequential`` (LayerNorm, Linear, GELU, Linear) so that its indices match; the
resampler's ``layers.<i>.0``/``.1`` become our ``layers.<i>.attn``/``.ff``. Renaming any of
them breaks the import (``tests/test_openflamingo.py`` catches it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flamingo.config import FlamingoConfig
from flamingo.formats import Format, register

if TYPE_CHECKING:
    from flamingo.model import Flamingo

OPENFLAMINGO_LAYOUT = """OpenFlamingo's key layout:
  perceiver.latents, perceiver.norm.*, perceiver.layers.<i>.0.* (attention), .1.* (feed-forward)
  lang_encoder.<decoder layers>.<i>.gated_cross_attn_layer.*  (or gated_cross_attn_layers.<i>.*)
  lang_encoder.<decoder layers>.<i>.decoder_layer.*, lang_encoder.old_decoder_blocks.* (frozen)
  lang_encoder.<input embedding>.weight: every row trained, new tokens appended
  vision_encoder.* (frozen open_clip visual tower)"""


def check_config(cfg: FlamingoConfig) -> None:
    """Settings our model needs to compute exactly what OpenFlamingo computes."""
    x, r, v = cfg.xattn, cfg.resampler, cfg.vision
    expected = {
        "vision.cls_token": (v.cls_token, False),
        "lm.special_tokens": (cfg.lm.special_tokens, "flamingo"),
        "xattn.first_layer": (x.first_layer, x.every_n_layers - 1),
        "xattn.heads": (x.heads, 8),
        "xattn.dim_head": (x.dim_head, 64),
        "xattn.ff_mult": (x.ff_mult, 4),
        "xattn.attend": (x.attend, "last"),
        "xattn.gate": (x.gate, "scalar"),
        "xattn.gating": (x.gating, "tanh"),
        "xattn.ff_on_imageless_tokens": (x.ff_on_imageless_tokens, True),
        "xattn.ff": (x.ff, "gelu"),
        "xattn.ff_hidden": (x.ff_hidden, 0),
        "xattn.norm": (x.norm, "layernorm"),
        "xattn.norm_eps": (x.norm_eps, 1e-5),
        "xattn.qk_norm": (x.qk_norm, False),
        "xattn.reset_after_eos": (x.reset_after_eos, False),
        "resampler.depth": (r.depth, 6),
        "resampler.heads": (r.heads, 8),
        "resampler.dim_head": (r.dim_head, 64),
        "resampler.num_latents": (r.num_latents, 64),
        "resampler.ff_mult": (r.ff_mult, 4),
        "resampler.max_num_frames": (r.max_num_frames, 0),
        "resampler.ff_activation": (r.ff_activation, "gelu"),
        "resampler.qk_norm": (r.qk_norm, False),
    }
    wrong = {k: v for k, (v, want) in expected.items() if v != want}
    if wrong:
        fixes = ", ".join(f"{k}={expected[k][1]!r}" for k in wrong)
        raise ValueError(
            f"this config cannot reproduce OpenFlamingo: it has {wrong}; set {fixes} "
            "(see configs/model/openflamingo-*.yaml)"
        )


def load_state(state_dict_or_path) -> dict[str, torch.Tensor]:
    if isinstance(state_dict_or_path, (str, Path)):
        path = Path(state_dict_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"OpenFlamingo checkpoint not found: {path}")
        try:  # a pickle: load tensors only, never arbitrary objects
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a loadable OpenFlamingo checkpoint.pt: {e}") from e
    else:
        state = state_dict_or_path
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("expected an OpenFlamingo state dict (a mapping of names to tensors)")
    # checkpoints saved from DDP/FSDP-wrapped models carry a "module." prefix
    return {k.removeprefix("module."): v for k, v in state.items()}


@dataclass
class _Mapped:
    """An OpenFlamingo state dict sorted by :func:`_map_state`."""

    embedding_keys: set[str]
    """The LM's input and output embedding keys (their rows are :func:`_new_token_rows`')."""
    ours: dict[str, torch.Tensor] = field(default_factory=dict)
    """The trained tensors, by our names."""
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)
    """Frozen tensors, by our names: they must equal what the config loads from its sources."""
    unknown: list[str] = field(default_factory=list)
    layers: set[int] = field(default_factory=set)
    """The decoder layers that have a gated block before them in the checkpoint."""


def load_openflamingo(model: Flamingo, state_dict_or_path) -> Flamingo:
    """Load an OpenFlamingo checkpoint into ``model``, built from a config that passes
    :func:`check_config`, with ``lm.save_input_embeddings`` (``Flamingo.from_openflamingo``
    builds it so).

    ``state_dict_or_path`` is OpenFlamingo's ``checkpoint.pt`` (loaded with
    ``torch.load(weights_only=True)``) or its state dict. Frozen weights found in it (vision
    tower, decoder layers) must equal the ones the config loads from its sources: a mismatch
    means the config names the wrong backbone and is an error. OpenFlamingo trains the whole
    input embedding, so its rows replace ours and the converted checkpoint carries them.
    """
    check_config(model.cfg)
    if not model.cfg.lm.save_input_embeddings:
        raise ValueError(
            "an OpenFlamingo import trains every input-embedding row: build the model with "
            "lm.save_input_embeddings=true (Flamingo.from_openflamingo does)"
        )
    state, lm = load_state(state_dict_or_path), model.lm
    embed, head = lm.hf.get_input_embeddings().weight, lm.hf.get_output_embeddings().weight
    all_names = list(lm.hf.named_parameters(remove_duplicate=False))
    embed_keys = [f"lang_encoder.{n}" for n, p in all_names if p is embed]
    head_keys = [f"lang_encoder.{n}" for n, p in all_names if p is head]  # == embed_keys if tied
    mapped = _map_state(state, lm, _Mapped(set(embed_keys) | set(head_keys)))
    if mapped.layers != set(lm.layer_indices):
        raise ValueError(
            f"the checkpoint has gated blocks before decoder layers {sorted(mapped.layers)}, the "
            f"config places them before {lm.layer_indices}: fix xattn.every_n_layers/first_layer"
        )
    if mapped.unknown:
        raise ValueError(
            f"keys outside OpenFlamingo's layout: {mapped.unknown[:10]}\n{OPENFLAMINGO_LAYOUT}"
        )
    embed_key = next((k for k in embed_keys if k in state), embed_keys[0])
    head_key = next((k for k in head_keys if k in state), head_keys[0])
    if embed_key not in state:
        raise ValueError(
            f"the checkpoint has no input embedding ({embed_key})\n{OPENFLAMINGO_LAYOUT}"
        )
    their_embed = state[embed_key]
    _new_token_rows(lm, their_embed, state.get(head_key), embed_key, head_key, mapped)
    _check(model, mapped)
    new_ids = list(lm.new_tokens.token_ids.tolist())
    with torch.no_grad():  # every other row of their input embedding replaces ours
        rows = min(embed.shape[0], their_embed.shape[0])
        keep = torch.ones(rows, dtype=torch.bool)
        keep[[i for i in new_ids if i < rows]] = False
        embed[:rows][keep] = their_embed[:rows][keep].to(embed.dtype)
    model.load_state_dict(mapped.ours, strict=False)
    return model


def _map_state(state: dict[str, torch.Tensor], lm, mapped: _Mapped) -> _Mapped:
    """OpenFlamingo's keys sorted into ours (the trained tensors), the frozen ones to compare
    with what the config loads, and what falls outside its layout."""
    block_of_layer = {layer: i for i, layer in enumerate(lm.layer_indices)}
    for key, tensor in state.items():
        if key.startswith("perceiver."):
            _map_perceiver(key, tensor, mapped)
        elif key.startswith("vision_encoder."):
            mapped.frozen["vision.visual." + key.removeprefix("vision_encoder.")] = tensor
        elif key.startswith("lang_encoder."):
            _map_lm(key, tensor, lm, block_of_layer, mapped)
        else:
            mapped.unknown.append(key)
    return mapped


def _map_perceiver(key: str, tensor: torch.Tensor, mapped: _Mapped) -> None:
    rest = key.split(".")[1:]
    if rest[0] == "layers":
        sub = {"0": "attn", "1": "ff"}[rest[2]]
        mapped.ours[".".join(["resampler.layers", rest[1], sub, *rest[3:]])] = tensor
    elif rest[0] in ("latents", "norm"):
        mapped.ours["resampler." + ".".join(rest)] = tensor
    else:  # frame_embs / media_time_embs: not in any released model
        mapped.unknown.append(key)


def _map_lm(
    key: str, tensor: torch.Tensor, lm, block_of_layer: dict[int, int], mapped: _Mapped
) -> None:
    name = key.removeprefix("lang_encoder.")
    if name.startswith("old_decoder_blocks."):
        return  # the same tensors as <layers>.<i>.decoder_layer
    layers_path = lm.layout.layers
    layer, inner = None, ""
    if name.startswith(f"{layers_path}."):
        index, _, inner = name.removeprefix(f"{layers_path}.").partition(".")
        layer = int(index)
    elif name.startswith("gated_cross_attn_layers."):
        index, _, inner = name.removeprefix("gated_cross_attn_layers.").partition(".")
        layer, inner = int(index), "gated_cross_attn_layer." + inner
    if layer is not None and inner.startswith("gated_cross_attn_layer."):
        mapped.layers.add(layer)
        if layer not in block_of_layer:
            mapped.unknown.append(key)
            return
        sub = inner.removeprefix("gated_cross_attn_layer.")
        mapped.ours[f"lm.gated_blocks.{block_of_layer[layer]}.{sub}"] = tensor
    elif layer is not None and inner.startswith("decoder_layer."):
        ours = f"lm.hf.{layers_path}.{layer}." + inner.removeprefix("decoder_layer.")
        mapped.frozen[ours] = tensor
    elif key not in mapped.embedding_keys:  # the embeddings: _new_token_rows
        mapped.frozen["lm.hf." + name] = tensor


def _new_token_rows(
    lm,
    their_embed: torch.Tensor,
    their_head: torch.Tensor | None,
    embed_key: str,
    head_key: str,
    mapped: _Mapped,
) -> None:
    """The new tokens' input (and output) rows, from their embedding (and head)."""
    new_ids = list(lm.new_tokens.token_ids.tolist())
    if their_embed.shape[0] <= max(new_ids):
        raise ValueError(
            f"{embed_key} has {their_embed.shape[0]} rows but the tokenizer's new tokens have "
            f"ids {new_ids}: the tokenizer does not match the checkpoint"
        )
    mapped.ours["lm.new_tokens.input_rows"] = their_embed[new_ids]
    head = lm.hf.get_output_embeddings().weight
    if lm.new_tokens.output_rows is not None:
        if their_head is not None:
            mapped.ours["lm.new_tokens.output_rows"] = their_head[new_ids]
        else:
            # OpenFlamingo resizes an untied LM head with random rows it neither trains nor
            # saves: they cannot be recovered, so ours keep their initialisation (the mean row).
            warnings.warn(
                f"the checkpoint has no {head_key}: the output rows of {new_ids} keep their "
                "initial values, so logits of the new tokens differ from OpenFlamingo's "
                "(whose rows were random and untrained)",
                stacklevel=3,
            )
            mapped.ours["lm.new_tokens.output_rows"] = lm.new_tokens.output_rows.detach().clone()
    elif their_head is not None and head is not lm.hf.get_input_embeddings().weight:
        mapped.frozen["lm.hf." + head_key.removeprefix("lang_encoder.")] = their_head


def _check(model: Flamingo, mapped: _Mapped) -> None:
    """Every trained tensor there and of its shape; every frozen one equal to the source's."""
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(mapped.ours))
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:10]}\n{OPENFLAMINGO_LAYOUT}")
    for name, tensor in mapped.ours.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{name}: OpenFlamingo tensor of shape {tuple(tensor.shape)}, the config builds "
                f"{tuple(expected[name].shape)}: the config does not match the checkpoint"
            )
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    mismatched = [
        n
        for n, t in mapped.frozen.items()
        if n not in params
        or params[n].shape != t.shape
        or not torch.allclose(params[n].float(), t.float(), atol=1e-6)
    ]
    if mismatched:
        raise ValueError(
            "frozen weights in the checkpoint differ from those the config loads from its sources "
            f"(wrong vision or LM model?): {mismatched[:10]}"
        )


def _prepared(cfg: FlamingoConfig) -> FlamingoConfig:
    check_config(cfg)
    return cfg.replace({"lm.save_input_embeddings": True})  # its training updated every row


register(
    Format(
        "openflamingo",
        None,  # a checkpoint.pt names no config: the release's (configs/model/) or the user's
        load_openflamingo,
        prepare=_prepared,
        storage_free=False,  # the tower and the LM come from their own sources
        description="an OpenFlamingo checkpoint.pt (read with weights_only=True)",
    )
)
