"""The head fused with the NLL gives the plain path's loss and gradients without the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flamingo import fused_nll
from flamingo.fused_nll import fused_summed_nll
from flamingo.losses import IGNORE, make_labels, summed_nll
from tests.helpers import build, noise_image, set_gates
from tests.test_model import INTERLEAVED


def assembled_logits(hidden, base_weight, new_weight, new_ids, vocab_size):
    """What FlamingoLM.logits builds: base columns, zero padding, new columns on top."""
    base = F.linear(hidden.to(base_weight.dtype), base_weight).float()
    base = F.pad(base, (0, vocab_size - base.shape[-1]))
    new = F.linear(hidden.to(new_weight.dtype), new_weight).float()
    return base.index_copy(-1, new_ids, new)


# (base vocabulary, new ids, assembled vocabulary): appended after the base (GPT-2, Llama),
# inside the base's padded rows (OPT), and beyond it with zero columns in between
LAYOUTS = {
    "appended": (13, (13, 14), 15),
    "inside": (20, (17, 3), 20),
    "gap": (13, (16, 17), 18),
    "none": (13, (), 13),  # the tokenizer brings every token (LLaVA's, Llama 3.2 Vision's)
}


@pytest.mark.parametrize("base_trains", [False, True], ids=["frozen_head", "trained_head"])
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "masked"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("chunk_rows", [1, 4, None, "default split"])
def test_loss_and_gradients_equal_the_plain_path(
    layout, chunk_rows, compact, base_trains, monkeypatch
):
    if chunk_rows == "default split":  # the default chunking, with chunks of 3 or 4 rows
        monkeypatch.setattr(fused_nll, "CHUNK_ELEMENTS", 64)
        chunk_rows = None
    base_vocab, ids, vocab = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    base_weight = torch.randn(base_vocab, 16, generator=g).requires_grad_(base_trains)
    new_weight = torch.randn(len(ids), 16, generator=g, requires_grad=True)
    wrt = (hidden, new_weight, base_weight) if base_trains else (hidden, new_weight)
    new_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.randint(0, vocab, (3, 7), generator=g)
    labels[0, :4] = IGNORE
    if ids:
        labels[1, 2] = ids[0]
        labels[2, 5] = ids[1]
    if layout == "gap":
        labels[2, 3] = 14  # a zero column is a valid target too

    plain = summed_nll(assembled_logits(hidden, base_weight, new_weight, new_ids, vocab), labels)
    plain_grads = torch.autograd.grad(plain, wrt)

    def fused_loss():
        args = (hidden, labels, base_weight, new_weight, new_ids, vocab)
        return fused_summed_nll(*args, chunk_rows=chunk_rows, compact=compact)

    fused = fused_loss()
    fused_grads = torch.autograd.grad(fused, wrt)
    torch.testing.assert_close(fused, plain)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # the loss alone, no gradients kept
        value = fused_loss()
    assert not value.requires_grad
    torch.testing.assert_close(value, plain.detach())


def test_backward_scales_with_the_incoming_gradient():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    base, new = torch.randn(11, 8, generator=g), torch.randn(1, 8, generator=g)
    labels = torch.randint(0, 12, (2, 5), generator=g)
    once = torch.autograd.grad(
        fused_summed_nll(hidden, labels, base, new, torch.tensor([11]), 12), hidden
    )[0]
    scaled = fused_summed_nll(hidden, labels, base, new, torch.tensor([11]), 12) * -0.25
    torch.testing.assert_close(torch.autograd.grad(scaled, hidden)[0], once * -0.25)


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "masked"])
def test_all_masked_rows_give_zero_and_zero_gradients(compact):
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    new = torch.randn(2, 8, requires_grad=True)
    labels = torch.full((2, 4), IGNORE)
    ids = torch.tensor([10, 11])
    loss = fused_summed_nll(hidden, labels, torch.randn(10, 8), new, ids, 12, compact=compact)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad.abs().sum() == 0 and new.grad.abs().sum() == 0


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_model_labels_give_the_plain_loss_and_gradients(processor, frozen_dtype):
    """Flamingo(..., labels=...).nll_sum equals summed_nll(logits, labels), every trainable
    gradient too, for float32 and bfloat16 frozen parts."""
    enc = processor(
        [INTERLEAVED, "<image>a red circle<|endofchunk|>"],
        images=[[noise_image(1), noise_image(2)], [noise_image(3)]],
    )
    results = []
    for fused in (False, True):
        model = build(f"frozen_dtype={frozen_dtype}").train()
        set_gates(model)
        labels = make_labels(enc["input_ids"], enc["attention_mask"], model.special_tokens)
        if fused:
            out = model(**enc, labels=labels)
            assert out.logits is None
            loss = out.nll_sum
        else:
            loss = summed_nll(model(**enc).logits, labels)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (plain, plain_grads), (fused, fused_grads) = results
    tol = {} if frozen_dtype == "float32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(fused, plain, **tol)
    assert plain_grads.keys() == fused_grads.keys()
    assert sum(g is not None for g in plain_grads.values()) > 10
    for name, want in plain_grads.items():
        if want is None:  # e.g. the video time embeddings, unused by images
            assert fused_grads[name] is None, name
        else:
            torch.testing.assert_close(fused_grads[name], want, msg=name, **tol)


def test_model_labels_must_match_the_ids(model, processor):
    enc = processor([INTERLEAVED], images=[[noise_image(1), noise_image(2)]])
    with pytest.raises(ValueError, match="labels shape"):
        model(**enc, labels=enc["input_ids"][:, 1:])


def test_chunks_are_sized_for_the_device():
    from flamingo.fused_nll import chunk_rows_for

    assert chunk_rows_for(510, 50272, "cpu") == 255  # 64 MiB of logits: two chunks
    for vocab in (32000, 50272, 128256, 131072):  # on an accelerator: >= 4096 rows a chunk
        assert chunk_rows_for(16384, vocab, "cuda") >= 4096
    assert chunk_rows_for(2048, 50272, "cuda") == 2048  # a micro-batch's rows in one chunk
    assert chunk_rows_for(1, 10**9, "cpu") == 1
