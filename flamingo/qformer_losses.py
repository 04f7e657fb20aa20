"""BLIP-2's stage-1 objectives on the Q-Former's outputs (Li et al. 2023, Sec. 3.2, Fig. 2).

Three losses, each with its own attention pattern between the queries and the text:

- **image-text contrastive** (ITC, "unimodal" mask: queries and text do not see each other):
  an image's similarity to a text is the best of its queries' cosine similarities to the
  text's CLS output (:func:`query_text_similarity`), over a learned temperature; the InfoNCE
  loss both ways over the whole global batch, every rank's features gathered *with* their
  gradients (:func:`gather_with_grad`), so that the gradients summed over ranks are the
  gradients of the loss over the global batch;
- **image-text matching** (ITM, "bi-directional" mask: every query and text token sees every
  other): a binary classifier on the queries' outputs, over each pair, one negative text per
  image and one negative image per text, drawn from the whole global batch with probabilities
  given by the contrastive similarities (hard negatives, :func:`hard_negatives`; the
  negatives' inputs come from the other ranks through :func:`gather`, no gradient needed: the
  tower is frozen and the classifier reads the text's tokens, not its features);
- **image-grounded text generation** (ITG, "multimodal causal" mask, :func:`itg_mask`):
  queries see queries only, each text token the queries and the text before it.

Shapes: query features ``(B, Q, E)``, text features ``(B, E)`` (both L2-normalised here),
logits ``(B, ...)``. The model that produces them is :mod:`flamingo.qformer_pretraining`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order, the gradient flowing back to
    each rank's own part (``torch.distributed.nn``'s all_gather); ``x`` itself outside a
    process group or with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather  # differentiable collective

    return torch.cat(all_gather(x), dim=0)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order, without gradient (``x``
    itself outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def rank_offset(batch: int) -> int:
    """Where this rank's rows start in the gathered batch (every rank holds ``batch`` rows)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank() * batch


def query_text_similarity(query_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``(Bi, Bt)``: image i against text j, the best of image i's queries' cosine similarities
    to text j (the features are normalised here)."""
    q = F.normalize(query_feats, dim=-1)
    t = F.normalize(text_feats, dim=-1)
    return torch.einsum("iqe,je->ijq", q, t).amax(-1)


def contrastive_loss(
    query_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temperature: torch.Tensor | float,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITC: the mean of the image-to-text and text-to-image InfoNCE losses of this rank's
    rows against the global batch, with BLIP-2's label smoothing (0.1 in its code, LAVIS), and
    this rank's ``(B, B_global)`` similarities, of its images to every text and of its texts
    to every image (for :func:`hard_negatives`). Each
    rank's loss is over its own rows; their mean over ranks is the loss of the global batch,
    and the gradients summed over ranks (as data-parallel engines do, then dividing by the
    ranks) are its gradients: the gather keeps them (LAVIS gathers without, so a feature's
    gradient as another rank's negative is lost there)."""
    batch, queries, width = query_feats.shape
    # one collective for both: two would run their backward in whatever order autograd picks,
    # which may differ between ranks and pair one rank's queries with another's texts
    both = gather_with_grad(torch.cat([query_feats.flatten(1), text_feats], dim=1))
    all_queries = both[:, : queries * width].unflatten(1, (queries, width))
    all_texts = both[:, queries * width :]
    i2t = query_text_similarity(query_feats, all_texts)  # (B, B_global)
    t2i = query_text_similarity(all_queries, text_feats).t()  # (B, B_global): text j vs images
    targets = torch.arange(batch, device=i2t.device) + rank_offset(batch)
    smooth = {"label_smoothing": label_smoothing}
    loss = F.cross_entropy(i2t / temperature, targets, **smooth)
    loss = (loss + F.cross_entropy(t2i / temperature, targets, **smooth)) / 2
    return loss, i2t, t2i


def hard_negatives(
    i2t: torch.Tensor,
    t2i: torch.Tensor | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM's negatives from ITC's similarities: ``i2t (B, B_global)`` of this rank's images to
    every text of the global batch, ``t2i (B, B_global)`` of its texts to every image
    (``i2t.T`` when the batch is the global one: one rank), the rank's own pairs at columns
    ``offset + i``. For each image a text and for each text an image, drawn with probability
    ``softmax(similarity)`` over the others (its own pair has none): the harder a negative,
    the likelier (BLIP-2 divides the similarities by the contrastive temperature first; the
    caller does). Drawn on the device, no host sync. Returns (negative text of each image,
    negative image of each text), indices into the global batch."""
    t2i = i2t.t() if t2i is None else t2i
    rows, cols = i2t.shape
    if cols < 2 or t2i.shape != i2t.shape or offset + rows > cols:
        raise ValueError(
            f"hard negatives need (B, B_global) similarities of at least 2 pairs, the rank's own "
            f"at offset {offset}; got i2t {tuple(i2t.shape)}, t2i {tuple(t2i.shape)}"
        )
    own = torch.zeros(rows, cols, dtype=torch.bool, device=i2t.device)
    own[torch.arange(rows), torch.arange(rows) + offset] = True

    def draw(similarity: torch.Tensor) -> torch.Tensor:
        weights = similarity.detach().float().masked_fill(own, float("-inf")).softmax(1)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return draw(i2t), draw(t2i)


def matching_loss(pair_logits: torch.Tensor, batch: int) -> torch.Tensor:
    """ITM: cross-entropy of ``pair_logits (3B, 2)`` (the classifier's, averaged over the
    queries), ordered as BLIP-2 builds them: the B pairs (label 1), then B images with their
    negative texts and B negative images with their texts (label 0)."""
    if pair_logits.shape != (3 * batch, 2):
        raise ValueError(
            f"pair_logits must be (3B, 2) = ({3 * batch}, 2), got {tuple(pair_logits.shape)}"
        )
    labels = torch.cat(
        [torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]
    ).to(pair_logits.device)
    return F.cross_entropy(pair_logits, labels)


def itg_mask(queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG's attention mask ``(B, Q + T, Q + T)``, True where a row may attend to a column:
    queries see every query and no text; a text token sees every query and the real text
    tokens at or before it (``text_mask (B, T)``: 1 for real tokens)."""
    b, t = text_mask.shape
    n = queries + t
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :queries] = True
    causal = torch.ones(t, t, dtype=torch.bool, device=text_mask.device).tril()
    allowed[:, queries:, queries:] = causal & text_mask.bool()[:, None, :]
    return allowed
