"""Robust image decoding and Flamingo's training-time image preprocessing.

Decoding turns any common encoding into 8-bit RGB: CMYK, 16-bit, palette, grayscale and
alpha images are converted (transparent pixels composited onto white) and counted by mode;
truncated or corrupt files and decompression bombs raise ``SkipSample``.

Preprocessing resizes keeping the aspect ratio and pads to a square with the normalisation
mean colour (so padding is 0 after normalisation), then flips horizontally with a per-sample
probability, then normalises (paper: aspect kept, padded).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from flamingo.data.schema import SkipSample


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Encoded bytes -> (RGB image, original mode). Raises SkipSample on bad input."""
    try:
        with warnings.catch_warnings():
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
    return to_rgb(image), image.mode


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


def resize_pad(image: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """Resize so the longer side is ``size`` (aspect kept), pad to ``size`` x ``size``."""
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(image, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


class ImagePreprocessor:
    """PIL RGB image -> normalised (3, size, size) tensor, with optional random flip."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.fill = tuple(round(255 * m) for m in mean)

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        image = resize_pad(image, self.size, self.fill)
        if flip:
            image = ImageOps.mirror(image)
        x = (
            torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
            / 255.0
        )
        return (x - self.mean) / self.std
