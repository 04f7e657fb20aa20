"""Shards -> Flamingo batches, deterministically, resumably, and robust to bad samples.

Every (rank, worker) pair reads its own **stream** of shards: in epoch mode stream ``s`` of
``S`` takes every S-th shard of a seeded per-epoch permutation (disjoint, split by node and
worker); in resampled mode it draws shards with replacement from a seeded generator, forever.
Within a shard a seeded shuffle buffer mixes samples; augmentation randomness is seeded per
sample. A stream's position is ``(epoch, shard_pos, sample_pos)``, so a restored loader
re-reads at most one shard (without decoding) and then gives exactly the batches an
uninterrupted loader would have given.

What a sample becomes (the paper's preprocessing) is :mod:`flamingo.data.preprocess`; this
module only moves samples: which shard, which position, which worker, which batch.

Bad samples raise ``SkipSample`` and are counted by reason (``stats()``). A stream whose skip
rate exceeds ``max_skip_rate`` stops the run with an error naming the shard.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flamingo.data.config import DatasetConfig
from flamingo.data.images import ImagePreprocessor
from flamingo.data.preprocess import Item, Preprocessor, collate, collate_packed
from flamingo.data.reshard import StreamState, epoch_order, merged_counters, reshard
from flamingo.data.schema import SkipSample
from flamingo.data.shards import ShardError, expand_shards, read_shard
from flamingo.tokens import SpecialTokens

log = logging.getLogger("flamingo.data")


# -- streams --------------------------------------------------------------------------------


def pack_rows(items: list[Item], length: int) -> list[list[Item]]:
    """Best-fit decreasing: the longest sample first, each into the fullest row that still has
    room for it, else a new row of ``length`` tokens. Rows keep their samples in stream order."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        size = len(items[i][1])
        fits = [r for r in range(len(rows)) if room[r] >= size]
        if fits:
            r = min(fits, key=lambda r: room[r])
            rows[r].append(i)
            room[r] -= size
        else:
            rows.append([i])
            room.append(length - size)
    return [[items[i] for i in sorted(row)] for row in rows]


class ShardStream:
    """One deterministic stream of batches from the shards assigned to stream ``stream_id``."""

    def __init__(
        self,
        cfg: DatasetConfig,
        urls: list[str],
        preprocess: Preprocessor,
        pad_id: int,
        seed: int,
        stream_id: int,
        num_streams: int,
        state: StreamState,
        counters: dict[str, int] | None = None,
    ) -> None:
        self.cfg, self.urls, self.preprocess, self.pad_id = cfg, urls, preprocess, pad_id
        # per-sample randomness is seeded by the shard's place in the list, not its path, so the
        # same shards read from another directory give the same batches
        self._shard_index = {url: i for i, url in enumerate(urls)}
        self.seed, self.stream_id, self.num_streams = seed, stream_id, num_streams
        self.tag = f"{seed}/{cfg.name}"  # every seed names the dataset: two differ
        self.state = state
        self.counters: Counter = Counter(counters or {})
        self._shard_errors = 0

    def _current(self) -> tuple[str, int, int] | None:
        """The shard to read now, with the stream and position that seed its shuffle; None
        at the end of this stream's share of its epoch."""
        st = self.state
        if st.epoch <= st.replay_until:  # after a change of streams: the pending shards
            if not st.pending or st.pending[0][0] != st.epoch:
                return None
            _, index, stream, pos, _ = st.pending[0]
            return self.urls[index], stream, pos
        if self.cfg.resampled:
            draw = random.Random(f"{self.tag}/draw/{self.stream_id}/{st.shard_pos}")
            return draw.choice(self.urls), self.stream_id, st.shard_pos
        share = epoch_order(self.tag, len(self.urls), st.epoch)[self.stream_id :: self.num_streams]
        if st.shard_pos >= len(share):
            return None
        return self.urls[share[st.shard_pos]], self.stream_id, st.shard_pos

    def _next_shard_state(self) -> StreamState:
        st = self.state
        if st.epoch > st.replay_until:
            return StreamState(epoch=st.epoch, shard_pos=st.shard_pos + 1)
        rest = st.pending[1:]
        skip = rest[0][4] if rest and rest[0][0] == st.epoch else 0
        return StreamState(st.epoch, sample_pos=skip, pending=rest, replay_until=st.replay_until)

    def _next_epoch_state(self) -> StreamState:
        st, epoch = self.state, self.state.epoch + 1
        if epoch > st.replay_until:
            return StreamState(epoch=epoch)
        skip = st.pending[0][4] if st.pending and st.pending[0][0] == epoch else 0
        return StreamState(epoch, sample_pos=skip, pending=st.pending, replay_until=st.replay_until)

    def _read(self, url: str) -> Iterator[dict]:
        """Raw samples of a shard; an unreadable or truncated tar ends it (counted, logged)."""
        samples = read_shard(url)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except Exception as e:  # ShardError (damaged tar), OSError (cannot open), ...
                self.counters["shard_error"] += 1
                if isinstance(e, ShardError) and e.partial is not None:
                    self.counters["seen"] += 1  # the sample the damage cut off
                    self.counters["skip/truncated_sample"] += 1
                self._shard_errors += 1
                log.warning(
                    "dataset %s: skipping the rest of shard %s: %s: %s",
                    self.cfg.name,
                    url,
                    type(e).__name__,
                    e,
                )
                if self._shard_errors >= 2 * len(self.urls) and self.counters["seen"] == 0:
                    raise RuntimeError(
                        f"dataset {self.cfg.name}: no shard could be read (last: {url}: {e}); "
                        f"check the shard paths {self.cfg.shards!r}"
                    ) from e
                return
            yield sample

    def _shuffled(self, url: str, stream: int, pos: int) -> Iterator[dict]:
        """The shard's raw samples through a shuffle buffer seeded by the stream that reads it
        and its place in that stream's share (deterministic)."""
        if self.cfg.shuffle_buffer == 0:
            yield from self._read(url)
            return
        rng = random.Random(f"{self.tag}/buffer/{stream}/{self.state.epoch}/{pos}")
        buffer: list[dict] = []
        for sample in self._read(url):
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _items(self) -> Iterator[tuple[Any, StreamState]]:
        """Processed samples, each with the state just before it (resuming there reads it
        again); at the end of an epoch-mode pass, ``(None, the final state)``."""
        while True:
            current = self._current()
            if current is None:  # epoch mode: this stream's share of the epoch is done
                self.state = self._next_epoch_state()
                yield None, self._copy()
                return
            url, stream, pos = current
            skip = self.state.sample_pos
            for i, raw in enumerate(self._shuffled(url, stream, pos)):
                if i < skip:
                    continue  # already delivered before a restore
                before = self._copy()
                self.state.sample_pos = i + 1
                item = self._process(raw, url, pos)
                if item is not None:
                    yield item, before
            self.state = self._next_shard_state()

    def _copy(self) -> StreamState:
        state = asdict(self.state)
        return StreamState(**{**state, "pending": [list(e) for e in state["pending"]]})

    def __iter__(self) -> Iterator[tuple[dict[str, Any], StreamState, Counter]]:
        if self.cfg.packing != "none":
            yield from self._packed()
            return
        pending: list[Item] = []
        for item, final in self._items():
            if item is None:  # the last partial batch, or None: either way the final state
                last = collate(pending, self.pad_id, self.cfg.name) if pending else None
                yield last, final, self.counters
                return
            pending.append(item)
            if len(pending) == self.cfg.batch_size:
                batch = collate(pending, self.pad_id, self.cfg.name)
                pending = []
                yield batch, self._copy(), self.counters

    def _packed(self) -> Iterator[tuple[dict[str, Any], StreamState, Counter]]:
        """Packed batches: ``pack_window`` samples at a time are packed into rows of
        ``packed_len`` tokens (:func:`pack_rows`), the rows shuffled (seeded by where the window
        starts) and delivered ``batch_size`` at a time (the window's last batch may have fewer).
        A batch's state is the window's start and how many of its batches were delivered, so
        a resumed run reads the window again, packs it the same way and goes on from there."""
        skip, self.state.window_batches = self.state.window_batches, 0
        items = self._items()
        while True:
            start = self._copy()
            # a batch inside the window resumes by reading the window again from its start:
            # it carries the counters of that start, so the window's skips count once
            start_counters = Counter(self.counters)
            window: list[Item] = []
            final = None
            for item, before in items:
                if item is None:
                    final = before
                    break
                window.append(item)
                if len(window) == self.cfg.pack_window:
                    break
            rows = pack_rows(window, self.cfg.row_len)
            random.Random(
                f"{self.tag}/pack/{self.stream_id}/{start.epoch}/{start.shard_pos}/"
                f"{start.sample_pos}/{len(start.pending)}"
            ).shuffle(rows)
            size = self.cfg.batch_size
            groups = [rows[i : i + size] for i in range(0, len(rows), size)]
            for g in range(skip, len(groups)):
                done = g + 1 == len(groups)
                state = self._copy() if done else replace(start, window_batches=g + 1)
                counters = self.counters if done else start_counters
                yield collate_packed(groups[g], self.pad_id, self.cfg.name), state, counters
            skip = 0
            if final is not None:
                yield None, final, self.counters
                return

    def _process(self, raw: dict, url: str, pos: int):
        counters = self.counters
        counters["seen"] += 1
        key = raw.get("__key__", "?")
        rng = random.Random(
            f"{self.tag}/sample/{self._shard_index[url]}/{key}/{self.state.epoch}/{pos}"
        )
        try:
            ids, pixels, targets, ratios = self.preprocess(raw, rng, counters)
        except SkipSample as e:
            counters[f"skip/{e.reason}"] += 1
            if counters[f"skip/{e.reason}"] == 1:
                log.warning(
                    "dataset %s: skipped sample %s of %s: %s (later ones of this kind are only counted)",
                    self.cfg.name,
                    key,
                    url,
                    e,
                )
            self._check_skip_rate(url)
            return None
        counters["ok"] += 1
        return key, ids, pixels, targets, ratios

    def _check_skip_rate(self, url: str) -> None:
        seen = self.counters["seen"]
        skipped = seen - self.counters["ok"]
        if seen >= self.cfg.min_samples_for_skip_rate and skipped / seen > self.cfg.max_skip_rate:
            reasons = {k: v for k, v in self.counters.items() if k.startswith("skip/")}
            raise RuntimeError(
                f"dataset {self.cfg.name}: {skipped}/{seen} samples skipped, more than "
                f"max_skip_rate={self.cfg.max_skip_rate}; current shard {url}; reasons {reasons}"
            )


class _StreamsDataset(IterableDataset):
    """Each DataLoader worker runs one stream; batches carry the stream's state."""

    def __init__(
        self,
        loader: FlamingoLoader,
        states: dict[int, StreamState],
        counters: dict[int, dict],
        offset: int,
    ) -> None:
        self.loader, self.states, self.counters, self.offset = loader, states, counters, offset

    def __iter__(self):
        info = get_worker_info()
        workers = self.loader.num_workers or 1
        local = ((info.id if info else 0) + self.offset) % workers
        stream_id = self.loader.rank * workers + local
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        state = self.states.get(stream_id, StreamState())
        stream = self.loader.make_stream(stream_id, state, self.counters.get(stream_id))
        for batch, state, counters in stream:
            yield batch, local, state, dict(counters)


class FlamingoLoader:
    """Batches of one dataset, split across ranks and workers, with ``state_dict`` for resume."""

    def __init__(
        self,
        cfg: DatasetConfig,
        tokenizer: Any,
        special: SpecialTokens,
        images: ImagePreprocessor,
        seed: int = 0,
        num_workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        image_tokens: int = 1,
        images_before_bos: bool = False,
    ) -> None:
        self.cfg = cfg
        self.urls = expand_shards(cfg.shards)
        self.image_tokens = image_tokens  # <image> tokens per image (the processor's)
        self.images_before_bos = images_before_bos  # the processor's prompt order
        self.pin_memory = pin_memory
        """Batches arrive in page-locked memory, so that copies to a CUDA device can be
        asynchronous (``non_blocking``); the trainer sets it when its engine is on CUDA."""
        self.tokenizer, self.special, self.images = tokenizer, special, images
        self.seed, self.num_workers = seed, num_workers
        self.rank, self.world_size = rank, world_size  # the engine's, passed by the trainer
        num_streams = self.world_size * (num_workers or 1)
        if not cfg.resampled and len(self.urls) < num_streams:
            raise ValueError(
                f"dataset {cfg.name}: {len(self.urls)} shards cannot be split over {num_streams} "
                "streams (ranks x workers) in epoch mode: write more, smaller shards, use fewer "
                "workers, or set resampled: true"
            )
        self._states: dict[int, StreamState] = {}
        self._counters: dict[int, dict[str, int]] = {}
        self._next_local = 0

    @classmethod
    def from_processor(cls, cfg: DatasetConfig, processor: Any, **kwargs: Any) -> FlamingoLoader:
        images = ImagePreprocessor(processor.vision_cfg)
        kwargs.setdefault("image_tokens", processor.image_tokens)
        kwargs.setdefault("images_before_bos", processor.images_before_bos)
        return cls(cfg, processor.tokenizer, processor.special_tokens, images, **kwargs)

    def make_stream(
        self, stream_id: int, state: StreamState, counters: dict | None = None
    ) -> ShardStream:
        preprocess = Preprocessor(
            self.cfg,
            self.tokenizer,
            self.special,
            self.images,
            self.image_tokens,
            self.images_before_bos,
        )
        num_streams = self.world_size * (self.num_workers or 1)
        return ShardStream(
            self.cfg,
            self.urls,
            preprocess,
            self.special.pad_id,
            self.seed,
            stream_id,
            num_streams,
            state,
            counters,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _StreamsDataset(self, dict(self._states), dict(self._counters), self._next_local)
        # Opening a DataLoader's iterator draws its workers' base seed from its generator: by
        # default torch's global one, which the model's dropout and sampling also read. A
        # resumed run opens its iterators at another point of that stream than the run it
        # continues, so every later draw would shift; a generator of the loader's own keeps
        # the global stream to the model (every randomness of the streams is seeded above).
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
        )
        workers = self.num_workers or 1
        for batch, local, state, counters in loader:
            stream_id = self.rank * workers + local
            self._states[stream_id] = state
            self._counters[stream_id] = counters
            self._next_local = (local + 1) % workers
            if batch is not None:
                yield batch

    @property
    def epoch(self) -> int:
        """The epoch this rank's streams are in (the earliest of them)."""
        return min((s.epoch for s in self._states.values()), default=0)

    def stats(self) -> Counter:
        """Counters summed over this rank's streams: seen, ok, skip/<reason>, image_mode/..."""
        total: Counter = Counter()
        for counters in self._counters.values():
            total.update(counters)
        return total

    @property
    def num_streams(self) -> int:
        return self.world_size * (self.num_workers or 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "streams": {str(k): asdict(v) for k, v in self._states.items()},
            "next_worker": self._next_local,
            "counters": {str(k): v for k, v in self._counters.items()},
            "num_streams": self.num_streams,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: this loader's own, or, after a change of the number of streams
        (ranks x workers), the merged positions of every old rank (:func:`merge_states`),
        carried over by :func:`flamingo.data.reshard.reshard`."""
        states = {int(k): StreamState(**v) for k, v in state["streams"].items()}
        counters = {int(k): dict(v) for k, v in state.get("counters", {}).items()}
        old = int(state.get("num_streams", self.num_streams))
        if old != self.num_streams:
            tag = f"{self.seed}/{self.cfg.name}"
            states = reshard(states, old, self.num_streams, len(self.urls), tag, self.cfg.resampled)
            counters = merged_counters(counters)
            log.warning(
                "dataset %s: the position of %d streams carried over to %d (%s)",
                self.cfg.name,
                old,
                self.num_streams,
                "fresh shard draws" if self.cfg.resampled else "the unread shards dealt anew",
            )
            self._next_local = 0
        else:
            self._next_local = int(state["next_worker"])
        mine = range(self.rank * (self.num_workers or 1), (self.rank + 1) * (self.num_workers or 1))
        self._states = {k: v for k, v in states.items() if k in mine or old == self.num_streams}
        self._counters = {k: v for k, v in counters.items() if k in mine or old == self.num_streams}


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The loader states of every rank of a run, as one (for :meth:`FlamingoLoader.load_state_dict`
    on another number of ranks)."""
    merged: dict[str, Any] = {"streams": {}, "counters": {}, "next_worker": 0}
    for state in states:
        merged["streams"].update(state["streams"])
        merged["counters"].update(state.get("counters", {}))
        merged["num_streams"] = state.get("num_streams")
    return merged
