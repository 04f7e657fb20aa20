"""Small learnable shards of all three kinds for training tests (colour words <-> colours)."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

from flamingo.data.schema import encode_interleaved, encode_pair, encode_video
from flamingo.data.writing import write_shards

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
}


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    return buf.getvalue()


def write_tiny_shards(root: Path, per_kind: int = 48, shards: int = 4) -> dict[str, str]:
    """Write ``shards`` shards per kind under ``root``; returns {kind: brace spec}."""
    rng = random.Random(0)
    names = list(COLOURS)
    per_shard = max(1, per_kind // shards)

    def pair(i: int) -> dict:
        c = rng.choice(names)
        return encode_pair(f"p{i}", _png(COLOURS[c]), "png", f"a {c} square")

    def doc(i: int) -> dict:
        chunks: list = ["some shapes."]
        for _ in range(rng.randint(1, 3)):
            c = rng.choice(names)
            chunks += [(_png(COLOURS[c]), "png"), f"this one is {c}."]
        return encode_interleaved(f"d{i}", chunks)

    def clip(i: int) -> dict:
        c = rng.choice(names)
        return encode_video(f"v{i}", [_png(COLOURS[c])] * 4, "png", f"a {c} clip")

    specs = {}
    for kind, encode in (("pairs", pair), ("interleaved", doc), ("video", clip)):
        write_shards(range(per_kind), encode, root, kind, items_per_shard=per_shard, desc=kind)
        specs[kind] = f"{root}/{kind}-{{00000..{shards - 1:05d}}}.tar"
    return specs


if __name__ == "__main__":
    import sys

    print(write_tiny_shards(Path(sys.argv[1])))
