"""LLaVA checkpoints (``llava-hf/*``, transformers' ``LlavaForConditionalGeneration``) -> our
model with the LLaVA connector.

LLaVA-1.5 is a CLIP tower read at its second-to-last block (the CLS token dropped), a two-layer
GELU MLP, and a decoder LM (Vicuna: transformers' Llama) that reads the projected tokens in
place of the ``<image>`` tokens. Each of those is a config field on our side, which
:func:`llava_config` sets from the checkpoint's ``config.json`` (read through transformers' own
``LlavaConfig``, so the fields a ``config.json`` leaves out take transformers' defaults):

- tower: ``vision.feature_layer`` (``vision_feature_layer``), ``vision.cls_token``
  (``vision_feature_select_strategy: full`` keeps it), ``vision.ln_post_on_tokens: false``,
  ``vision.resize: crop`` (the CLIP image processor: shortest side, then a center crop); the
  HF-CLIP tower's weights are mapped onto an open_clip tower built alone and carried in the
  converted checkpoint, as for IDEFICS;
- connector: ``connector: llava``, ``projector.layers: 2``, ``projector.activation``
  (``projector_hidden_act``), ``projector.bias`` (``multimodal_projector_bias``);
- LM: the text config inline (any family of ``flamingo.lm.DECODER_LAYOUTS``), its weights
  mapped by name; ``lm.special_tokens: llava`` (the tokenizer's own ``<image>``, whose
  embedding row the LM has).

Both key layouts are read: the one the ``llava-hf`` repos were uploaded with
(``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``) and the one
transformers 5 writes (``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``).
An option this cannot reproduce is refused, naming the field. ``tests/test_llava.py`` holds
the logits and greedy tokens to transformers' ``LlavaForConditionalGeneration`` on tiny
random configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flamingo.config import OPENAI_MEAN, OPENAI_STD, FlamingoConfig
from flamingo.convert.mapping import (
    assign_with_lm,
    clip_tower_names,
    frozen_dtype,
    lm_architecture,
    read_configs,
    read_tensors,
)
from flamingo.formats import Format, register

if TYPE_CHECKING:
    from flamingo.model import Flamingo

OLD_PREFIXES = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
}
"""The ``llava-hf`` repos' key prefixes -> transformers 5's (whose CLIP vision model also holds
its tower directly, not under ``vision_model.``: :data:`TOWER`)."""
TOWER = "model.vision_tower."
NESTED_TOWER = TOWER + "vision_model."

ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "quick_gelu": "quick_gelu"}


def _refuse(field: str, value: Any, why: str) -> None:
    raise ValueError(f"LLaVA config {field}={value!r} cannot be reproduced here: {why}")


def llava_config(
    config: dict[str, Any], tokenizer: str | Path, preprocessor: dict[str, Any] | None = None
) -> FlamingoConfig:
    """Our model config for a LLaVA ``config.json`` (a dict), its tokenizer (a directory or
    id) and its ``preprocessor_config.json`` (the normalisation; OpenAI CLIP's if none)."""
    from transformers import LlavaConfig  # the one reader of LLaVA's defaults

    if config.get("model_type") != "llava":
        raise ValueError(f"not a LLaVA config: model_type {config.get('model_type')!r}")
    llava = LlavaConfig.from_dict(config)
    vision, text = llava.vision_config, llava.text_config
    if vision.model_type != "clip_vision_model":
        _refuse("vision_config.model_type", vision.model_type, "the tower is a CLIP ViT")
    if vision.hidden_act not in ("gelu", "quick_gelu"):
        _refuse("vision_config.hidden_act", vision.hidden_act, "open_clip uses (quick) gelu")
    if vision.layer_norm_eps != 1e-5:
        _refuse("vision_config.layer_norm_eps", vision.layer_norm_eps, "open_clip uses 1e-5")
    width, heads = vision.hidden_size, vision.num_attention_heads
    if width % heads or vision.intermediate_size % width:
        _refuse(
            "vision_config.intermediate_size",
            vision.intermediate_size,
            "open_clip needs width divisible by heads and an integer MLP ratio",
        )
    layer = llava.vision_feature_layer
    if not isinstance(layer, int):
        _refuse("vision_feature_layer", layer, "one layer is read (no concatenation of several)")
    depth = vision.num_hidden_layers
    if layer >= 0:  # transformers indexes hidden_states: 0 is the embeddings, i after block i
        if not 1 <= layer <= depth:
            _refuse("vision_feature_layer", layer, f"the tower has {depth} blocks")
        layer -= depth + 1
    if layer == -(depth + 1):
        _refuse("vision_feature_layer", layer, "the embeddings alone are not a block's output")
    act = llava.projector_hidden_act
    if act not in ACTIVATIONS:
        _refuse("projector_hidden_act", act, f"the projector's activations are {list(ACTIVATIONS)}")
    preprocessor = preprocessor or {}
    model = {
        "connector": "llava",
        "vision": {
            "model_name": "llava-vision",
            "pretrained": None,
            "architecture": {
                "embed_dim": vision.projection_dim,
                "quick_gelu": vision.hidden_act == "quick_gelu",
                "vision_cfg": {
                    "image_size": vision.image_size,
                    "patch_size": vision.patch_size,
                    "width": width,
                    "layers": depth,
                    "head_width": width // heads,
                    "mlp_ratio": vision.intermediate_size // width,
                },
            },
            "cls_token": llava.vision_feature_select_strategy == "full",
            "ln_post_on_tokens": False,
            "feature_layer": layer,
            "image_size": vision.image_size,
            "resize": "crop",
            "crop_offset": "floor",  # CLIPImageProcessor's center crop rounds down
            "image_mean": list(preprocessor.get("image_mean", OPENAI_MEAN)),
            "image_std": list(preprocessor.get("image_std", OPENAI_STD)),
        },
        "projector": {
            "layers": 2,
            "activation": ACTIVATIONS[act],
            "bias": bool(llava.multimodal_projector_bias),
        },
        "lm": {
            "name_or_path": None,
            "architecture": lm_architecture(text, bool(llava.tie_word_embeddings)),
            "tokenizer": str(tokenizer),
            "special_tokens": "llava",
        },
        "frozen_dtype": frozen_dtype(text, config),
    }
    return FlamingoConfig.from_dict(model)


def directory_config(directory: str | Path) -> FlamingoConfig:
    """:func:`llava_config` of a LLaVA checkpoint directory (its ``config.json``, its
    tokenizer and its ``preprocessor_config.json``)."""
    config, preprocessor = read_configs(directory, "llava", "LLaVA")
    return llava_config(config, directory, preprocessor)


def read_llava(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A LLaVA checkpoint directory's ``config.json`` and its tensors, under transformers 5's
    names (the older layout's prefixes rewritten)."""
    config, _ = read_configs(directory, "llava", "LLaVA")
    state = {}
    for name, tensor in read_tensors(directory, "LLaVA").items():
        for old, new in OLD_PREFIXES.items():
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        if name.startswith(NESTED_TOWER):
            name = TOWER + name.removeprefix(NESTED_TOWER)
        state[name] = tensor
    return config, state


def load_llava(model: Flamingo, state: dict[str, torch.Tensor]) -> Flamingo:
    """Load a LLaVA state dict (:func:`read_llava`'s names) into ``model``, built from
    :func:`llava_config`. Strict, as :func:`flamingo.convert.mapping.assign_mapped` is."""
    lm = model.lm
    layers = len(model.vision.visual.transformer.resblocks)
    names = clip_tower_names(layers, TOWER)
    for p in ("weight", "bias") if model.cfg.projector.bias else ("weight",):
        for i in (1, 2):
            names[f"projector.linear_{i}.{p}"] = (f"model.multi_modal_projector.linear_{i}.{p}",)
    prefix = lm.hf.base_model_prefix + "."
    for name, _ in lm.hf.named_parameters():  # deduplicated: a tied head is not listed
        theirs = name.removeprefix(prefix)
        names["lm.hf." + name] = (
            "model.language_model." + theirs if name.startswith(prefix) else name,
        )
    assign_with_lm(model, state, names, "LLaVA", head="lm_head.weight")
    return model


register(
    Format(
        "llava",
        directory_config,
        lambda model, directory: load_llava(model, read_llava(directory)[1]),
        description="a LLaVA checkpoint (transformers' format, llava-hf/*)",
    )
)
