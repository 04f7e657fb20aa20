"""Pixels of every import against transformers' image processors, on both of their backends.

transformers 5 keeps two backends per image processor: PIL (``*ImageProcessorPil``) and
torchvision (``*ImageProcessor``, the class ``from_pretrained`` gives when torchvision is
installed). Our one resize (``flamingo.vision.square``) is PIL's: equal to the PIL backend to
the bit; the torchvision backend resizes tensors with antialiasing and differs by a few 8-bit
levels (bounded here, mean under half a level). Images of every margin residue mod 4, both
orientations, resized and not, narrow ones included: a crop offset off by one pixel (the
LLaVA crop once rounded half to even where CLIPImageProcessor rounds down) moves the mean by
tens of levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BlipImageProcessor,
    CLIPImageProcessor,
    IdeficsConfig,
    LlavaConfig,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics.image_processing_idefics import IdeficsImageProcessor
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

from flamingo.convert.blip2 import blip2_config
from flamingo.convert.idefics import idefics_config
from flamingo.convert.llava import llava_config
from flamingo.vision import image_transform
from tests.helpers import TINY_CLIP_VISION, TINY_LLAMA, TINY_OPT
from tests.test_blip2 import VISION as BLIP2_VISION

S = 28
SIZES = (
    [(S + m, S) for m in range(8)]  # margins 0..7: every residue mod 4, no resize
    + [(S, S + m) for m in range(1, 8)]
    + [(60, 41), (41, 60), (200, 120), (64, 300), (300, 30), (30, 300), (500, 40)]
)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def llava():
    config = LlavaConfig(
        vision_config=dict(TINY_CLIP_VISION, image_size=S),
        text_config=dict(TINY_LLAMA, vocab_size=100),
    ).to_dict()
    size = dict(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    backends = {"pil": CLIPImageProcessorPil(**size), "torchvision": CLIPImageProcessor(**size)}
    return llava_config(config, "tiny", {"image_mean": MEAN, "image_std": STD}), backends


def blip2():
    from transformers import Blip2Config

    config = Blip2Config(
        vision_config=BLIP2_VISION | {"image_size": S},
        qformer_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        text_config=dict(TINY_OPT, vocab_size=100),
        num_query_tokens=4,
    ).to_dict()
    size = dict(size={"height": S, "width": S})
    backends = {"pil": BlipImageProcessorPil(**size), "torchvision": BlipImageProcessor(**size)}
    return blip2_config(config, "tiny", {"image_mean": MEAN, "image_std": STD}), backends


def idefics():
    config = IdeficsConfig(
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=4,
        use_resampler=True,
        alpha_initializer="zeros",
        vision_config=dict(
            embed_dim=24,
            image_size=S,
            patch_size=7,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
    ).to_dict()
    backends = {
        "pil": IdeficsImageProcessorPil(image_size=S),
        "torchvision": IdeficsImageProcessor(image_size=S),
    }
    return idefics_config(config, "tiny", {"image_mean": MEAN, "image_std": STD}), backends


IMPORTS = {"llava": llava, "blip2": blip2, "idefics": idefics}
WORST_LEVELS = {"pil": 0.0, "torchvision": 16.0}
"""The largest difference allowed, in 8-bit levels: none on PIL's backend; torchvision's
antialiased tensor resize, measured at 12 (crop, a 30x300 noise image) and 2.9 (squash)."""


def noise(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def theirs(processor, image: Image.Image) -> torch.Tensor:
    out = processor(images=[image], return_tensors="pt")  # IDEFICS's: the tensor itself
    return (out if isinstance(out, torch.Tensor) else out["pixel_values"]).reshape(3, S, S)


@pytest.mark.parametrize("backend", sorted(WORST_LEVELS))
@pytest.mark.parametrize("kind", sorted(IMPORTS))
def test_an_imports_pixels_are_the_reference_processors(kind, backend):
    cfg, backends = IMPORTS[kind]()
    ours = image_transform(cfg.vision)
    level = 1 / 255 / min(cfg.vision.image_std)  # one 8-bit level, normalised
    worst = 0.0
    for size in SIZES:
        image = noise(size)
        difference = (ours(image) - theirs(backends[backend], image)).abs() / level
        assert difference.mean() < 0.5, (size, difference.mean().item())  # a shift: tens
        worst = max(worst, difference.max().item())
    assert worst <= WORST_LEVELS[backend] + 1e-3, worst


def test_the_llava_crop_rounds_its_offset_down():
    cfg, backends = llava()
    assert cfg.vision.resize == "crop" and cfg.vision.crop_offset == "floor"
    photo = noise((640, 427))  # the 336-pixel crop's margin is 2 mod 4: a pixel apart
    at_336 = cfg.vision.replace({"image_size": 336})
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    expected = processor(images=[photo], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(image_transform(at_336)(photo), expected)
    rounded = image_transform(at_336.replace({"crop_offset": "round"}))(photo)
    assert not torch.equal(rounded, expected)
