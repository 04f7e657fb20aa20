"""Shared pieces of the converters: CLI options, image validation, table reading."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from flamingo.data.images import decode_image
from flamingo.data.schema import IMAGE_EXTS, SkipSample
from flamingo.data.shards import WriteSummary

PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}
MAX_PIXELS = 89_478_485


def add_output_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    parser.add_argument("--prefix", default=prefix, help=f"shard name prefix (default {prefix})")
    parser.add_argument("--items-per-shard", type=int, default=1000, help="input items per shard")
    parser.add_argument(
        "--max-image-pixels", type=int, default=MAX_PIXELS, help="skip larger images"
    )


def checked_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[bytes, str]:
    """Validate encoded image bytes; returns (bytes, extension). Re-encodes unusual formats
    as PNG so every shard image decodes with PIL. Raises SkipSample on bad images."""
    decode_image(data, max_pixels)  # raises SkipSample(image_decode_error | image_too_large)
    fmt = Image.open(io.BytesIO(data)).format
    ext = PIL_EXT.get(fmt or "")
    if ext in IMAGE_EXTS:
        return data, ext
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "PNG")
    return buf.getvalue(), "png"


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SkipSample("missing_image", str(e)) from e


def read_table(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl, .csv or .parquet file as dicts (malformed JSON lines are yielded as
    ``{"__error__": ...}`` so the converter counts them)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open() as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    row = {"__error__": f"bad_json: {e}"}
                yield row if isinstance(row, dict) else {"__error__": "bad_json: not an object"}
    elif suffix == ".csv":
        with path.open(newline="") as f:
            yield from csv.DictReader(f)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
    else:
        raise ValueError(
            f"{path}: unsupported table format {suffix!r}; use .jsonl, .csv or .parquet"
        )


def count_rows(path: Path) -> int | None:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def finish(summary: WriteSummary, out: Path) -> None:
    print(f"\n{out}:\n{summary.report()}")
