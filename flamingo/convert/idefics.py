"""IDEFICS checkpoints (``HuggingFaceM4/idefics-*``, transformers' ``IdeficsForVisionText2Text``)
-> our model.

IDEFICS is a Flamingo: a frozen CLIP tower, a Perceiver Resampler, tanh-gated cross-attention
blocks in a frozen Llama. What differs from the paper's and OpenFlamingo's choices is a named
config field on our side, which :func:`idefics_config` sets from the checkpoint's
``config.json`` (nested ``vision_config``/``perceiver_config``, or those keys flat at the top):

- tower: ``vision.cls_token`` (the CLS token is kept), ``vision.ln_post_on_tokens: false``,
  ``vision.resize: squash``; the HF-CLIP tower's weights are mapped onto an open_clip tower
  (one tower implementation for every model; the two compute the same ViT), built alone
  (``vision.architecture`` without ``text_cfg``) and carried in the converted checkpoint;
- resampler: its head count and width, ``resampler.ff_activation: relu``,
  ``resampler.qk_norm``;
- gated blocks: ``xattn.norm: rmsnorm`` with the LM's epsilon, the LM's head count and head
  width, ``xattn.qk_norm``, ``xattn.ff: swiglu`` of the LM's MLP width, scalar or vector gates,
  before layers 0, n, 2n, ... (``xattn.first_layer: 0``), ``xattn.reset_after_eos``;
- tokens: ``lm.special_tokens: idefics``; IDEFICS's decoupled extra embedding and output rows
  are our new-token rows; the decoder is transformers' Llama, whose parameter names IDEFICS's
  decoder shares.

An option this cannot reproduce is refused, naming the field. ``tests/test_idefics.py`` holds
the logits to transformers' ``IdeficsForVisionText2Text`` on tiny random configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flamingo.config import OPENAI_MEAN, OPENAI_STD, FlamingoConfig
from flamingo.convert.mapping import (
    assign_mapped,
    clip_tower_names,
    read_configs,
    read_tensors,
)
from flamingo.formats import Format, register

if TYPE_CHECKING:
    from flamingo.model import Flamingo

IDEFICS_RELEASES = (
    "HuggingFaceM4/idefics-9b",
    "HuggingFaceM4/idefics-9b-instruct",
    "HuggingFaceM4/idefics-80b",
    "HuggingFaceM4/idefics-80b-instruct",
)
"""The released IDEFICS checkpoints, each with its architecture in
``configs/model/<name>.yaml`` (``tests/test_model_configs.py`` holds them to the import); any
repo or directory whose ``config.json`` says ``"model_type": "idefics"`` converts the same
way."""

KNOWN_TOWERS = {
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": {
        "embed_dim": 1280,
        "image_size": 224,
        "intermediate_size": 5120,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "patch_size": 14,
    },
}
"""Vision towers by ``vision_model_name``: the dimensions a flat config may leave out."""

VISION_KEYS = (
    "embed_dim",
    "image_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "patch_size",
)
PERCEIVER_KEYS = (
    "resampler_depth",
    "resampler_head_dim",
    "resampler_n_heads",
    "resampler_n_latents",
)
IGNORED_BUFFERS = ("position_ids", "rotary_emb.inv_freq")
"""Non-parameter tensors some IDEFICS checkpoints carry, rebuilt by the model."""


def _refuse(field: str, value: Any, why: str) -> None:
    raise ValueError(f"IDEFICS config {field}={value!r} cannot be reproduced here: {why}")


def _sub(config: dict[str, Any], nested: str, key: str, flat: str, fallback: dict) -> Any:
    """``config[nested][key]``, else the flat ``config[flat]``, else ``fallback[key]``."""
    inner = config.get(nested) or {}
    for source in (inner, config, fallback):
        name = key if source is not config else flat
        if name in source:
            return source[name]
    raise ValueError(
        f"IDEFICS config has no {nested}.{key} (nor a flat {flat}): not an IDEFICS config.json?"
    )


def idefics_config(
    config: dict[str, Any], tokenizer: str | Path, preprocessor: dict[str, Any] | None = None
) -> FlamingoConfig:
    """Our model config for an IDEFICS ``config.json`` (a dict), its tokenizer (a directory
    or id) and its ``preprocessor_config.json`` (the normalisation; OpenAI CLIP's if none)."""
    if config.get("model_type", "idefics") != "idefics":
        raise ValueError(f"not an IDEFICS config: model_type {config.get('model_type')!r}")
    vision_raw = config.get("vision_config") or {}
    tower = KNOWN_TOWERS.get(
        vision_raw.get("vision_model_name", config.get("vision_model_name", "")), {}
    )
    vision = {k: _sub(config, "vision_config", k, f"vision_{k}", tower) for k in VISION_KEYS}
    act = vision_raw.get("hidden_act", config.get("vision_hidden_act", "gelu"))
    _refuse_what_differs(config, vision_raw, vision, act)
    llama = _llama(config)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    model = {
        "vision": _vision(vision, act, preprocessor or {}),
        "resampler": _resampler(config),
        "xattn": _xattn(config, llama),
        "lm": {
            "name_or_path": None,
            "architecture": llama,
            "tokenizer": str(tokenizer),
            "special_tokens": "idefics",
        },
        "frozen_dtype": dtype if dtype in ("bfloat16", "float16") else "float32",
    }
    return FlamingoConfig.from_dict(model)


def _refuse_what_differs(
    config: dict[str, Any], vision_raw: dict[str, Any], vision: dict[str, Any], act: str
) -> None:
    """Options our model cannot reproduce are errors naming the field."""
    if act not in ("gelu", "quick_gelu"):
        _refuse("vision_config.hidden_act", act, "open_clip towers use gelu or quick_gelu")
    eps = vision_raw.get("layer_norm_eps", 1e-5)
    if eps != 1e-5:
        _refuse("vision_config.layer_norm_eps", eps, "open_clip's LayerNorms use 1e-5")
    if vision_raw.get("num_channels", 3) != 3:
        _refuse("vision_config.num_channels", vision_raw["num_channels"], "RGB towers only")
    if not config.get("use_resampler", True):
        _refuse("use_resampler", False, "our connector always resamples to fixed latents")
    alpha = config.get("alpha_type", "float")
    if alpha not in ("float", "vector"):
        _refuse("alpha_type", alpha, "the gates are a float or a vector")
    layers, interval = config.get("num_hidden_layers", 32), config.get("cross_layer_interval", 1)
    if layers % interval:
        _refuse(
            "cross_layer_interval",
            interval,
            f"it must divide num_hidden_layers={layers} (IDEFICS itself fails otherwise)",
        )
    if config.get("tie_word_embeddings", False):
        _refuse("tie_word_embeddings", True, "no IDEFICS release ties them; not mapped")
    if config.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", config["hidden_act"], "the decoder is a Llama (silu)")
    width, heads = vision["embed_dim"], vision["num_attention_heads"]
    if width % heads or vision["intermediate_size"] % width:
        _refuse(
            "vision_config.intermediate_size",
            vision["intermediate_size"],
            "open_clip needs width divisible by heads and an integer MLP ratio",
        )


def _llama(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder: a Llama, inline (its weights are the checkpoint's)."""
    heads = config.get("num_attention_heads", 32)
    llama = {
        "model_type": "llama",
        "vocab_size": config.get("vocab_size", 32000),
        "hidden_size": config.get("hidden_size", 4096),
        "intermediate_size": config.get("intermediate_size", 11008),
        "num_hidden_layers": config.get("num_hidden_layers", 32),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "pad_token_id": config.get("pad_token_id", 0),
        "bos_token_id": config.get("bos_token_id", 1),
        "eos_token_id": config.get("eos_token_id", 2),
    }
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if rope:
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            _refuse("rope_parameters", rope, "only IDEFICS's plain RoPE is mapped")
        llama["rope_theta"] = rope.get("rope_theta", 10000.0)
    return llama


def _vision(vision: dict[str, Any], act: str, preprocessor: dict[str, Any]) -> dict[str, Any]:
    """The HF-CLIP tower as an open_clip one (its weights the checkpoint's), squashing images."""
    width, heads = vision["embed_dim"], vision["num_attention_heads"]
    return {
        "model_name": "idefics-vision",
        "pretrained": None,
        "architecture": {
            "embed_dim": width,
            "quick_gelu": act == "quick_gelu",
            "vision_cfg": {
                "image_size": vision["image_size"],
                "patch_size": vision["patch_size"],
                "width": width,
                "layers": vision["num_hidden_layers"],
                "head_width": width // heads,
                "mlp_ratio": vision["intermediate_size"] // width,
            },
        },
        "cls_token": True,
        "ln_post_on_tokens": False,
        "image_size": vision["image_size"],
        "resize": "squash",
        "image_mean": list(preprocessor.get("image_mean", OPENAI_MEAN)),
        "image_std": list(preprocessor.get("image_std", OPENAI_STD)),
    }


def _resampler(config: dict[str, Any]) -> dict[str, Any]:
    perceiver = {k: _sub(config, "perceiver_config", k, k, {}) for k in PERCEIVER_KEYS}
    qk_key = "qk_layer_norms_perceiver"
    return {
        "depth": perceiver["resampler_depth"],
        "heads": perceiver["resampler_n_heads"],
        "dim_head": perceiver["resampler_head_dim"],
        "num_latents": perceiver["resampler_n_latents"],
        "ff_mult": 4,
        "ff_activation": "relu",
        "qk_norm": bool(_sub(config, "perceiver_config", qk_key, qk_key, {qk_key: False})),
    }


def _xattn(config: dict[str, Any], llama: dict[str, Any]) -> dict[str, Any]:
    heads = llama["num_attention_heads"]
    return {
        "every_n_layers": config.get("cross_layer_interval", 1),
        "first_layer": 0,
        "heads": heads,
        "dim_head": llama["hidden_size"] // heads,
        "ff": "swiglu",
        "ff_hidden": llama["intermediate_size"],
        "norm": "rmsnorm",
        "norm_eps": llama["rms_norm_eps"],
        "qk_norm": bool(config.get("qk_layer_norms", False)),
        "gate": "vector" if config.get("alpha_type", "float") == "vector" else "scalar",
        "attend": "last",
        "ff_on_imageless_tokens": True,
        "reset_after_eos": True,
    }


def directory_config(directory: str | Path) -> FlamingoConfig:
    """:func:`idefics_config` of an IDEFICS checkpoint directory (its ``config.json``, its
    tokenizer and its ``preprocessor_config.json``)."""
    config, preprocessor = read_configs(directory, "idefics", "IDEFICS")
    return idefics_config(config, directory, preprocessor)


def read_idefics(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An IDEFICS checkpoint directory's ``config.json`` and its tensors (safetensors files,
    sharded or not, else ``pytorch_model*.bin`` read with ``weights_only=True``)."""
    config, _ = read_configs(directory, "idefics", "IDEFICS")
    return config, read_tensors(directory, "IDEFICS")


def _connector_names(model: Flamingo) -> dict[str, tuple[str, ...]]:
    """The resampler's and gated blocks' tensors -> IDEFICS's."""
    names: dict[str, tuple[str, ...]] = {
        "resampler.latents": ("model.perceiver_resampler.latents",)
    }
    pr = "model.perceiver_resampler."
    for p in ("weight", "bias"):
        names[f"resampler.norm.{p}"] = (f"{pr}layer_norm.{p}",)
    for i in range(model.cfg.resampler.depth):
        theirs, mine = f"{pr}blocks.{i}.", f"resampler.layers.{i}."
        for p in ("weight", "bias"):
            names[f"{mine}attn.norm_media.{p}"] = (f"{theirs}0.context_layer_norm.{p}",)
            names[f"{mine}attn.norm_latents.{p}"] = (f"{theirs}0.latents_layer_norm.{p}",)
            names[f"{mine}ff.0.{p}"] = (f"{theirs}1.ln.{p}",)
        names[mine + "attn.to_q.weight"] = (theirs + "0.q_proj.weight",)
        names[mine + "attn.to_kv.weight"] = (theirs + "0.k_proj.weight", theirs + "0.v_proj.weight")
        names[mine + "attn.to_out.weight"] = (theirs + "0.output_proj.weight",)
        names[mine + "ff.1.weight"] = (theirs + "1.fc.weight",)
        names[mine + "ff.3.weight"] = (theirs + "1.c_proj.weight",)
        if model.cfg.resampler.qk_norm:
            for m in ("q", "k"):
                for p in ("weight", "bias"):
                    names[f"{mine}attn.{m}_norm.{p}"] = (f"{theirs}0.{m}_layer_norm.{p}",)
    for j in range(len(model.lm.gated_blocks)):
        theirs, mine = f"model.gated_cross_attn_layers.{j}.", f"lm.gated_blocks.{j}."
        names[mine + "attn.norm.weight"] = (theirs + "input_layernorm.weight",)
        names[mine + "attn.to_q.weight"] = (theirs + "cross_attn.q_proj.weight",)
        names[mine + "attn.to_kv.weight"] = (
            theirs + "cross_attn.k_proj.weight",
            theirs + "cross_attn.v_proj.weight",
        )
        names[mine + "attn.to_out.weight"] = (theirs + "cross_attn.o_proj.weight",)
        if model.cfg.xattn.qk_norm:
            for m in ("q", "k"):
                names[f"{mine}attn.{m}_norm.weight"] = (
                    f"{theirs}cross_attn.{m}_layer_norm.weight",
                )
        names[mine + "ff.norm.weight"] = (theirs + "post_attention_layernorm.weight",)
        for m in ("gate_proj", "up_proj", "down_proj"):
            names[f"{mine}ff.{m}.weight"] = (f"{theirs}mlp.{m}.weight",)
        names[mine + "attn_gate"] = (theirs + "alpha_cross_attn",)
        names[mine + "ff_gate"] = (theirs + "alpha_dense",)
    return names


def load_idefics(model: Flamingo, state: dict[str, torch.Tensor]) -> Flamingo:
    """Load an IDEFICS state dict (``IdeficsForVisionText2Text``'s names) into ``model``,
    built from :func:`idefics_config`. Strict: every tensor of the model is assigned, every
    IDEFICS tensor used; a missing, unused or mis-shaped one is an error naming it."""
    lm = model.lm
    vocab = lm.base_vocab
    new_ids = lm.new_tokens.token_ids.tolist()
    extra = state.get("model.embed_tokens.additional_embedding.weight")
    rows = 0 if extra is None else extra.shape[0]
    if new_ids != list(range(vocab, vocab + rows)):
        raise ValueError(
            f"the tokenizer's IDEFICS tokens have ids {new_ids}, but the checkpoint's "
            f"additional_vocab_size={rows} gives rows for ids {vocab}..{vocab + rows - 1}: "
            "the tokenizer does not match the checkpoint"
        )
    layers = len(model.vision.visual.transformer.resblocks)
    names = clip_tower_names(layers, "model.vision_model.")
    names.update(_connector_names(model))
    for name, _ in lm.hf.named_parameters():  # transformers' Llama names are IDEFICS's
        names["lm.hf." + name] = (name,)
    names["lm.new_tokens.input_rows"] = ("model.embed_tokens.additional_embedding.weight",)
    if lm.new_tokens.output_rows is not None:
        names["lm.new_tokens.output_rows"] = ("lm_head.additional_fc.weight",)
    # the contrastive projection: IDEFICS's tower has none
    assign_mapped(model, state, names, "IDEFICS", ("vision.visual.proj",), IGNORED_BUFFERS)
    return model


register(
    Format(
        "idefics",
        directory_config,
        lambda model, directory: load_idefics(model, read_idefics(directory)[1]),
        description="an IDEFICS checkpoint (transformers' format, HuggingFaceM4/idefics-*)",
    )
)
