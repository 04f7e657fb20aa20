"""The vision towers, by ``vision.kind``: open_clip's ViTs (the paper's NFNet stands in as a
CLIP ViT, as in OpenFlamingo; IDEFICS's, LLaVA's and BLIP-2's towers are mapped onto one), and
Llama 3.2 Vision's tiled ViT (``flamingo.mllama``, imported when one is built)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flamingo.parts.base import Tower
from flamingo.vision import VisionEncoder, image_transform, tokens_per_image


class OpenClipTower(Tower):
    """An open_clip ``VisionTransformer``'s patch tokens from a chosen block
    (:class:`flamingo.vision.VisionEncoder`)."""

    name = "open_clip"

    def build(self) -> nn.Module:
        return VisionEncoder(self.cfg.vision)

    def tokens(self) -> int:
        return tokens_per_image(self.cfg.vision)

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return image_transform(self.cfg.vision)


class MllamaTower(Tower):
    """Llama 3.2 Vision's tiled ViT (:class:`flamingo.mllama.MllamaVisionTower`): an image is
    up to ``max_num_tiles`` tiles, its tokens every tile's patches and CLS."""

    name = "mllama"

    def build(self) -> nn.Module:
        from flamingo.mllama import MllamaVisionTower

        return MllamaVisionTower(self.cfg.vision)

    def tokens(self) -> int:
        from flamingo.mllama import vision_config

        config = vision_config(self.cfg.vision)
        return config.max_num_tiles * ((config.image_size // config.patch_size) ** 2 + 1)

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return lambda image: self.preprocess(image)[0]

    def preprocess(self, image: Any) -> tuple[torch.Tensor, int | None]:
        from flamingo.mllama import tile_image

        return tile_image(image, self.cfg.vision)

    def frames(self) -> int:
        from flamingo.mllama import vision_config

        return vision_config(self.cfg.vision).max_num_tiles

    def training_pixels(self, image: Any, flip: bool) -> tuple[torch.Tensor, int | None]:
        from PIL import ImageOps

        from flamingo.mllama import tile_uint8

        return tile_uint8(ImageOps.mirror(image) if flip else image, self.cfg.vision)


TOWERS: dict[str, type[Tower]] = {t.name: t for t in (OpenClipTower, MllamaTower)}
