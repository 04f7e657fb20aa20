"""flamingo: Flamingo-style large multimodal models.

A frozen open_clip vision tower feeds a Perceiver Resampler whose latents condition a frozen
Hugging Face causal LM through tanh-gated cross-attention blocks (Alayrac et al., 2022).

    from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor

The model and the processor are imported on first use, so that what needs neither (the data
converters and their worker processes) never imports transformers or open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flamingo.config import FlamingoConfig, library_version

if TYPE_CHECKING:
    from flamingo.model import Flamingo, FlamingoOutput
    from flamingo.processing import FlamingoProcessor

_LAZY = {
    "Flamingo": "flamingo.model",
    "FlamingoOutput": "flamingo.model",
    "FlamingoProcessor": "flamingo.processing",
}

__all__ = ["Flamingo", "FlamingoConfig", "FlamingoOutput", "FlamingoProcessor"]
__version__ = library_version()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flamingo' has no attribute {name!r}")
