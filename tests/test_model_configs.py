"""Every shipped model config (``configs/model/*.yaml``, and the benchmarks' ``configs/bench/``)
builds, on the meta device (shapes only: no weights, no download), or is listed with the reason
it cannot and the reason is checked. (``configs/demo/model.yaml`` names the demo's own
pretrained stages; the demo builds it.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor
from flamingo.convert import idefics as convert_idefics
from flamingo.lm import decoder_layout
from tests.helpers import ROOT

HUB_ARCHITECTURES = {
    # The architecture fields of each named Hub LM's config.json, what AutoConfig would read
    # there, and its size in billions of parameters (the name's figure, as published).
    "facebook/opt-1.3b": (
        dict(
            model_type="opt",
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=32,
            ffn_dim=8192,
            vocab_size=50272,
            word_embed_proj_dim=2048,
            max_position_embeddings=2048,
        ),
        1.3,
    ),
    "meta-llama/Llama-2-7b-hf": (
        dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
        6.7,
    ),
    "huggyllama/llama-7b": (
        dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            rms_norm_eps=1e-6,
        ),
        6.7,
    ),
    "huggyllama/llama-65b": (
        dict(
            model_type="llama",
            hidden_size=8192,
            intermediate_size=22016,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=64,
            vocab_size=32000,
            rms_norm_eps=1e-6,
        ),
        65.2,
    ),
    "togethercomputer/RedPajama-INCITE-Base-3B-v1": (
        dict(
            model_type="gpt_neox",
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=50432,
        ),
        2.8,
    ),
    "mosaicml/mpt-7b": (
        dict(
            model_type="mpt",
            d_model=4096,
            n_heads=32,
            n_layers=32,
            expansion_ratio=4,
            vocab_size=50432,
            max_seq_len=2048,
        ),
        6.7,
    ),
}
MLLAMA_SIZES = {"llama-3.2-11b-vision.yaml": 10.6, "llama-3.2-90b-vision.yaml": 88.6}
"""Llama 3.2 Vision's published sizes, in billions of parameters."""
CANNOT_BUILD = {
    # config -> (the model_type its LM declares, why it cannot be built)
    "openflamingo-3b.yaml": (
        "mosaic_gpt",
        "its LM (anas-awadalla/mpt-1b-redpajama-200b) ships as Hub remote code with "
        "model_type mosaic_gpt, which the decoder-layer table does not cover",
    ),
}
CONFIGS = sorted((ROOT / "configs" / "model").glob("*.yaml"))
BENCH = sorted((ROOT / "configs" / "bench").glob("*.yaml"))


def test_every_hub_lm_of_a_buildable_config_has_its_architecture_here():
    assert set(CANNOT_BUILD) <= {p.name for p in CONFIGS}
    named = {
        cfg.lm.name_or_path
        for cfg in (FlamingoConfig.from_yaml(p) for p in CONFIGS if p.name not in CANNOT_BUILD)
        if cfg.lm.architecture is None
    }
    assert named == set(HUB_ARCHITECTURES)


def offline(cfg: FlamingoConfig) -> tuple[FlamingoConfig, float | None]:
    """The config with its downloads replaced by stand-ins: the tower without pretrained
    weights, the LM from its published architecture, the packaged tokenizer."""
    changes: dict = {"vision.pretrained": None}
    if cfg.lm.special_tokens in ("idefics", "mllama"):  # the packaged tokenizer has none of
        changes |= {"lm.special_tokens": "flamingo", "lm.tokenizer": "tiny"}  # their tokens
    size = None
    if cfg.lm.architecture is None:
        architecture, size = HUB_ARCHITECTURES[cfg.lm.name_or_path]
        changes |= {
            "lm.architecture": architecture,
            "lm.name_or_path": None,
            "lm.tokenizer": "tiny",
        }
    return cfg.replace(changes), size


@pytest.mark.parametrize(
    "path",
    [p for p in CONFIGS if p.name not in CANNOT_BUILD] + BENCH,
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_config_builds_on_the_meta_device(path: Path):
    cfg, size = offline(FlamingoConfig.from_yaml(path))
    processor = FlamingoProcessor.from_config(cfg)
    with torch.device("meta"):
        model = Flamingo.from_config(cfg, processor)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    layers = model.lm.hf.get_submodule(model.lm.layout.layers)
    assert len(model.lm.gated_blocks) == len(model.lm.layer_indices) > 0
    if cfg.connector == "mllama":  # the published size (new token rows aside: the tiny's)
        assert model.lm.layer_indices == cfg.mllama.layers
        total = sum(p.numel() for n, p in model.named_parameters() if "new_tokens" not in n)
        published = MLLAMA_SIZES[path.name]
        assert abs(total / 1e9 - published) / published < 0.02, total
        return
    assert model.lm.layer_indices == cfg.xattn.layer_indices(len(layers))
    assert model.resampler.latents.shape == (cfg.resampler.num_latents, model.vision.width)
    if size is not None:  # the architecture table matches the model's published size
        lm_params = sum(p.numel() for p in model.lm.hf.parameters())
        assert abs(lm_params / 1e9 - size) / size < 0.06, lm_params
        tower = {"ViT-L-14": (1024, 256), "ViT-H-14": (1280, 257)}[cfg.vision.model_name]
        assert (model.vision.width, model.vision.num_tokens) == tower  # 224 px (ViT-H: + CLS)


@pytest.mark.parametrize("name", sorted(CANNOT_BUILD))
def test_configs_that_cannot_be_built_say_why(name: str):
    model_type, _ = CANNOT_BUILD[name]
    with pytest.raises(ValueError, match=f"{model_type!r} is not supported; supported types"):
        decoder_layout(model_type)
    assert "remote code" in (ROOT / "configs/model" / name).read_text()


IDEFICS_RELEASES = {
    # The architecture fields of each IDEFICS release's config.json (nested form).
    "idefics-9b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        rms_norm_eps=1e-6,
        cross_layer_interval=4,
        qk_layer_norms=False,
        alpha_type="float",
        vocab_size=32000,
        additional_vocab_size=2,
        use_resampler=True,
    ),
    "idefics-80b": dict(
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        rms_norm_eps=1e-6,
        cross_layer_interval=4,
        qk_layer_norms=True,
        alpha_type="float",
        vocab_size=32000,
        additional_vocab_size=2,
        use_resampler=True,
    ),
}
IDEFICS_TOWER = dict(
    vision_model_name="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    embed_dim=1280,
    image_size=224,
    patch_size=14,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
)
IDEFICS_PERCEIVER = dict(
    resampler_depth=6,
    resampler_n_heads=16,
    resampler_head_dim=96,
    resampler_n_latents=64,
    qk_layer_norms_perceiver=False,
)


@pytest.mark.parametrize("repo", convert_idefics.IDEFICS_RELEASES)
def test_the_idefics_configs_have_the_architecture_the_import_reads(repo: str):
    """Each configs/model/idefics-*.yaml is what the import makes of the release's config.json
    (nested and flat alike), but for where the parts come from."""
    from flamingo.vision import build_clip

    release = repo.split("/")[1]  # each release has its config
    fields = IDEFICS_RELEASES[release.removesuffix("-instruct")]
    nested = {**fields, "vision_config": IDEFICS_TOWER, "perceiver_config": IDEFICS_PERCEIVER}
    flat = {**fields, **IDEFICS_PERCEIVER, "vision_model_name": IDEFICS_TOWER["vision_model_name"]}
    ours = FlamingoConfig.from_yaml(ROOT / "configs" / "model" / f"{release}.yaml")
    for config in (nested, flat):
        imported = convert_idefics.idefics_config({**config, "torch_dtype": "bfloat16"}, "tok")
        assert imported.resampler == ours.resampler
        assert imported.xattn == ours.xattn
        keep = ("cls_token", "ln_post_on_tokens", "image_size", "resize", "image_mean", "image_std")
        assert all(getattr(imported.vision, k) == getattr(ours.vision, k) for k in keep)
        assert imported.lm.special_tokens == ours.lm.special_tokens == "idefics"
        assert imported.frozen_dtype == ours.frozen_dtype
        llama = {
            k: v
            for k, v in imported.lm.architecture.items()
            if k in HUB_ARCHITECTURES[ours.lm.name_or_path][0]
        }
        assert llama == HUB_ARCHITECTURES[ours.lm.name_or_path][0]
    # the imported tower (vision alone) and open_clip's ViT-H-14 have the same tensors, but
    # for the contrastive projection, which IDEFICS's tower has not and nothing reads
    with torch.device("meta"):
        named = build_clip(ours.vision.__class__(model_name="ViT-H-14", pretrained=None)).visual
        alone = build_clip(imported.vision).visual
    shapes = lambda m: {n: tuple(t.shape) for n, t in m.state_dict().items() if n != "proj"}  # noqa: E731
    assert shapes(alone) == shapes(named)


MLLAMA_RELEASES = {
    # what the releases' config.json hold beyond transformers' MllamaConfig defaults (its
    # defaults are the 11B's but for the tile size and the rotary scaling)
    "llama-3.2-11b-vision.yaml": {},
    "llama-3.2-90b-vision.yaml": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=100,
        num_attention_heads=64,
        cross_attention_layers=list(range(3, 100, 5)),
    ),
}


@pytest.mark.parametrize("name", sorted(MLLAMA_RELEASES))
def test_the_llama_vision_configs_are_what_the_import_makes_of_the_releases(name: str):
    from transformers import MllamaConfig

    from flamingo.convert.mllama import mllama_config

    rope = dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8192,
    )  # fmt: skip
    text = {**MLLAMA_RELEASES[name], "rope_parameters": rope, "dtype": "bfloat16"}
    release = MllamaConfig(vision_config={"image_size": 560}, text_config=text).to_dict()
    ours = FlamingoConfig.from_yaml(ROOT / "configs" / "model" / name)
    pre = {"image_mean": list(ours.vision.image_mean), "image_std": list(ours.vision.image_std)}
    imported = mllama_config(
        release, ours.lm.tokenizer, {**pre, "size": {"height": 560, "width": 560}}
    )
    assert imported.mllama == ours.mllama and imported.projector == ours.projector
    assert imported.frozen_dtype == ours.frozen_dtype
    assert imported.lm.head_rows == ours.lm.head_rows
    assert {k: imported.lm.architecture[k] for k in ours.lm.architecture} == ours.lm.architecture
    assert {k: imported.vision.architecture[k] for k in ours.vision.architecture} == dict(
        ours.vision.architecture
    )
