"""The vision towers, by ``vision.kind``: open_clip's ViTs (the paper's NFNet stands in as a
CLIP ViT, as in OpenFlamingo; IDEFICS's, LLaVA's and BLIP-2's towers are mapped onto one)."""

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


TOWERS: dict[str, type[Tower]] = {t.name: t for t in (OpenClipTower,)}
