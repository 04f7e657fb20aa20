"""The connectors: the Perceiver Resampler (Flamingo), LLaVA's projector, BLIP-2's Q-Former.

Each is registered in :data:`CONNECTORS` under the attribute name the model holds it by (its
state-dict prefix). FLOP terms count matrix products of the whole batch, ``s`` being a step's
shape (``bench.flops.StepShape``: the glossary's letters).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flamingo.parts.base import Connector, Flops
from flamingo.parts.towers import TOWERS
from flamingo.projector import LlavaProjector
from flamingo.qformer import QFormer, QFormerLayer
from flamingo.resampler import PerceiverLayer, PerceiverResampler


class Resampler(Connector):
    """The Perceiver Resampler: R learned latents read each medium's tokens (frames folded in
    with time embeddings): (B, N, F, V, Dv) -> (B, N, R, Dv)."""

    name = "resampler"
    section = "resampler"
    decays = False  # the paper: weight decay on the gated blocks alone

    def build(self, tower_width: int, tower_tokens: int, lm_width: int) -> nn.Module:
        return PerceiverResampler(self.cfg.resampler, tower_width, tower_tokens)

    def tokens(self) -> int:
        return self.cfg.resampler.num_latents

    def width(self, tower_width: int, lm_width: int) -> int:
        return tower_width

    def max_frames(self) -> int:
        return max(1, self.cfg.resampler.max_num_frames)  # its time embeddings

    def wrap_units(self) -> tuple[type[nn.Module], ...]:
        return (PerceiverLayer,)

    def describe(self) -> str:
        return f"connector: {self.cfg.connector} (resampler.num_latents={self.tokens()})"

    def flops(self, s: Any) -> Flops:
        w, v, r, i = s.vision_width, s.frames * s.patches, s.latents, s.resampler_inner
        layer = (
            2 * (v + r) * w * 2 * i  # keys and values of tokens and latents
            + 2 * r * w * i  # queries
            + 4 * r * (v + r) * i  # attention
            + 2 * r * i * w  # output
            + 4 * r * w * s.resampler_ff_mult * w  # feed-forward
        )
        return {"resampler": (float(s.resampler_depth * layer * s.batch * s.images), 3)}


class Projector(Connector):
    """LLaVA's MLP, one LM input token per tower token: (B, N, 1, V, Dv) -> (B, N, V, D)."""

    name = "projector"
    section = "projector"
    decays = True

    def build(self, tower_width: int, tower_tokens: int, lm_width: int) -> nn.Module:
        return LlavaProjector(self.cfg.projector, tower_width, lm_width)

    def tokens(self) -> int:
        return TOWERS[self.cfg.vision.kind](self.cfg).tokens()  # one per tower token

    def width(self, tower_width: int, lm_width: int) -> int:
        return lm_width

    def describe(self) -> str:
        return f"connector: {self.cfg.connector} ({self.tokens()} tokens per image: the tower's)"

    def flops(self, s: Any) -> Flops:
        items, w, d = s.batch * s.images, s.media_width or s.vision_width, s.lm_width
        first = 2 * s.image_tokens * w * d  # reads the frozen tower: no input gradient
        second = (s.projector_layers == 2) * 2 * s.image_tokens * d * d
        return {
            "projector_in": (float(first * items), 2),
            "projector_out": (float(second * items), 3),
        }


class QFormerConnector(Connector):
    """BLIP-2's Q-Former: Q learned queries read the tower's tokens through a BERT-style
    transformer, projected to the LM's width: (B, N, 1, V, Dv) -> (B, N, Q, D)."""

    name = "qformer"
    section = "qformer"
    decays = True

    def build(self, tower_width: int, tower_tokens: int, lm_width: int) -> nn.Module:
        return QFormer(self.cfg.qformer, tower_width, lm_width)

    def tokens(self) -> int:
        return self.cfg.qformer.queries

    def width(self, tower_width: int, lm_width: int) -> int:
        return lm_width

    def wrap_units(self) -> tuple[type[nn.Module], ...]:
        return (QFormerLayer,)

    def describe(self) -> str:
        return f"connector: {self.cfg.connector} (qformer.queries={self.tokens()} tokens per image)"

    def flops(self, s: Any) -> Flops:
        items, w, d = s.batch * s.images, s.vision_width, s.lm_width
        h, q, kv = s.qformer_width, s.queries, s.image_tokens  # kv: the tower's tokens it reads
        crossing = len(range(0, s.qformer_layers, s.qformer_cross_every))
        layer = 8 * q * h * h + 4 * q * q * h + 4 * q * h * s.qformer_intermediate
        cross = 4 * q * h * h + 4 * q * kv * h  # queries, output, attention
        own = (s.qformer_layers * layer + crossing * cross + 2 * q * h * d) * items
        tower_kv = crossing * 4 * kv * w * h * items  # keys and values of the frozen tower
        return {"qformer": (float(own), 3), "qformer_tower_kv": (float(tower_kv), 2)}


CONNECTORS: dict[str, type[Connector]] = {
    c.name: c for c in (Resampler, Projector, QFormerConnector)
}
