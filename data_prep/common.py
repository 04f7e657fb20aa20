"""Shared pieces of the converters: CLI options, image validation, table reading."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from flamingo.data.images import decode_image
from flamingo.data.schema import IMAGE_EXTS, SkipSample

PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}
MAX_PIXELS = 89_478_485


def add_output_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    parser.add_argument("--prefix", default=prefix, help=f"shard name prefix (default {prefix})")
    parser.add_argument("--items-per-shard", type=int, default=1000, help="input items per shard")
    parser.add_argument(
        "--max-image-pixels", type=int, default=MAX_PIXELS, help="skip larger images"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="local processes, one input each at a time"
    )
    parser.add_argument(
        "--part",
        default="0/1",
        help="I/N: convert only the inputs j with j %% N == I (N machines, or a job array: "
        '--part "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")',
    )


def checked_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[bytes, str]:
    """Validate encoded image bytes; returns (bytes, extension). The common formats are kept
    as they are (the loader decodes them, EXIF orientation included, with the same decoder);
    others are re-encoded as PNG from the decoded, upright RGB image, so every shard image
    decodes with PIL. Raises SkipSample on bad images."""
    image, _ = decode_image(data, max_pixels)  # SkipSample(image_decode_error | too_large)
    ext = PIL_EXT.get(Image.open(io.BytesIO(data)).format or "")
    if ext in IMAGE_EXTS:
        return data, ext
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue(), "png"


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise SkipSample("missing_image", str(e)) from e


def text_member(data: bytes) -> str:
    """A caption file's bytes as text; bytes that are not UTF-8 skip the sample (counted)
    rather than reaching the shard as replacement characters."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipSample("bad_encoding", f"caption is not UTF-8 ({e.reason})") from e


def json_scalar(value: Any) -> bool:
    """Whether a table value can go into a sample's metadata as it is (finite numbers only:
    NaN is not JSON)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int))


BAD_ROW = "__error__"
"""Key of the row dict :func:`read_table` yields for a row it could not read: ``{BAD_ROW:
(reason, detail)}``; converters turn it into a skip counted under ``reason``."""


def bad_row(reason: str, detail: str) -> dict[str, Any]:
    return {BAD_ROW: (reason, detail)}


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield bad_row("bad_encoding", f"line {number}: not UTF-8 ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:  # ValueError: JSON, or a huge integer
                yield bad_row("bad_json", f"line {number}: {type(e).__name__}: {e}")
                continue
            if not isinstance(row, dict):
                yield bad_row("bad_json", f"line {number}: a {type(row).__name__}, not an object")
                continue
            yield row


def _has_undecodable(value: Any) -> bool:
    return isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value)


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    # Undecodable bytes become lone surrogates (surrogateescape), so one bad byte costs its
    # row only; a row holding one is reported instead of yielded.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
        except csv.Error as e:
            raise ValueError(f"{path}: the CSV header cannot be read: {e}") from e
        if any(_has_undecodable(k) for k in header):
            raise ValueError(f"{path}: the CSV header is not UTF-8")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. a field over csv.field_size_limit(); the reader
                yield bad_row("bad_csv", f"line {reader.line_num}: {e}")  # moves on
                continue
            if any(_has_undecodable(v) for v in row.values()):
                yield bad_row("bad_encoding", f"line {reader.line_num}: not UTF-8")
            elif None in row:  # more fields than the header names
                yield bad_row("bad_csv", f"line {reader.line_num}: more fields than the header")
            else:
                yield row


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    done = 0
    try:
        for batch in table.iter_batches(batch_size=256):
            rows = batch.to_pylist()
            yield from rows
            done += len(rows)
    except Exception as e:
        # the rest of the file is unreadable: its rows are reported as one bad row per row
        # the footer promised, so skipped + written still adds up to the table's rows
        lost = max(table.metadata.num_rows - done, 1)
        detail = f"rows {done}..: {type(e).__name__}: {e}"
        for _ in range(lost):
            yield bad_row("bad_parquet", detail)


def read_table(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl, .csv or .parquet file as dicts.

    A row that cannot be read (bytes that are not UTF-8, malformed JSON or CSV, an unreadable
    parquet row group) costs that row only: it comes out as :func:`bad_row` so the converter
    counts it, and the rows after it are read as usual.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise ValueError(
            f"{path}: unsupported table format {suffix!r}; use .jsonl, .csv or .parquet"
        )


def check_row(row: dict[str, Any]) -> dict[str, Any]:
    """Raise the skip a :func:`bad_row` stands for; return a good row unchanged."""
    if BAD_ROW in row:
        reason, detail = row[BAD_ROW]
        raise SkipSample(reason, detail)
    return row


def count_rows(path: Path) -> int | None:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None
