"""Interleaved image-text documents -> webdataset shards (schema "interleaved").

Sources:
  mmc4     --jsonl FILES --images DIR  MMC4-style documents: text_list, image_info
                                       (image_name), similarity_matrix (images x sentences)
  obelics  --parquet FILES [--images DIR]  OBELICS-style rows: parallel texts/images lists;
                                       an image is a path under --images, raw bytes, or
                                       {"bytes": ...}

MMC4 images are assigned to sentences one-to-one, greedily by descending CLIP similarity,
keeping pairs at or above --threshold (MMC4's default 0.24); each image is placed before its
sentence, so the order of images in the shard is the order of <image> markers in the text
(OpenFlamingo's loader can let the two disagree when two images match one sentence).
Missing or broken images are dropped from their document (counted); documents left with no
image or no text are skipped (counted).

    python -m data_prep.interleaved mmc4 --jsonl docs.jsonl --images imgs --out shards/mmc4
    python -m data_prep.interleaved mmc4 --jsonl 'mmc4/*.jsonl' --images 'imgs/{stem}' \
        --workers 16 --out shards/mmc4

Many inputs, several processes or machines, resume: data_prep/corpus.py.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path
from typing import Any

from data_prep.common import (
    add_output_args,
    check_row,
    checked_image,
    count_rows,
    read_file,
    read_table,
)
from data_prep.corpus import Conversion, Work, expand_inputs, run_command
from flamingo.data.schema import SkipSample, encode_interleaved, sanitize_key

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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def bad_record(detail: str) -> SkipSample:
    return SkipSample("bad_record", detail)


def check_mmc4(doc: dict[str, Any]) -> tuple[list[str], list[str], list[list[float]]]:
    """An MMC4 document's (sentences, image names, similarity images x sentences), checked:
    anything malformed (a wrong type, a null, an index past ``text_list``, a matrix of the
    wrong shape) raises ``SkipSample`` and costs this document only."""
    sentences, infos = doc.get("text_list"), doc.get("image_info")
    if sentences is None or infos is None:
        raise SkipSample("missing_key", "needs text_list and image_info")
    if not isinstance(sentences, list) or not all(isinstance(t, str) for t in sentences):
        raise bad_record("text_list must be a list of strings")
    if not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
        raise bad_record("image_info must be a list of objects")
    names = []
    for k, info in enumerate(infos):
        name = info.get("image_name")
        if not isinstance(name, str) or not name:
            raise bad_record(f"image_info[{k}].image_name must be a file name")
        names.append(name)
    similarity = doc.get("similarity_matrix")
    if similarity is None:  # fall back to each image's single best match
        similarity = []
        for k, info in enumerate(infos):
            index, sim = info.get("matched_text_index"), info.get("matched_sim", 0.0)
            if index is not None and (
                not isinstance(index, int) or isinstance(index, bool) or index < 0
            ):
                raise bad_record(f"image_info[{k}].matched_text_index must be an integer")
            if index is not None and index >= len(sentences):
                raise bad_record(
                    f"image_info[{k}].matched_text_index {index} is past text_list "
                    f"({len(sentences)} sentences)"
                )
            if not _number(sim):
                raise bad_record(f"image_info[{k}].matched_sim must be a number")
            similarity.append([sim if s == index else -1.0 for s in range(len(sentences))])
        return sentences, names, similarity
    if (
        not isinstance(similarity, list)
        or len(similarity) != len(infos)
        or not all(isinstance(r, list) and len(r) == len(sentences) for r in similarity)
    ):
        raise bad_record(
            f"similarity_matrix must be {len(infos)} x {len(sentences)} (images x sentences)"
        )
    if not all(_number(v) for row in similarity for v in row):
        raise bad_record("similarity_matrix holds a value that is not a finite number")
    return sentences, names, similarity


def mmc4_chunks(
    doc: dict[str, Any], images_dir: Path, threshold: float, events: Counter, max_pixels: int
) -> list:
    sentences, names, similarity = check_mmc4(doc)
    assignment = assign_images(similarity, threshold)
    events["image_below_threshold_or_unmatched"] += len(names) - len(assignment)
    before: dict[int, tuple[bytes, str]] = {}
    for i, s in assignment.items():
        try:
            before[s] = checked_image(read_file(images_dir / names[i]), max_pixels)
        except SkipSample as e:
            events[f"image_dropped/{e.reason}"] += 1
    chunks: list = []
    for s, sentence in enumerate(sentences):
        if s in before:
            chunks.append(before[s])
        if sentence.strip():
            chunks.append(sentence.strip())
    return chunks


def _obelics_image(image: Any, images_dir: Path | None, k: int) -> bytes:
    """One OBELICS image entry -> encoded bytes; SkipSample(missing_image) drops the image,
    SkipSample(bad_record) the document."""
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        if data is not None:
            image = data
        elif isinstance(path, str) and path:
            image = path
        else:  # how some exports write "no image": dropped, counted
            raise SkipSample("missing_image", f"images[{k}] has neither bytes nor a path")
    if isinstance(image, str):
        if images_dir is None or "://" in image:
            raise SkipSample(
                "missing_image", f"{image!r}: not a local file (download first, give --images)"
            )
        return read_file(images_dir / image)
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    raise bad_record(f"images[{k}] is a {type(image).__name__}, not a path or bytes")


def obelics_chunks(
    row: dict[str, Any], images_dir: Path | None, events: Counter, max_pixels: int
) -> list:
    texts, images = row.get("texts"), row.get("images")
    if texts is None or images is None:
        raise SkipSample("missing_key", "needs texts and images lists")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise bad_record("texts and images must be lists of one length")
    chunks: list = []
    for k, (text, image) in enumerate(zip(texts, images, strict=True)):
        if text is not None and not isinstance(text, str):
            raise bad_record(f"texts[{k}] is a {type(text).__name__}, not a string")
        if text is not None and image is not None:
            raise bad_record(f"position {k} holds both a text and an image")
        if image is not None:
            try:
                chunks.append(checked_image(_obelics_image(image, images_dir, k), max_pixels))
            except SkipSample as e:
                if e.reason == "bad_record":
                    raise
                events[f"image_dropped/{e.reason}"] += 1
        elif text is not None and text.strip():
            chunks.append(text.strip())
    return chunks


def images_for(images: Path | None, table: str) -> Path | None:
    """The image folder of one input: ``{stem}`` in ``--images`` becomes the input's file
    name without its suffix (``imgs/{stem}`` -> ``imgs/docs_shard_0_v2`` for MMC4's
    per-shard image folders)."""
    if images is None or "{stem}" not in str(images):
        return images
    return Path(str(images).replace("{stem}", Path(table).stem))


def make_encoder(source: str, args: argparse.Namespace, images: Path | None, events: Counter):
    def encode(item: tuple[int, dict]) -> dict:
        index, row = item
        check_row(row)
        if source == "mmc4":
            chunks = mmc4_chunks(row, images, args.threshold, events, args.max_image_pixels)
        else:
            chunks = obelics_chunks(row, images, events, args.max_image_pixels)
        if not any(isinstance(c, tuple) for c in chunks):
            raise SkipSample("no_images")
        if not any(isinstance(c, str) for c in chunks):
            raise SkipSample("empty_text")
        meta = {k: row[k] for k in ("url", "id", "document_url") if isinstance(row.get(k), str)}
        return encode_interleaved(sanitize_key(f"doc{index:09d}"), chunks, meta)

    return encode


def build(args: argparse.Namespace, inputs: tuple[str, ...], j: int) -> Work:
    """Input j's documents (data_prep/corpus.py runs this per input)."""
    table = inputs[j]
    events: Counter = Counter()
    encode = make_encoder(args.source, args, images_for(args.images, table), events)
    return Work(enumerate(read_table(Path(table))), encode, count_rows(Path(table)), events)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.interleaved",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True)
    mmc4 = sub.add_parser("mmc4", help="MMC4-style JSONL documents with a local image folder")
    mmc4.add_argument(
        "--jsonl", required=True, help="input files: a glob or brace list, e.g. 'docs/*.jsonl'"
    )
    mmc4.add_argument(
        "--images",
        type=Path,
        required=True,
        help="folder holding image_info[].image_name; {stem}: the input's name, for a folder "
        "per input",
    )
    mmc4.add_argument(
        "--threshold", type=float, default=MMC4_THRESHOLD, help="minimum image-sentence similarity"
    )
    add_output_args(mmc4, "mmc4")
    obelics = sub.add_parser("obelics", help="OBELICS-style parquet rows (texts/images lists)")
    obelics.add_argument(
        "--parquet", required=True, help="input files: a glob or brace list, e.g. 'data/*.parquet'"
    )
    obelics.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder that image paths are relative to ({stem}: the input's name)",
    )
    add_output_args(obelics, "obelics")
    return parser


def prepare(args: argparse.Namespace) -> Conversion:
    option = "jsonl" if args.source == "mmc4" else "parquet"
    inputs = expand_inputs(getattr(args, option))
    return Conversion(build, args, tuple(inputs), option, args.source)


def main(argv: list[str] | None = None) -> None:
    run_command(make_parser(), argv, prepare)


if __name__ == "__main__":
    main()
