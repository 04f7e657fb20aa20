"""Image-text pairs -> webdataset shards (schema: flamingo/data/schema.py, "pairs").

Sources (pick one; each takes a glob or a brace list of inputs):
  --folder DIRS       images with a caption file beside each (cat.jpg + cat.txt)
  --table FILES       .jsonl / .csv / .parquet rows naming an image path and a caption
  --img2dataset TARS  img2dataset-style shards (KEY.jpg + KEY.txt [+ KEY.json])

Every image is decoded once to validate it; broken, missing or oversized images, empty
captions and malformed rows are skipped and counted in the summary. Re-running resumes:
finished shards are kept. Many inputs, several processes or machines: data_prep/corpus.py.

    python -m data_prep.pairs --table captions.jsonl --image-root imgs --out shards/pairs
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from data_prep.common import (
    add_output_args,
    check_row,
    checked_image,
    count_rows,
    json_scalar,
    read_file,
    read_table,
    text_member,
)
from data_prep.corpus import Conversion, Work, expand_inputs, run_command
from flamingo.data.schema import IMAGE_EXTS, SkipSample, encode_pair, sanitize_key, unique_keys
from flamingo.data.shards import ShardError, read_shard

log = logging.getLogger("data_prep.pairs")


def folder_items(folder: Path) -> Iterator[dict]:
    paths = [p for p in sorted(folder.rglob("*")) if p.suffix.lower().lstrip(".") in IMAGE_EXTS]
    # cat.jpg + cat.png, or a.b.png + a_b.png, would share a key: unique_keys tells them apart
    keys = unique_keys([str(p.relative_to(folder).with_suffix("")) for p in paths], paths)
    for path, key in zip(paths, keys, strict=True):
        yield {"key": key, "path": path, "caption_file": path.with_suffix(".txt")}


def table_items(table: Path, root: Path, image_column: str, caption_column: str) -> Iterator[dict]:
    for i, row in enumerate(read_table(table)):
        yield {
            "key": f"{table.stem}_{i:09d}",
            "row": row,
            "root": root,
            "columns": (image_column, caption_column),
        }


def img2dataset_items(url: str, events: Counter) -> Iterator[dict]:
    """The samples of one input tar; a damaged tar gives its samples up to the damage (the
    one cut off is counted as ``truncated_input``)."""
    try:
        for raw in read_shard(url):
            yield {"key": raw["__key__"], "raw": raw}
    except ShardError as e:
        events["input_tar_damaged"] += 1
        log.warning("input %s is damaged; its samples after the damage are lost", e)
        if e.partial is not None:
            yield {"key": e.partial, "cut": e.detail}
    except OSError as e:
        events["input_tar_unreadable"] += 1
        log.warning("cannot read input %s: %s", url, e)


def make_encoder(max_pixels: int):
    def encode(item: dict) -> dict:
        meta = {}
        if "cut" in item:  # the sample a damaged input tar cut off
            raise SkipSample("truncated_input", item["cut"])
        if "raw" in item:  # img2dataset shard sample
            raw = item["raw"]
            if "__bad__" in raw:
                raise SkipSample("duplicate_member", raw["__bad__"])
            image_key = next((k for k in raw if k in IMAGE_EXTS), None)
            if image_key is None or "txt" not in raw:
                raise SkipSample("missing_key", "needs an image and a .txt caption")
            data, caption = raw[image_key], text_member(raw["txt"])
            if "json" in raw:
                meta["source"] = raw["json"].decode("utf-8", "replace")[:2000]
        elif "row" in item:
            row = check_row(item["row"])
            image_column, caption_column = item["columns"]
            image, caption = row.get(image_column), row.get(caption_column)
            if image is None or caption is None:
                raise SkipSample("missing_key", f"row lacks {image_column!r} or {caption_column!r}")
            if not isinstance(image, str) or not isinstance(caption, str):
                raise SkipSample(
                    "bad_record",
                    f"{image_column!r} and {caption_column!r} must be strings, got "
                    f"{type(image).__name__} and {type(caption).__name__}",
                )
            data = read_file(item["root"] / image)
            meta = {
                k: v
                for k, v in row.items()
                if k not in (image_column, caption_column) and json_scalar(v)
            }
        else:
            data = read_file(item["path"])
            if not item["caption_file"].is_file():
                raise SkipSample("missing_key", f"no caption file {item['caption_file'].name}")
            caption = text_member(item["caption_file"].read_bytes())
        caption = " ".join(caption.split())
        if not caption:
            raise SkipSample("empty_text")
        data, ext = checked_image(data, max_pixels)
        return encode_pair(sanitize_key(item["key"]), data, ext, caption, meta)

    return encode


SOURCES = ("folder", "table", "img2dataset")


def build(args: argparse.Namespace, inputs: tuple[str, ...], j: int) -> Work:
    """Input j's pairs (data_prep/corpus.py runs this per input)."""
    source = inputs[j]
    encode = make_encoder(args.max_image_pixels)
    if args.folder:
        return Work(folder_items(Path(source)), encode)
    if args.table:
        table = Path(source)
        items = table_items(table, args.image_root, args.image_column, args.caption_column)
        return Work(items, encode, count_rows(table))
    input_events: Counter = Counter()
    return Work(img2dataset_items(source, input_events), encode, input_events=input_events)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--folder", help="folders of images with .txt captions beside them (a glob or brace list)"
    )
    source.add_argument(
        "--table", help=".jsonl/.csv/.parquet files of image paths and captions (glob, braces)"
    )
    source.add_argument("--img2dataset", help="img2dataset shards, e.g. 'in/{00000..00009}.tar'")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=Path("."),
        help="--table image paths are relative to this",
    )
    parser.add_argument(
        "--image-column", default="image", help="--table column with the image path"
    )
    parser.add_argument(
        "--caption-column", default="caption", help="--table column with the caption"
    )
    add_output_args(parser, "pairs")
    return parser


def prepare(args: argparse.Namespace) -> Conversion:
    option = next(name for name in SOURCES if getattr(args, name))
    inputs = expand_inputs(getattr(args, option), "dir" if option == "folder" else "file")
    return Conversion(build, args, tuple(inputs), option, "pairs")


def main(argv: list[str] | None = None) -> None:
    run_command(make_parser(), argv, prepare)


if __name__ == "__main__":
    main()
