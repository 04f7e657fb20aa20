"""The three parts a model is composed of, as the rest of the code sees them.

- :class:`Tower`: frozen, pixels ``(B, N, F, C, H, W)`` -> its tokens ``(B, N, F, V, Dv)``.
- :class:`Connector`: trained, vision tokens ``(B, N, F, V, Dv)`` -> media ``(B, N, R, D)``.
- :class:`Fusion`: how the frozen LM reads the media: blocks run before chosen decoder layers
  (the gated cross-attention), or media tokens in place of the ``<image>`` tokens (splice).

Each implementation answers for itself what code elsewhere would otherwise ask by name: its
tokens per image, whether it takes video, its state-dict prefix, its wrap units, which of its
modules take weight decay, its error messages and its FLOP terms. A spec is built from the
whole model config and reads its own section; the modules it builds are the nn.Modules of
``resampler.py``, ``projector.py``, ``qformer.py``, ``xattn.py`` and ``vision.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from flamingo.config import FlamingoConfig

Flops = dict[str, tuple[float, float]]
"""FLOP terms: name -> (forward FLOPs of the whole batch, forward + backward over forward)."""


class Tower:
    """A frozen vision tower (``vision.kind``)."""

    name: ClassVar[str]

    def __init__(self, cfg: FlamingoConfig) -> None:
        self.cfg = cfg

    def build(self) -> nn.Module:
        """The tower module: ``forward(pixels (B, N, F, C, H, W)) -> (B, N, F, V, Dv)``, with
        ``width`` (Dv), ``num_tokens`` (V) and ``block_class()``."""
        raise NotImplementedError

    def tokens(self) -> int:
        """V, the tokens an image gives, from the config alone (no tower built)."""
        raise NotImplementedError

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> the tower's normalised input ``(C, H, W)`` (inference and training
        resize alike)."""
        raise NotImplementedError

    def frames(self) -> int:
        """F of one image (a tiled tower's tiles)."""
        return 1

    def shape(self) -> dict[str, Any]:
        """Its fields of a step's shape (``bench.flops.StepShape``), from the config alone."""
        raise NotImplementedError

    def flops(self, s: Any) -> float:
        """Forward FLOPs of one image (one frame) for a step of shape ``s``."""
        raise NotImplementedError

    def training_pixels(self, image: Any, flip: bool) -> tuple[torch.Tensor, int | None]:
        """PIL image -> ``(its uint8 frames (F, 3, H, W), its aspect-ratio id)``, what the
        training loader ships (the tower normalises uint8 pixels on the device): resized as
        :meth:`image_transform` resizes, not normalised, mirrored if ``flip``."""
        from PIL import ImageOps

        from flamingo.vision import square, to_uint8

        image = square(image, self.cfg.vision)
        return to_uint8(ImageOps.mirror(image) if flip else image)[None], None

    def preprocess(self, image: Any) -> tuple[torch.Tensor, int | None]:
        """PIL image -> ``(its frames (F, C, H, W), its aspect-ratio id)``: one frame and no
        id here; a tiled tower's tiles and the id of their arrangement."""
        return self.image_transform()(image)[None], None


class Connector:
    """A trained connector from the tower's tokens to the media the LM reads."""

    name: ClassVar[str]
    """Its registry key, and the attribute of the model that holds it: its state-dict prefix
    (``resampler.*``, ``projector.*``, ``qformer.*``), which every checkpoint relies on."""
    section: ClassVar[str]
    """Its config section."""
    decays: ClassVar[bool]
    """Its matrices take weight decay (the paper decays none of the resampler's)."""

    def __init__(self, cfg: FlamingoConfig) -> None:
        self.cfg = cfg

    def build(self, tower_width: int, tower_tokens: int, lm_width: int) -> nn.Module:
        raise NotImplementedError

    def tokens(self) -> int:
        """R, its media tokens per image, from the config alone."""
        raise NotImplementedError

    def width(self, tower_width: int, lm_width: int) -> int:
        """D, the width of its media tokens."""
        raise NotImplementedError

    def max_frames(self) -> int:
        """The most frames a media item may have (1: images only, no video)."""
        return 1

    def wrap_units(self) -> tuple[type[nn.Module], ...]:
        """Its repeated blocks, which an engine may shard, checkpoint or compile one by one."""
        return ()

    def describe(self) -> str:
        """How errors name it: the preset and what sets its tokens per image."""
        raise NotImplementedError

    def flops(self, s: Any) -> Flops:
        """Its FLOP terms for a step of shape ``s`` (``bench.flops.StepShape``'s fields)."""
        raise NotImplementedError


class Fusion:
    """How the LM reads the media."""

    name: ClassVar[str]
    identity_at_init: ClassVar[bool]
    """A fresh model computes exactly the LM's logits (the tanh gates start at zero)."""

    def __init__(self, cfg: FlamingoConfig) -> None:
        self.cfg = cfg

    def image_tokens(self, connector_tokens: int) -> int:
        """``<image>`` tokens an image is in the text."""
        raise NotImplementedError

    def layer_indices(self, num_layers: int) -> list[int]:
        """The LM layers its blocks run before (none: it has no blocks)."""
        return []

    def blocks(
        self, lm_config: Any, num_layers: int, dim_media: int
    ) -> tuple[nn.ModuleList, list[int]]:
        """The modules the LM runs before chosen decoder layers (state-dict prefix
        ``lm.gated_blocks``), and those layers' indices."""
        return nn.ModuleList(), []

    def trainable(self, lm: nn.Module) -> dict[str, nn.Module]:
        """Its trained modules in the LM, by the name ``trainable_modules`` gives them."""
        return {}

    def wrap_units(self) -> tuple[type[nn.Module], ...]:
        return ()

    def block_inputs(self, block_idx: int, block: nn.Module, context: Any) -> tuple:
        """What block ``block_idx`` takes besides the hidden states, from the call's context."""
        raise NotImplementedError

    def lm_inputs(self, model: Any, call: LMCall) -> LMCall:
        """Check the call's media against its text (before the first step: errors name the
        part) and say how the LM reads them: a context for the blocks, or embeddings edited."""
        raise NotImplementedError

    def decoding(
        self,
        model: Any,
        media_latents: torch.Tensor | None,
        use_cache: bool,
        input_ids: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
    ) -> Any:
        """What a prompt's media become for decoding (computed once per call); ``input_ids``
        is the prompt, ``media_mask (B, N, R)`` its media's real tokens (a tiled tower's)."""
        return media_latents

    def step_media(self, state: Any, use_cache: bool, first: bool) -> dict[str, Any]:
        """The media arguments of one decoding forward."""
        raise NotImplementedError

    def select(self, state: Any, index: torch.Tensor) -> Any:
        """Rows ``index`` of a decoding state (beams, candidates)."""
        return None if state is None else state[index]

    def flops(self, s: Any) -> Flops:
        return {}


@dataclass
class LMCall:
    """One forward's inputs on their way to the LM (``Fusion.lm_inputs`` fills the last two)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    media_latents: torch.Tensor | None
    media_kv: Any
    media_index: torch.Tensor
    cache: Any
    document_ids: torch.Tensor | None
    media_mask: torch.Tensor | None = None
    """(B, N, R) bool: the media tokens that are real (a tiled tower's: the tiles an image
    has), or None: all."""
    context: Any = None
    """What the LM's blocks read (``Fusion.block_inputs``), or None."""
    edit_embeds: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Applied to the input embeddings before the decoder layers, or None."""


@dataclass(frozen=True)
class Parts:
    """The tower, connector and fusion of one model config."""

    tower: Tower
    connector: Connector
    fusion: Fusion

    def image_tokens(self) -> int:
        """``<image>`` tokens an image is in the text (what the processor writes)."""
        return self.fusion.image_tokens(self.connector.tokens())
