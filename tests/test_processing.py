"""Processor: markers vs images, pixel layout, padding sides, truncation, decoding, video."""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import noise_image, padded, solid


def test_media_are_flat_with_their_slots(processor):
    enc = processor(
        ["<image>one<image>two", "<image>three", "no image"],
        images=[[solid((255, 0, 0)), noise_image(1)], [solid((0, 0, 255), (20, 60))], []],
    )
    assert enc["pixel_values"].shape == (3, 1, 3, 32, 32)  # the real images only
    assert enc["media_slots"].tolist() == [[0, 1], [2, -1], [-1, -1]]
    slots = padded(enc)  # the padded layout: (B, N, F, C, H, W), zero-filled slots
    assert slots.shape == (3, 2, 1, 3, 32, 32)
    assert torch.equal(slots[0, 1], enc["pixel_values"][1])
    assert torch.equal(slots[1, 0], enc["pixel_values"][2])
    assert slots[1, 1].abs().sum() == 0 and slots[2].abs().sum() == 0
    assert (enc["input_ids"] == processor.special_tokens.image_id).sum(-1).tolist() == [2, 1, 0]


def test_marker_image_mismatch_is_a_clear_error(processor):
    with pytest.raises(ValueError, match=r"sequence 0 has 2 <image> marker\(s\) but 1 image"):
        processor(["<image>a<image>b"], images=[[solid((1, 2, 3))]])
    with pytest.raises(ValueError, match=r"has 1 <image> marker\(s\) but 0"):
        processor(["<image>a"])
    with pytest.raises(ValueError, match="2 texts but 1 image lists"):
        processor(["a", "b"], images=[[]])
    # one flat list of images (not one list per text) was an unclear TypeError
    with pytest.raises(ValueError, match=r"flat list \(Image items\): images=\[\[image\]\]"):
        processor(["<image>a"], images=[solid((1, 2, 3))])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(processor, side):
    enc = processor(["a red circle on the left of the image", "hi"], padding_side=side)
    mask = enc["attention_mask"][1]
    assert mask.sum() < mask.numel()
    assert (mask[0] == 0) == (side == "left")
    pad = enc["input_ids"][1][mask == 0]
    assert (pad == processor.special_tokens.pad_id).all()


def test_decode_round_trip(processor):
    text = "<image>Question: what colour is the circle? Short answer: red<|endofchunk|>"
    enc = processor([text, "x"], images=[[noise_image(0)], []])
    assert processor.decode(enc["input_ids"][0]) == text
    assert processor.batch_decode(enc["input_ids"])[1] == "x"
    assert "<image>" not in processor.decode(enc["input_ids"][0], skip_special_tokens=True)


def test_truncation_that_drops_an_image_marker_is_an_error(processor):
    text = "a long prefix of words before the image " * 3 + "<image>tail"
    with pytest.raises(ValueError, match="truncates away <image>"):
        processor([text], images=[[noise_image(0)]], max_length=8)
    enc = processor(
        ["<image>" + text.replace("<image>", "")], images=[[noise_image(0)]], max_length=8
    )
    assert enc["input_ids"].shape[1] == 8


def test_video_frames(processor):
    clip = [noise_image(i) for i in range(3)]
    enc = processor(["<image>a video"], images=[[clip]])
    assert enc["pixel_values"].shape == (1, 3, 3, 32, 32)
    assert not torch.equal(enc["pixel_values"][0, 0], enc["pixel_values"][0, 1])
    with pytest.raises(ValueError, match="same number of frames"):
        processor(["<image>a<image>b"], images=[[clip, noise_image(9)]])
    with pytest.raises(ValueError, match="PIL image"):
        processor(["<image>a"], images=[["not an image"]])


def test_video_through_the_model(processor, model):
    clip = [noise_image(i) for i in range(3)]
    logits = model(**processor(["<image>a video of a circle"], images=[[clip]])).logits
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="max_num_frames=4"):
        model(**processor(["<image>a long video"], images=[[clip + clip]]))


@pytest.mark.parametrize(
    ("scheme", "marker", "needs_bos"), [("llava", "<image>", False), ("mllama", "<|image|>", True)]
)
def test_a_checkpoints_own_image_token_is_found_or_its_absence_named(scheme, marker, needs_bos):
    """LLaVA's and Llama 3.2 Vision's tokenizers bring their image token (nothing is new): a
    tokenizer without it is refused naming the scheme, a missing pad token becomes <PAD>."""
    from transformers import AutoTokenizer

    from flamingo.tokens import PAD, TINY_TOKENIZER_DIR, add_special_tokens

    bare = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    with pytest.raises(
        ValueError, match=f"lm.special_tokens: {scheme} needs .*{re.escape(marker)}"
    ):
        add_special_tokens(bare, scheme)
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tok.add_special_tokens({"additional_special_tokens": [marker]})
    special = add_special_tokens(tok, scheme)
    assert special.image_id == tok.convert_tokens_to_ids(marker) and special.image_text == marker
    assert tok.pad_token == PAD and special.new_ids == (tok.pad_token_id,)
    if needs_bos:
        tok.bos_token = None
        with pytest.raises(ValueError, match="beginning- and an end-of-sequence"):
            add_special_tokens(tok, scheme)
