"""Building blocks shared by the resampler and the gated cross-attention.

Both follow the paper's pre-norm transformer conventions: a LayerNorm before each attention and
feed-forward, bias-free projections, GELU.
"""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim).

    With ``recompute_activation`` (the default) the GELU output, which the last Linear would
    keep for its weight gradient, is not stored: the backward recomputes it from the GELU's
    input, which autograd keeps anyway. Same values and gradients, one ``(tokens, mult*dim)``
    tensor less per feed-forward. Turn it off inside activation checkpointing, which manages
    the saved tensors itself.
    """

    def __init__(self, dim: int, mult: int = 4) -> None:
        inner = dim * mult
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),
        )
        self.recompute_activation = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, up, act, down = self
        hidden = up(norm(x))
        activated = act(hidden)
        if not (self.recompute_activation and torch.is_grad_enabled() and hidden.requires_grad):
            return down(activated)
        storage = activated.untyped_storage().data_ptr()

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() == storage:  # the Linear's input (or a view)
                return ("recompute", t.shape)
            return t

        def unpack(saved):
            if isinstance(saved, tuple):
                with torch.no_grad():
                    return act(hidden).view(saved[1])
            return saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return down(activated)
