"""Masked, tanh-gated cross-attention from text to media latents (paper Sec. 2.2, Fig. 4, 7).

A GATED XATTN-DENSE block computes, on the LM's hidden states ``y``::

    y = y + tanh(attn_gate) * xattn(q=y, kv=media_latents)
    y = y + tanh(ff_gate)   * ffw(y)

with both gates initialised to 0, so that at initialisation the model is exactly the LM
(``gating: none``, the paper's ablation, adds both branches unscaled and has no gates).

Which media a token sees is given by the media index phi (``media_index (B, T)``): the index of
the last ``<image>`` at or before the token, -1 when there is none. A token attends to the R
latents of that media item only (paper), or optionally of every item up to it. Tokens with no
media before them get exactly zero cross-attention output.

**Two kernels, one mask.** Which keys a token may see is built once per LM call and shared by
the gated blocks, in one of two forms (``ExecutionPolicy.cross_attention``): an additive float
mask for ``scaled_dot_product_attention`` (``sdpa``: every token scores all N*R keys, and the
float mask keeps SDPA off its flash kernel), or a ``BlockMask`` for PyTorch's
``flex_attention`` (``flex``: blocks of keys no token of a query block may see are skipped,
so a token computes about the R keys of its own media item). Both give the same outputs
(tested on CPU to 1e-5 in fp32). ``flex`` needs torch >= 2.5 and, to train, a GPU: PyTorch's
flex_attention has no CPU backward, and uncompiled it materialises the scores.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from flamingo.config import CrossAttentionConfig
from flamingo.layers import (
    DEFAULT_POLICY,
    FeedForward,
    GatedFeedForward,
    linear_of_norm,
    make_norm,
)
from flamingo.packing import document_starts

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch 2.4, the floor; flex is then refused
    BlockMask = create_block_mask = flex_attention = None

CrossAttentionMask = Any
"""What a gated block's attention is masked with: the float bias of
:func:`cross_attention_bias` (SDPA) or the ``BlockMask`` of :func:`cross_attention_block_mask`
(flex_attention)."""


def media_index_from_ids(
    input_ids: torch.Tensor,
    image_token_id: int,
    document_ids: torch.Tensor | None = None,
    reset_token_id: int | None = None,
) -> torch.Tensor:
    """phi: for each token, the index of the last ``<image>`` at or before it, else -1; in a
    packed row (``document_ids``, :mod:`flamingo.packing`) -1 also where that image belongs
    to an earlier document; with ``reset_token_id`` (``xattn.reset_after_eos``) -1 also where
    a reset token came between that image and the token (the reset token itself keeps it).
    Indices count the row's images (its media slots).

    ``input_ids (B, T) -> media_index (B, T)`` (int64).
    """
    is_image = input_ids == image_token_id
    index = is_image.long().cumsum(dim=-1) - 1
    if document_ids is None and reset_token_id is None:
        return index
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_image = torch.where(is_image, positions, -1).cummax(dim=1).values
    start = torch.zeros_like(positions)
    if document_ids is not None:
        start = document_starts(document_ids)
    if reset_token_id is not None:
        # the first position after the last reset token strictly before each token
        after_reset = torch.where(input_ids == reset_token_id, positions + 1, 0)
        after_reset = F.pad(after_reset.cummax(dim=1).values[:, :-1], (1, 0))
        start = torch.maximum(start, after_reset)
    return torch.where(last_image >= start, index, -1)


def cross_attention_mask(
    media_index: torch.Tensor,
    num_media: int,
    num_latents: int,
    attend: str,
    media_first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, T, N*R): True where token t may attend to latent key j.

    ``media_first (B, T)``, with ``attend: all_previous`` in packed rows: the first media
    item of each token's document (:func:`document_first_media`), below which it sees none.
    Rows of tokens with no media (index -1) are all True so that SDPA stays finite; their
    output is zeroed by the caller.
    """
    key_media = torch.arange(num_media, device=media_index.device).repeat_interleave(num_latents)
    idx = media_index.unsqueeze(-1)  # (B, T, 1)
    allowed = (key_media == idx) if attend == "last" else (key_media <= idx)
    if media_first is not None and attend != "last":
        allowed = allowed & (key_media >= media_first.unsqueeze(-1))
    allowed = allowed | (idx < 0)
    return allowed.unsqueeze(1)


def document_first_media(
    input_ids: torch.Tensor, image_token_id: int, document_ids: torch.Tensor
) -> torch.Tensor:
    """(B, T): the row index of the first media item of each token's document in a packed row
    (images before the document's start; its own first image if it has one)."""
    is_image = (input_ids == image_token_id).long()
    before = is_image.cumsum(dim=-1) - is_image
    return before.gather(1, document_starts(document_ids))


def cross_attention_bias(
    media_index: torch.Tensor,
    num_media: int,
    num_latents: int,
    attend: str,
    dtype: torch.dtype,
    media_first: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`cross_attention_mask` as an additive float mask (0 allowed, -inf not): what SDPA
    turns a boolean mask into on every call. Built once per LM call and shared by the gated
    blocks, the backward keeps one copy instead of one per block."""
    allowed = cross_attention_mask(media_index, num_media, num_latents, attend, media_first)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, float("-inf"))


def cross_attention_block_mask(
    media_index: torch.Tensor,
    num_media: int,
    num_latents: int,
    attend: str,
    media_first: torch.Tensor | None = None,
) -> BlockMask:
    """:func:`cross_attention_mask` as a flex_attention ``BlockMask`` (B, 1, T, N*R). Rows of
    tokens with no media allow nothing (flex_attention gives them zeros, as the caller's
    zeroing would); blocks of keys that no query of a block may see are never computed."""
    if create_block_mask is None:
        raise RuntimeError(
            f"cross_attention: flex needs torch >= 2.5 (flex_attention), this is {torch.__version__}"
        )
    batch, seq_len = media_index.shape

    def may_attend(b, h, q, kv):
        media = media_index[b, q]
        key_media = kv // num_latents
        if attend == "last":
            return key_media == media
        if media_first is None:
            return key_media <= media
        return (key_media <= media) & (key_media >= media_first[b, q])

    return create_block_mask(
        may_attend, batch, None, seq_len, num_media * num_latents, device=media_index.device
    )


@cache
def _compiled_flex_attention():
    """flex_attention is fast only compiled (eager, it materialises the scores); compiled
    once per process, its graphs cached by shape."""
    return torch.compile(flex_attention, dynamic=False)


def flex_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """flex_attention of ``q (B, H, T, d)`` on ``k, v (B, H, N*R, d)`` under ``block_mask``;
    compiled on accelerators (on the CPU it runs eager: forward only, for inference and the
    equivalence tests)."""
    if q.device.type != "cpu":
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():  # eager on purpose: it says it materialises the scores
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


@dataclass
class MediaKV:
    """One block's cross-attention keys and values for a batch of media."""

    k: torch.Tensor
    """(B, heads, N*R, dim_head)"""
    v: torch.Tensor
    """(B, heads, N*R, dim_head)"""
    num_media: int
    num_latents: int

    def index_select(self, index: torch.Tensor) -> MediaKV:
        """Rows ``index`` of the batch (e.g. each prompt repeated once per beam)."""
        return MediaKV(self.k[index], self.v[index], self.num_media, self.num_latents)


class MaskedCrossAttention(nn.Module):
    """Text queries (pre-norm) attend to the latents of the media each token may see.

    Under the default policy the LayerNorm output, which the query projection would keep, is
    rebuilt in the backward (:mod:`flamingo.layers`). The attribute names (``norm``, ``to_q``,
    ``to_kv``, ``to_out``) are OpenFlamingo's: its checkpoints load by name
    (``flamingo/convert/openflamingo.py``).
    """

    def __init__(
        self,
        dim: int,
        dim_media: int,
        heads: int,
        dim_head: int,
        norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = make_norm(norm, dim, norm_eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_media, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # xattn.qk_norm: each head's queries and keys normalised (IDEFICS's qk_layer_norms)
        self.q_norm = make_norm(norm, dim_head, norm_eps) if qk_norm else None
        self.k_norm = make_norm(norm, dim_head, norm_eps) if qk_norm else None
        self.policy = DEFAULT_POLICY

    def media_kv(self, media_latents: torch.Tensor) -> MediaKV:
        """media_latents (B, N, R, Dv) -> keys (normalised, with ``qk_norm``) and values
        (B, heads, N*R, dim_head)."""
        _, num_media, num_latents, _ = media_latents.shape
        k, v = self.to_kv(rearrange(media_latents, "b n r d -> b (n r) d")).chunk(2, dim=-1)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (k, v))
        if self.k_norm is not None:
            k = self.k_norm(k)
        return MediaKV(k, v, num_media, num_latents)

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor | MediaKV,
        media_index: torch.Tensor,
        attend: Literal["last", "all_previous"] = "last",
        attn_mask: CrossAttentionMask | None = None,
    ) -> torch.Tensor:
        """x (B, T, D), media: latents (B, N, R, Dv) or their MediaKV, media_index (B, T);
        ``attn_mask``: the mask of these arguments when already built, a float bias
        (:func:`cross_attention_bias`, SDPA) or a ``BlockMask`` (flex_attention)."""
        kv = media if isinstance(media, MediaKV) else self.media_kv(media)
        if attn_mask is None:
            attn_mask = cross_attention_bias(
                media_index, kv.num_media, kv.num_latents, attend, x.dtype
            )
        q = linear_of_norm(self.to_q, self.norm, x, self.policy)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if isinstance(attn_mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=attn_mask)
        else:
            out = flex_cross_attention(q, kv.k, kv.v, attn_mask)
        has_media = (media_index >= 0).unsqueeze(-1).to(out.dtype)
        # zeroed after the bias-free projection, not before: the same values, and the
        # projection keeps the attention's own output (its heads merge as a view) not a copy
        return self.to_out(rearrange(out, "b h t d -> b t (h d)")) * has_media


class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE: residual tanh-gated cross-attention then tanh-gated feed-forward.

    ``attn``, ``ff``, ``attn_gate`` and ``ff_gate`` are OpenFlamingo's names (its
    ``GatedCrossAttentionBlock``), which the OpenFlamingo import relies on."""

    def __init__(self, cfg: CrossAttentionConfig, dim: int, dim_media: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn = MaskedCrossAttention(
            dim, dim_media, cfg.heads, cfg.dim_head, cfg.norm, cfg.norm_eps, cfg.qk_norm
        )
        hidden = cfg.ff_hidden or cfg.ff_mult * dim
        if cfg.ff == "swiglu":
            self.ff = GatedFeedForward(dim, hidden, cfg.norm, cfg.norm_eps)
        else:
            self.ff = FeedForward(dim, norm=cfg.norm, norm_eps=cfg.norm_eps, hidden=hidden)
        if cfg.gating == "tanh":
            gate_shape = (dim,) if cfg.gate == "vector" else (1,)
            self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
            self.ff_gate = nn.Parameter(torch.zeros(gate_shape))

    def _gated(self, branch: torch.Tensor, gate: str) -> torch.Tensor:
        return branch * getattr(self, gate).tanh() if self.cfg.gating == "tanh" else branch

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor | MediaKV | None,
        media_index: torch.Tensor,
        attn_mask: CrossAttentionMask | None = None,
    ) -> torch.Tensor:
        """x (B, T, D); media: latents (B, N, R, Dv), their MediaKV, or None for text only;
        media_index (B, T); ``attn_mask``: the shared cross-attention mask, if built."""
        if media is not None:
            attn = self.attn(x, media, media_index, self.cfg.attend, attn_mask)
            x = x + self._gated(attn, "attn_gate")
        ff = self.ff(x)
        if not self.cfg.ff_on_imageless_tokens:
            ff = ff * (media_index >= 0).unsqueeze(-1).to(ff.dtype)
        return x + self._gated(ff, "ff_gate")
