"""Writing shards atomically and resumably; listing and reading them.

Converters feed input items in a fixed order; item ``i`` belongs to shard
``i // items_per_shard``. A shard is written under a temporary name and renamed when complete,
so a killed converter never leaves a truncated shard under a final name, and a re-run skips
every input group whose shard already exists (resume).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from webdataset import TarWriter, gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from flamingo.data.schema import SkipSample


@dataclass
class WriteSummary:
    """What a converter wrote and skipped."""

    shards_written: list[str] = field(default_factory=list)
    shards_reused: list[str] = field(default_factory=list)
    samples_written: int = 0
    samples_reused: int = 0
    skipped: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)
    """Things that changed a written sample without skipping it (e.g. an image dropped)."""

    def report(self) -> str:
        lines = [
            f"shards written: {len(self.shards_written)}, reused from an earlier run: "
            f"{len(self.shards_reused)}",
            f"samples written: {self.samples_written}, in reused shards: {self.samples_reused}",
            f"samples skipped: {sum(self.skipped.values())}"
            + "".join(f"\n  {reason}: {n}" for reason, n in sorted(self.skipped.items())),
        ]
        if self.events:
            lines.append("within written samples:")
            lines += [f"  {event}: {n}" for event, n in sorted(self.events.items())]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards_written": self.shards_written,
            "shards_reused": self.shards_reused,
            "samples_written": self.samples_written,
            "samples_reused": self.samples_reused,
            "skipped": dict(self.skipped),
            "events": dict(self.events),
        }


def shard_name(out_dir: Path, prefix: str, index: int) -> Path:
    return out_dir / f"{prefix}-{index:05d}.tar"


def write_shards(
    items: Iterable[Any],
    encode: Callable[[Any], dict | list[dict]],
    out_dir: str | Path,
    prefix: str,
    items_per_shard: int = 1000,
    total: int | None = None,
    desc: str = "writing shards",
    events: Counter | None = None,
) -> WriteSummary:
    """Encode ``items`` into shards ``out_dir/prefix-00000.tar``, ...

    ``encode(item)`` returns a sample dict (see ``schema.encode_*``), or a list of them, or
    raises :class:`SkipSample` (counted by reason). Other exceptions propagate: they are bugs,
    not bad data. ``events`` is a Counter the encoder may update; it goes into the summary.
    """
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard must be >= 1, got {items_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = WriteSummary()
    writer: TarWriter | None = None
    tmp: Path | None = None
    current = -1
    in_current = 0

    def finish() -> None:
        nonlocal writer, tmp
        if writer is not None:
            writer.close()
            final = shard_name(out_dir, prefix, current)
            os.replace(tmp, final)
            summary.shards_written.append(final.name)
            writer = tmp = None

    for i, item in enumerate(tqdm(items, total=total, desc=desc, unit="item")):
        index = i // items_per_shard
        if index != current:
            finish()
            current, in_current = index, 0
            final = shard_name(out_dir, prefix, index)
            if final.exists():
                summary.shards_reused.append(final.name)
            else:
                tmp = final.with_name(final.name + ".tmp")
                writer = TarWriter(str(tmp), encoder=False)
        if writer is None:  # this group's shard exists from an earlier run
            summary.samples_reused += 1
            continue
        try:
            samples = encode(item)
        except SkipSample as e:
            summary.skipped[e.reason] += 1
            continue
        for sample in samples if isinstance(samples, list) else [samples]:
            writer.write(sample)
            summary.samples_written += 1
            in_current += 1
    finish()
    summary.events.update(events or {})
    (out_dir / f"{prefix}-summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def expand_shards(spec: str) -> list[str]:
    """Brace expansion and ``::`` lists: ``data/a-{000..009}.tar::data/b.tar``."""
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return urls


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (member suffix -> bytes, plus ``__key__``/``__url__``) of one tar shard.

    Errors opening or reading the tar propagate; the pipeline counts them per shard.
    """
    with gopen(url, "rb") as stream:
        files = tar_file_iterator(stream)
        yield from group_by_keys({**f, "__url__": url} for f in files)
