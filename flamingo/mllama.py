"""Llama 3.2 Vision's modules (transformers' ``models/mllama``), as parts of the composable model.

- :class:`MllamaVisionTower`: the tiled tower. An image is resized onto the best canvas of up to
  ``max_num_tiles`` tiles (:func:`tile_image`), cut into tiles, and read by transformers' own
  ``MllamaVisionModel`` (gated positional and tile embeddings, the local encoder, then the
  global layers; the chosen intermediate layers' outputs appended per channel after the last
  one's). Its tokens for one image are every tile's patches and CLS, tile by tile:
  ``(B, N, tiles, C, H, W) -> (B, N, 1, tiles * (patches + 1), Dv)``, one "frame" whose
  tokens the projector maps one by one, as LLaVA's does.
- :class:`MllamaCrossBlock`: one of the text model's cross-attention layers, run before a
  self-attention layer of the frozen Llama (its place in the 40-layer stack becomes "before
  Llama layer j"): RMSNorm, grouped-query cross-attention with RMSNorm on each head's queries
  and keys, a tanh-gated residual, then a SwiGLU MLP with its own tanh gate. The parameter
  names are transformers' (``cross_attn.q_proj``, ``cross_attn_attn_gate``, ...).

Which media a token reads (:func:`visible_media`) is ``MllamaProcessor``'s rule: the images of
the last run of consecutive ``<|image|>`` tokens at or before it, each only from its own token
on. A token that reads no image (text before the first image) gets nothing from the layer
(Meta's reference code, with which the checkpoints were trained, and Flamingo's rule), or,
with ``mllama.rows_without_image: attend_uniformly``, transformers' numerics: attention spread
evenly over every vision token of its row, the MLP output zeroed.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
from transformers.models.mllama.modeling_mllama import (
    MllamaTextMLP,
    MllamaTextRMSNorm,
    MllamaVisionModel,
)

from flamingo.config import VisionConfig


def vision_config(cfg: VisionConfig) -> MllamaVisionConfig:
    """transformers' config of the tower ``cfg`` describes, made once per architecture and
    shared (read it, never change it): the tiling of every image reads it."""
    return _vision_config(json.dumps(dict(cfg.architecture or {}), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _vision_config(architecture: str) -> MllamaVisionConfig:
    return MllamaVisionConfig(**json.loads(architecture))


def aspect_ratios(config: MllamaVisionConfig) -> list[tuple[int, int]]:
    """The (tiles high, tiles wide) arrangements, in the order of their ids (id = index + 1; 0
    is an empty media slot)."""
    return [tuple(r) for r in config.supported_aspect_ratios]


def tiles_of(config: MllamaVisionConfig) -> torch.Tensor:
    """Tiles per aspect-ratio id, id 0 (an empty slot) having none: (max_aspect_ratio_id + 1,)."""
    return torch.tensor([0] + [h * w for h, w in aspect_ratios(config)], dtype=torch.long)


class MllamaVisionTower(nn.Module):
    """transformers' ``MllamaVisionModel``, frozen: tiles -> every tile's tokens, flattened."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        config = MllamaVisionConfig(**dict(cfg.architecture or {}))  # its own: the model's
        if config.image_size != cfg.image_size:
            raise ValueError(
                f"vision.image_size={cfg.image_size} but the tower's tiles are "
                f"{config.image_size} pixels (vision.architecture.image_size)"
            )
        self.model = MllamaVisionModel(config).requires_grad_(False).eval()
        self.tiles = config.max_num_tiles
        self.patches = (config.image_size // config.patch_size) ** 2 + 1  # with the CLS
        self.width = config.vision_output_dim
        self.num_tokens = self.tiles * self.patches
        self.register_buffer("tile_counts", tiles_of(config), persistent=False)

    def block_class(self) -> type[nn.Module]:
        return type(self.model.transformer.layers[0])

    def train(self, mode: bool = True) -> MllamaVisionTower:
        return super().train(False)  # frozen: eval mode whatever the parent asks

    def tile_mask(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(...,) ids -> (..., tiles) bool: the tiles an image has (none for an empty slot)."""
        counts = self.tile_counts.to(aspect_ratio_ids.device)[aspect_ratio_ids]
        return torch.arange(self.tiles, device=counts.device) < counts[..., None]

    def token_mask(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(...,) ids -> (..., tiles * patches) bool: the tokens of real tiles."""
        return self.tile_mask(aspect_ratio_ids).repeat_interleave(self.patches, dim=-1)

    @torch.no_grad()
    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        size = self.cfg.image_size
        if pixel_values.ndim != 6 or tuple(pixel_values.shape[2:]) != (self.tiles, 3, size, size):
            raise ValueError(
                f"pixel_values must be (B, N, {self.tiles}, 3, {size}, {size}): each image as its "
                f"{self.tiles} tiles (or flat, (M, {self.tiles}, 3, {size}, {size}), through "
                f"Flamingo.encode_media), got shape {tuple(pixel_values.shape)}: the tiled tower "
                "takes single images (no video); preprocess them with FlamingoProcessor"
            )
        if aspect_ratio_ids is None or aspect_ratio_ids.shape != pixel_values.shape[:2]:
            raise ValueError(
                "the tiled tower (vision.kind: mllama) needs aspect_ratio_ids, one per image "
                f"({tuple(pixel_values.shape[:2])}), as FlamingoProcessor gives them; got "
                f"{None if aspect_ratio_ids is None else tuple(aspect_ratio_ids.shape)}"
            )
        b, n = pixel_values.shape[:2]
        tile_mask = self.tile_mask(aspect_ratio_ids)
        if pixel_values.dtype == torch.uint8:  # the training loader's: normalised here
            pixel_values = normalise_tiles(pixel_values, tile_mask, self.cfg)
        tile_mask[..., 0] = True  # transformers' rule: an empty slot keeps its first tile
        dtype = self.model.patch_embedding.weight.dtype
        out = self.model(
            pixel_values.to(dtype), aspect_ratio_ids, tile_mask.long()
        ).last_hidden_state  # (B, N, tiles, patches, Dv)
        return out.reshape(b, n, 1, self.num_tokens, self.width)


# -- the image transform ------------------------------------------------------------------------


def best_canvas(
    height: int, width: int, ratios: list[tuple[int, int]], tile: int
) -> tuple[int, int]:
    """The (tiles high, tiles wide) arrangement an image of ``height x width`` goes on: the one
    that upscales it least, else downscales it least; the smaller canvas on a tie (as
    ``MllamaImageProcessor``'s ``get_optimal_tiled_canvas``; ``ratios`` give its candidates)."""
    scales = [min(h * tile / height, w * tile / width) for h, w in ratios]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    candidates = [r for r, s in zip(ratios, scales, strict=True) if s == chosen]
    return min(candidates, key=lambda r: r[0] * r[1])


def fit_to_canvas(
    height: int, width: int, canvas_h: int, canvas_w: int, tile: int
) -> tuple[int, int]:
    """The size the image is resized to on its canvas: aspect ratio kept, each side between a
    tile and the canvas (``get_image_size_fit_to_canvas``)."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tile_uint8(image: Image.Image, cfg: VisionConfig) -> tuple[torch.Tensor, int]:
    """An RGB image -> ``(tiles (max_num_tiles, 3, S, S) uint8, aspect_ratio_id)``, as
    ``MllamaImageProcessor`` cuts them before normalising: bilinear resize (antialiased) onto
    the best canvas, zero padding to the canvas, cut into tiles row by row, the missing tiles
    zeros (:func:`normalise_tiles` makes them the tower's input; the training loader ships
    these, normalised on the device)."""
    from torchvision.transforms.v2 import functional as tvf

    config = vision_config(cfg)
    ratios, tile = aspect_ratios(config), config.image_size
    if image.width < 1 or image.height < 1:
        raise ValueError(f"an image must have pixels, got a {image.width}x{image.height} image")
    pixels = tvf.pil_to_tensor(image.convert("RGB"))  # (3, H, W) uint8
    rows, cols = best_canvas(image.height, image.width, ratios, tile)
    size = fit_to_canvas(image.height, image.width, rows * tile, cols * tile, tile)
    bilinear = tvf.InterpolationMode.BILINEAR
    pixels = tvf.resize(pixels, list(size), interpolation=bilinear, antialias=True)
    pixels = F.pad(pixels, (0, cols * tile - size[1], 0, rows * tile - size[0]))
    tiles = pixels.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(-1, 3, tile, tile)
    out = torch.zeros(config.max_num_tiles, 3, tile, tile, dtype=torch.uint8)
    out[: rows * cols] = tiles
    return out, ratios.index((rows, cols)) + 1


def normalise_tiles(tiles: torch.Tensor, real: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """uint8 tiles (..., T, 3, S, S) -> the tower's float input: scaled to [0, 1] and
    normalised, the missing tiles (``real`` (..., T) False) zeros."""
    mean = torch.tensor(cfg.image_mean, device=tiles.device).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, device=tiles.device).view(3, 1, 1)
    pixels = (tiles.float() * (1 / 255) - mean) / std
    return pixels * real[..., None, None, None]


def tile_image(image: Image.Image, cfg: VisionConfig) -> tuple[torch.Tensor, int]:
    """An RGB image -> ``(tiles (max_num_tiles, 3, S, S) float32, aspect_ratio_id)``, as
    ``MllamaImageProcessor`` makes them: :func:`tile_uint8`, normalised, the missing tiles
    zeros."""
    tiles, ratio = tile_uint8(image, cfg)
    rows, cols = aspect_ratios(vision_config(cfg))[ratio - 1]
    real = torch.arange(tiles.shape[0]) < rows * cols
    return normalise_tiles(tiles, real, cfg), ratio


# -- which media a token reads ------------------------------------------------------------------


def visible_media(
    input_ids: torch.Tensor, image_id: int, media_index: torch.Tensor, num_media: int
) -> torch.Tensor:
    """(B, T, N) bool: the media each token reads, ``MllamaProcessor``'s rule: the images of the
    last run of consecutive ``<|image|>`` tokens at or before it, from each one's own token on.
    ``media_index`` (phi, the last image at or before each token) bounds it above; a token of
    this call after no image token of it (a decoding step) has no lower bound here (its
    media mask carries the prompt's, :meth:`MllamaFusion.decoding`)."""
    is_image = input_ids == image_id
    index = is_image.long().cumsum(-1) - 1
    starts = is_image & ~F.pad(is_image[:, :-1], (1, 0))
    first = torch.where(starts, index, -1).cummax(dim=-1).values.clamp(min=0)
    n = torch.arange(num_media, device=input_ids.device)
    return (n <= media_index[..., None]) & (n >= first[..., None])


# -- the cross-attention layer ------------------------------------------------------------------


class MllamaCrossAttention(nn.Module):
    """Grouped-query cross-attention, each head's queries and keys RMS-normalised."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, width, bias=False)
        self.q_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media (B, M, D) -> keys and values (B, kv_heads, M, head_dim), once per prompt."""
        b = media.shape[0]
        k = self.k_proj(media).view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(media).view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor
    ) -> torch.Tensor:
        """``bias`` (B, 1, T, M): 0 where a token reads a media token, the dtype's lowest
        value elsewhere. Grouped-query attention without copying the keys and values per
        query head (SDPA's ``enable_gqa``)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2))
        k, v = kv
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), enable_gqa=self.heads != self.kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MllamaCrossBlock(nn.Module):
    """One cross-attention layer of Llama 3.2 Vision's text model, run before a Llama layer."""

    def __init__(self, config: Any, uniform_rows: bool = False) -> None:
        super().__init__()
        self.uniform_rows = uniform_rows
        """transformers' numerics for tokens that read no image (``attend_uniformly``)."""
        self.cross_attn = MllamaCrossAttention(config)
        self.input_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = MllamaTextMLP(config)
        self.post_attention_layernorm = MllamaTextRMSNorm(
            config.hidden_size, eps=config.rms_norm_eps
        )
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        hidden: torch.Tensor,
        media: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
        mask: CrossMask | None,
    ) -> torch.Tensor:
        """``media``: (B, M, D) flattened media tokens, or their keys and values; ``mask``:
        what each token reads (:func:`cross_mask`, built once per call for every layer). No
        media: the layer is skipped (as transformers skips it for text alone)."""
        if media is None:
            return hidden
        kv = self.cross_attn.media_kv(media) if isinstance(media, torch.Tensor) else media
        bias = mask.uniform if self.uniform_rows else mask.bias
        attended = self.cross_attn(self.input_layernorm(hidden), kv, bias)
        reads = mask.reads.to(hidden.dtype)
        if not self.uniform_rows:
            attended = attended * reads
        hidden = hidden + self.cross_attn_attn_gate.tanh() * attended
        mlp = self.mlp(self.post_attention_layernorm(hidden)) * reads
        return hidden + self.cross_attn_mlp_gate.tanh() * mlp


@dataclass(frozen=True)
class CrossMask:
    """What the tokens of one call read, for every cross-attention layer (built once)."""

    bias: torch.Tensor
    """(B, 1, T, M): 0 where a token reads a media token, the lowest value elsewhere."""
    uniform: torch.Tensor
    """The same with the rows that read nothing all 0 (transformers' even attention there)."""
    reads: torch.Tensor
    """(B, T, 1) bool: the token reads some media token."""


def cross_mask(allowed: torch.Tensor, dtype: torch.dtype) -> CrossMask:
    """``allowed`` (B, T, M) bool -> the :class:`CrossMask` of a call in ``dtype``."""
    reads = allowed.any(-1, keepdim=True)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    bias = torch.where(allowed, zero, low)[:, None]
    return CrossMask(bias, torch.where(reads[:, None], bias, zero), reads)
