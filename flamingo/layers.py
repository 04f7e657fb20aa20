"""Building blocks shared by the resampler and the gated cross-attention.

Both follow the paper's pre-norm transformer conventions: a LayerNorm before each attention and
feed-forward, bias-free projections, GELU.
"""

from __future__ import annotations

from torch import nn


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        inner = dim * mult
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),
        )
