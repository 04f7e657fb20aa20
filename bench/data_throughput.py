"""Loader throughput per dataset kind: samples/s with N workers at a given image size.

    python -m bench.data_throughput [--image-size 32 224] [--workers 2] [--samples 400]

Writes synthetic shards (JPEG photos-like noise of 256-512 px, captions, 3-image documents,
8-frame clips) to a temporary folder, then times the loaders after a warm-up batch. Prints one
JSON line per (kind, image size).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flamingo import FlamingoConfig, FlamingoProcessor
from flamingo.data.config import DatasetConfig
from flamingo.data.pipeline import FlamingoLoader
from flamingo.data.schema import encode_interleaved, encode_pair, encode_video
from flamingo.data.writing import write_shards

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "a red green blue circle square star on the left right top of image with small large".split()
)


def photo(rng: random.Random) -> bytes:
    w, h = rng.randint(256, 512), rng.randint(256, 512)
    arr = np.random.default_rng(rng.randrange(1 << 30)).integers(
        0, 255, (h // 8, w // 8, 3), dtype=np.uint8
    )
    image = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write(kind: str, out: Path, n: int) -> str:
    rng = random.Random(0)

    def encode(i: int) -> dict:
        if kind == "pairs":
            return encode_pair(f"s{i}", photo(rng), "jpg", sentence(rng))
        if kind == "interleaved":
            chunks = [sentence(rng, 30)]
            for _ in range(3):
                chunks += [(photo(rng), "jpg"), sentence(rng, 40)]
            return encode_interleaved(f"d{i}", chunks)
        return encode_video(f"v{i}", [photo(rng) for _ in range(8)], "jpg", sentence(rng))

    write_shards(
        range(n), encode, out, kind, items_per_shard=max(1, n // 8), desc=f"writing {kind}"
    )
    return f"{out}/{kind}-{{00000..00007}}.tar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=400, help="samples per kind in the shards")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    rows = []
    cfg = FlamingoConfig.from_yaml(ROOT / "configs/model/tiny.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        specs = {
            kind: write(kind, Path(tmp) / kind, args.samples)
            for kind in ("pairs", "interleaved", "video")
        }
        for size in args.image_size:
            processor = FlamingoProcessor.from_config(cfg.replace({"vision.image_size": size}))
            for kind, spec in specs.items():
                seq_len = 256 if kind == "interleaved" else 32
                data_cfg = DatasetConfig(
                    name=kind,
                    kind=kind,
                    shards=spec,
                    batch_size=args.batch_size,
                    seq_len=seq_len,
                    resampled=True,
                )
                loader = FlamingoLoader.from_processor(
                    data_cfg, processor, num_workers=args.workers
                )
                it = iter(loader)
                next(it)  # warm-up: worker start, first shard open
                batches = max(4, 2 * args.samples // args.batch_size // 4)
                start = time.perf_counter()
                for _ in range(batches):
                    next(it)
                elapsed = time.perf_counter() - start
                rows.append(
                    {
                        "kind": kind,
                        "image_size": size,
                        "workers": args.workers,
                        "samples_per_s": round(batches * args.batch_size / elapsed, 1),
                        "images_per_sample": {"pairs": 1, "interleaved": 3, "video": 8}[kind],
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    }
                )
                print(json.dumps(rows[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "data_throughput.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
