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
    state = load_state(state_dict_or_path)
    lm = model.lm
    layers_path = lm.layout.layers
    embed = lm.hf.get_input_embeddings().weight
    head = lm.hf.get_output_embeddings().weight
    all_names = list(lm.hf.named_parameters(remove_duplicate=False))
    embed_keys = [f"lang_encoder.{n}" for n, p in all_names if p is embed]
    head_keys = [f"lang_encoder.{n}" for n, p in all_names if p is head]  # == embed_keys if tied
    embed_key = next((k for k in embed_keys if k in state), embed_keys[0])
    head_key = next((k for k in head_keys if k in state), head_keys[0])

    ours: dict[str, torch.Tensor] = {}
    frozen_checks: dict[str, torch.Tensor] = {}  # their frozen tensor -> our key
    unknown = []
    block_of_layer = {layer: i for i, layer in enumerate(lm.layer_indices)}
    found_layers: set[int] = set()
    for key, tensor in state.items():
        parts = key.split(".")
        if key.startswith("perceiver."):
            rest = parts[1:]
            if rest[0] == "layers":
                sub = {"0": "attn", "1": "ff"}[rest[2]]
                ours[".".join(["resampler.layers", rest[1], sub, *rest[3:]])] = tensor
            elif rest[0] in ("latents", "norm"):
                ours["resampler." + ".".join(rest)] = tensor
            else:  # frame_embs / media_time_embs: not in any released model
                unknown.append(key)
        elif key.startswith("vision_encoder."):
            frozen_checks["vision.visual." + key.removeprefix("vision_encoder.")] = tensor
        elif key.startswith("lang_encoder."):
            name = key.removeprefix("lang_encoder.")
            if name.startswith("old_decoder_blocks."):
                continue  # the same tensors as <layers>.<i>.decoder_layer
            layer, inner = None, ""
            if name.startswith(f"{layers_path}."):
                index, _, inner = name.removeprefix(f"{layers_path}.").partition(".")
                layer = int(index)
            elif name.startswith("gated_cross_attn_layers."):
                index, _, inner = name.removeprefix("gated_cross_attn_layers.").partition(".")
                layer, inner = int(index), "gated_cross_attn_layer." + inner
            if layer is not None and inner.startswith("gated_cross_attn_layer."):
                found_layers.add(layer)
                if layer not in block_of_layer:
                    unknown.append(key)
                    continue
                sub = inner.removeprefix("gated_cross_attn_layer.")
                ours[f"lm.gated_blocks.{block_of_layer[layer]}.{sub}"] = tensor
            elif layer is not None and inner.startswith("decoder_layer."):
                our_name = f"lm.hf.{layers_path}.{layer}." + inner.removeprefix("decoder_layer.")
                frozen_checks[our_name] = tensor
            elif key in embed_keys or key in head_keys:
                pass  # handled below
            else:
                frozen_checks["lm.hf." + name] = tensor
        else:
            unknown.append(key)
    if found_layers != set(lm.layer_indices):
        raise ValueError(
            f"the checkpoint has gated blocks before decoder layers {sorted(found_layers)}, the "
            f"config places them before {lm.layer_indices}: fix xattn.every_n_layers/first_layer"
        )
    if unknown:
        raise ValueError(
            f"keys outside OpenFlamingo's layout: {unknown[:10]}\n{OPENFLAMINGO_LAYOUT}"
        )
    if embed_key not in state:
        raise ValueError(
            f"the checkpoint has no input embedding ({embed_key})\n{OPENFLAMINGO_LAYOUT}"
        )

    new_ids = list(lm.new_tokens.token_ids.tolist())
    their_embed = state[embed_key]
    if their_embed.shape[0] <= max(new_ids):
        raise ValueError(
            f"{embed_key} has {their_embed.shape[0]} rows but the tokenizer's new tokens have "
            f"ids {new_ids}: the tokenizer does not match the checkpoint"
        )
    ours["lm.new_tokens.input_rows"] = their_embed[new_ids]
    if lm.new_tokens.output_rows is not None:
        if head_key in state:
            ours["lm.new_tokens.output_rows"] = state[head_key][new_ids]
        else:
            # OpenFlamingo resizes an untied LM head with random rows it neither trains nor
            # saves: they cannot be recovered, so ours keep their initialisation (the mean row).
            warnings.warn(
                f"the checkpoint has no {head_key}: the output rows of {new_ids} keep their "
                "initial values, so logits of the new tokens differ from OpenFlamingo's "
                "(whose rows were random and untrained)",
                stacklevel=2,
            )
            ours["lm.new_tokens.output_rows"] = lm.new_tokens.output_rows.detach().clone()
    elif head_key in state and head is not embed:
        frozen_checks["lm.hf." + head_key.removeprefix("lang_encoder.")] = state[head_key]

    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:10]}\n{OPENFLAMINGO_LAYOUT}")
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{name}: OpenFlamingo tensor of shape {tuple(tensor.shape)}, the config builds "
                f"{tuple(expected[name].shape)}: the config does not match the checkpoint"
            )

    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    mismatched = [
        n
        for n, t in frozen_checks.items()
        if n not in params
        or params[n].shape != t.shape
        or not torch.allclose(params[n].float(), t.float(), atol=1e-6)
    ]
    if mismatched:
        raise ValueError(
            "frozen weights in the checkpoint differ from those the config loads from its sources "
            f"(wrong vision or LM model?): {mismatched[:10]}"
        )
    with torch.no_grad():
        rows = min(embed.shape[0], their_embed.shape[0])
        keep = torch.ones(rows, dtype=torch.bool)
        keep[[i for i in new_ids if i < rows]] = False
        embed[:rows][keep] = their_embed[:rows][keep].to(embed.dtype)
    model.load_state_dict(ours, strict=False)
    return model


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
