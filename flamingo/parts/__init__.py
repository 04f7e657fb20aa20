"""The model's parts, each a strategy with a registry (ARCHITECTURE.md, "Parts").

- the **tower** (:data:`TOWERS`, by ``vision.kind``): pixels -> its tokens ``(B, N, F, V, Dv)``;
- the **connector** (:data:`CONNECTORS`): vision tokens -> media ``(B, N, R, D)``;
- the **fusion** (:data:`FUSIONS`): how the LM reads the media, gated cross-attention blocks
  before chosen decoder layers, or media tokens spliced in place of ``<image>``.

A model config's ``connector:`` names a preset (``flamingo.config.PRESETS``: ``flamingo`` is the
resampler with cross-attention, ``llava`` the projector spliced, ``qformer`` the Q-Former
spliced, ``mllama`` the projector read by Llama 3.2 Vision's cross-attention layers), so configs and checkpoints of every earlier version load unchanged. Code outside the
registries asks the parts (:func:`parts_of`), never a connector's name.
"""

from __future__ import annotations

from flamingo.config import PRESETS, FlamingoConfig, VisionConfig
from flamingo.parts.base import Connector, Flops, Fusion, LMCall, Parts, Tower
from flamingo.parts.connectors import CONNECTORS
from flamingo.parts.cross_attention import CrossAttentionFusion
from flamingo.parts.mllama import MllamaFusion
from flamingo.parts.splice import SpliceFusion
from flamingo.parts.towers import TOWERS

FUSIONS: dict[str, type[Fusion]] = {
    f.name: f for f in (CrossAttentionFusion, SpliceFusion, MllamaFusion)
}


def parts_of(cfg: FlamingoConfig) -> Parts:
    """The tower, connector and fusion ``cfg`` composes."""
    preset = cfg.preset
    return Parts(
        TOWERS[cfg.vision.kind](cfg), CONNECTORS[preset.connector](cfg), FUSIONS[preset.fusion](cfg)
    )


def tower_of(vision: VisionConfig) -> Tower:
    """The tower of a vision config alone (a processor's or a loader's preprocessing)."""
    return TOWERS[vision.kind](FlamingoConfig(vision=vision))


def combinations() -> list[str]:
    """Every registered preset (``connector:`` value): what the contract tests run over."""
    return sorted(PRESETS)


__all__ = [
    "CONNECTORS",
    "FUSIONS",
    "TOWERS",
    "Connector",
    "Flops",
    "Fusion",
    "LMCall",
    "Parts",
    "Tower",
    "combinations",
    "parts_of",
    "tower_of",
]
