"""Labels and the per-dataset weighted, token-counted NLL (paper Sec. 3, Eq. 2).

Targets are the tokens the model should learn to produce: not padding, not ``<image>`` (its
position comes from the data, never predicted), not text before a document's first image
(nothing to condition on), and not the text between an ``<|endofchunk|>`` and the next
``<image>`` (it belongs to no image). ``<|endofchunk|>`` itself is a target: the model must
learn to end a chunk.

Normalisation: each dataset's NLL is a sum over its target tokens divided by the number of
target tokens of that dataset in the whole optimiser step (all micro-batches, all ranks), so
a step's gradient does not depend on how its tokens were split into micro-batches or ranks.
The total is ``sum_m lambda_m * NLL_m``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flamingo.packing import document_starts
from flamingo.tokens import SpecialTokens

IGNORE = -100


def make_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special: SpecialTokens,
    document_ids: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """input_ids, attention_mask (B, T) -> labels (B, T), ``IGNORE`` where no loss is taken.
    In a packed row (``document_ids``, :mod:`flamingo.packing`) each document counts on its
    own: its text before its own first image is no target, and its first token (an image, or
    such text) is never predicted from the document before it. ``targets (B, T)`` (bool, a
    conversation's: the assistant's replies, :mod:`flamingo.chat`) replaces the image-and-chunk
    rule: exactly those tokens are targets (never padding, never an image token), and a packed
    document's first token still is not."""
    if targets is not None:
        start = 0 if document_ids is None else document_starts(document_ids)
        first = torch.arange(input_ids.shape[1], device=input_ids.device) == start
        ignore = ~attention_mask.bool() | ~targets | (input_ids == special.image_id) | first
        return input_ids.masked_fill(ignore, IGNORE)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    is_image = input_ids == special.image_id
    is_eoc = input_ids == special.end_of_chunk_id
    none = torch.full_like(positions, -1)
    last_image = torch.where(is_image, positions, none).cummax(dim=1).values
    last_eoc = torch.where(is_eoc, positions, none).cummax(dim=1).values
    start = 0 if document_ids is None else document_starts(document_ids)
    before_first_image = last_image < start
    after_chunk = (last_eoc > last_image) & ~is_eoc
    ignore = ~attention_mask.bool() | is_image | before_first_image | after_chunk
    if special.around_image_id is not None:  # IDEFICS's form: its fake tokens frame images
        ignore = ignore | (input_ids == special.around_image_id)
    return input_ids.masked_fill(ignore, IGNORE)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of next-token targets in ``labels`` (the first position is never a target)."""
    return (labels[:, 1:] != IGNORE).sum()


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL over the targets: logits (B, T, V), labels (B, T) -> scalar."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def weighted_loss(
    nll_sum: torch.Tensor, loss_weight: float, step_targets: int | float | torch.Tensor
) -> torch.Tensor:
    """This micro-batch's share of ``lambda_m * NLL_m``: its summed NLL (:func:`summed_nll`)
    over the step's target count for the dataset. An all-masked micro-batch contributes
    exactly 0 (not NaN)."""
    total = torch.as_tensor(step_targets, dtype=torch.float32, device=nll_sum.device).clamp(min=1)
    return loss_weight * nll_sum / total
