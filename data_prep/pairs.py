"""Image-text pairs -> webdataset shards (schema: flamingo/data/schema.py, "pairs").

Sources (pick one):
  --folder DIR        images with a caption file beside each (cat.jpg + cat.txt)
  --table FILE        .jsonl / .csv / .parquet rows naming an image path and a caption
  --img2dataset SPEC  img2dataset-style shards (KEY.jpg + KEY.txt [+ KEY.json]), brace-expanded

Every image is decoded once to validate it; broken, missing or oversized images, empty
captions and malformed rows are skipped and counted in the summary. Re-running resumes:
finished shards are kept.

    python -m data_prep.pairs --table captions.jsonl --image-root imgs --out shards/pairs
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data_prep.common import (
    add_output_args,
    checked_image,
    count_rows,
    finish,
    read_file,
    read_table,
)
from flamingo.data.schema import IMAGE_EXTS, SkipSample, encode_pair, sanitize_key
from flamingo.data.shards import expand_shards, read_shard, write_shards


def folder_items(folder: Path) -> Iterator[dict]:
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower().lstrip(".") in IMAGE_EXTS:
            caption = path.with_suffix(".txt")
            yield {
                "key": str(path.relative_to(folder).with_suffix("")),
                "path": path,
                "caption_file": caption,
            }


def table_items(table: Path, root: Path, image_column: str, caption_column: str) -> Iterator[dict]:
    for i, row in enumerate(read_table(table)):
        yield {
            "key": f"{table.stem}_{i:09d}",
            "row": row,
            "root": root,
            "columns": (image_column, caption_column),
        }


def img2dataset_items(spec: str) -> Iterator[dict]:
    for url in expand_shards(spec):
        for raw in read_shard(url):
            yield {"key": raw["__key__"], "raw": raw}


def make_encoder(max_pixels: int):
    def encode(item: dict) -> dict:
        meta = {}
        if "raw" in item:  # img2dataset shard sample
            raw = item["raw"]
            image_key = next((k for k in raw if k in IMAGE_EXTS), None)
            if image_key is None or "txt" not in raw:
                raise SkipSample("missing_key", "needs an image and a .txt caption")
            data, caption = raw[image_key], raw["txt"].decode("utf-8", "replace")
            if "json" in raw:
                meta["source"] = raw["json"].decode("utf-8", "replace")[:2000]
        elif "row" in item:
            row = item["row"]
            if "__error__" in row:
                raise SkipSample("bad_json", row["__error__"])
            image_column, caption_column = item["columns"]
            if not row.get(image_column) or caption_column not in row:
                raise SkipSample("missing_key", f"row lacks {image_column!r} or {caption_column!r}")
            data = read_file(item["root"] / str(row[image_column]))
            caption = str(row[caption_column] or "")
            meta = {
                k: v
                for k, v in row.items()
                if k not in (image_column, caption_column) and isinstance(v, (str, int, float))
            }
        else:
            data = read_file(item["path"])
            if not item["caption_file"].is_file():
                raise SkipSample("missing_key", f"no caption file {item['caption_file'].name}")
            caption = item["caption_file"].read_text(errors="replace")
        caption = " ".join(caption.split())
        if not caption:
            raise SkipSample("empty_text")
        data, ext = checked_image(data, max_pixels)
        return encode_pair(sanitize_key(item["key"]), data, ext, caption, meta)

    return encode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--folder", type=Path, help="folder of images with .txt captions beside them"
    )
    source.add_argument(
        "--table", type=Path, help=".jsonl/.csv/.parquet of image paths and captions"
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
    args = parser.parse_args(argv)

    total = None
    if args.folder:
        if not args.folder.is_dir():
            parser.error(f"--folder {args.folder} is not a directory")
        items = folder_items(args.folder)
    elif args.table:
        if not args.table.is_file():
            parser.error(f"--table {args.table} does not exist")
        items = table_items(args.table, args.image_root, args.image_column, args.caption_column)
        total = count_rows(args.table)
    else:
        items = img2dataset_items(args.img2dataset)
    summary = write_shards(
        items,
        make_encoder(args.max_image_pixels),
        args.out,
        args.prefix,
        args.items_per_shard,
        total,
        "pairs",
    )
    finish(summary, args.out)


if __name__ == "__main__":
    main()
