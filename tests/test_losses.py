"""Labels on hand-written sequences; the weighted, token-counted loss; accumulation."""

from __future__ import annotations

import torch

from flamingo.losses import IGNORE, count_targets, make_labels, summed_nll, weighted_loss
from flamingo.tokens import SpecialTokens

SPECIAL = SpecialTokens(image_id=90, end_of_chunk_id=91, pad_id=92, new_ids=(91, 90, 92))
IMG, E, P = 90, 91, 92


def test_labels_on_hand_written_sequences():
    x = IGNORE
    # text before the first image, a gap after <eoc>; then left padding and text after the chunk
    rows = [
        ([5, 6, IMG, 7, 8, E, 9, 10, IMG, 11, E, 12], [x, x, x, 7, 8, E, x, x, x, 11, E, x]),
        ([P, P, IMG, 7, E, 3, 4, 5, 6, 7, 8, 9], [x, x, x, 7, E, x, x, x, x, x, x, x]),
    ]
    ids = torch.tensor([r for r, _ in rows])
    labels = make_labels(ids, (ids != P).long(), SPECIAL)
    assert labels.tolist() == [expected for _, expected in rows]


def test_all_masked_batch_contributes_zero_not_nan():
    logits = torch.randn(2, 4, 10, requires_grad=True)
    labels = torch.full((2, 4), IGNORE)
    loss = weighted_loss(summed_nll(logits, labels), 0.2, step_targets=0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_weighted_total_equals_the_formula():
    torch.manual_seed(0)
    parts = []
    for weight in (1.0, 0.2, 0.03):
        logits = torch.randn(3, 6, 11)
        labels = torch.randint(0, 11, (3, 6))
        labels[0, :3] = IGNORE
        n = count_targets(labels)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE
        )
        parts.append((weighted_loss(summed_nll(logits, labels), weight, n), weight * nll))
    total = sum(p for p, _ in parts)
    torch.testing.assert_close(total, sum(f for _, f in parts))


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    w = torch.randn(16, 13, requires_grad=True)
    hidden = torch.randn(6, 7, 16)
    labels = torch.randint(0, 13, (6, 7))
    labels[torch.rand(6, 7) < 0.3] = IGNORE  # ragged targets per row

    weighted_loss(summed_nll(hidden @ w, labels), 0.5, count_targets(labels)).backward()
    full = w.grad.clone()
    w.grad = None
    chunks = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total = sum(count_targets(labels[c]) for c in chunks)
    for c in chunks:
        weighted_loss(summed_nll(hidden[c] @ w, labels[c]), 0.5, total).backward()
    torch.testing.assert_close(w.grad, full)


def test_summed_nll_ignores_masked_targets():
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[IGNORE, 2, IGNORE]])
    assert summed_nll(logits, labels).item() == torch.log(torch.tensor(4.0)).item()
