"""Writing shards atomically and resumably; listing and reading them.

Converters feed input items in a fixed order; item ``i`` belongs to shard
``i // items_per_shard``. A shard is written under a temporary name and renamed when complete,
after its record (``progress/NAME.tar.json``: samples, skips, settings), so a killed converter
never leaves a truncated shard under a final name, and a re-run skips every input group whose
shard and record exist (resume), reporting what a fresh run would. The bytes of a shard
depend on its samples only (fixed member times), so the same input gives the same shards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from webdataset import TarWriter, gopen
from webdataset.shardlists import expand_urls

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


RECORDS = "progress"
"""Folder (under the output) of the per-shard records: what each finished shard holds and
what its input group skipped, so that a resumed conversion reports what a fresh one would."""

MTIME = 946684800.0
"""Every member's modification time (2000-01-01): a shard's bytes depend on its samples only."""


def record_path(shard: Path) -> Path:
    return shard.parent / RECORDS / f"{shard.name}.json"


def write_json(path: Path, value: Any) -> None:
    """Write JSON under a temporary name and rename it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def shard_keys(path: Path) -> set[str]:
    """The sample keys of a finished shard, from its member headers (no data read)."""
    with tarfile.open(path) as tar:
        return {parts[0] for name in tar.getnames() if (parts := split_member(name))}


def _reusable(final: Path, fingerprint: str) -> dict | None:
    """The record of a finished shard written with the same settings; None where the group
    must be (re)written: no shard, or a shard without its record (the record is written just
    before the shard is renamed, so a kill between the two costs that shard only)."""
    record = record_path(final)
    if not final.exists() or not record.exists():
        return None
    try:
        value = json.loads(record.read_text())
    except ValueError:
        return None
    if value.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{final} was written with other settings than this run's (the input or an option "
            "changed): convert into a new --out, or delete the old shards first"
        )
    return value


def write_shards(
    items: Iterable[Any],
    encode: Callable[[Any], dict | list[dict]],
    out_dir: str | Path,
    prefix: str,
    items_per_shard: int = 1000,
    total: int | None = None,
    desc: str = "writing shards",
    events: Counter | None = None,
    input_events: Counter | None = None,
    manifest: dict[str, Any] | None = None,
    progress: bool = True,
) -> WriteSummary:
    """Encode ``items`` into shards ``out_dir/prefix-00000.tar``, ...

    ``encode(item)`` returns a sample dict (see ``schema.encode_*``), or a list of them, or
    raises :class:`SkipSample` (counted by reason). Other exceptions propagate: they are bugs,
    not bad data. ``events`` is a Counter the encoder may update (counted per shard);
    ``input_events`` one that reading ``items`` updates; both go into the summary, written
    last as ``prefix-summary.json`` with ``manifest``'s fields. A key twice in the output
    skips its second sample (``duplicate_key``). A finished shard from an earlier run with the
    same ``manifest`` is kept and its items are not encoded again (resume); one from a run
    with another manifest is an error.
    """
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard must be >= 1, got {items_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest or {}, items_per_shard=items_per_shard)
    fingerprint = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    events = Counter() if events is None else events
    summary = WriteSummary()
    writer: TarWriter | None = None
    tmp: Path | None = None
    current = -1
    keys: set[str] = set()  # of the whole output: a key twice would merge two samples
    shard_samples, shard_skipped, shard_events = 0, Counter(), Counter()

    def finish() -> None:
        nonlocal writer, tmp
        if writer is not None:
            writer.close()
            final = shard_name(out_dir, prefix, current)
            record = {
                "fingerprint": fingerprint,
                "samples": shard_samples,
                "skipped": dict(shard_skipped),
                "events": dict(events - shard_events),
            }
            write_json(record_path(final), record)  # first: a shard always has its record
            os.replace(tmp, final)
            summary.shards_written.append(final.name)
            writer = tmp = None

    try:
        bar = tqdm(items, total=total, desc=desc, unit="item", disable=not progress)
        for i, item in enumerate(bar):
            index = i // items_per_shard
            if index != current:
                finish()
                current = index
                shard_samples, shard_skipped, shard_events = 0, Counter(), Counter(events)
                final = shard_name(out_dir, prefix, index)
                reused = _reusable(final, fingerprint)
                if reused is not None:
                    summary.shards_reused.append(final.name)
                    summary.samples_reused += reused["samples"]
                    summary.skipped.update(reused["skipped"])
                    summary.events.update(reused["events"])
                    keys |= shard_keys(final)
                else:
                    tmp = final.with_name(final.name + ".tmp")
                    writer = TarWriter(str(tmp), encoder=False, mtime=MTIME)
            if writer is None:  # this group's shard exists from an earlier run
                continue
            try:
                samples = encode(item)
                samples = samples if isinstance(samples, list) else [samples]
                new = [s["__key__"] for s in samples]
                taken = [k for k in new if k in keys or new.count(k) > 1]
                if taken:
                    raise SkipSample("duplicate_key", f"{taken[0]!r} is already in the output")
            except SkipSample as e:
                summary.skipped[e.reason] += 1
                shard_skipped[e.reason] += 1
                continue
            for sample in samples:
                writer.write(sample)
                keys.add(sample["__key__"])
                summary.samples_written += 1
                shard_samples += 1
    except BaseException:
        if writer is not None:  # never leave a half-written shard behind, even as .tmp
            writer.close()
            tmp.unlink(missing_ok=True)
        raise
    finish()
    summary.events.update(events - Counter())  # encoding in this run; reused shards' above
    summary.events.update(input_events or {})
    write_json(out_dir / f"{prefix}-summary.json", {**manifest, **summary.to_dict()})
    return summary


GLOB = re.compile(r"[*?\[]")


def expand_shards(spec: str) -> list[str]:
    """Brace expansion, ``::`` lists and (local paths) globs, each glob's matches sorted:
    ``data/a-{000..009}.tar::data/b-*.tar``. A glob matching nothing is an error."""
    urls = []
    for url in expand_urls(spec):
        if GLOB.search(url) and "://" not in url:
            matches = sorted(glob.glob(url))
            if not matches:
                raise ValueError(f"{url!r} (in {spec!r}) matches no file")
            urls += matches
        else:
            urls.append(url)
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return urls


class ShardError(Exception):
    """A shard that could not be read to its end; every complete sample before the damage
    was yielded first. ``partial`` is the key of a sample cut off by it (or None)."""

    def __init__(self, url: str, detail: str, partial: str | None) -> None:
        lost = f"; sample {partial!r} was cut off and is not used" if partial else ""
        super().__init__(f"{url}: {detail}{lost}")
        self.url, self.detail, self.partial = url, detail, partial


class _Counted:
    """A read-only stream that counts the bytes it delivered."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.bytes = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes += len(data)
        return data


def split_member(name: str) -> tuple[str, str] | None:
    """``"dir/KEY.img0.jpg"`` -> ``("dir/KEY", "img0.jpg")`` (webdataset's rule: the key ends
    at the first dot of the file name; suffixes are lower-cased); None without a suffix."""
    head, _, base = name.rpartition("/")
    key, dot, suffix = base.partition(".")
    if not dot or not key or not suffix:
        return None
    return (f"{head}/{key}" if head else key), suffix.lower()


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (member suffix -> bytes, plus ``__key__``/``__url__``) of one tar shard.

    Members sharing a key form a sample; a sample is yielded once the next sample's header (or
    the end of the archive) shows that it is complete. A tar cut short (even between members,
    which ``tarfile`` alone takes for a normal end) or otherwise unreadable raises
    :class:`ShardError` after every complete sample before the damage. A sample holding one
    member name twice comes out with ``__bad__`` saying so (its first copy of each member is
    kept), for the reader to skip. Opening errors (a missing file) propagate as they are.
    """
    with gopen(url, "rb") as raw:
        stream = _Counted(raw)
        sample: dict[str, Any] | None = None
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    tar.members = []  # stream mode: do not keep every header in memory
                    parts = split_member(member.name) if member.isreg() else None
                    if parts is None or parts[0].rpartition("/")[2].startswith("__"):
                        continue  # directories, links, suffix-less names, webdataset __meta__
                    key, suffix = parts
                    if sample is not None and key != sample["__key__"]:
                        yield sample
                        sample = None
                    if sample is None:
                        sample = {"__key__": key, "__url__": url}
                    data = tar.extractfile(member).read()
                    if suffix in sample:
                        sample["__bad__"] = f"member {member.name!r} appears twice"
                    else:
                        sample[suffix] = data
                if getattr(tar.fileobj, "comptype", "tar") == "tar":
                    while stream.read(1 << 20):  # the padding after the end-of-archive marker
                        pass
                    if stream.bytes < tar.offset + tarfile.BLOCKSIZE:
                        raise tarfile.ReadError(
                            f"truncated: ends inside the member header at byte {tar.offset}"
                        )
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            partial = sample["__key__"] if sample is not None else None
            raise ShardError(url, f"{type(e).__name__}: {e}", partial) from e
        if sample is not None:
            yield sample
