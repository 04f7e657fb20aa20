"""A loader's position carried over to another number of streams (ranks x workers).

A loader's position is one :class:`StreamState` per stream. In epoch mode stream ``s`` of
``S`` reads the shards ``order[s::S]`` of each epoch's seeded permutation, each through a
shuffle buffer seeded by the stream and the shard's place in its share. When a run resumes on
another number of processes (a lost node, an added one) or data workers, :func:`reshard` turns
the positions of the ``S`` old streams into positions of ``S'`` new ones, so that in epoch
mode every sample not yet delivered is delivered once and none twice:

- each old stream's unread shards up to the furthest epoch any stream reached, and the rest of
  the shard it was reading, become *pending* shards ``[epoch, shard, stream, position, skip]``:
  read with the old stream's own shuffle (``stream``, ``position``), the first ``skip``
  samples (those it delivered) passed over;
- the pending shards are dealt round-robin, epoch by epoch, to the new streams, which read
  them before going on with the usual share of the later epochs.

Bounds, documented rather than hidden: with packing, a window in progress is packed again
from its start, so up to ``pack_window`` samples per old stream are seen twice; resampled
streams draw shards with replacement, so there is nothing to carry over but the count: the
new streams draw fresh shards, and the rest of a partly read shard is not read.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

Pending = list[int]
"""``[epoch, shard index, old stream, position in its share, samples to skip]``."""


@dataclass
class StreamState:
    """Where one stream stands: resume from here."""

    epoch: int = 0
    shard_pos: int = 0
    """Index into the epoch's shard order (epoch mode) or number of shards drawn (resampled)."""
    sample_pos: int = 0
    """Raw samples already taken from the current shard (after shuffling)."""
    window_batches: int = 0
    """Packing: batches already delivered from the packing window that starts here."""
    pending: list[Pending] = field(default_factory=list)
    """After a change of the number of streams: the shards to read first (module docstring)."""
    replay_until: int = -1
    """The last epoch ``pending`` covers: until then the stream reads its pending shards only."""


def epoch_order(tag: str, count: int, epoch: int) -> list[int]:
    """The seeded permutation of the ``count`` shards of ``epoch`` (``tag``: seed and dataset)."""
    order = list(range(count))
    random.Random(f"{tag}/shards/{epoch}").shuffle(order)
    return order


def _unread(
    state: StreamState, stream: int, streams: int, count: int, tag: str, last: int
) -> list[Pending]:
    """What old stream ``stream`` of ``streams`` had still to read up to the end of ``last``."""
    entries: list[Pending] = []
    if state.epoch <= state.replay_until:  # itself resharded before: its pending shards first
        for i, (epoch, index, old, pos, skip) in enumerate(state.pending):
            current = i == 0 and epoch == state.epoch
            entries.append([epoch, index, old, pos, state.sample_pos if current else skip])
        after = state.replay_until + 1
    else:
        share = epoch_order(tag, count, state.epoch)[stream::streams]
        for pos in range(state.shard_pos, len(share)):
            skip = state.sample_pos if pos == state.shard_pos else 0
            entries.append([state.epoch, share[pos], stream, pos, skip])
        after = state.epoch + 1
    for epoch in range(after, last + 1):
        share = epoch_order(tag, count, epoch)[stream::streams]
        entries += [[epoch, index, stream, pos, 0] for pos, index in enumerate(share)]
    return entries


def reshard(
    states: dict[int, StreamState],
    old: int,
    new: int,
    count: int,
    tag: str,
    resampled: bool,
) -> dict[int, StreamState]:
    """The positions of ``new`` streams that carry on from those of ``old`` streams (a stream
    absent from ``states`` had not started) over ``count`` shards; see the module docstring."""
    before = [states.get(s, StreamState()) for s in range(old)]
    if resampled:  # fresh draws: positions no old stream drew at
        drawn = max(s.shard_pos for s in before) + 1
        return {k: StreamState(shard_pos=drawn) for k in range(new)}
    first = min(s.epoch for s in before)
    last = max(s.epoch for s in before)
    entries = [e for s, st in enumerate(before) for e in _unread(st, s, old, count, tag, last)]
    entries.sort(key=lambda e: e[0])  # stable: by epoch, then the old streams' order
    out = {}
    for k in range(new):
        mine = entries[k::new]
        skip = mine[0][4] if mine and mine[0][0] == first else 0
        out[k] = StreamState(epoch=first, sample_pos=skip, pending=mine, replay_until=last)
    return out


def merged_counters(counters: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    """Old streams' counters carried over: summed into new stream 0 (the first rank's, which
    logs them), so that no skipped sample is forgotten or counted twice."""
    total: Counter = Counter()
    for c in counters.values():
        total.update(c)
    return {0: dict(total)} if total else {}
