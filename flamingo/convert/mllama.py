"""Llama 3.2 Vision checkpoints (``meta-llama/Llama-3.2-11B-Vision``, ``-90B-Vision``, their
``-Instruct``; transformers' ``MllamaForConditionalGeneration``) -> our model, and back.

The parts (``connector: mllama``; ``flamingo/mllama.py``): the tiled tower is transformers' own
``MllamaVisionModel`` (``vision.kind: mllama``, its config inline); the projection to the LM's
width is the projector with one linear layer; the text model's cross-attention layers, which
sit *between* its self-attention layers (``cross_attention_layers`` of the 40-layer stack),
become blocks run before the following Llama layer (``mllama.layers``), and its self-attention
layers are transformers' Llama's, with the embedding's 8 extra rows (``<|image|>``'s among
them) and a head of ``vocab_size`` rows (``lm.head_rows``).

Both key layouts are read: the one the Meta repos were uploaded with (``vision_model.*``,
``language_model.model.*``, ``language_model.lm_head.*``, ``multi_modal_projector.*``) and the
one transformers 5 writes (``model.vision_model.*``, ``model.language_model.*``, ``lm_head.*``,
``model.multi_modal_projector.*``). :func:`export_mllama` writes transformers 5's, with the
config and the tokenizer, so a fine-tuned model loads in ``MllamaForConditionalGeneration``.
An option this cannot reproduce is refused, naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flamingo.convert.mapping import (
    DROPPED_TEXT_KEYS,
    Names,
    assign_with_lm,
    frozen_dtype,
    read_configs,
    read_tensors,
)
from flamingo.formats import Format, register

if TYPE_CHECKING:
    from flamingo.config import FlamingoConfig
    from flamingo.model import Flamingo

OLD_PREFIXES = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_model.": "model.vision_model.",
    "multi_modal_projector.": "model.multi_modal_projector.",
}
"""The Meta repos' key prefixes -> transformers 5's."""
EXTRA_ROWS = 8
"""The text model's embedding rows beyond its vocabulary (``<|image|>`` is the first)."""
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
"""``MllamaImageProcessor``'s mean and std where a ``preprocessor_config.json`` gives none."""


def _refuse(field: str, value: Any, why: str) -> None:
    raise ValueError(f"Llama 3.2 Vision config {field}={value!r} cannot be reproduced here: {why}")


def llama_layers(cross: list[int], total: int) -> tuple[list[int], list[int]]:
    """The text stack's self-attention layer indices (the Llama's layers, in order), and for
    each cross-attention layer the Llama layer it runs before."""
    cross = sorted(cross)
    selfs = [i for i in range(total) if i not in cross]
    before = [c - sum(1 for d in cross if d < c) for c in cross]
    if any(b >= len(selfs) for b in before):
        _refuse(
            "text_config.cross_attention_layers",
            cross,
            "a cross-attention layer after the last self-attention layer has no Llama layer to "
            "run before",
        )
    return selfs, before


def check_preprocessor(pre: dict[str, Any], vision: Any) -> None:
    """Refuse a ``preprocessor_config.json`` whose options our tiling does not make."""
    tiles = pre.get("max_image_tiles", 4)
    if tiles != vision.max_num_tiles:
        _refuse("max_image_tiles", tiles, f"the tower takes {vision.max_num_tiles} tiles")
    size = pre.get("size", {"height": vision.image_size, "width": vision.image_size})
    if size.get("height") != vision.image_size or size.get("width") != vision.image_size:
        _refuse("size", size, f"tiles are {vision.image_size} pixels square")
    for key, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True),
                      ("do_pad", True), ("resample", 2)):  # fmt: skip
        if pre.get(key, want) != want:
            _refuse(key, pre[key], f"the tiling makes {want} (MllamaImageProcessor's)")
    if abs(pre.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        _refuse("rescale_factor", pre["rescale_factor"], "pixels are scaled by 1/255")


def mllama_config(
    config: dict[str, Any],
    tokenizer: str | Path,
    preprocessor: dict[str, Any] | None = None,
    rows_without_image: str = "zero",
) -> FlamingoConfig:
    """Our model config for a Llama 3.2 Vision ``config.json`` (a dict), its tokenizer (a
    directory or id) and its ``preprocessor_config.json``."""
    from transformers import MllamaConfig  # the one reader of Mllama's defaults

    from flamingo.config import FlamingoConfig

    if config.get("model_type") != "mllama":
        raise ValueError(f"not a Llama 3.2 Vision config: model_type {config.get('model_type')!r}")
    mllama = MllamaConfig.from_dict(config)
    vision, text = mllama.vision_config, mllama.text_config
    if text.hidden_size != text.num_attention_heads * (
        text.hidden_size // text.num_attention_heads
    ):
        _refuse("text_config.hidden_size", text.hidden_size, "heads must divide the width")
    if text.hidden_act != "silu":
        _refuse("text_config.hidden_act", text.hidden_act, "the Llama layers use silu")
    selfs, before = llama_layers(list(text.cross_attention_layers), text.num_hidden_layers)
    preprocessor = preprocessor or {}
    check_preprocessor(preprocessor, vision)
    arch = {
        k: v
        for k, v in vision.to_diff_dict().items()
        if k not in DROPPED_TEXT_KEYS and k != "model_type"
    }
    llama = {
        "model_type": "llama",
        "vocab_size": text.vocab_size + EXTRA_ROWS,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": len(selfs),
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_parameters": dict(text.rope_parameters),
        "tie_word_embeddings": bool(text.tie_word_embeddings),
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
    }
    model = {
        "connector": "mllama",
        "vision": {
            "kind": "mllama",
            "model_name": "mllama-vision",
            "pretrained": None,
            "architecture": arch,
            "image_size": vision.image_size,
            "image_mean": list(preprocessor.get("image_mean", IMAGENET_STANDARD)),
            "image_std": list(preprocessor.get("image_std", IMAGENET_STANDARD)),
        },
        "projector": {"layers": 1, "bias": True},
        "mllama": {"layers": before, "rows_without_image": rows_without_image},
        "lm": {
            "name_or_path": None,
            "architecture": llama,
            "tokenizer": str(tokenizer),
            "special_tokens": "mllama",
            "head_rows": text.vocab_size,
        },
        "frozen_dtype": frozen_dtype(text, config),
    }
    return FlamingoConfig.from_dict(model)


def directory_config(directory: str | Path) -> FlamingoConfig:
    """:func:`mllama_config` of a checkpoint directory (its ``config.json``, its tokenizer
    and its ``preprocessor_config.json``)."""
    config, preprocessor = read_configs(directory, "mllama", "Llama 3.2 Vision")
    return mllama_config(config, directory, preprocessor)


def read_mllama(directory: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint directory's tensors under transformers 5's names."""
    state = {}
    for name, tensor in read_tensors(Path(directory), "Llama 3.2 Vision").items():
        for old, new in OLD_PREFIXES.items():
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        state[name] = tensor
    return state


def mllama_names(model: Flamingo) -> Names:
    """Our parameter -> its tensor in transformers 5's layout."""
    text_layers = len(model.lm.layer_indices) + model.lm.hf.config.num_hidden_layers
    cross = cross_attention_layers(model.cfg.mllama.layers, text_layers)
    selfs = [i for i in range(text_layers) if i not in cross]
    names: Names = {}
    for name, _ in model.vision.model.named_parameters():
        names[f"vision.model.{name}"] = (f"model.vision_model.{name}",)
    for p in ("weight", "bias"):
        names[f"projector.linear_1.{p}"] = (f"model.multi_modal_projector.{p}",)
    for name, _ in model.lm.gated_blocks.named_parameters():
        k, _, rest = name.partition(".")
        names[f"lm.gated_blocks.{name}"] = (f"model.language_model.layers.{cross[int(k)]}.{rest}",)
    for name, _ in model.lm.hf.named_parameters():
        if name.startswith("model.layers."):
            j, _, rest = name.removeprefix("model.layers.").partition(".")
            theirs = f"model.language_model.layers.{selfs[int(j)]}.{rest}"
        elif name.startswith("model."):
            theirs = "model.language_model." + name.removeprefix("model.")
        else:
            theirs = name  # lm_head.weight
        names[f"lm.hf.{name}"] = (theirs,)
    return names


def cross_attention_layers(before: list[int], total: int) -> list[int]:
    """The inverse of :func:`llama_layers`: the cross-attention layers' indices in the text
    stack of ``total`` layers, from the Llama layers they run before."""
    return [b + k for k, b in enumerate(sorted(before))] if total else []


def load_mllama(model: Flamingo, state: dict[str, torch.Tensor]) -> Flamingo:
    """Load a Llama 3.2 Vision state dict (:func:`read_mllama`'s names) into ``model``, built
    from :func:`mllama_config`. Strict: every tensor placed, every parameter given."""
    assign_with_lm(model, state, mllama_names(model), "Llama 3.2 Vision", head="lm_head.weight")
    return model


def export_mllama(model: Flamingo, processor: Any, out: str | Path) -> Path:
    """Write ``model`` (``connector: mllama``, e.g. fine-tuned) in transformers' format:
    ``config.json``, ``model.safetensors`` and the tokenizer, loadable by
    ``MllamaForConditionalGeneration.from_pretrained`` and by :meth:`Flamingo.from_pretrained`."""
    from safetensors.torch import save_file
    from transformers import MllamaConfig

    if model.cfg.connector != "mllama":
        raise ValueError(
            f"only connector: mllama exports to Llama 3.2 Vision's format (this model is "
            f"connector: {model.cfg.connector})"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    state = {theirs[0]: params[ours].detach() for ours, theirs in mllama_names(model).items()}
    hf = model.lm.hf.config
    text_layers = len(model.lm.layer_indices) + hf.num_hidden_layers
    vocab = model.cfg.lm.head_rows
    text = {
        "vocab_size": vocab,
        "hidden_size": hf.hidden_size,
        "intermediate_size": hf.intermediate_size,
        "num_hidden_layers": text_layers,
        "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": hf.num_key_value_heads,
        "hidden_act": hf.hidden_act,
        "max_position_embeddings": hf.max_position_embeddings,
        "rms_norm_eps": hf.rms_norm_eps,
        "rope_parameters": dict(hf.rope_parameters),
        "cross_attention_layers": cross_attention_layers(model.cfg.mllama.layers, text_layers),
        "tie_word_embeddings": bool(hf.tie_word_embeddings),
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
    }
    config = MllamaConfig(
        vision_config=dict(model.cfg.vision.architecture or {}),
        text_config=text,
        image_token_index=model.special_tokens.image_id,
    )
    config.save_pretrained(out)
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"))
    processor.tokenizer.save_pretrained(str(out))
    tiles = config.vision_config.max_num_tiles
    pre = {
        "image_processor_type": "MllamaImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_pad": True,
        "do_convert_rgb": True,
        "resample": 2,
        "rescale_factor": 1 / 255,
        "max_image_tiles": tiles,
        "size": {"height": model.cfg.vision.image_size, "width": model.cfg.vision.image_size},
        "image_mean": list(model.cfg.vision.image_mean),
        "image_std": list(model.cfg.vision.image_std),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out


register(
    Format(
        "mllama",
        directory_config,
        lambda model, directory: load_mllama(model, read_mllama(directory)),
        loads_partitioned=True,  # tests/test_mllama.py: ZeRO-3 partitioned = ZeRO-2
        description="a Llama 3.2 Vision checkpoint (transformers' format, meta-llama/*-Vision*)",
    )
)
