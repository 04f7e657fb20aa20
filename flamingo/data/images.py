"""Robust image decoding and Flamingo's training-time image preprocessing.

Decoding turns any common encoding into upright (EXIF orientation applied) 8-bit RGB: CMYK, 16-bit, palette, grayscale and
alpha images are converted (transparent pixels composited onto white) and counted by mode;
truncated or corrupt files and decompression bombs raise ``SkipSample``.

Decoding imports no torch (the converters start faster). Preprocessing resizes exactly like inference (``vision.resize``: by default keeping the aspect
ratio and padding with the normalisation mean colour, as in the paper), then flips
horizontally with a per-sample probability, then normalises.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from flamingo.config import VisionConfig
from flamingo.data.schema import SkipSample

if TYPE_CHECKING:
    import torch

EXIF_ORIENTATION = 0x0112


def decode_image(
    data: bytes, max_pixels: int, counters: Counter | None = None
) -> tuple[Image.Image, str]:
    """Encoded bytes -> (RGB image, original mode), turned upright by its EXIF orientation.
    Raises SkipSample on bad input. ``counters`` (optional) counts ``image_mode/<mode>`` for
    converted modes and ``image_exif_rotated`` / ``image_exif_unreadable``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's notes on damaged metadata
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SkipSample("image_too_large", f"{width}x{height} > {max_pixels} pixels")
            image.load()
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("image_too_large", str(e)) from e
    except Exception as e:  # PIL raises many types for corrupt or truncated data
        raise SkipSample("image_decode_error", f"{type(e).__name__}: {e}") from e
    if width == 0 or height == 0:
        raise SkipSample("image_decode_error", "empty image")
    counters = Counter() if counters is None else counters
    mode = image.mode
    if mode != "RGB":
        counters[f"image_mode/{mode}"] += 1
    return to_rgb(upright(image, counters)), mode


def upright(image: Image.Image, counters: Counter) -> Image.Image:
    """Apply the EXIF orientation (camera photos are often stored sideways with a tag saying
    so); an unreadable EXIF block leaves the image as stored (counted)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            if orientation not in (2, 3, 4, 5, 6, 7, 8):
                return image
            rotated = ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: Pillow raises assorted types
        counters["image_exif_unreadable"] += 1
        return image
    counters["image_exif_rotated"] += 1
    return rotated


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the used range to 8 bits (convert("L") clips to 255)
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, F


class ImagePreprocessor:
    """PIL RGB image -> uint8 (3, size, size) pixels, resized like the inference transform
    (``vision.resize``: pad or crop), with an optional horizontal flip. Normalised on the
    device by the vision tower (``flamingo.vision.normalise``: the inference transform's
    values)."""

    def __init__(self, cfg: VisionConfig) -> None:
        # imported here: decoding alone (the converters' share) needs neither torch nor the tower
        from flamingo.parts import tower_of

        self.cfg = cfg
        self.tower = tower_of(cfg)
        """The tower's own resize (a tiled tower's tiles and their aspect-ratio id)."""

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        """One frame (3, size, size); :meth:`media` for any tower (a tiled one's tiles)."""
        frames, _ = self.media(image, flip)
        if frames.shape[0] != 1:
            raise ValueError(
                f"vision.kind: {self.cfg.kind} makes {frames.shape[0]} tiles of an image: use "
                "ImagePreprocessor.media, which gives them with their aspect-ratio id"
            )
        return frames[0]

    def media(self, image: Image.Image, flip: bool = False) -> tuple[torch.Tensor, int | None]:
        """An image -> its uint8 frames (F, 3, H, W) (a tiled tower's tiles) and its
        aspect-ratio id (None but for a tiled tower), mirrored if ``flip``."""
        return self.tower.training_pixels(image, flip)
