"""Shards -> Flamingo batches, deterministically, resumably, and robust to bad samples.

Every (rank, worker) pair reads its own **stream** of shards: in epoch mode stream ``s`` of
``S`` takes every S-th shard of a seeded per-epoch permutation (disjoint, split by node and
worker); in resampled mode it draws shards with replacement from a seeded generator, forever.
Within a shard a seeded shuffle buffer mixes samples; augmentation randomness is seeded per
sample. A stream's position is ``(epoch, shard_pos, sample_pos)``, so a restored loader
re-reads at most one shard (without decoding) and then gives exactly the batches an
uninterrupted loader would have given.

Flamingo's preprocessing (paper, App. A.1): ``<image>`` before each image's text and
``<|endofchunk|>`` after it; interleaved documents tie text to the next image with
``p_next_image``, then take a random ``seq_len``-token window holding at most ``max_images``
images (images outside it are dropped and never decoded past validation); captions get a
leading space with ``p_leading_space``; images are resized keeping aspect ratio and padded with
the mean colour, and flipped per sample.

Bad samples raise ``SkipSample`` and are counted by reason (``stats()``); an image that fails
inside an interleaved document is dropped together with its ``<image>``. A stream whose skip
rate exceeds ``max_skip_rate`` stops the run with an error naming the shard.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flamingo.config import DatasetConfig
from flamingo.data.images import ImagePreprocessor, decode_image
from flamingo.data.schema import (
    DECODERS,
    InterleavedSample,
    PairSample,
    SkipSample,
    VideoSample,
)
from flamingo.data.shards import ShardError, expand_shards, read_shard
from flamingo.tokens import END_OF_CHUNK, IMAGE, SpecialTokens

log = logging.getLogger("flamingo.data")


@dataclass
class StreamState:
    """Where one stream stands: resume from here."""

    epoch: int = 0
    shard_pos: int = 0
    """Index into the epoch's shard order (epoch mode) or number of shards drawn (resampled)."""
    sample_pos: int = 0
    """Raw samples already taken from the current shard (after shuffling)."""


# -- per-kind preprocessing -----------------------------------------------------------------


class Preprocessor:
    """Raw shard sample -> (input_ids, pixel_values (N, F, C, H, W)) for one dataset."""

    def __init__(
        self, cfg: DatasetConfig, tokenizer: Any, special: SpecialTokens, images: ImagePreprocessor
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.special = special
        self.images = images
        self.eos = tokenizer.eos_token or ""
        self.markers = special_strings(tokenizer)

    def __call__(
        self, raw: dict, rng: random.Random, counters: Counter
    ) -> tuple[list[int], torch.Tensor]:
        sample = DECODERS[self.cfg.kind](raw, self.cfg.max_text_chars)
        if isinstance(sample, PairSample):
            return self._caption(sample.caption, [sample.image], rng, counters)
        if isinstance(sample, VideoSample):
            return self._caption(sample.caption, self._pick_frames(sample.frames), rng, counters)
        return self._interleaved(sample, rng, counters)

    def _decode(self, data: bytes, counters: Counter):
        return decode_image(data, self.cfg.max_image_pixels, counters)[0]

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def clean(self, text: str, counters: Counter) -> str:
        """Data text may hold special-token strings literally (``<image>``, ``<PAD>``, the
        LM's ``</s>`` or ``<|endoftext|>``): removed, so that only the markers we place
        become special tokens."""
        cleaned = strip_markers(text, self.markers)
        if cleaned != text:
            counters["text_markers_removed"] += 1
        return cleaned.strip()

    def _pick_frames(self, frames: list[bytes]) -> list[bytes]:
        n, want = len(frames), self.cfg.num_frames
        if n < want:
            raise SkipSample("too_few_frames", f"{n} < num_frames={want}")
        return [frames[round(i * (n - 1) / max(want - 1, 1))] for i in range(want)]

    def _caption(self, caption: str, frames: list[bytes], rng: random.Random, counters: Counter):
        """Pairs and video: ``<image>[ ]caption<|endofchunk|><eos>``, one media item."""
        space = " " if rng.random() < self.cfg.p_leading_space else ""
        text = self.clean(caption, counters)
        ids = self._tokens(f"{IMAGE}{space}{text}{END_OF_CHUNK}{self.eos}")
        self._check_markers(ids, 1)
        ids = ids[: self.cfg.seq_len]
        if self.special.image_id not in ids:  # a BOS-heavy tokenizer and a tiny seq_len
            raise SkipSample("no_images", "the <image> token fell outside seq_len")
        flip = rng.random() < self.cfg.p_flip  # one decision per clip: frames stay consistent
        pixels = torch.stack([self.images(self._decode(f, counters), flip) for f in frames])
        return ids, pixels[None]  # (N=1, F, C, H, W)

    def _interleaved(self, doc: InterleavedSample, rng: random.Random, counters: Counter):
        # Validate every image first: a bad one is dropped with its <image> (meaning kept).
        chunks: list[str | Any] = []
        for chunk in doc.chunks:
            if isinstance(chunk, str):
                chunks.append(self.clean(chunk, counters))
                continue
            try:
                chunks.append(self._decode(chunk, counters))
            except SkipSample as e:
                counters[f"image_dropped/{e.reason}"] += 1
        images = [c for c in chunks if not isinstance(c, str)]
        if not images:
            raise SkipSample("no_images", "every image of the document failed to decode")
        text = self._render(chunks, tie_next=rng.random() < self.cfg.p_next_image)
        ids = self._tokens(text + self.eos)
        self._check_markers(ids, len(images))
        ids, kept = self._window(ids, rng)
        pixels = torch.stack([self.images(images[k], rng.random() < self.cfg.p_flip) for k in kept])
        return ids, pixels[:, None]  # (N, F=1, C, H, W)

    def _check_markers(self, ids: list[int], images: int) -> None:
        """One ``<image>`` token per image: the last line of defence behind :meth:`clean`
        (a mismatch would fail the model's forward or index past the images)."""
        found = ids.count(self.special.image_id)
        if found != images:
            raise SkipSample("marker_mismatch", f"{found} <image> tokens for {images} images")

    @staticmethod
    def _render(chunks: list, tie_next: bool) -> str:
        """Chunks in document order (text already cleaned) -> text with ``<image>`` and
        ``<|endofchunk|>`` markers.

        Text between two images belongs to the earlier one (the image precedes its text), or,
        with ``tie_next``, to the later one (the text precedes its image).
        """
        segments: list[list] = [[None, []]]  # [image or None, texts]
        for chunk in chunks:
            if isinstance(chunk, str):
                segments[-1][1].append(chunk)
            elif tie_next:
                segments[-1][0] = chunk
                segments.append([None, []])
            else:
                segments.append([chunk, []])
        parts = []
        for image, texts in segments:
            text = " ".join(t for t in texts if t)
            if image is None:
                parts.append(text)
            else:
                parts.append(f"{IMAGE}{text}{END_OF_CHUNK}")
        return " ".join(p for p in parts if p).replace(f" {IMAGE}", IMAGE)

    def _window(self, ids: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
        """A random seq_len window with 1..max_images images; returns (ids, kept image indices)."""
        image_id, length = self.special.image_id, self.cfg.seq_len
        markers = [i for i, t in enumerate(ids) if t == image_id]
        start = rng.randint(0, max(0, len(ids) - length))
        if not any(start <= m < start + length for m in markers):
            after = [m for m in markers if m >= start]
            start = min(after[0] if after else markers[-1], max(0, len(ids) - length))
        end = min(start + length, len(ids))
        inside = [k for k, m in enumerate(markers) if start <= m < end]
        if len(inside) > self.cfg.max_images:
            end = markers[inside[self.cfg.max_images]]
            inside = inside[: self.cfg.max_images]
        return ids[start:end], inside


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every string the tokenizer turns into a special token, longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", []))
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    found |= {IMAGE, END_OF_CHUNK}
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


def strip_markers(text: str, markers: tuple[str, ...] = (IMAGE, END_OF_CHUNK)) -> str:
    """Remove every marker string, again and again until none is left: one pass would turn
    ``<ima<image>ge>`` into ``<image>``."""
    while True:
        cleaned = text
        for marker in markers:
            cleaned = cleaned.replace(marker, "")
        if cleaned == text:
            return text
        text = cleaned


def collate(
    samples: list[tuple[str, list[int], torch.Tensor]], pad_id: int, name: str
) -> dict[str, Any]:
    """Right-padded ids and mask (B, T); zero-filled pixel_values (B, N, F, C, H, W)."""
    width = max(len(ids) for _, ids, _ in samples)
    num_media = max(p.shape[0] for _, _, p in samples)
    frames, c, h, w = samples[0][2].shape[1:]
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    pixels = torch.zeros((len(samples), num_media, frames, c, h, w))
    for b, (_, ids, pix) in enumerate(samples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        pixels[b, : pix.shape[0]] = pix
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "keys": [k for k, _, _ in samples],
        "dataset": name,
    }


# -- streams --------------------------------------------------------------------------------


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
        self.state = state
        self.counters: Counter = Counter(counters or {})
        self._shard_errors = 0

    def _epoch_shards(self, epoch: int) -> list[str]:
        order = list(self.urls)
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        return order[self.stream_id :: self.num_streams]

    def _next_shard(self) -> str | None:
        if self.cfg.resampled:
            return random.Random(
                f"{self.seed}/draw/{self.stream_id}/{self.state.shard_pos}"
            ).choice(self.urls)
        shards = self._epoch_shards(self.state.epoch)
        return shards[self.state.shard_pos] if self.state.shard_pos < len(shards) else None

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

    def _shuffled(self, url: str) -> Iterator[dict]:
        """The shard's raw samples through a seeded shuffle buffer (deterministic)."""
        if self.cfg.shuffle_buffer == 0:
            yield from self._read(url)
            return
        rng = random.Random(
            f"{self.seed}/buffer/{self.stream_id}/{self.state.epoch}/{self.state.shard_pos}"
        )
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

    def __iter__(self) -> Iterator[tuple[dict[str, Any], StreamState, Counter]]:
        pending: list[tuple[str, list[int], torch.Tensor]] = []
        while True:
            url = self._next_shard()
            if url is None:  # epoch mode: this stream's share of the epoch is done
                self.state = StreamState(epoch=self.state.epoch + 1)
                # the last partial batch, or None: either way the final state and counters
                last = collate(pending, self.pad_id, self.cfg.name) if pending else None
                yield last, StreamState(**asdict(self.state)), self.counters
                return
            skip = self.state.sample_pos
            for i, raw in enumerate(self._shuffled(url)):
                if i < skip:
                    continue  # already delivered before a restore
                self.state.sample_pos = i + 1
                item = self._process(raw, url)
                if item is not None:
                    pending.append(item)
                if len(pending) == self.cfg.batch_size:
                    batch = collate(pending, self.pad_id, self.cfg.name)
                    pending = []
                    yield batch, StreamState(**asdict(self.state)), self.counters
            self.state = StreamState(epoch=self.state.epoch, shard_pos=self.state.shard_pos + 1)

    def _process(self, raw: dict, url: str):
        counters = self.counters
        counters["seen"] += 1
        key = raw.get("__key__", "?")
        rng = random.Random(
            f"{self.seed}/sample/{self._shard_index[url]}/{key}/{self.state.epoch}/"
            f"{self.state.shard_pos}"
        )
        try:
            ids, pixels = self.preprocess(raw, rng, counters)
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
        return key, ids, pixels

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
    ) -> None:
        self.cfg = cfg
        self.urls = expand_shards(cfg.shards)
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
        return cls(cfg, processor.tokenizer, processor.special_tokens, images, **kwargs)

    def make_stream(
        self, stream_id: int, state: StreamState, counters: dict | None = None
    ) -> ShardStream:
        preprocess = Preprocessor(self.cfg, self.tokenizer, self.special, self.images)
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
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
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

    def state_dict(self) -> dict[str, Any]:
        return {
            "streams": {str(k): asdict(v) for k, v in self._states.items()},
            "next_worker": self._next_local,
            "counters": {str(k): v for k, v in self._counters.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._states = {int(k): StreamState(**v) for k, v in state["streams"].items()}
        self._next_local = int(state["next_worker"])
        self._counters = {int(k): dict(v) for k, v in state.get("counters", {}).items()}
