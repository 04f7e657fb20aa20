"""BLIP-2 checkpoints (``Salesforce/blip2-opt-*``, transformers' ``Blip2ForConditionalGeneration``)
-> our model with the Q-Former connector.

BLIP-2 is a frozen EVA-CLIP tower, a Q-Former whose 32 queries read it, a linear projection
and a frozen decoder LM (OPT) that reads the projected queries in place of the ``<image>``
tokens. :func:`blip2_config` reads the checkpoint's ``config.json`` through transformers' own
``Blip2Config`` and sets our fields:

- tower: BLIP-2's ViT is an open_clip ``VisionTransformer`` with ``no_ln_pre`` (it has no
  LayerNorm before its blocks), its LayerNorms' epsilon (``vision.layer_norm_eps``: 1e-6), the
  CLS token kept and the final LayerNorm on every token (``vision.cls_token``,
  ``vision.ln_post_on_tokens``: what the Q-Former reads), images squashed to the square
  (``BlipImageProcessor``); its patch embedding's bias, which open_clip's has not, is folded
  into the patch tokens' position embeddings (the same sum), its q and v biases are the packed
  ``in_proj_bias`` (k's is zero);
- connector: ``connector: qformer`` with the Q-Former's sizes, cross-attention frequency,
  activation and epsilon;
- LM: the text config inline (a decoder-only family of ``flamingo.lm.DECODER_LAYOUTS``: OPT),
  ``lm.special_tokens: llava`` (the tokenizer's own ``<image>``, whose row the LM has).

The Q-Former's text input in stage 2 (``use_qformer_text_input``, InstructBLIP's) and
encoder-decoder LMs (BLIP-2-FlanT5) are refused, naming the field. ``tests/test_blip2.py``
holds the logits to ``Blip2ForConditionalGeneration`` on tiny random configs.

:func:`load_stage1` reads stage 1's format (transformers' ``Blip2ForImageTextRetrieval``: the
same tower and Q-Former, with its text side, projections and matching head) onto
:class:`flamingo.qformer_pretraining.QFormerPretraining`; ``tests/test_qformer_pretraining.py``
holds its matching logits and contrastive similarities to transformers'.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flamingo.config import OPENAI_MEAN, OPENAI_STD, FlamingoConfig
from flamingo.convert.mapping import (
    assign_mapped,
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
    from flamingo.qformer_pretraining import QFormerPretraining

TOWER = "vision_model."


def _refuse(field: str, value: Any, why: str) -> None:
    raise ValueError(f"BLIP-2 config {field}={value!r} cannot be reproduced here: {why}")


def _sections(
    blip2: Any, preprocessor: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our ``vision`` and ``qformer`` sections for a transformers ``Blip2Config``."""
    vision, qformer = blip2.vision_config, blip2.qformer_config
    if vision.hidden_act not in ("gelu", "quick_gelu"):
        _refuse("vision_config.hidden_act", vision.hidden_act, "open_clip uses (quick) gelu")
    if qformer.hidden_act not in ("gelu", "relu"):
        _refuse("qformer_config.hidden_act", qformer.hidden_act, "the Q-Former uses gelu or relu")
    if not vision.qkv_bias:
        _refuse("vision_config.qkv_bias", False, "open_clip's attention has its biases")
    width, heads = vision.hidden_size, vision.num_attention_heads
    if width % heads:
        _refuse("vision_config.num_attention_heads", heads, f"it must divide {width}")
    preprocessor = preprocessor or {}
    tower = {
        "model_name": "blip2-vision",
        "pretrained": None,
        "architecture": {
            "embed_dim": width,  # open_clip's contrastive projection: BLIP-2 has none
            "quick_gelu": vision.hidden_act == "quick_gelu",
            "vision_cfg": {
                "image_size": vision.image_size,
                "patch_size": vision.patch_size,
                "width": width,
                "layers": vision.num_hidden_layers,
                "head_width": width // heads,
                # open_clip takes int(width * mlp_ratio): a half keeps it off the boundary
                "mlp_ratio": (vision.intermediate_size + 0.5) / width,
                "no_ln_pre": True,
            },
        },
        "cls_token": True,
        "ln_post_on_tokens": True,
        "image_size": vision.image_size,
        "layer_norm_eps": vision.layer_norm_eps,
        "resize": "squash",
        "image_mean": list(preprocessor.get("image_mean", OPENAI_MEAN)),
        "image_std": list(preprocessor.get("image_std", OPENAI_STD)),
    }
    connector = {
        "queries": blip2.num_query_tokens,
        "layers": qformer.num_hidden_layers,
        "width": qformer.hidden_size,
        "heads": qformer.num_attention_heads,
        "intermediate": qformer.intermediate_size,
        "cross_attention_every": qformer.cross_attention_frequency,
        "activation": qformer.hidden_act,
        "layer_norm_eps": qformer.layer_norm_eps,
        "dropout": qformer.hidden_dropout_prob,
        "attention_dropout": qformer.attention_probs_dropout_prob,
        "max_text_positions": qformer.max_position_embeddings,
        "contrastive_width": blip2.image_text_hidden_size,
    }
    return tower, connector


def _read(config: dict[str, Any]) -> Any:
    from transformers import Blip2Config  # the one reader of BLIP-2's defaults

    if config.get("model_type") != "blip-2":
        raise ValueError(f"not a BLIP-2 config: model_type {config.get('model_type')!r}")
    return Blip2Config.from_dict(config)


def blip2_config(
    config: dict[str, Any], tokenizer: str | Path, preprocessor: dict[str, Any] | None = None
) -> FlamingoConfig:
    """Our model config for a BLIP-2 ``config.json`` (a dict), its tokenizer (a directory or
    id) and its ``preprocessor_config.json`` (the normalisation; OpenAI CLIP's if none)."""
    blip2 = _read(config)
    text = blip2.text_config
    if not blip2.use_decoder_only_language_model:
        _refuse("text_config.model_type", text.model_type, "the LM must be decoder-only")
    if blip2.qformer_config.use_qformer_text_input:
        _refuse(
            "qformer_config.use_qformer_text_input",
            True,
            "the Q-Former reads no instruction text in stage 2 (its text side is stage 1's: "
            "flamingo.convert.blip2.load_stage1)",
        )
    tower, connector = _sections(blip2, preprocessor)
    model = {
        "connector": "qformer",
        "vision": tower,
        "qformer": connector,
        "lm": {
            "name_or_path": None,
            "architecture": lm_architecture(text, bool(text.tie_word_embeddings)),
            "tokenizer": str(tokenizer),
            "special_tokens": "llava",
            "leading_images": "before_bos",  # Blip2Processor: the queries, then </s> and text
        },
        "frozen_dtype": frozen_dtype(text, config),
    }
    return FlamingoConfig.from_dict(model)


def directory_config(directory: str | Path) -> FlamingoConfig:
    """:func:`blip2_config` of a BLIP-2 checkpoint directory."""
    config, preprocessor = read_configs(directory, "blip-2", "BLIP-2")
    return blip2_config(config, directory, preprocessor)


def read_blip2(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A BLIP-2 checkpoint directory's ``config.json`` and its tensors, the tower's made into
    open_clip's terms: the patch embedding's bias folded into the patch tokens' position
    embeddings, each layer's q and v biases packed (k's zero) where they are kept apart."""
    config, _ = read_configs(directory, "blip-2", "BLIP-2")
    state = read_tensors(directory, "BLIP-2")
    bias = state.pop(TOWER + "embeddings.patch_embedding.bias", None)
    if bias is not None:
        position = state[TOWER + "embeddings.position_embedding"].clone()
        position[..., 1:, :] += bias  # every patch token; not the CLS token
        state[TOWER + "embeddings.position_embedding"] = position
    for name in [n for n in state if n.endswith(".self_attn.q_bias")]:
        prefix = name.removesuffix("q_bias")
        q, v = state.pop(name), state.pop(prefix + "v_bias")
        state[prefix + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return config, state


def _tower_names(layers: int) -> dict[str, tuple[str, ...]]:
    """Our open_clip tower -> BLIP-2's (after :func:`read_blip2`)."""
    ours = "vision.visual."
    names = {
        n: t
        for n, t in clip_tower_names(layers, TOWER).items()
        if ".ln_pre." not in n and ".attn." not in n
    }
    names[ours + "ln_post.weight"] = (TOWER + "post_layernorm.weight",)
    names[ours + "ln_post.bias"] = (TOWER + "post_layernorm.bias",)
    names[ours + "positional_embedding"] = (TOWER + "embeddings.position_embedding",)
    for i in range(layers):
        mine, theirs = f"{ours}transformer.resblocks.{i}.", f"{TOWER}encoder.layers.{i}.self_attn."
        names[mine + "attn.in_proj_weight"] = (theirs + "qkv.weight",)
        names[mine + "attn.in_proj_bias"] = (theirs + "qkv.bias",)
        for p in ("weight", "bias"):
            names[f"{mine}attn.out_proj.{p}"] = (f"{theirs}projection.{p}",)
    return names


def load_blip2(model: Flamingo, state: dict[str, torch.Tensor]) -> Flamingo:
    """Load a BLIP-2 state dict (:func:`read_blip2`'s) into ``model``, built from
    :func:`blip2_config`. Strict, as :func:`flamingo.convert.mapping.assign_mapped` is."""
    names = _tower_names(len(model.vision.visual.transformer.resblocks))
    for name, _ in model.qformer.named_parameters():  # BLIP-2 keeps two beside its Q-Former
        outside = name.startswith(("query_tokens", "language_projection."))
        names["qformer." + name] = (name if outside else "qformer." + name,)
    for name, _ in model.lm.hf.named_parameters():  # deduplicated: a tied head is not listed
        names["lm.hf." + name] = ("language_model." + name,)
    assign_with_lm(model, state, names, "BLIP-2", head="language_model.lm_head.weight")
    return model


def load_stage1(directory: str | Path) -> QFormerPretraining:
    """transformers' ``Blip2ForImageTextRetrieval`` checkpoint (``Salesforce/blip2-itm-vit-g``:
    BLIP-2's stage 1 without its text-generation head) -> our stage-1 model, the tower in
    float32. The text vocabulary's [CLS] and [DEC] are its tokenizer's ``cls_token`` and
    ``bos_token`` (BLIP-2 adds [DEC] as the BOS). The checkpoint has no ITG head and no
    temperature: ``lm_head`` keeps its fresh initialisation (its output matrix is the word
    embeddings, tied, so only the transform and the bias are new) and ``temp`` the config's."""
    from transformers import AutoTokenizer

    from flamingo.config import QFormerConfig, VisionConfig
    from flamingo.qformer_pretraining import QFormerPretraining, TextVocabulary
    from flamingo.vision import VisionEncoder

    config, preprocessor = read_configs(directory, "blip-2", "BLIP-2")
    blip2 = _read(config)
    if not blip2.qformer_config.use_qformer_text_input:
        _refuse(
            "qformer_config.use_qformer_text_input",
            False,
            "a stage-1 checkpoint has the Q-Former's text side (Blip2ForImageTextRetrieval's)",
        )
    tower, connector = _sections(blip2, preprocessor)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dec = tokenizer.bos_token_id
    if tokenizer.cls_token_id is None or dec is None:
        raise ValueError(
            f"{directory}: the tokenizer must have a cls_token ([CLS]) and a bos_token ([DEC])"
        )
    vocab = TextVocabulary(blip2.qformer_config.vocab_size, tokenizer.cls_token_id, dec)
    cfg = QFormerConfig.from_dict(connector)
    model = QFormerPretraining(cfg, VisionEncoder(VisionConfig.from_dict(tower)), vocab)
    _, state = read_blip2(directory)
    names = _tower_names(len(model.vision.visual.transformer.resblocks))
    for name, _ in model.named_parameters():
        if name.startswith("qformer."):
            inner = name.removeprefix("qformer.")
            outside = inner.startswith(("query_tokens", "embeddings."))
            names[name] = (inner if outside else name,)
        elif name.startswith(("vision_projection.", "text_projection.", "itm_head.")):
            names[name] = (name,)
    new = tuple(n for n, _ in model.named_parameters() if n.startswith(("lm_head.", "temp.")))
    new += ("vision.visual.proj",)  # open_clip's contrastive projection, unused
    assign_mapped(model, state, names, "BLIP-2", absent=new, ignored=("position_ids",))
    return model.eval()


register(
    Format(
        "blip-2",
        directory_config,
        lambda model, directory: load_blip2(model, read_blip2(directory)[1]),
        description="a BLIP-2 checkpoint (transformers' format, decoder LM: Salesforce/blip2-opt-*)",
    )
)
