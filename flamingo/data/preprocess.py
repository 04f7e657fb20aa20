"""What one shard sample becomes: Flamingo's preprocessing (paper, App. A.1), and batching.

``<image>`` goes before each image's text and ``<|endofchunk|>`` after it; interleaved
documents tie text to the next image with ``p_next_image``, then take a random
``seq_len``-token window holding at most ``max_images`` images (images outside it are dropped
and never decoded past validation); captions get a leading space with ``p_leading_space``;
images are resized as at inference (``vision.resize``) and flipped per sample. Special-token
strings found in the data's text are removed, so only the markers placed here become special
tokens. Bad samples raise ``SkipSample``; an image that fails inside an interleaved document is
dropped together with its ``<image>``. Where samples come from is :mod:`flamingo.data.pipeline`.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import torch

from flamingo.chat import render, target_tokens
from flamingo.data.config import DatasetConfig
from flamingo.data.images import ImagePreprocessor, decode_image
from flamingo.data.schema import (
    DECODERS,
    ConversationSample,
    InterleavedSample,
    PairSample,
    SkipSample,
    VideoSample,
)
from flamingo.media import media_slots
from flamingo.tokens import (
    END_OF_CHUNK,
    IMAGE,
    MLLAMA_IMAGE,
    SpecialTokens,
    chunk_ends,
    encode,
    expand_images,
    idefics_prompt,
    mllama_prompt,
)

Processed = tuple[list[int], torch.Tensor, list[bool] | None, torch.Tensor | None]
Item = tuple[str, list[int], torch.Tensor, list[bool] | None, torch.Tensor | None]
"""A preprocessed sample with its key, as the loader batches it."""
"""A sample's token ids, its uint8 pixels (N, F, C, H, W) (a tiled tower's tiles for F), which
tokens are targets (conversations: the assistant's replies; None: the default rule,
``flamingo.losses``), and a tiled tower's aspect-ratio ids (N,) (None for other towers)."""


class Preprocessor:
    """Raw shard sample -> (input_ids, pixel_values (N, F, C, H, W), targets, aspect-ratio ids)
    for one dataset."""

    def __init__(
        self,
        cfg: DatasetConfig,
        tokenizer: Any,
        special: SpecialTokens,
        images: ImagePreprocessor,
        image_tokens: int = 1,
        images_before_bos: bool = False,
    ):
        self.cfg = cfg
        self.images_before_bos = images_before_bos
        """The processor's rule for images that open a text (:func:`flamingo.tokens.encode`)."""
        self.tokenizer = tokenizer
        self.special = special
        self.images = images
        self.image_tokens = image_tokens
        """``<image>`` tokens per image (the LLaVA connector: one per token of the image),
        written after the ``seq_len`` window is taken: ``seq_len`` counts an image once."""
        self.eos = tokenizer.eos_token or ""
        if special.end_of_chunk_id == special.eos_id:
            self.eos = ""  # a chunk ends on the eos (IDEFICS without <end_of_utterance>, LLaVA)
        self.markers = special_strings(tokenizer)
        if cfg.kind == "conversation" and special.around_image_id is not None:
            raise ValueError(
                f"dataset {cfg.name}: conversations are written in a chat template "
                "(flamingo.chat), not in IDEFICS's prompt form (lm.special_tokens: idefics)"
            )

    def __call__(self, raw: dict, rng: random.Random, counters: Counter) -> Processed:
        sample = DECODERS[self.cfg.kind](raw, self.cfg.max_text_chars)
        if isinstance(sample, PairSample):
            return self._caption(sample.caption, [sample.image], rng, counters)
        if isinstance(sample, VideoSample):
            return self._caption(sample.caption, self._pick_frames(sample.frames), rng, counters)
        if isinstance(sample, ConversationSample):
            return self._conversation(sample, rng, counters)
        return self._interleaved(sample, rng, counters)

    def _decode(self, data: bytes, counters: Counter):
        return decode_image(data, self.cfg.max_image_pixels, counters)[0]

    def _tokens(self, text: str) -> list[int]:
        if self.special.around_image_id is not None:  # lm.special_tokens: idefics
            text = idefics_prompt(text, self.tokenizer, self.special)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.special.image_text == MLLAMA_IMAGE:  # lm.special_tokens: mllama, its form
            text = mllama_prompt(chunk_ends(text, self.tokenizer, self.special), self.tokenizer)
            return self.tokenizer(text)["input_ids"]
        return encode(
            self.tokenizer, chunk_ends(text, self.tokenizer, self.special), self.images_before_bos
        )

    def _expanded(self, ids: list[int]) -> list[int]:
        return expand_images(ids, self.special.image_id, self.image_tokens)

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
        media = [self.images.media(self._decode(f, counters), flip) for f in frames]
        pixels = torch.cat([m for m, _ in media])  # (F, C, H, W): frames, or one image's tiles
        return self._expanded(ids), pixels[None], None, _ratios(media[:1])  # (N=1, F, C, H, W)

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
        media = [self.images.media(images[k], rng.random() < self.cfg.p_flip) for k in kept]
        pixels = torch.stack([m for m, _ in media])  # (N, F, C, H, W): F=1, or tiles
        return self._expanded(ids), pixels, None, _ratios(media)

    def _conversation(self, sample: ConversationSample, rng: random.Random, counters: Counter):
        """A conversation in the dataset's template, the assistant's replies its targets
        (:mod:`flamingo.chat`), cut to ``seq_len``; its image (if any) opens it."""
        turns = [{**t, "text": self.clean(t["text"], counters)} for t in sample.turns]
        eos = self.tokenizer.eos_token or ""
        has_image = sample.image is not None
        text, spans = render(turns, self.cfg.template, eos, has_image)
        ids, targets = target_tokens(self.tokenizer, text, spans)
        self._check_markers(ids, int(has_image))
        ids, targets = ids[: self.cfg.seq_len], targets[: self.cfg.seq_len]
        if has_image and self.special.image_id not in ids:
            raise SkipSample("no_images", "the <image> token fell outside seq_len")
        if not any(targets[1:]):
            raise SkipSample("no_targets", "no assistant reply within seq_len")
        size = self.images.cfg.image_size
        frames = self.images.tower.frames()
        pixels, ratios = torch.zeros(0, frames, 3, size, size, dtype=torch.uint8), None
        if has_image:
            flip = rng.random() < self.cfg.p_flip
            media = self.images.media(self._decode(sample.image, counters), flip)
            pixels, ratios = media[0][None], _ratios([media])
        runs = [self.image_tokens if t == self.special.image_id else 1 for t in ids]
        expanded = [target for target, n in zip(targets, runs, strict=True) for _ in range(n)]
        return self._expanded(ids), pixels, expanded, ratios

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


def _targets(samples: list[Item], width: int, rows: list[list[Item]] | None = None):
    """``targets (B, T)`` of samples that say which tokens are targets (conversations), laid
    out as their ids are; None when none do (the default rule of ``flamingo.losses``)."""
    if all(s[3] is None for s in samples):
        return None
    rows = rows if rows is not None else [[s] for s in samples]
    out = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        at = 0
        for _, ids, _, targets, _ in row:
            out[b, at : at + len(ids)] = torch.tensor(
                targets if targets is not None else [True] * len(ids)
            )
            at += len(ids)
    return out


def _ratios(media: list[tuple[torch.Tensor, int | None]]) -> torch.Tensor | None:
    """The aspect-ratio ids (N,) of a sample's media (a tiled tower's), else None."""
    if not media or media[0][1] is None:
        return None
    return torch.tensor([r for _, r in media], dtype=torch.long)


def media_of(samples: list[Item], rows: list[list[Item]]) -> dict[str, torch.Tensor]:
    """The samples' media flat, in order: ``pixel_values (M, F, C, H, W)``, ``media_slots
    (B, N)`` for ``rows`` (the samples of each row), and a tiled tower's ``aspect_ratio_ids
    (M,)``."""
    batch = {
        "pixel_values": torch.cat([s[2] for s in samples]),
        "media_slots": media_slots([sum(s[2].shape[0] for s in row) for row in rows]),
    }
    ratios = [s[4] for s in samples if s[4] is not None]
    if ratios:
        batch["aspect_ratio_ids"] = torch.cat(ratios)
    return batch


def collate(samples: list[Item], pad_id: int, name: str) -> dict[str, Any]:
    """Right-padded ids and mask (B, T); the samples' media flat, in order, as uint8
    ``pixel_values (M, F, C, H, W)`` with ``media_slots (B, N)`` (``Flamingo.encode_media``):
    no padding image is ever decoded, shipped or encoded. Conversations add ``targets (B, T)``."""
    width = max(len(ids) for _, ids, _, _, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, (_, ids, _, _, _) in enumerate(samples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        **media_of(samples, [[s] for s in samples]),
        "keys": [s[0] for s in samples],
        "dataset": name,
    }
    targets = _targets(samples, width)
    if targets is not None:
        batch["targets"] = targets
    return batch


def collate_packed(rows: list[list[Item]], pad_id: int, name: str) -> dict[str, Any]:
    """Packed rows (several samples each, :mod:`flamingo.packing`): their ids concatenated and
    right-padded (B, T), ``document_ids (B, T)`` (each sample of a row numbered in order;
    padding takes the next number), and the media flat as in :func:`collate`."""
    width = max(sum(len(s[1]) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    documents = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d, (_, ids, _, _, _) in enumerate(row):
            input_ids[b, at : at + len(ids)] = torch.tensor(ids)
            documents[b, at : at + len(ids)] = d
            at += len(ids)
        mask[b, :at] = 1
        documents[b, at:] = len(row)
    samples = [sample for row in rows for sample in row]
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "document_ids": documents,
        **media_of(samples, rows),
        "keys": [s[0] for s in samples],
        "dataset": name,
    }
    targets = _targets(samples, width, rows)
    if targets is not None:
        batch["targets"] = targets
    return batch
