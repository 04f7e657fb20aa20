"""Interleaved image-text documents -> webdataset shards (schema "interleaved").

Sources:
  mmc4     --jsonl FILE --images DIR   MMC4-style documents: text_list, image_info
                                       (image_name), similarity_matrix (images x sentences)
  obelics  --parquet FILE [--images DIR]  OBELICS-style rows: parallel texts/images lists;
                                       an image is a path under --images, raw bytes, or
                                       {"bytes": ...}

MMC4 images are assigned to sentences one-to-one, greedily by descending CLIP similarity,
keeping pairs at or above --threshold (MMC4's default 0.24); each image is placed before its
sentence, so the order of images in the shard is the order of <image> markers in the text
(OpenFlamingo's loader can let the two disagree when two images match one sentence).
Missing or broken images are dropped from their document (counted); documents left with no
image or no text are skipped (counted).

    python -m data_prep.interleaved mmc4 --jsonl docs.jsonl --images imgs --out shards/mmc4
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from data_prep.common import (
    add_output_args,
    checked_image,
    count_rows,
    finish,
    read_file,
    read_table,
)
from flamingo.data.schema import SkipSample, encode_interleaved, sanitize_key
from flamingo.data.shards import write_shards

MMC4_THRESHOLD = 0.24


def assign_images(similarity: list[list[float]], threshold: float) -> dict[int, int]:
    """One-to-one image -> sentence assignment, greedy by descending similarity.

    ``similarity[i][s]`` is image i's similarity to sentence s; pairs below ``threshold`` are
    never used. Returns ``{image index: sentence index}``.
    """
    pairs = sorted(
        (
            (sim, i, s)
            for i, row in enumerate(similarity)
            for s, sim in enumerate(row)
            if sim >= threshold
        ),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    used_images: set[int] = set()
    used_sentences: set[int] = set()
    assignment = {}
    for _, i, s in pairs:
        if i not in used_images and s not in used_sentences:
            assignment[i] = s
            used_images.add(i)
            used_sentences.add(s)
    return assignment


def mmc4_chunks(
    doc: dict[str, Any], images_dir: Path, threshold: float, events: Counter, max_pixels: int
) -> list:
    sentences = doc.get("text_list")
    infos = doc.get("image_info")
    if not isinstance(sentences, list) or not isinstance(infos, list):
        raise SkipSample("missing_key", "needs text_list and image_info lists")
    similarity = doc.get("similarity_matrix")
    if not isinstance(similarity, list) or len(similarity) != len(infos):
        # fall back to each image's single best match
        similarity = [
            [
                info.get("matched_sim", 0.0) if s == info.get("matched_text_index") else -1.0
                for s in range(len(sentences))
            ]
            for info in infos
        ]
    assignment = assign_images(similarity, threshold)
    events["image_below_threshold_or_unmatched"] += len(infos) - len(assignment)
    before: dict[int, tuple[bytes, str]] = {}
    for i, s in assignment.items():
        try:
            before[s] = checked_image(
                read_file(images_dir / str(infos[i].get("image_name", ""))), max_pixels
            )
        except SkipSample as e:
            events[f"image_dropped/{e.reason}"] += 1
    chunks: list = []
    for s, sentence in enumerate(sentences):
        if s in before:
            chunks.append(before[s])
        if isinstance(sentence, str) and sentence.strip():
            chunks.append(sentence.strip())
    return chunks


def obelics_chunks(
    row: dict[str, Any], images_dir: Path | None, events: Counter, max_pixels: int
) -> list:
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SkipSample("missing_key", "needs parallel texts and images lists")
    chunks: list = []
    for text, image in zip(texts, images, strict=True):
        if image is not None:
            try:
                if isinstance(image, dict):
                    image = image.get("bytes") or (
                        images_dir / image["path"] if images_dir and image.get("path") else None
                    )
                if isinstance(image, str):
                    if images_dir is None or "://" in image:
                        raise SkipSample(
                            "missing_image",
                            f"{image!r}: not a local file (download first, give --images)",
                        )
                    image = images_dir / image
                data = read_file(image) if isinstance(image, Path) else image
                if not isinstance(data, bytes):
                    raise SkipSample("missing_image", "no image bytes")
                chunks.append(checked_image(data, max_pixels))
            except SkipSample as e:
                events[f"image_dropped/{e.reason}"] += 1
        elif isinstance(text, str) and text.strip():
            chunks.append(text.strip())
    return chunks


def make_encoder(source: str, args: argparse.Namespace, events: Counter):
    def encode(item: tuple[int, dict]) -> dict:
        index, row = item
        if "__error__" in row:
            raise SkipSample("bad_json", row["__error__"])
        if source == "mmc4":
            chunks = mmc4_chunks(row, args.images, args.threshold, events, args.max_image_pixels)
        else:
            chunks = obelics_chunks(row, args.images, events, args.max_image_pixels)
        if not any(isinstance(c, tuple) for c in chunks):
            raise SkipSample("no_images")
        if not any(isinstance(c, str) for c in chunks):
            raise SkipSample("empty_text")
        meta = {k: row[k] for k in ("url", "id", "document_url") if isinstance(row.get(k), str)}
        return encode_interleaved(sanitize_key(f"doc{index:09d}"), chunks, meta)

    return encode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.interleaved",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True)
    mmc4 = sub.add_parser("mmc4", help="MMC4-style JSONL documents with a local image folder")
    mmc4.add_argument("--jsonl", type=Path, required=True)
    mmc4.add_argument(
        "--images", type=Path, required=True, help="folder holding image_info[].image_name"
    )
    mmc4.add_argument(
        "--threshold", type=float, default=MMC4_THRESHOLD, help="minimum image-sentence similarity"
    )
    add_output_args(mmc4, "mmc4")
    obelics = sub.add_parser("obelics", help="OBELICS-style parquet rows (texts/images lists)")
    obelics.add_argument("--parquet", type=Path, required=True)
    obelics.add_argument(
        "--images", type=Path, default=None, help="folder that image paths are relative to"
    )
    add_output_args(obelics, "obelics")
    args = parser.parse_args(argv)

    table = args.jsonl if args.source == "mmc4" else args.parquet
    if not table.is_file():
        parser.error(f"{table} does not exist")
    events: Counter = Counter()
    summary = write_shards(
        enumerate(read_table(table)),
        make_encoder(args.source, args, events),
        args.out,
        args.prefix,
        args.items_per_shard,
        count_rows(table),
        args.source,
        events=events,
    )
    finish(summary, args.out)


if __name__ == "__main__":
    main()
