"""Shared pieces of the converters: CLI options, image validation, table reading."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
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
    parser.add_argument(
        "--verify",
        choices=("size", "checksum"),
        default="size",
        help="on a re-run, check each finished shard against its record by its size (default) "
        "or also by its SHA-256 (reads every shard again); a damaged one is written again",
    )
    parser.add_argument(
        "--max-skip-ratio",
        type=float,
        default=0.5,
        help="end with exit status 3 when more than this fraction of the items were skipped "
        "(bad images, missing files, ...; the shards are written all the same): a wrong "
        "--image-root or format shows as a failed command, not a quiet near-empty corpus; "
        "1 never fails (default 0.5)",
    )
    parser.add_argument(
        "--skip-input",
        action="append",
        metavar="PATH",
        help="leave this input out (repeatable; e.g. an unreadable file): the other inputs keep "
        "their numbers, so their shards stay the same, and the summary lists it",
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


def _holds_undecodable(value: Any) -> bool:
    """Whether a decoded JSON value holds a lone surrogate anywhere (a byte that was not
    UTF-8, or an escape no UTF-8 text can hold)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _LONE_SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, list):
            stack += v
    return False


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)
_SPACE = re.compile(r"\s*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON value opening at ``start`` ends (one past it), found from its brackets
    and strings alone, so a value too deep or too broken to parse can still be stepped over;
    None when the text ends first."""
    if text[start] not in "[{":  # a scalar: up to the next separator of the list
        match = re.compile(r'"(?:[^"\\]|\\.)*"|[^,\]]*').match(text, start)
        return match.end()
    depth = 0
    for match in _STRUCTURE.finditer(text, start):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def _decode_one(chunk: str, number: int) -> Any:
    try:
        value = json.loads(chunk)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        return bad_row("bad_json", f"record {number}: {type(e).__name__}: {str(e)[:200]}")
    if _holds_undecodable(value):
        return bad_row("bad_encoding", f"record {number}: not UTF-8")
    return value


def json_list_items(path: Path) -> Iterator[Any]:
    """The elements of a file holding one JSON list (LLaVA's instruction data), each decoded
    on its own: an element with bytes that are not UTF-8, broken JSON or nesting too deep to
    parse costs that element only (it comes out as :func:`bad_row`), and the elements after
    it are read as usual. A file that is not a JSON list at all is an error naming it."""
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e})") from e
    text = text.removeprefix("\ufeff")
    try:  # the fast path: the whole file at once
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if data is not None and not isinstance(data, list):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, not a list of records")
    if data is not None:
        # raw bytes that were not UTF-8, or escapes of surrogates (paired ones are fine)
        check = _LONE_SURROGATE.search(text) is not None or _SURROGATE_ESCAPE.search(text)
        for number, value in enumerate(data):
            yield (
                bad_row("bad_encoding", f"record {number}: not UTF-8")
                if check and _holds_undecodable(value)
                else value
            )
        return
    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise ValueError(f"{path}: not a JSON list of records (it starts {text[pos : pos + 20]!r})")
    pos += 1
    number = 0
    while True:
        pos = _SPACE.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":  # the end (or a file cut after a record)
            return
        end = _value_end(text, pos)
        if end is None:
            yield bad_row("bad_json", f"record {number}: the file ends inside it")
            return
        yield _decode_one(text[pos:end], number)
        number += 1
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos += 1


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
