"""The flat media layout: a batch's real media items in one list, and where each sequence's
items are in it (ARCHITECTURE.md, tensor glossary).

``pixel_values (M, F, C, H, W)`` holds the batch's M real media, sequence by sequence;
``media_slots (B, N)`` says where sequence b's n-th item is among them (-1: none). The
processor and the training loader make the slots (:func:`media_slots`); the model encodes the
M real items only and puts each item's output in its sequence's slot (:func:`place_in_slots`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def media_slots(counts: Sequence[int]) -> torch.Tensor:
    """``media_slots (B, N)`` of a flat media list holding ``counts[b]`` items of sequence b,
    in order: row b is ``offset_b, offset_b + 1, ...`` then -1 up to N = max(counts)."""
    width = max(counts, default=0)
    slots = torch.full((len(counts), width), -1, dtype=torch.long)
    start = 0
    for b, n in enumerate(counts):
        slots[b, :n] = torch.arange(start, start + n)
        start += n
    return slots


def place_in_slots(flat: torch.Tensor, media_slots: torch.Tensor) -> torch.Tensor:
    """Items of a flat media list (M, ...) in their sequences' slots: (B, N, ...), zeros where
    ``media_slots (B, N)`` is -1 (the padded layout). A gather: no host sync, and its backward
    adds each slot's gradient to the one item it came from."""
    with_zero = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
    return with_zero[media_slots]  # -1 picks the zero row
