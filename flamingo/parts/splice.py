"""Fusion by splicing (LLaVA, BLIP-2): each image is a run of ``<image>`` tokens in the text,
one per media token, and the media tokens take the place of their embeddings; the LM reads
them through its ordinary self-attention. No blocks in the LM, and no promise that a fresh
model is the LM.

In decoding the media enter once, with the prompt, and the LM's cache carries them on. A
sequence longer than the LM's positions is an error (each image costs its tokens: LLaVA-1.5's
576). A training step without images still takes the connector in, times zero, where every
parameter must take part (ZeRO-3's contract, ``ExecutionPolicy.every_parameter_takes_part``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from flamingo.parts.base import Fusion, LMCall


def splice(
    input_ids: torch.Tensor, image_id: int, media: torch.Tensor, embeds: torch.Tensor
) -> torch.Tensor:
    """Put ``media (B, N, V, E)`` in place of the ``<image>`` tokens' embeddings: row b's k-th
    ``<image>`` token takes ``media[b]``'s k-th token, counting its N items' V tokens in order.
    A gather: no host sync, and each media token's gradient comes back from the one position
    it took."""
    b, n, v, e = media.shape
    is_image = input_ids == image_id
    if n * v == 0:
        return embeds
    flat = media.reshape(b, n * v, e).to(embeds.dtype)
    index = (is_image.long().cumsum(1) - 1).clamp(0, n * v - 1)
    picked = flat.gather(1, index.unsqueeze(-1).expand(-1, -1, e))
    return torch.where(is_image.unsqueeze(-1), picked, embeds)


class SpliceFusion(Fusion):
    """Media tokens in place of the ``<image>`` tokens."""

    name = "splice"
    identity_at_init = False

    def image_tokens(self, connector_tokens: int) -> int:
        return connector_tokens

    def lm_inputs(self, model: Any, call: LMCall) -> LMCall:
        if call.media_kv is not None:
            raise ValueError(
                f"{model.parts.connector.describe()} has no cross-attention keys/values "
                "(media_kv): its media take the place of the <image> tokens; pass "
                "pixel_values or media_latents"
            )
        media = self._takes_part(model, call.input_ids, call.media_latents)
        self._check_tokens(model, call.input_ids, media)
        self._check_length(model, call)
        if media is not None:
            call.edit_embeds = partial(splice, call.input_ids, model.special_tokens.image_id, media)
        return call

    @staticmethod
    def _takes_part(
        model: Any, input_ids: torch.Tensor, media: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The media, or, in a training step without images (none given, or a batch of
        text-only conversations: no media items) where every parameter must take part, the
        connector's output for one zero token that no ``<image>`` takes: the connector gets
        zero gradients instead of none."""
        has_media = media is not None and media.numel() > 0
        if has_media or not (model.training and model.policy.every_parameter_takes_part):
            return media
        connector = model.connector()
        weight = next(connector.parameters())
        zero = weight.new_zeros(input_ids.shape[0], 1, 1, 1, model.vision.width)
        return connector(zero)

    @staticmethod
    def _check_tokens(model: Any, input_ids: torch.Tensor, media: torch.Tensor | None) -> None:
        """Every ``<image>`` token of a row has a media token to take its place."""
        if media is not None and media.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"media batch size {media.shape[0]} != text batch size {input_ids.shape[0]}"
            )
        available = 0 if media is None else media.shape[1] * media.shape[2]
        counts = (input_ids == model.special_tokens.image_id).sum(-1)
        if model.policy.sync_free:  # the device checks it when it gets there: no host wait
            if counts.numel():
                torch._assert_async(counts.max() <= available)
            return
        needed = int(counts.max()) if counts.numel() else 0
        if needed > available:
            connector = model.parts.connector
            raise ValueError(
                f"the text holds {needed} <image> tokens in a row but the media give "
                f"{available} ({connector.describe()}: {connector.tokens()} <image> tokens per "
                "image, which FlamingoProcessor writes): pass the images of every <image> run"
            )

    @staticmethod
    def _check_length(model: Any, call: LMCall) -> None:
        """A sequence fits the LM's positions: each image costs its tokens, so a few-shot
        prompt with many images can outgrow them."""
        limit = getattr(model.lm.hf.config, "max_position_embeddings", None)
        past = call.cache.get_seq_length() if call.cache is not None else 0
        mask = call.attention_mask
        total = mask.shape[1] if mask is not None else past + call.input_ids.shape[1]
        if limit is not None and total > limit:
            connector = model.parts.connector
            raise ValueError(
                f"the sequence holds {total} tokens but the LM takes {limit} positions "
                f"({connector.describe()} writes {connector.tokens()} <image> tokens per "
                "image): give fewer images or shots"
            )

    # -- decoding -------------------------------------------------------------------------------

    def step_media(self, state: Any, use_cache: bool, first: bool) -> dict[str, Any]:
        # with a cache, the prompt's call reads the media and the cache holds them on
        return {"media_latents": state if first or not use_cache else None}
