"""LLaVA's instruction data -> webdataset shards (schema: flamingo/data/schema.py,
"conversation").

The input is LLaVA's JSON (``llava_v1_5_mix665k.json``, ``llava_instruct_150k.json``,
``blip_laion_cc_sbu_558k.json``; a glob or brace list of such files): a list of records, each
``{"id", "image" (a path under --images; absent for a text-only conversation),
"conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt",
"value": "..."}, ...]}``. Roles ``human``/``user`` and ``gpt``/``assistant`` are read; the
``<image>`` marker is taken out of the text (the template puts the image at the start of the
first user turn, as LLaVA-1.5 does). A record whose turns do not alternate from the user, whose
image is missing or broken, or which is no object is skipped and counted in the summary.

    python -m data_prep.conversations --llava llava_v1_5_mix665k.json --images data/ --out shards/llava
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.common import add_output_args, checked_image, read_file
from data_prep.corpus import Work, convert, expand_inputs
from flamingo.chat import check_turns
from flamingo.data.schema import SkipSample, encode_conversation, sanitize_key
from flamingo.tokens import IMAGE

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of one LLaVA JSON file (a list), each with its index."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable LLaVA JSON file: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: LLaVA's instruction data is a JSON list of records")
    for i, record in enumerate(data):
        yield {"index": i, "record": record, "file": path.stem}


def turns_of(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record's conversation as our turns (roles mapped, ``<image>`` taken out)."""
    raw = record.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise SkipSample("bad_record", 'no "conversations" list')
    turns = []
    for turn in raw:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            raise SkipSample("bad_record", f"turn {turn!r} has no known role (human, gpt)")
        if not isinstance(turn.get("value"), str):
            raise SkipSample("bad_record", f"turn {turn!r} has no text value")
        text = turn["value"].replace(IMAGE, "").strip()
        turns.append({"role": ROLES[turn["from"]], "text": text})
    try:
        check_turns(turns)
    except ValueError as e:
        raise SkipSample("bad_record", str(e)) from e
    return turns


def make_encoder(images: Path, max_pixels: int):
    def encode(item: dict) -> dict:
        record = item["record"]
        if not isinstance(record, dict):
            raise SkipSample("bad_record", f"record {item['index']} is not an object")
        turns = turns_of(record)
        image = None
        if record.get("image") is not None:
            if not isinstance(record["image"], str):
                raise SkipSample("bad_record", f"image {record['image']!r} is not a path")
            image = checked_image(read_file(images / record["image"]), max_pixels)
        key = sanitize_key(f"{item['file']}_{item['index']:09d}")
        meta = {"id": str(record.get("id", "")), "source_image": record.get("image")}
        return encode_conversation(key, turns, image, meta)

    return encode


def build(args: argparse.Namespace, inputs: tuple[str, ...], j: int) -> Work:
    """Input j's conversations (data_prep/corpus.py runs this per input)."""
    path = Path(inputs[j])
    items = list(records(path))
    return Work(items, make_encoder(args.images, args.max_image_pixels), len(items))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.conversations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--llava", required=True, help="LLaVA instruction JSON files (glob, braces)"
    )
    parser.add_argument(
        "--images", type=Path, default=Path("."), help="the records' image paths are under this"
    )
    add_output_args(parser, "conversations")
    args = parser.parse_args(argv)
    try:
        convert(build, args, expand_inputs(args.llava), "llava", "conversations")
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
