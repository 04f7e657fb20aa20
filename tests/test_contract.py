"""The contract every registered combination of parts keeps (``flamingo.parts``), run over each
preset of ``connector:`` on the tiny model, as transformers' ``ModelTesterMixin`` runs one
suite over every model: identity at init where the fusion promises it, each token seeing only
the media before it, left padding, packed rows, cached decoding, the save/load round trip, and
bad media refused with a message that names the part and its numbers."""

from __future__ import annotations

import pytest
import torch

from flamingo import Flamingo, FlamingoProcessor
from flamingo.data.config import DatasetConfig
from flamingo.parts import combinations, parts_of
from flamingo.training.config import TrainConfig
from tests.helpers import PRESET_OVERRIDES, build, noise_image, set_gates
from train import check_datasets

TEXT = "a photo <image>a red circle<|endofchunk|> then <image>a blue"


@pytest.fixture(scope="module", params=combinations())
def preset(request) -> str:
    assert set(PRESET_OVERRIDES) == set(combinations()), "give each preset's tiny overrides"
    return request.param


@pytest.fixture(scope="module")
def built(preset) -> tuple[Flamingo, FlamingoProcessor]:
    """The preset's tiny model, its images mattering (gates opened where it has them)."""
    model = build(*PRESET_OVERRIDES[preset])
    set_gates(model)
    return model, FlamingoProcessor.from_config(model.cfg)


def logits(model: Flamingo, enc: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits


def test_a_fresh_model_is_the_lm_where_the_fusion_promises_it(preset):
    model = build(*PRESET_OVERRIDES[preset])  # gates as initialised
    if not model.fusion.identity_at_init:
        pytest.skip(f"{model.parts.fusion.name}: its media replace token embeddings")
    processor = FlamingoProcessor.from_config(model.cfg)
    images = [[noise_image(1), noise_image(2)]]
    other = [[noise_image(3), noise_image(4)]]
    assert torch.equal(
        logits(model, processor([TEXT], images)), logits(model, processor([TEXT], other))
    )


def test_a_token_sees_only_the_media_before_it(built):
    model, processor = built
    enc = processor([TEXT], [[noise_image(1), noise_image(2)]])
    changed = processor([TEXT], [[noise_image(1), noise_image(5)]])
    a, b = logits(model, enc), logits(model, changed)
    second = (enc["input_ids"][0] == processor.special_tokens.image_id).nonzero()
    start = int(second[processor.image_tokens])  # the second image's first <image> token
    torch.testing.assert_close(a[0, :start], b[0, :start], rtol=0, atol=1e-6)
    assert (a[0, start:] - b[0, start:]).abs().max() > 1e-3  # and it does matter after


def test_left_padding_changes_no_real_token(built):
    model, processor = built
    short = "<image>a red circle"
    alone = processor([short], [[noise_image(1)]])
    both = processor([TEXT, short], [[noise_image(3), noise_image(4)], [noise_image(1)]])
    assert both["attention_mask"][1, 0] == 0  # left padded
    width = alone["input_ids"].shape[1]
    torch.testing.assert_close(
        logits(model, both)[1, -width:], logits(model, alone)[0], rtol=1e-5, atol=1e-5
    )


def test_packed_rows_give_each_document_its_own_logits(built):
    model, processor = built
    texts = ["<image>a red circle<|endofchunk|>", "<image>a blue square<|endofchunk|>"]
    images = [noise_image(1), noise_image(2)]
    alone = [processor([t], [[im]]) for t, im in zip(texts, images, strict=True)]
    ids = torch.cat([a["input_ids"] for a in alone], dim=1)
    documents = torch.cat([torch.full_like(a["input_ids"], d) for d, a in enumerate(alone)], 1)
    packed = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.cat([a["pixel_values"] for a in alone]),
        "media_slots": torch.tensor([[0, 1]]),
        "document_ids": documents,
    }
    if "aspect_ratio_ids" in alone[0]:  # a tiled tower's ids go with its pixels
        packed["aspect_ratio_ids"] = torch.cat([a["aspect_ratio_ids"] for a in alone])
    out = logits(model, packed)[0]
    first = alone[0]["input_ids"].shape[1]
    torch.testing.assert_close(out[:first], logits(model, alone[0])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[first:], logits(model, alone[1])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_decoding_gives_the_uncached_tokens(built, beams):
    model, processor = built
    enc = processor([TEXT, "<image>a"], [[noise_image(1), noise_image(2)], [noise_image(3)]])
    runs = [
        model.generate(**enc, max_new_tokens=4, num_beams=beams, eos_token_id=-1, use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_save_and_load_round_trip(built, tmp_path):
    model, processor = built
    model.save_pretrained(tmp_path / "ckpt", processor)
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    enc = processor([TEXT], [[noise_image(1), noise_image(2)]])
    assert torch.equal(logits(loaded, enc), logits(model, enc))
    assert loaded.parts.connector.name == model.parts.connector.name


def test_bad_media_are_refused_naming_the_part_and_its_numbers(built):
    model, processor = built
    connector = model.parts.connector
    with pytest.raises(ValueError, match="has 2 <image> marker"):  # the processor's check
        processor([TEXT], [[noise_image(1)]])
    enc = processor([TEXT], [[noise_image(1), noise_image(2)]])
    fewer = {**enc, "pixel_values": enc["pixel_values"][:1], "media_slots": torch.tensor([[0]])}
    if "aspect_ratio_ids" in enc:  # a tiled tower's ids go with its pixels
        fewer["aspect_ratio_ids"] = enc["aspect_ratio_ids"][:1]
    with pytest.raises(ValueError) as error:  # more <image> than media: before the LM runs
        model(**fewer)
    assert connector.describe() in str(error.value) and "1" in str(error.value)
    # video where the connector takes none is refused before the first step, naming it
    video = DatasetConfig(name="clips", kind="video", shards="x.tar", num_frames=2)
    cfg = TrainConfig(datasets=[video], model="tiny.yaml")
    if connector.max_frames() >= 2:
        check_datasets(cfg, model.cfg)
        return
    with pytest.raises(ValueError, match="clips") as error:
        check_datasets(cfg, model.cfg)
    assert connector.describe() in str(error.value)
    frames = enc["pixel_values"].repeat(1, 2, 1, 1, 1)  # two frames an item
    with pytest.raises(ValueError, match="single images"):
        model(**{**enc, "pixel_values": frames})


def test_every_part_answers_from_the_config_alone(preset):
    parts = parts_of(build(*PRESET_OVERRIDES[preset]).cfg)
    processor = FlamingoProcessor.from_config(parts.connector.cfg)
    assert processor.image_tokens == parts.image_tokens()
    assert parts.connector.tokens() > 0 and parts.tower.tokens() > 0
    model = build(*PRESET_OVERRIDES[preset])
    enc = processor([TEXT], [[noise_image(1), noise_image(2)]])
    latents = model.encode_media(
        enc["pixel_values"], enc["media_slots"], enc.get("aspect_ratio_ids")
    )
    assert latents.shape[2] == parts.connector.tokens()  # R, as the config said
    assert set(model.trainable_modules()) >= {parts.connector.name, "new_tokens"}
