"""MPT's ALiBi attention through ``scaled_dot_product_attention``.

transformers' MPT (OpenFlamingo-9B's LM, ``mosaicml/mpt-7b``) has only an eager attention: per
layer it materialises the (B, heads, T, T) scores, adds the ALiBi bias, and keeps an fp32
softmax of them for the backward. :class:`SdpaMptAttention` computes the same attention with
one SDPA call whose float mask is the ALiBi bias with the causal/padding mask folded in; the
mask is built once per LM call and shared by every layer (all layers get the same bias and the
same mask), so the backward keeps one (B, heads, T, T) tensor for the whole LM instead of two
per layer. The weights, their names and the cache are MPT's own: the class is swapped in on the
loaded modules (:func:`use_sdpa_attention`).

Numerics: fp32 outputs equal the eager ones to 1e-5 (tested). In bf16 the bias is rounded to
bf16 before the kernel adds it (the eager path adds an fp32 bias to bf16 scores), an error of
the same size as the scores' own bf16 rounding. A query row that may see nothing (a left
padding position) attends uniformly in both, but only the eager path's ``masked_fill`` stops
its gradient into the scores: gradients agree wherever padding outputs get none (training puts
no loss on them).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mpt.modeling_mpt import MptAttention


class _SharedBias:
    """The last bias built, kept while the mask it came from is alive (one LM call)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.bias: torch.Tensor | None = None

    def clear(self) -> None:
        self.key = self.bias = None

    def get(
        self, position_bias: torch.Tensor, mask: torch.Tensor, num_keys: int, dtype: torch.dtype
    ) -> torch.Tensor:
        key = (id(position_bias), id(mask), num_keys, dtype)
        if self.key != key:
            query_start = max(0, position_bias.size(1) - mask.size(-2))
            alibi = position_bias[:, query_start:, max(0, position_bias.size(2) - num_keys) :]
            # what the eager path does to its scores: bias added, masked entries replaced by
            # the dtype's minimum (so a fully masked row stays finite and uniform)
            self.bias = alibi.to(dtype).masked_fill(mask, torch.finfo(dtype).min)
            self.key = key
            weakref.finalize(mask, self.clear)
        return self.bias


class SdpaMptAttention(MptAttention):
    """MPT's attention, one SDPA call (module docstring). Takes the keyword arguments of the
    transformers releases the project supports: ``cache`` (5.24 on) or ``past_key_values``
    (before), with ``cache_position``."""

    shared_bias: _SharedBias

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        batch, seq_len = hidden_states.shape[:2]
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = (
            t.reshape(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
            for t in qkv.chunk(3, dim=2)
        )
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": cache_position})
        if attention_mask is None:
            raise ValueError("SdpaMptAttention needs the boolean mask MptModel builds")
        bias = self.shared_bias.get(position_bias, attention_mask, k.shape[-2], q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, -1)), None


def use_sdpa_attention(model: nn.Module) -> int:
    """Swap every ``MptAttention`` of ``model`` for :class:`SdpaMptAttention` (same weights,
    one bias shared by all of them); returns how many were swapped."""
    shared = _SharedBias()
    swapped = 0
    for module in model.modules():
        if type(module) is MptAttention:
            module.__class__ = SdpaMptAttention
            module.shared_bias = shared
            swapped += 1
    return swapped
