"""The flat media layout (the batch's real media only, with their slots) against the padded one
(every sequence padded to N media, empty slots encoded too): same logits, loss and gradients,
and the tower sees only the real media."""

from __future__ import annotations

import pytest
import torch

from flamingo import FlamingoProcessor
from flamingo.losses import make_labels, summed_nll
from tests.helpers import build, noise_image, padded, set_gates

TEXTS = [
    "a sentence without any image at all, as text-only rows have",
    "<image>a red circle<|endofchunk|>",
    "<image>one<|endofchunk|><image>two<|endofchunk|><image>three<image>four<image>five",
]


def media(seed: int, frames: int):
    return noise_image(seed) if frames == 1 else [noise_image(seed * 10 + f) for f in range(frames)]


@pytest.mark.parametrize("frames", [1, 3], ids=["images", "video"])
@pytest.mark.parametrize("attend", ["last", "all_previous"])
def test_flat_media_give_the_padded_layouts_logits_and_gradients(frames, attend):
    model = build(f"xattn.attend={attend}").train()
    set_gates(model)
    processor = FlamingoProcessor.from_config(model.cfg)
    images = [[], [media(1, frames)], [media(s, frames) for s in range(2, 7)]]  # 0, 1, 5
    enc = processor(TEXTS, images=images, padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = make_labels(ids, mask, processor.special_tokens)
    encoded = []
    model.vision.register_forward_hook(lambda m, args, out: encoded.append(out.shape[:3]))
    layouts = {
        "flat": {"pixel_values": enc["pixel_values"], "media_slots": enc["media_slots"]},
        "padded": {"pixel_values": padded(enc)},
    }
    results = {}
    for name, given in layouts.items():
        model.zero_grad()
        logits = model(ids, mask, **given).logits
        summed_nll(logits, labels).backward()
        fused = model(ids, mask, labels=labels, **given).nll_sum
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = logits.detach(), fused.detach(), grads
    # the tower encoded the 6 real media once per forward, and 3 x 5 slots padded
    assert encoded == [(1, 6, frames)] * 2 + [(3, 5, frames)] * 2
    (flat_logits, flat_nll, flat_grads), (pad_logits, pad_nll, pad_grads) = results.values()
    real = mask.bool()
    torch.testing.assert_close(flat_logits[real], pad_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat_nll, pad_nll, rtol=1e-5, atol=1e-5)
    assert flat_grads.keys() == pad_grads.keys() and any("resampler" in n for n in flat_grads)
    for n, g in flat_grads.items():
        torch.testing.assert_close(g, pad_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bad_slots_are_clear_errors():
    model = build()
    processor = FlamingoProcessor.from_config(model.cfg)
    enc = processor(TEXTS[1:2], images=[[noise_image(1)]])
    ids, pixels, slots = enc["input_ids"], enc["pixel_values"], enc["media_slots"]
    with pytest.raises(ValueError, match=r"need media_slots \(B, N\)"):
        model(ids, pixel_values=pixels)
    with pytest.raises(ValueError, match="must index the 1 media item"):
        model(ids, pixel_values=pixels, media_slots=slots + 1)
    with pytest.raises(ValueError, match="int64"):
        model(ids, pixel_values=pixels, media_slots=slots.int())
    with pytest.raises(ValueError, match="not padded"):
        model(ids, pixel_values=padded(enc), media_slots=slots)
    with pytest.raises(ValueError, match="without pixel_values"):
        model(ids, media_slots=slots)
