"""Packed rows: several documents (or image-text pairs) in one row of ``seq_len`` tokens.

A packed batch carries ``document_ids (B, T)``: which document of its row each token belongs
to, numbered 0, 1, ... in order (padding after the last document takes the next number).
Everything that must stop at a document boundary is derived from it on the device, without a
host sync:

- positions restart at each document (:func:`document_positions`);
- the media index phi is -1 until the document's own first ``<image>``
  (``flamingo.xattn.media_index_from_ids``), so no token sees another document's image;
- labels: a document's text before its first image is no target (``flamingo.losses``), and
  no token is asked to predict the next document's first token;
- self-attention is block-diagonal and causal (:func:`block_diagonal_mask`): a packed row then
  gives each document the logits it has alone. Or, with ``across_documents``, plain causal over
  the whole row with positions running on, as IDEFICS trained: documents then see the text of
  those before them (not their images), which changes the results.
"""

from __future__ import annotations

import torch


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """``document_ids (B, T)`` -> the position at which each token's document begins."""
    positions = torch.arange(document_ids.shape[1], device=document_ids.device)
    positions = positions.expand_as(document_ids)
    new = torch.ones_like(document_ids, dtype=torch.bool)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(new, positions, 0).cummax(dim=1).values


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at each document of a packed row."""
    positions = torch.arange(document_ids.shape[1], device=document_ids.device)
    return positions - document_starts(document_ids)


def block_diagonal_mask(
    document_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Which keys each query of a packed batch may attend to, (B, 1, T, T) bool: the earlier
    tokens of its own document, and itself (so that padding rows stay finite too)."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    allowed = same & causal
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=document_ids.device)
    return allowed[:, None]
