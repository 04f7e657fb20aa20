"""flamingo: Flamingo-style large multimodal models.

A frozen open_clip vision tower feeds a Perceiver Resampler whose latents condition a frozen
Hugging Face causal LM through tanh-gated cross-attention blocks (Alayrac et al., 2022).

    from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor
"""

import flamingo.convert  # noqa: F401  (registers the foreign checkpoint formats)
from flamingo.config import FlamingoConfig, library_version
from flamingo.model import Flamingo, FlamingoOutput
from flamingo.processing import FlamingoProcessor

__all__ = ["Flamingo", "FlamingoConfig", "FlamingoOutput", "FlamingoProcessor"]
__version__ = library_version()
