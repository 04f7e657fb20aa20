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

    def shape(self) -> dict[str, Any]:
        import open_clip

        vision = self.cfg.vision
        if vision.architecture is not None:
            arch = vision.architecture["vision_cfg"]
        else:
            arch = open_clip.get_model_config(vision.model_name)["vision_cfg"]
        width, size, patch = arch["width"], arch["image_size"], arch["patch_size"]
        return {
            "vision_width": width,
            "vision_layers": arch["layers"] + vision.feature_layer + 1,  # the blocks that run
            "vision_mlp": int(width * arch.get("mlp_ratio", 4.0)),
            "patch": patch,
            "patches": (size // patch) ** 2,
            "image_tokens": (size // patch) ** 2 + int(vision.cls_token),
        }

    def flops(self, s: Any) -> float:
        w, tokens = s.vision_width, s.patches + 1
        return 2 * s.patches * 3 * s.patch**2 * w + s.vision_layers * (
            2 * tokens * (4 * w * w + 2 * w * s.vision_mlp) + 4 * tokens * tokens * w
        )


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

    def shape(self) -> dict[str, Any]:
        from flamingo.mllama import vision_config

        config = vision_config(self.cfg.vision)
        patches = (config.image_size // config.patch_size) ** 2
        return {
            "vision_width": config.hidden_size,
            "vision_layers": config.num_hidden_layers,
            "vision_global_layers": config.num_global_layers,
            "vision_mlp": config.intermediate_size,
            "patch": config.patch_size,
            "patches": patches,
            "tiles": config.max_num_tiles,
            "vision_seq": -(-(patches + 1) // 8) * 8,  # padded to a multiple of 8
            "image_tokens": config.max_num_tiles * (patches + 1),
            "media_width": config.vision_output_dim,
        }

    def flops(self, s: Any) -> float:
        """Every tile's patch embedding, then local and global layers over all the tiles'
        (padded) tokens at once: real patches attend to padded tiles, so all are computed.
        transformers builds the tiles' attention mask as an outer product, a matrix product
        too (``seq x 1`` by ``1 x seq``)."""
        w, seq = s.vision_width, s.tiles * s.vision_seq
        embed = s.tiles * 2 * s.patches * 3 * s.patch**2 * w
        layer = 2 * seq * (4 * w * w + 2 * w * s.vision_mlp) + 4 * seq * seq * w
        return embed + (s.vision_layers + s.vision_global_layers) * layer + 2 * seq * seq

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
