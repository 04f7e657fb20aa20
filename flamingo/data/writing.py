"""Writing shards atomically, durably and resumably.

Converters feed input items in a fixed order; item ``i`` belongs to shard
``i // items_per_shard``. A shard is written under a temporary name, made durable (the file,
then its folder, synced to the disk) and renamed when complete, after its record
(``progress/NAME.tar.json``: samples, skips, settings, the shard's size and SHA-256). A killed
converter never leaves a truncated shard under a final name, and a power cut after a rename
cannot leave an empty one that the rename already marked done.

A re-run reuses every input group whose shard matches its record (present, the recorded size;
the recorded SHA-256 too with ``checksum``) and reports what a fresh run would; a shard that
does not match (deleted, cut, zero bytes) is written again, and named. The bytes of a shard
depend on its samples only (fixed member times), so the same input gives the same shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm
from webdataset import TarWriter

from flamingo.data.schema import SkipSample
from flamingo.data.shards import ShardError, read_shard, split_member

log = logging.getLogger("flamingo.data")

RECORDS = "progress"
"""Folder (under the output) of the per-shard records: what each finished shard holds and
what its input group skipped, so that a resumed conversion reports what a fresh one would."""

MTIME = 946684800.0
"""Every member's modification time (2000-01-01): a shard's bytes depend on its samples only."""


class OutputMismatch(ValueError):
    """An output folder holds shards that a run with other settings wrote."""


EXAMPLES = 3
"""Skipped items a summary names per reason (the counts cover them all)."""


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
    shards_redone: list[str] = field(default_factory=list)
    """Shards an earlier run finished that no longer matched their records, written again."""
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few skipped items of this run by reason, each with what was wrong."""

    def note_skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(example)

    def report(self) -> str:
        lines = [
            f"shards written: {len(self.shards_written)}, reused from an earlier run: "
            f"{len(self.shards_reused)}",
            f"samples written: {self.samples_written}, in reused shards: {self.samples_reused}",
            f"samples skipped: {sum(self.skipped.values())}",
        ]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {n}")
            lines += [f"    e.g. {example}" for example in self.skipped_examples.get(reason, [])]
        if self.shards_redone:
            lines.append(
                f"damaged shards of an earlier run written again: {len(self.shards_redone)}"
            )
        if self.events:
            lines.append("within written samples:")
            lines += [f"  {event}: {n}" for event, n in sorted(self.events.items())]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards_written": self.shards_written,
            "shards_reused": self.shards_reused,
            "shards_redone": self.shards_redone,
            "samples_written": self.samples_written,
            "samples_reused": self.samples_reused,
            "skipped": dict(self.skipped),
            "skipped_examples": self.skipped_examples,
            "events": dict(self.events),
        }


def shard_name(out_dir: Path, prefix: str, index: int) -> Path:
    return out_dir / f"{prefix}-{index:05d}.tar"


def record_path(shard: Path) -> Path:
    return shard.parent / RECORDS / f"{shard.name}.json"


# -- durability ------------------------------------------------------------------------------


def sync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: Path, final: Path) -> None:
    """Rename the synced file ``tmp`` to ``final`` and sync the folder: after a power cut the
    final name holds the whole file or the previous state, never an empty file."""
    os.replace(tmp, final)
    sync_dir(final.parent)


def write_json(path: Path, value: Any) -> None:
    """Write JSON under a temporary name, sync it and rename it: a reader never sees half a
    file, and a crash never leaves an empty one under the final name. The temporary name is
    the writer's own: processes that write the same file at once (two parts of a conversion
    finishing together, each merging the summaries) each rename a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    durable_replace(tmp, path)


class _HashingFile:
    """A binary file that hashes and counts what is written to it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)


# -- checking finished shards ----------------------------------------------------------------


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_record(shard: Path) -> dict[str, Any] | None:
    """A finished shard's record, or None when there is none; one that is damaged (not JSON,
    or JSON but not an object) is named in a warning and taken for none (the shard is then
    written again)."""
    path = record_path(shard)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s is damaged (%s): its shard is written again", path, e)
        return None
    if not isinstance(value, dict):
        log.warning(
            "%s holds a JSON %s, not a record: its shard is written again",
            path,
            type(value).__name__,
        )
        return None
    return value


def shard_problem(shard: Path, record: dict[str, Any], checksum: bool = False) -> str | None:
    """What is wrong with a finished shard against its record (None: nothing): missing, or
    another size than was written; with ``checksum``, other bytes (SHA-256). A record from
    before sizes were recorded is checked by reading the archive to its end."""
    if not shard.is_file():
        return "missing"
    size = shard.stat().st_size
    if isinstance(record.get("bytes"), int):
        if size != record["bytes"]:
            return f"{size} bytes, {record['bytes']} were written"
        if checksum and file_sha256(shard) != record.get("sha256"):
            return "its contents changed since it was written (SHA-256)"
        return None
    try:
        samples = sum(1 for _ in read_shard(str(shard)))
    except (ShardError, OSError) as e:
        return f"unreadable ({e})"
    if samples != record.get("samples"):
        return f"{samples} samples, {record.get('samples')} were written"
    return None


def shard_keys(path: Path) -> set[str]:
    """The sample keys of a finished shard, from its member headers (no data read)."""
    with tarfile.open(path) as tar:
        return {parts[0] for name in tar.getnames() if (parts := split_member(name))}


# -- writing ---------------------------------------------------------------------------------


class _Shards:
    """The shards of one ``write_shards`` call: one open at a time, each reused, or written
    under a temporary name and moved into place with its record."""

    def __init__(
        self,
        out_dir: Path,
        prefix: str,
        fingerprint: str,
        summary: WriteSummary,
        events: Counter,
        checksum: bool,
    ) -> None:
        self.out_dir, self.prefix, self.fingerprint = out_dir, prefix, fingerprint
        self.summary, self.events, self.checksum = summary, events, checksum
        self.keys: set[str] = set()  # of the whole output: a key twice would merge two samples
        self.index = -1
        self.tmp: Path | None = None
        self.file: BinaryIO | None = None
        self.hashing: _HashingFile | None = None
        self.writer: TarWriter | None = None
        self.samples, self.skipped, self.events_before = 0, Counter(), Counter()
        self.examples: dict[str, list[str]] = {}

    @property
    def writing(self) -> bool:
        return self.writer is not None

    def _reusable(self, final: Path) -> dict | None:
        """The record of a finished shard written with the same settings that still matches
        it; None where the group must be (re)written. The record is written just before the
        shard is renamed, so a kill between the two costs that shard only."""
        record = read_record(final)
        if record is None:
            return None
        if record.get("fingerprint") != self.fingerprint:
            raise OutputMismatch(
                f"{final} was written with other settings than this run's (the input or an "
                "option changed): convert into a new --out, or delete the old shards first"
            )
        if not final.exists():
            return None  # killed between the record and the rename: not a damaged shard
        problem = shard_problem(final, record, self.checksum)
        if problem is None:
            try:
                self.keys |= shard_keys(final)
                return record
            except (tarfile.TarError, OSError) as e:
                problem = f"unreadable ({e})"
        log.warning("%s from an earlier run is damaged (%s): writing it again", final, problem)
        self.summary.shards_redone.append(final.name)
        return None

    def open(self, index: int) -> None:
        """Start group ``index``: reuse its shard, or open a temporary one to write."""
        self.finish()
        self.index = index
        self.samples, self.skipped, self.events_before = 0, Counter(), Counter(self.events)
        self.examples = {}
        final = shard_name(self.out_dir, self.prefix, index)
        reused = self._reusable(final)
        if reused is not None:
            self.summary.shards_reused.append(final.name)
            self.summary.samples_reused += reused["samples"]
            self.summary.skipped.update(reused["skipped"])
            self.summary.events.update(reused["events"])
            for reason, examples in reused.get("skipped_examples", {}).items():
                kept = self.summary.skipped_examples.setdefault(reason, [])
                kept += examples[: EXAMPLES - len(kept)]
            return
        self.tmp = final.with_name(final.name + ".tmp")
        self.file = self.tmp.open("wb")
        self.hashing = _HashingFile(self.file)
        self.writer = TarWriter(self.hashing, encoder=False, mtime=MTIME)

    def add(self, samples: list[dict]) -> None:
        for sample in samples:
            self.writer.write(sample)
            self.keys.add(sample["__key__"])
        self.summary.samples_written += len(samples)
        self.samples += len(samples)

    def skip(self, reason: str, example: str) -> None:
        self.summary.note_skip(reason, example)
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(example)

    def finish(self) -> None:
        """Close the open shard: synced, its record first, then renamed into place."""
        if self.writer is None:
            return
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        final = shard_name(self.out_dir, self.prefix, self.index)
        record = {
            "fingerprint": self.fingerprint,
            "samples": self.samples,
            "skipped": dict(self.skipped),
            "skipped_examples": self.examples,
            "events": dict(self.events - self.events_before),
            "bytes": self.hashing.bytes,
            "sha256": self.hashing.sha256.hexdigest(),
        }
        write_json(record_path(final), record)  # first: a shard always has its record
        durable_replace(self.tmp, final)
        self.summary.shards_written.append(final.name)
        self.writer = self.file = self.hashing = None

    def abort(self) -> None:
        """Never leave a half-written shard behind, even as .tmp."""
        if self.writer is not None:
            self.writer.close()
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            self.writer = self.file = self.hashing = None


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
    checksum: bool = False,
) -> WriteSummary:
    """Encode ``items`` into shards ``out_dir/prefix-00000.tar``, ...

    ``encode(item)`` returns a sample dict (see ``schema.encode_*``), or a list of them, or
    raises :class:`SkipSample` (counted by reason). Other exceptions propagate: they are bugs,
    not bad data. ``events`` is a Counter the encoder may update (counted per shard);
    ``input_events`` one that reading ``items`` updates; both go into the summary, written
    last as ``prefix-summary.json`` with ``manifest``'s fields. A key twice in the output
    skips its second sample (``duplicate_key``). A finished shard from an earlier run with the
    same ``manifest`` that still matches its record (``checksum``: to the SHA-256) is kept and
    its items are not encoded again (resume); one from a run with another manifest is an
    error.
    """
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard must be >= 1, got {items_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest or {}, items_per_shard=items_per_shard)
    fingerprint = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    events = Counter() if events is None else events
    summary = WriteSummary()
    shards = _Shards(out_dir, prefix, fingerprint, summary, events, checksum)
    try:
        bar = tqdm(items, total=total, desc=desc, unit="item", disable=not progress)
        for i, item in enumerate(bar):
            if i // items_per_shard != shards.index:
                shards.open(i // items_per_shard)
            if not shards.writing:  # this group's shard exists from an earlier run
                continue
            try:
                samples = encode(item)
                samples = samples if isinstance(samples, list) else [samples]
                new = [s["__key__"] for s in samples]
                taken = [k for k in new if k in shards.keys or new.count(k) > 1]
                if taken:
                    raise SkipSample("duplicate_key", f"{taken[0]!r} is already in the output")
            except SkipSample as e:
                shards.skip(e.reason, f"item {i}: {e}")
                continue
            shards.add(samples)
    except BaseException:
        shards.abort()
        raise
    shards.finish()
    summary.events.update(events - Counter())  # encoding in this run; reused shards' above
    summary.events.update(input_events or {})
    write_json(out_dir / f"{prefix}-summary.json", {**manifest, **summary.to_dict()})
    return summary
