"""The frozen open_clip vision tower: pixels -> patch tokens (paper Sec. 2.1).

Returns the transformer's patch tokens, no projection to the contrastive space. Whether the
CLS token comes first among them (``VisionConfig.cls_token``) and whether the tower's final
LayerNorm (``ln_post``) is applied to them (``VisionConfig.ln_post_on_tokens``) are explicit
config fields; we run the tower's stages ourselves rather than call
``visual.forward``, whose token normalisation changed across open_clip releases (2.24 added
``final_ln_after_pool``).

The tower is frozen: no parameter requires grad, it stays in eval mode whatever mode its parent
is put in, and its forward runs without autograd.

Shapes: ``pixel_values (B, N, F, C, H, W) -> vision_tokens (B, N, F, V, Dv)`` (the model
passes a batch's flat media as B = 1, N = M: ``Flamingo.encode_media``).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import nn

from flamingo.config import VisionConfig
from flamingo.quiet_imports import deferring_wandb

with deferring_wandb():  # open_clip imports timm, which would import wandb (1.1 s)
    import open_clip
    from open_clip.model import _build_vision_tower
    from open_clip.transformer import VisionTransformer


def build_clip(cfg: VisionConfig) -> nn.Module:
    """Build the open_clip model named by ``cfg`` (with its pretrained weights, if any), on
    torch's default device (``with torch.device("meta"):`` builds shapes only)."""
    if cfg.architecture is not None and "text_cfg" not in cfg.architecture:
        return VisionOnly(cfg.architecture)
    if cfg.architecture is not None:
        clip = open_clip.CLIP(**cfg.architecture)
        if cfg.pretrained:
            open_clip.load_checkpoint(clip, cfg.pretrained, strict=True, weights_only=True)
        return clip
    if cfg.model_name not in open_clip.list_models():
        raise ValueError(
            f"vision.model_name {cfg.model_name!r} is not an open_clip architecture; "
            f"choose one of open_clip.list_models() or give vision.architecture inline"
        )
    # pretrained weights load with torch.load(weights_only=True): open_clip's default from
    # 2.27 on (its create_model takes the argument only from 3.x)
    device = torch.empty(()).device  # torch's default (a `with torch.device(...)` included)
    return open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained, device=device)


class VisionOnly(nn.Module):
    """An open_clip vision tower without its text tower, as ``CLIP.visual`` holds it (an
    imported tower whose weights a checkpoint carries: nothing to build the text side for).
    Built by open_clip's own ``_build_vision_tower``, which ``open_clip.CLIP`` calls (present
    in every open_clip release this project supports, >= 2.27)."""

    def __init__(self, architecture: dict) -> None:
        super().__init__()
        self.visual = _build_vision_tower(
            architecture["embed_dim"],
            architecture["vision_cfg"],
            quick_gelu=architecture.get("quick_gelu", False),
        )


def tokens_per_image(cfg: VisionConfig) -> int:
    """How many tokens the tower gives per image (patches, plus the CLS token with
    ``vision.cls_token``), from the config alone: the processor writes that many ``<image>``
    tokens per image for the LLaVA connector without building the tower."""
    if cfg.architecture is not None:
        vision_cfg = cfg.architecture["vision_cfg"]
    else:
        known = open_clip.get_model_config(cfg.model_name)
        if known is None:
            raise ValueError(
                f"vision.model_name {cfg.model_name!r} is not an open_clip architecture; "
                f"choose one of open_clip.list_models() or give vision.architecture inline"
            )
        vision_cfg = known["vision_cfg"]
    patch = vision_cfg["patch_size"]
    grid = cfg.image_size // (patch if isinstance(patch, int) else patch[0])
    return grid * grid + int(cfg.cls_token)


def resize_pad(image: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """Resize so the longer side is ``size`` (aspect kept), pad to ``size`` x ``size``."""
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(image, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def resize_crop(image: Image.Image, size: int, offset: str = "round") -> Image.Image:
    """Resize so the shorter side is ``size`` (aspect kept), center crop ``size`` x ``size``,
    to the pixel: the longer side is truncated, not rounded. The crop offset (half the
    margin) rounds half to even with ``offset="round"``: open_clip's inference preprocessing
    (torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image, which OpenFlamingo
    used); it rounds down with ``"floor"``: transformers' ``CLIPImageProcessor`` (LLaVA's),
    both backends. They differ by a pixel where the margin is 2 mod 4 (a 640x427 photo at 336)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new = (size, new_long) if width <= height else (new_long, size)
    if new != image.size:
        image = image.resize(new, Image.Resampling.BICUBIC)
    if offset == "floor":
        top, left = (new[1] - size) // 2, (new[0] - size) // 2
    else:
        top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def square(image: Image.Image, cfg: VisionConfig) -> Image.Image:
    """An RGB image made ``image_size`` square as ``vision.resize`` says: in training and at
    inference alike (the one resize of the project)."""
    if image.width < 1 or image.height < 1:  # PIL makes them; no resize has a ratio for them
        raise ValueError(f"an image must have pixels, got a {image.width}x{image.height} image")
    image = image.convert("RGB")
    if cfg.resize == "crop":
        return resize_crop(image, cfg.image_size, cfg.crop_offset)
    if cfg.resize == "squash":
        size = (cfg.image_size, cfg.image_size)
        return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
    return resize_pad(image, cfg.image_size, mean_colour(cfg))


def mean_colour(cfg: VisionConfig) -> tuple[int, int, int]:
    """The padding colour: the normalisation mean, so padding is 0 after normalising."""
    return tuple(round(255 * m) for m in cfg.image_mean)


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> its pixels, uint8 (3, H, W): what the training loader ships (a quarter
    of float32's bytes through the loader and the host-to-device copy)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(
        2, 0, 1
    )


@cache
def _mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's mean and std as (3, 1, 1) float32 tensors, made once per device (a
    training step copies nothing to the device for them)."""
    return tuple(torch.tensor(v, device=device).view(3, 1, 1) for v in (mean, std))


def normalise(pixels: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> the tower's float32 input: ``(x / 255 - mean) / std``."""
    mean, std = _mean_std(tuple(cfg.image_mean), tuple(cfg.image_std), pixels.device)
    return (pixels.float() / 255.0 - mean) / std


def to_tensor(image: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """RGB PIL image -> normalised float (3, H, W)."""
    return normalise(to_uint8(image), cfg)


def image_transform(cfg: VisionConfig):
    """Inference transform (PIL image -> normalised (C, H, W)), the same resize as training."""
    return lambda image: to_tensor(square(image, cfg), cfg)


class VisionEncoder(nn.Module):
    """Frozen open_clip ViT returning patch tokens."""

    def __init__(self, cfg: VisionConfig, visual: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        visual = visual if visual is not None else build_clip(cfg).visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"vision tower {cfg.model_name!r} is a {type(visual).__name__}; only open_clip "
                "VisionTransformer towers (ViT-*) provide patch tokens here"
            )
        size = visual.image_size
        if tuple(size) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"vision.image_size={cfg.image_size} but {cfg.model_name!r} expects {tuple(size)}"
            )
        self.visual = visual.requires_grad_(False).eval()
        if cfg.layer_norm_eps is not None:  # open_clip builds them with its own (1e-5)
            for module in visual.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = cfg.layer_norm_eps
        self.width = visual.transformer.width
        depth = len(visual.transformer.resblocks)
        if -cfg.feature_layer > depth:
            raise ValueError(
                f"vision.feature_layer={cfg.feature_layer} but the tower has {depth} blocks"
            )
        self.num_tokens = visual.grid_size[0] * visual.grid_size[1] + int(cfg.cls_token)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's blocks up to ``vision.feature_layer`` (all of them at -1)."""
        transformer = self.visual.transformer
        if self.cfg.feature_layer == -1:
            return transformer(x)
        batch_first = getattr(transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in transformer.resblocks[: self.cfg.feature_layer + 1]:
            x = block(x)
        return x if batch_first else x.transpose(0, 1)

    def block_class(self) -> type[nn.Module]:
        """The class of the tower's transformer blocks (compiled one by one)."""
        return type(self.visual.transformer.resblocks[0])

    def train(self, mode: bool = True) -> VisionEncoder:
        # Frozen: keep eval mode (no dropout, no patch dropout) whatever the parent asks.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if pixel_values.ndim != 6 or tuple(pixel_values.shape[3:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be (B, N, F, 3, {size}, {size}) (or flat, (M, F, 3, {size}, "
                f"{size}), through Flamingo.encode_media), got shape "
                f"{tuple(pixel_values.shape)}; preprocess images with FlamingoProcessor"
            )
        b, n, f = pixel_values.shape[:3]
        v = self.visual
        x = rearrange(pixel_values, "b n f c h w -> (b n f) c h w")
        if x.dtype == torch.uint8:  # the training loader's: normalised here, on the device
            x = normalise(x, self.cfg)
        x = x.to(v.conv1.weight.dtype)
        x = rearrange(v.conv1(x), "m d gh gw -> m (gh gw) d")
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = self._blocks(v.ln_pre(x))
        if self.cfg.ln_post_on_tokens:
            x = v.ln_post(x)
        tokens = x if self.cfg.cls_token else x[:, 1:]
        return rearrange(tokens, "(b n f) v d -> b n f v d", b=b, n=n, f=f)
