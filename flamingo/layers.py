"""Building blocks shared by the resampler and the gated cross-attention.

Both follow the paper's pre-norm transformer conventions: a LayerNorm before each attention and
feed-forward, bias-free projections, GELU.

**Cheap activations are rebuilt, not kept.** A trainable Linear keeps its input for its weight
gradient. Where that input is a cheap function of tensors autograd keeps anyway (a LayerNorm's
output: its input is kept for the LayerNorm's own backward; a GELU's output: its input is
kept), the modules here let autograd drop it and rebuild it in the backward
(:func:`recompute_in_backward`): the same values and gradients bit for bit, for one elementwise
op per tensor. Inside activation checkpointing, which manages saved tensors itself, it is
switched off (``recompute_saved``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class _Rebuild(NamedTuple):
    """What autograd stores instead of a view of the recomputed tensor."""

    size: torch.Size
    stride: tuple[int, ...]
    offset: int


@contextlib.contextmanager
def recompute_in_backward(
    tensor: torch.Tensor, recompute: Callable[[], torch.Tensor], enabled: bool = True
) -> Iterator[None]:
    """Autograd does not keep ``tensor`` (or views of it) for the ops run inside the block.

    Their backward calls ``recompute()`` (under no_grad) to rebuild it; it must return the same
    values, contiguous, from tensors that stay alive anyway. Without grad mode, or when
    ``enabled`` is false or ``tensor`` is not contiguous, the block runs unchanged.
    """
    if not (enabled and torch.is_grad_enabled() and tensor.is_contiguous()):
        yield
        return
    storage, dtype, base = (
        tensor.untyped_storage().data_ptr(),
        tensor.dtype,
        tensor.storage_offset(),
    )

    def pack(saved: torch.Tensor):
        if saved.dtype == dtype and saved.untyped_storage().data_ptr() == storage:
            return _Rebuild(saved.shape, saved.stride(), saved.storage_offset() - base)
        return saved

    def unpack(saved):
        if not isinstance(saved, _Rebuild):
            return saved
        with torch.no_grad():
            full = recompute()
        return full.as_strided(saved.size, saved.stride, full.storage_offset() + saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def stays_materialised(module: nn.Module) -> bool:
    """Whether ``module``'s parameters can be read during any part of the backward.

    Not under ZeRO-3 (its parameters carry ``ds_status``): it releases a module's parameters
    after each use, so a recomputation that reads them during another module's backward would
    find them empty. Even those below the persistence threshold are released during the first,
    trace-recording step.
    """
    return not any(hasattr(p, "ds_status") for p in module.parameters())


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` without a module call (no hooks: safe to run inside a backward)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def linear_of_norm(
    linear: nn.Linear, norm: nn.LayerNorm, x: torch.Tensor, recompute: bool
) -> torch.Tensor:
    """``linear(norm(x))``; with ``recompute`` the LayerNorm output is rebuilt in the backward
    for the Linear's weight gradient instead of kept (kept under ZeRO-3)."""
    normed = norm(x)
    rebuild = recompute and stays_materialised(norm)
    with recompute_in_backward(normed, lambda: layer_norm(norm, x), rebuild):
        return linear(normed)


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim).

    With ``recompute_saved`` (the default) neither the LayerNorm output nor the GELU output,
    which the Linears would keep for their weight gradients, is stored: the backward rebuilds
    them from the LayerNorm's and the GELU's inputs (module docstring).
    """

    def __init__(self, dim: int, mult: int = 4) -> None:
        inner = dim * mult
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),
        )
        self.recompute_saved = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, up, act, down = self
        hidden = linear_of_norm(up, norm, x, self.recompute_saved)
        activated = act(hidden)
        gelu = lambda: F.gelu(hidden, approximate=act.approximate)  # noqa: E731
        with recompute_in_backward(activated, gelu, self.recompute_saved):
            return down(activated)
