"""LLaVA's instruction data -> webdataset shards (schema: flamingo/data/schema.py,
"conversation").

The input is LLaVA's JSON (``llava_v1_5_mix665k.json``, ``llava_instruct_150k.json``,
``blip_laion_cc_sbu_558k.json``; a glob or brace list of such files): a list of records, each
``{"id", "image" (a path under --images; absent for a text-only conversation),
"conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt",
"value": "..."}, ...]}``. Roles ``human``/``user`` and ``gpt``/``assistant`` are read; the
``<image>`` marker is taken out of the text (the template puts the image at the start of the
first user turn, as LLaVA-1.5 does). A record whose turns do not alternate from the user, with
an empty reply, whose image is missing or broken, which is no object or cannot be decoded (bytes
that are not UTF-8, broken JSON: that record alone) is skipped and counted in the summary by
reason. Where the markers were not where the image goes (none, several, outside the first
user turn, or a marker in a record without an image, dropped), the written sample is counted
under ``image_marker_*`` events.

    python -m data_prep.conversations --llava llava_v1_5_mix665k.json --images data/ --out shards/llava
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.common import (
    add_output_args,
    check_row,
    checked_image,
    json_list_items,
    read_file,
)
from data_prep.corpus import Conversion, Work, expand_inputs, run_command
from flamingo.chat import check_turns
from flamingo.data.schema import SkipSample, encode_conversation, sanitize_key
from flamingo.tokens import IMAGE

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of one LLaVA JSON file (a list), each with its index; a record that cannot
    be decoded (bytes that are not UTF-8, broken JSON) comes as a bad row, to be counted."""
    for i, record in enumerate(json_list_items(path)):
        yield {"index": i, "record": record, "file": path.stem}


def turns_of(record: dict[str, Any]) -> tuple[list[dict[str, str]], list[int]]:
    """A record's conversation as our turns (roles mapped, ``<image>`` taken out), and how
    many ``<image>`` markers each turn held. An empty reply skips the record: trained on, it
    would teach the model to answer with the end of the sequence alone."""
    raw = record.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise SkipSample("bad_record", 'no "conversations" list')
    turns, markers = [], []
    for turn in raw:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            raise SkipSample("bad_record", f"turn {turn!r} has no known role (human, gpt)")
        if not isinstance(turn.get("value"), str):
            raise SkipSample("bad_record", f"turn {turn!r} has no text value")
        text = turn["value"].replace(IMAGE, "").strip()
        turns.append({"role": ROLES[turn["from"]], "text": text})
        markers.append(turn["value"].count(IMAGE))
    try:
        check_turns(turns)
    except ValueError as e:
        raise SkipSample("bad_record", str(e)) from e
    empty = [i for i, t in enumerate(turns) if t["role"] == "assistant" and not t["text"]]
    if empty:
        raise SkipSample("empty_reply", f"turn {empty[0]} is an empty reply")
    return turns, markers


def marker_events(markers: list[int], has_image: bool) -> list[str]:
    """What the placement of the image changed in a record (counted as events): the image
    always opens the first user turn, as one ``<image>``, and only when there is an image."""
    total = sum(markers)
    if not has_image:
        return ["image_marker_without_image"] if total else []
    if total == 0:
        return ["image_marker_missing"]
    events = ["image_marker_repeated"] if total > 1 else []
    if markers[0] != total:  # a marker outside the first user turn
        events.append("image_marker_moved")
    return events


def make_encoder(images: Path, max_pixels: int, events: Counter):
    def encode(item: dict) -> dict:
        record = check_row(item["record"]) if isinstance(item["record"], dict) else item["record"]
        if not isinstance(record, dict):
            raise SkipSample("bad_record", f"record {item['index']} is not an object")
        turns, markers = turns_of(record)
        image = None
        if record.get("image") is not None:
            if not isinstance(record["image"], str):
                raise SkipSample("bad_record", f"image {record['image']!r} is not a path")
            image = checked_image(read_file(images / record["image"]), max_pixels)
        key = sanitize_key(f"{item['file']}_{item['index']:09d}")
        meta = {"id": str(record.get("id", "")), "source_image": record.get("image")}
        sample = encode_conversation(key, turns, image, meta)
        events.update(marker_events(markers, image is not None))  # the sample is written
        return sample

    return encode


def build(args: argparse.Namespace, inputs: tuple[str, ...], j: int) -> Work:
    """Input j's conversations (data_prep/corpus.py runs this per input)."""
    path = Path(inputs[j])
    items = list(records(path))
    events: Counter = Counter()
    encode = make_encoder(args.images, args.max_image_pixels, events)
    return Work(items, encode, len(items), events=events)


def make_parser() -> argparse.ArgumentParser:
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
    return parser


def prepare(args: argparse.Namespace) -> Conversion:
    return Conversion(build, args, tuple(expand_inputs(args.llava)), "llava", "conversations")


def main(argv: list[str] | None = None) -> None:
    run_command(make_parser(), argv, prepare)


if __name__ == "__main__":
    main()
