"""Fusion by gated cross-attention (paper Sec. 2.2, Fig. 4): a GATED XATTN-DENSE block before
every n-th decoder layer of the frozen LM; each text token attends to the media its ``<image>``
tokens point it to (phi, ``media_index``), and ``tanh(gate)`` starts at 0, so a fresh model is
the LM.

The blocks live in the LM (``lm.gated_blocks``, OpenFlamingo's names) and run from its hooks
(``FlamingoLM``); what they read in one call is a :class:`MediaContext`: the media (latents, or
each block's keys/values while decoding), phi, and the cross-attention mask every block shares
(built once per call: a float bias for SDPA, or a flex_attention BlockMask, as the engine's
policy says). While decoding, each block's keys/values are computed once per prompt
(:class:`~flamingo.xattn.MediaKV`) and beams share them by indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flamingo.parts.base import Flops, Fusion, LMCall
from flamingo.xattn import (
    CrossAttentionMask,
    GatedCrossAttentionBlock,
    MediaKV,
    cross_attention_bias,
    cross_attention_block_mask,
    document_first_media,
)

MediaInput = torch.Tensor | list[MediaKV] | None
"""What the gated blocks attend to: media latents (B, N, R, Dv), one precomputed MediaKV per
gated block (decoding), or None (text only)."""


@dataclass(frozen=True)
class MediaContext:
    """What the gated blocks of one LM call attend to (set for the call, then cleared)."""

    media: MediaInput
    media_index: torch.Tensor
    """(B, T): phi, the media item each token sees (-1: none)."""
    mask: CrossAttentionMask | None
    """The cross-attention mask all blocks share (None without media)."""


def check_media(
    input_ids: torch.Tensor,
    media: MediaInput,
    media_index: torch.Tensor,
    sync_free: bool,
    part: str = "the gated cross-attention",
) -> None:
    """phi matches the text, and points at media that were given (``part``: how errors name
    the model's connector)."""
    if media_index.shape != input_ids.shape:
        raise ValueError(
            f"media_index shape {tuple(media_index.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    if isinstance(media, list):
        batch, available = (media[0].k.shape[0], media[0].num_media) if media else (None, 0)
    elif media is not None:
        batch, available = media.shape[0], media.shape[1]
    else:
        batch, available = None, 0
    if batch is not None and batch != input_ids.shape[0]:
        raise ValueError(f"media batch size {batch} != text batch size {input_ids.shape[0]}")
    if sync_free:  # the device checks it when it gets there; the host does not wait
        if media_index.numel():
            torch._assert_async(media_index.max() < available)
        return
    needed = int(media_index.max()) + 1 if media_index.numel() else 0
    if needed > available:
        raise ValueError(
            f"the text refers to {needed} media item(s) per sequence (<image> tokens) but "
            f"only {available} were given to {part}: pass pixel_values with N >= {needed}"
        )


class CrossAttentionFusion(Fusion):
    """Gated cross-attention blocks before chosen decoder layers (``xattn``)."""

    name = "cross_attention"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.cfg.xattn.gating == "tanh"  # the ablation without gates is not the LM

    def image_tokens(self, connector_tokens: int) -> int:
        return 1  # one <image> per image; its media tokens are the blocks' keys and values

    def layer_indices(self, num_layers: int) -> list[int]:
        return self.cfg.xattn.layer_indices(num_layers)

    def blocks(
        self, lm_config: Any, num_layers: int, dim_media: int
    ) -> tuple[nn.ModuleList, list[int]]:
        indices = self.layer_indices(num_layers)
        make = lambda: GatedCrossAttentionBlock(self.cfg.xattn, lm_config.hidden_size, dim_media)  # noqa: E731
        return nn.ModuleList(make() for _ in indices), indices

    def trainable(self, lm: nn.Module) -> dict[str, nn.Module]:
        return {"gated_blocks": lm.gated_blocks}

    def wrap_units(self) -> tuple[type[nn.Module], ...]:
        return (GatedCrossAttentionBlock,)

    # -- one call -------------------------------------------------------------------------------

    def lm_inputs(self, model: Any, call: LMCall) -> LMCall:
        media = call.media_kv if call.media_kv is not None else call.media_latents
        part = model.parts.connector.describe()
        check_media(call.input_ids, media, call.media_index, model.policy.sync_free, part)
        media_first = None
        lm = model.lm
        if call.document_ids is not None and lm.gated_blocks and self.cfg.xattn.attend != "last":
            image_id = model.special_tokens.image_id
            media_first = document_first_media(call.input_ids, image_id, call.document_ids)
        mask = self.mask(lm, media, call.media_index, media_first)
        call.context = MediaContext(media, call.media_index, mask)
        return call

    def mask(
        self,
        lm: nn.Module,
        media: MediaInput,
        media_index: torch.Tensor,
        media_first: torch.Tensor | None,
    ) -> CrossAttentionMask | None:
        """The cross-attention mask of one call, built once: every gated block sees the same
        media, so they share it (and the backward keeps one copy, not one per block)."""
        if media is None or not len(lm.gated_blocks):
            return None
        if isinstance(media, list):
            num_media, num_latents = media[0].num_media, media[0].num_latents
        else:
            num_media, num_latents = media.shape[1:3]
        attend = self.cfg.xattn.attend
        if lm.policy.cross_attention == "flex":
            return cross_attention_block_mask(
                media_index, num_media, num_latents, attend, media_first
            )
        dtype = lm.gated_blocks[0].attn.to_q.weight.dtype
        return cross_attention_bias(media_index, num_media, num_latents, attend, dtype, media_first)

    def block_inputs(self, block_idx: int, block: nn.Module, context: MediaContext) -> tuple:
        media = context.media
        if isinstance(media, list):
            media = media[block_idx]
        elif media is not None:
            media = media.to(block.attn.to_q.weight.dtype)
        return media, context.media_index, context.mask

    # -- decoding -------------------------------------------------------------------------------

    def decoding(
        self,
        model: Any,
        media_latents: torch.Tensor | None,
        use_cache: bool,
        input_ids: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
    ) -> Any:
        """The latents and, with a cache, every gated block's keys/values, once per prompt."""
        if media_latents is None or not use_cache:
            return media_latents, None
        blocks = model.lm.gated_blocks
        kv = [b.attn.media_kv(media_latents.to(b.attn.to_q.weight.dtype)) for b in blocks]
        return media_latents, kv

    def step_media(self, state: Any, use_cache: bool, first: bool) -> dict[str, Any]:
        latents, kv = state
        return {"media_kv": kv} if use_cache else {"media_latents": latents}

    def select(self, state: Any, index: torch.Tensor) -> Any:
        latents, kv = state
        return (
            None if latents is None else latents[index],
            None if kv is None else [v.index_select(index) for v in kv],
        )

    def flops(self, s: Any) -> Flops:
        t, d, w, i = s.seq_len, s.lm_width, s.vision_width, s.xattn_inner
        media = s.images * s.latents
        block = (
            2 * t * d * i  # queries
            + 2 * media * w * 2 * i  # keys and values of the media
            + 4 * t * media * i  # attention
            + 2 * t * i * d  # output
            + 4 * t * d * s.xattn_ff_mult * d  # gated feed-forward
        )
        return {"gated_blocks": (float(s.gated_blocks * block * s.batch), 3)}
