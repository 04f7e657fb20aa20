"""What the transformers-format imports share: the HF CLIP tower's tensor names on our
open_clip tower, safetensors (or ``pytorch_model*.bin``) reading, and the strict assignment of
mapped tensors into a built model.

A mapping is ``our name -> the foreign tensors it is made of`` (several are concatenated: HF's
separate q, k and v projections are open_clip's packed ``in_proj``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from flamingo.layers import is_partitioned, shape_whole, write_whole

if TYPE_CHECKING:
    from torch import nn

Names = dict[str, tuple[str, ...]]


def read_configs(
    directory: str | Path, model_type: str, what: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A transformers checkpoint directory's ``config.json``, which must say ``model_type``
    (else an error naming the format, ``what``), and its ``preprocessor_config.json`` (None
    where it has none)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict) or config.get("model_type") != model_type:
        raise ValueError(f"{directory} is not a {what} checkpoint (config.json model_type)")
    pre = directory / "preprocessor_config.json"
    return config, json.loads(pre.read_text()) if pre.is_file() else None


DROPPED_TEXT_KEYS = ("architectures", "transformers_version", "_name_or_path", "dtype")
"""A text sub-config's keys that say nothing about the architecture."""


def lm_architecture(text: Any, tie_word_embeddings: bool) -> dict[str, Any]:
    """Our inline ``lm.architecture`` for a composite model's text sub-config (a transformers
    ``PretrainedConfig``): what differs from its family's defaults, its ``model_type``, and
    whether the head is tied (the composite's say, which can differ from the sub-config's)."""
    arch = {k: v for k, v in text.to_diff_dict().items() if k not in DROPPED_TEXT_KEYS}
    return {**arch, "model_type": text.model_type, "tie_word_embeddings": tie_word_embeddings}


def frozen_dtype(text: Any, config: dict[str, Any]) -> str:
    """Our ``frozen_dtype`` for the dtype a checkpoint's weights were saved in (its text
    sub-config's, else the top level's): a half precision kept, anything else float32."""
    dtype = str(getattr(text, "dtype", None) or config.get("dtype") or config.get("torch_dtype"))
    dtype = dtype.removeprefix("torch.")
    return dtype if dtype in ("bfloat16", "float16") else "float32"


def assign_with_lm(
    model: nn.Module, state: dict[str, torch.Tensor], names: Names, source: str, head: str
) -> None:
    """:func:`assign_mapped` for a composite checkpoint whose LM uses the tokenizer's own
    tokens (LLaVA, BLIP-2): no new token rows (refused if the tokenizer needed any), the
    contrastive projection absent from the tower, the head's copy in ``state`` (named
    ``head``) dropped when the LM ties it to the embedding, and the tie restored after."""
    lm = model.lm
    if lm.new_tokens.token_ids.numel():
        raise ValueError(
            f"the tokenizer needed new tokens {lm.new_tokens.token_ids.tolist()} (a <PAD>?), "
            f"which a {source} checkpoint has no rows for: give it the checkpoint's own tokenizer"
        )
    output, embed = lm.hf.get_output_embeddings(), lm.hf.get_input_embeddings()
    tied = output.weight is embed.weight
    if tied:
        state = {k: v for k, v in state.items() if k != head}  # the tie's copy
    absent = ("vision.visual.proj", "lm.new_tokens.input_rows", "lm.new_tokens.output_rows")
    assign_mapped(model, state, names, source, absent, ("position_ids", "rotary_emb.inv_freq"))
    if tied:  # assigning gave the embedding a new parameter: the head shares it again
        output.weight = embed.weight


def read_tensors(directory: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint directory: its safetensors files, sharded or
    not, else its ``pytorch_model*.bin`` files read with ``weights_only=True``."""
    files = sorted(Path(directory).glob("*.safetensors"))
    loader = lambda f: load_file(str(f))  # noqa: E731
    if not files:
        files = sorted(Path(directory).glob("pytorch_model*.bin"))
        loader = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731
    if not files:
        raise FileNotFoundError(
            f"{directory} has no *.safetensors or pytorch_model*.bin weights ({what})"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(loader(f))
    return state


def clip_tower_names(layers: int, theirs: str, ours: str = "vision.visual.") -> Names:
    """Our open_clip tower's tensors -> an HF ``CLIPVisionTransformer``'s under ``theirs``
    (e.g. ``model.vision_model.``): the two compute the same ViT."""
    names: Names = {
        ours + "class_embedding": (theirs + "embeddings.class_embedding",),
        ours + "conv1.weight": (theirs + "embeddings.patch_embedding.weight",),
        ours + "positional_embedding": (theirs + "embeddings.position_embedding.weight",),
    }
    for hf, mine in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            names[f"{ours}{mine}.{p}"] = (f"{theirs}{hf}.{p}",)
    pairs = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for i in range(layers):
        hf, mine = f"{theirs}encoder.layers.{i}.", f"{ours}transformer.resblocks.{i}."
        for m, t in pairs.items():
            for p in ("weight", "bias"):
                names[f"{mine}{m}.{p}"] = (f"{hf}{t}.{p}",)
        for p in ("weight", "bias"):
            names[f"{mine}attn.in_proj_{p}"] = tuple(f"{hf}self_attn.{x}_proj.{p}" for x in "qkv")
    return names


def assign_mapped(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    names: Names,
    source: str,
    absent: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> None:
    """Give ``model`` the tensors of ``state`` that ``names`` maps to each of its parameters.
    Strict: every parameter is mapped (but those named in ``absent``, which the format has no
    tensor for: they get zeros), every tensor of ``state`` used (but those whose names end
    with one of ``ignored``, buffers the model rebuilds); a missing, unused or mis-shaped one
    is an error naming it and the ``source`` format. Tensors are assigned, not copied: the
    model may have been built without storage (on the meta device), and a copy would hold
    the weights twice; those of parameters built partitioned (ZeRO-3's ``zero.Init``) are
    written into their partitions (:func:`flamingo.layers.write_whole`)."""
    params = dict(model.named_parameters())
    missing = sorted(n for n in params if n not in names and n not in absent)
    if missing:
        raise ValueError(f"no {source} tensor is mapped to {missing[:10]}")
    used: set[str] = set()
    values: dict[str, torch.Tensor] = {}
    for ours, theirs in names.items():
        lacking = [t for t in theirs if t not in state]
        if lacking:
            raise ValueError(f"the {source} checkpoint lacks {lacking} (for our {ours})")
        used.update(theirs)
        tensor = torch.cat([state[t] for t in theirs]) if len(theirs) > 1 else state[theirs[0]]
        shape = shape_whole(params[ours])
        if tensor.numel() != shape.numel():
            raise ValueError(
                f"{theirs[0]} has shape {tuple(tensor.shape)}; our {ours} is "
                f"{tuple(shape)}: the config does not match the checkpoint"
            )
        values[ours] = tensor.reshape(shape)
    unused = sorted(k for k in state if k not in used and not k.endswith(ignored))
    if unused:
        raise ValueError(f"{source} tensors with no place in our model: {unused[:10]}")
    for name in [n for n in values if is_partitioned(params[n])]:  # built under ZeRO-3
        write_whole(params[name], values.pop(name))
    device = next((p.device for p in params.values() if not p.is_meta), torch.device("cpu"))
    cast = {n: t.to(device=device, dtype=params[n].dtype) for n, t in values.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    for name, param in list(model.named_parameters()):
        if param.is_meta:  # only what the format has no tensor for (``absent``)
            owner, _, attr = name.rpartition(".")
            empty = torch.zeros(param.shape, dtype=param.dtype, device=device)
            setattr(
                model.get_submodule(owner), attr, torch.nn.Parameter(empty, param.requires_grad)
            )
