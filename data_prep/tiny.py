"""Small learnable shards of all three kinds (colour words <-> coloured squares): what
``configs/train/tiny*.yaml`` read, for a first training run in seconds, and for the tests.

    python -m data_prep.tiny --out data/tiny
    python train.py --config configs/train/tiny.yaml steps=20

writes ``data/tiny/{pairs,interleaved,video}-0000{0..3}.tar`` (48 samples of each kind).
"""

from __future__ import annotations

import argparse
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


def square_png(colour: tuple[int, int, int]) -> bytes:
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
        return encode_pair(f"p{i}", square_png(COLOURS[c]), "png", f"a {c} square")

    def doc(i: int) -> dict:
        chunks: list = ["some shapes."]
        for _ in range(rng.randint(1, 3)):
            c = rng.choice(names)
            chunks += [(square_png(COLOURS[c]), "png"), f"this one is {c}."]
        return encode_interleaved(f"d{i}", chunks)

    def clip(i: int) -> dict:
        c = rng.choice(names)
        return encode_video(f"v{i}", [square_png(COLOURS[c])] * 4, "png", f"a {c} clip")

    specs = {}
    for kind, encode in (("pairs", pair), ("interleaved", doc), ("video", clip)):
        write_shards(range(per_kind), encode, root, kind, items_per_shard=per_shard, desc=kind)
        specs[kind] = f"{root}/{kind}-{{00000..{shards - 1:05d}}}.tar"
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.tiny",
        description="Write the small shards configs/train/tiny*.yaml read (data/tiny/...).",
    )
    parser.add_argument("--out", type=Path, default=Path("data/tiny"), help="default data/tiny")
    parser.add_argument("--per-kind", type=int, default=48, help="samples of each kind")
    parser.add_argument("--shards", type=int, default=4, help="shards of each kind")
    args = parser.parse_args(argv)
    for kind, spec in write_tiny_shards(args.out, args.per_kind, args.shards).items():
        print(f"{kind}: {spec}")


if __name__ == "__main__":
    main()
