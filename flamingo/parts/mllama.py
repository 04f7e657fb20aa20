"""Llama 3.2 Vision's fusion (``connector: mllama``): its cross-attention layers as blocks run
before chosen layers of the frozen Llama (``flamingo.mllama.MllamaCrossBlock``).

A call's context is the media (flattened per row: ``(B, N * R, D)``, or each block's keys and
values while decoding) and one mask every block shares (:class:`flamingo.mllama.CrossMask`,
built once per call): which media each token reads (:func:`flamingo.mllama.visible_media`),
restricted to the tokens of each image's real tiles (``media_mask``, from the aspect-ratio
ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flamingo.mllama import CrossMask, MllamaCrossBlock, cross_mask, visible_media
from flamingo.parts.base import Flops, Fusion, LMCall
from flamingo.parts.cross_attention import check_media


@dataclass(frozen=True)
class MllamaContext:
    """What the cross-attention layers of one LM call read (set for the call, then cleared)."""

    media: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]] | None
    """(B, N * R, D) media tokens, or one (keys, values) per block; None: text only."""
    mask: CrossMask | None
    """What each token reads, for every block (built once per call)."""


@dataclass
class MllamaDecoding:
    """A prompt's media for decoding: computed once, shared by beams (``select``)."""

    latents: torch.Tensor | None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    media_mask: torch.Tensor | None
    """(B, N, R) bool: the media's real tokens (what the prompt's own call reads through)."""
    continuation: torch.Tensor | None
    """(B, N, R) bool: the tokens a generated token reads (the prompt's last token's media,
    their real tiles): a cached step sees only its own token, not the run of images before."""
    step: MllamaStep | None = None
    """With a cache: every one-token step's context, built once (no mask rebuilt a step)."""


@dataclass(frozen=True)
class MllamaStep:
    """``media_kv`` of a cached decoding step: the blocks' keys and values and the step's
    mask, made once per prompt (what :meth:`MllamaFusion.lm_inputs` would build each step from
    the token alone: a generated token is never an image, so it reads ``continuation``)."""

    context: MllamaContext

    def select(self, index: torch.Tensor, kv: list) -> MllamaStep:
        """Rows ``index``, with ``kv`` the keys and values already selected."""
        mask = self.context.mask
        assert mask is not None
        rows = CrossMask(mask.bias[index], mask.uniform[index], mask.reads[index])
        return MllamaStep(MllamaContext(kv, rows))


class MllamaFusion(Fusion):
    """Cross-attention layers before the Llama layers ``mllama.layers``."""

    name = "mllama"
    identity_at_init = True  # both tanh gates start at zero

    def image_tokens(self, connector_tokens: int) -> int:
        return 1  # one <|image|> per image

    def layer_indices(self, num_layers: int) -> list[int]:
        return list(self.cfg.mllama.layers)

    def blocks(
        self, lm_config: Any, num_layers: int, dim_media: int
    ) -> tuple[nn.ModuleList, list[int]]:
        indices = self.layer_indices(num_layers)
        bad = [i for i in indices if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"mllama.layers {bad} are not layers of this {num_layers}-layer LM: each names "
                "the Llama layer a cross-attention layer runs before"
            )
        if dim_media != lm_config.hidden_size:
            raise ValueError(
                f"connector: mllama needs media of the LM's width {lm_config.hidden_size} (its "
                f"projector's output), got {dim_media}"
            )
        uniform = self.cfg.mllama.rows_without_image == "attend_uniformly"
        return nn.ModuleList(MllamaCrossBlock(lm_config, uniform) for _ in indices), indices

    def trainable(self, lm: nn.Module) -> dict[str, nn.Module]:
        return {"gated_blocks": lm.gated_blocks}

    def wrap_units(self) -> tuple[type[nn.Module], ...]:
        return (MllamaCrossBlock,)

    # -- one call -------------------------------------------------------------------------------

    def lm_inputs(self, model: Any, call: LMCall) -> LMCall:
        if isinstance(call.media_kv, MllamaStep):  # a generated token: its context is made
            if call.input_ids.shape[1] != 1:
                raise ValueError("an MllamaStep's context is for one generated token a call")
            call.context = call.media_kv.context
            return call
        media = call.media_kv if call.media_kv is not None else call.media_latents
        if media is None:
            check_media(call.input_ids, None, call.media_index, model.policy.sync_free)
            call.context = MllamaContext(None, None)
            return call
        if isinstance(media, list):  # decoding: made from a prompt whose media were checked
            if call.media_mask is None:
                raise ValueError(
                    "decoding from the blocks' keys and values needs the media_mask they were "
                    "made with (Flamingo.generate passes both)"
                )
            n, per_item = call.media_mask.shape[1:]
        else:
            part = model.parts.connector.describe()
            check_media(call.input_ids, media, call.media_index, model.policy.sync_free, part)
            n, per_item = media.shape[1:3]
            media = media.flatten(1, 2)
        if not len(model.lm.gated_blocks):  # no layer reads them
            call.context = MllamaContext(None, None)
            return call
        image_id = model.special_tokens.image_id
        visible = visible_media(call.input_ids, image_id, call.media_index, n)  # (B, T, N)
        allowed = visible.repeat_interleave(per_item, dim=-1)
        if call.media_mask is not None:
            allowed = allowed & call.media_mask.flatten(1, 2)[:, None]
        dtype = model.lm.gated_blocks[0].cross_attn.q_proj.weight.dtype
        call.context = MllamaContext(media, cross_mask(allowed, dtype))
        return call

    def block_inputs(self, block_idx: int, block: nn.Module, context: MllamaContext) -> tuple:
        media = context.media
        if isinstance(media, list):
            media = media[block_idx]
        elif media is not None:
            media = media.to(block.cross_attn.q_proj.weight.dtype)
        return media, context.mask

    # -- decoding -------------------------------------------------------------------------------

    def decoding(
        self,
        model: Any,
        media_latents: torch.Tensor | None,
        use_cache: bool,
        input_ids: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
    ) -> MllamaDecoding:
        """The media, their mask narrowed to what the prompt's last token reads (the generated
        tokens read the same: none is an image), and with a cache every block's keys and
        values, once per prompt."""
        if media_latents is None:
            return MllamaDecoding(None, None, None, None)
        b, n, r = media_latents.shape[:3]
        if media_mask is None:
            media_mask = torch.ones(b, n, r, dtype=torch.bool, device=media_latents.device)
        continuation = media_mask
        if input_ids is not None:
            phi = model.media_index(input_ids)
            visible = visible_media(input_ids, model.special_tokens.image_id, phi, n)[:, -1]
            continuation = media_mask & visible[..., None]
        kv, step = None, None
        blocks = model.lm.gated_blocks
        if use_cache and len(blocks):
            flat = media_latents.flatten(1, 2)
            kv = [b.cross_attn.media_kv(flat.to(b.cross_attn.q_proj.weight.dtype)) for b in blocks]
            dtype = blocks[0].cross_attn.q_proj.weight.dtype
            mask = cross_mask(continuation.flatten(1, 2)[:, None], dtype)
            step = MllamaStep(MllamaContext(kv, mask))
        return MllamaDecoding(media_latents, kv, media_mask, continuation, step)

    def step_media(self, state: MllamaDecoding, use_cache: bool, first: bool) -> dict[str, Any]:
        """The prompt's call, and every uncached call (the whole sequence again), read through
        the media's own mask, each token finding its images in the ids; a cached step's one
        token reads what the prompt's last token read."""
        if state.latents is None:
            return {}
        if not use_cache:
            return {"media_latents": state.latents, "media_mask": state.media_mask}
        if first or state.step is None:
            mask = state.media_mask if first else state.continuation
            return {"media_kv": state.kv, "media_mask": mask}
        return {"media_kv": state.step}

    def select(self, state: MllamaDecoding, index: torch.Tensor) -> MllamaDecoding:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        kv = None if state.kv is None else [(k[index], v[index]) for k, v in state.kv]
        step = None if state.step is None or kv is None else state.step.select(index, kv)
        return MllamaDecoding(
            pick(state.latents), kv, pick(state.media_mask), pick(state.continuation), step
        )

    def flops(self, s: Any) -> Flops:
        t, d, kv = s.seq_len, s.lm_width, s.lm_kv_width or s.lm_width
        media = s.images * s.image_tokens
        block = (
            4 * t * d * d  # queries and output
            + 2 * media * d * 2 * kv  # keys and values of the media
            + 4 * t * media * d  # attention
            + 2 * t * 3 * d * s.lm_ffn  # the SwiGLU MLP
        )
        return {"gated_blocks": (float(s.gated_blocks * block * s.batch), 3)}
