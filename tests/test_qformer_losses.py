"""BLIP-2's stage-1 objectives on known answers, and the contrastive loss over two processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from flamingo.qformer_losses import (
    contrastive_loss,
    hard_negatives,
    itg_mask,
    matching_loss,
    query_text_similarity,
)


def test_an_image_is_as_close_to_a_text_as_its_closest_query():
    queries = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[-1.0, 0.0], [-1.0, -1.0]]])  # (2, 2, 2)
    texts = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    sim = query_text_similarity(queries, texts)
    r = 1 / math.sqrt(2)
    # image 0: queries (1, 0), (0, 1); image 1: (-1, 0), (-r, -r); texts (0, 1), (r, r)
    expected = torch.tensor([[1.0, r], [0.0, -r]])
    torch.testing.assert_close(sim, expected)


def test_the_contrastive_loss_on_known_answers():
    b, q, e = 4, 3, 8
    same = torch.ones(b, q, e), torch.ones(b, e)
    loss, *_ = contrastive_loss(*same, temperature=0.07)  # every pair alike: chance, log B
    torch.testing.assert_close(loss, torch.tensor(math.log(b)))
    g = torch.Generator().manual_seed(0)
    queries, texts = torch.randn(b, q, e, generator=g), torch.randn(b, e, generator=g)
    loss, i2t, t2i = contrastive_loss(queries, texts, temperature=0.1, label_smoothing=0.0)
    unit_q = queries / queries.norm(dim=-1, keepdim=True)
    unit_t = texts / texts.norm(dim=-1, keepdim=True)
    sim = torch.tensor([[(unit_q[i] @ unit_t[j]).max().item() for j in range(b)] for i in range(b)])
    torch.testing.assert_close(i2t, sim)
    torch.testing.assert_close(t2i, sim.t())
    rows = -(sim / 0.1).log_softmax(1).diagonal().mean()
    cols = -(sim / 0.1).log_softmax(0).diagonal().mean()
    torch.testing.assert_close(loss, (rows + cols) / 2)
    aligned = torch.eye(b).repeat_interleave(q, 0).view(b, q, b)  # image i's queries = text i
    loss, *_ = contrastive_loss(aligned, torch.eye(b), temperature=0.01, label_smoothing=0.0)
    assert loss.item() < 1e-6  # each pair apart from every other: nothing left to learn
    smoothed, *_ = contrastive_loss(aligned, torch.eye(b), temperature=0.01, label_smoothing=0.1)
    # smoothing leaves 0.1 spread over the B classes: its cross-entropy floor
    assert smoothed.item() == pytest.approx(0.1 * (b - 1) / b * 100, rel=1e-3)


def test_hard_negatives_are_never_the_pair_and_follow_the_similarities():
    sim = torch.zeros(3, 3)
    sim[0, 2] = sim[1, 0] = sim[2, 1] = 20.0  # one much harder negative each way
    g = torch.Generator().manual_seed(0)
    texts, images = hard_negatives(sim, generator=g)
    assert texts.tolist() == [2, 0, 1] and images.tolist() == [1, 2, 0]
    sim = torch.tensor([[5.0, 1.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    draws = torch.stack([hard_negatives(sim, generator=g)[0] for _ in range(4000)])
    assert not (draws == torch.arange(3)).any()
    share = (draws[:, 0] == 1).float().mean().item()  # image 0: text 1 with e/(e+1)
    assert share == pytest.approx(math.e / (math.e + 1), abs=0.03)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        hard_negatives(torch.zeros(1, 1))


def test_a_ranks_hard_negatives_come_from_the_global_batch_never_its_own_pair():
    # rank 1 of 2, two rows each: its pairs are columns 2 and 3 of the global batch
    i2t = torch.zeros(2, 4)
    i2t[0, 0] = i2t[1, 3] = 30.0  # row 0's hardest text is on rank 0; row 1's is its own pair
    t2i = torch.zeros(2, 4)
    t2i[0, 1] = t2i[1, 2] = 30.0
    g = torch.Generator().manual_seed(0)
    draws = [hard_negatives(i2t, t2i, offset=2, generator=g) for _ in range(500)]
    texts = torch.stack([d[0] for d in draws])
    images = torch.stack([d[1] for d in draws])
    assert (texts[:, 0] == 0).all() and (images[:, 0] == 1).all()  # the hard ones, elsewhere
    assert not (texts[:, 1] == 3).any() and not (images[:, 1] == 3).any()  # never the pair
    assert set(texts[:, 1].tolist()) == {0, 1, 2}  # the rest alike
    with pytest.raises(ValueError, match="offset"):
        hard_negatives(i2t, t2i, offset=3)


def test_the_matching_loss_takes_pairs_then_negatives():
    confident = torch.tensor(
        [[-9.0, 9.0]] * 2 + [[9.0, -9.0]] * 4
    )  # pairs first, then 2B negatives
    assert matching_loss(confident, 2).item() < 1e-6
    swapped = confident.flip(0)
    assert matching_loss(swapped, 2).item() > 5
    with pytest.raises(ValueError, match="must be"):
        matching_loss(torch.zeros(4, 2), 2)


def test_itg_mask_queries_see_queries_text_sees_queries_and_earlier_text():
    mask = itg_mask(2, torch.tensor([[1, 1, 0]]))[0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # query 0
            [1, 1, 0, 0, 0],  # query 1
            [1, 1, 1, 0, 0],  # text 0
            [1, 1, 1, 1, 0],  # text 1
            [1, 1, 1, 1, 0],  # text 2 (padding): no padding is attended to
        ]
    )
    assert torch.equal(mask, expected)


def _ranks(rank: int, world: int, path: str, queries, texts, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    half = queries.shape[0] // world
    mine = slice(rank * half, (rank + 1) * half)
    q = queries[mine].clone().requires_grad_(True)
    t = texts[mine].clone().requires_grad_(True)
    loss, *_ = contrastive_loss(q, t, temperature=0.1)
    loss.backward()
    out[rank] = (loss.detach(), q.grad, t.grad)
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_give_the_global_batchs_loss_and_gradients(tmp_path):
    g = torch.Generator().manual_seed(1)
    queries, texts = torch.randn(6, 3, 8, generator=g), torch.randn(6, 8, generator=g)
    q, t = queries.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    loss, *_ = contrastive_loss(q, t, temperature=0.1)
    loss.backward()
    out = mp.Manager().dict()
    mp.spawn(_ranks, args=(2, str(tmp_path / "rendezvous"), queries, texts, out), nprocs=2)
    losses = torch.stack([out[r][0] for r in range(2)])
    torch.testing.assert_close(losses.mean(), loss.detach())  # the mean over ranks
    grads_q = torch.cat([out[r][1] for r in range(2)]) / 2  # summed over ranks, then / ranks
    grads_t = torch.cat([out[r][2] for r in range(2)]) / 2
    torch.testing.assert_close(grads_q, q.grad)
    torch.testing.assert_close(grads_t, t.grad)
