"""LLaVA's connector: an MLP from the tower's patch tokens into the LM's input embeddings.

LLaVA (Liu et al. 2023) and LLaVA-1.5 feed an image to the LM as a run of soft tokens: each of
the tower's tokens (from its second-to-last block, the CLS token dropped, in LLaVA-1.5) goes
through a linear layer (LLaVA) or a two-layer GELU MLP (LLaVA-1.5, ``mlp2x_gelu``) and takes the
place of one ``<image>`` token of the text. The LM reads them through its ordinary
self-attention: no gated blocks, and nothing about the LM that stays the LM at init.

Shapes: ``vision_tokens (B, N, F, V, Dv) -> media_latents (B, N, V, D)`` (one frame per image:
the connector has no notion of time). The attribute names (``linear_1``, ``linear_2``) are
transformers' ``LlavaMultiModalProjector``'s, so ``llava-hf`` checkpoints load by name
(``flamingo/convert/llava.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from flamingo.config import ProjectorConfig

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation of OpenAI's CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LlavaProjector(nn.Module):
    """Patch tokens (width ``dim_vision``) -> LM input embeddings (width ``dim_lm``)."""

    def __init__(self, cfg: ProjectorConfig, dim_vision: int, dim_lm: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear_1 = nn.Linear(dim_vision, dim_lm, bias=cfg.bias)
        if cfg.layers == 2:
            self.act = (
                QuickGELU() if cfg.activation == "quick_gelu" else ACTIVATIONS[cfg.activation]()
            )
            self.linear_2 = nn.Linear(dim_lm, dim_lm, bias=cfg.bias)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        if vision_tokens.ndim != 5:
            raise ValueError(
                f"vision_tokens must be (B, N, F, V, Dv), got shape {tuple(vision_tokens.shape)}"
            )
        if vision_tokens.shape[2] != 1:
            raise ValueError(
                f"connector: llava takes single images, got media of {vision_tokens.shape[2]} "
                "frames (video needs the resampler's time embeddings: connector: flamingo)"
            )
        x = self.linear_1(vision_tokens[:, :, 0].to(self.linear_1.weight.dtype))
        if self.cfg.layers == 2:
            x = self.linear_2(self.act(x))
        return x
