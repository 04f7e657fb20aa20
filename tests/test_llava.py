"""LLaVA import: transformers' ``LlavaForConditionalGeneration`` on tiny random configs, saved by
transformers itself, converted, and compared logit for logit, token for token."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from flamingo import hub
from flamingo.convert.__main__ import main as convert_main
from flamingo.convert.llava import llava_config
from flamingo.model import Flamingo
from flamingo.processing import FlamingoProcessor
from flamingo.tokens import IMAGE
from tests.helpers import (
    COMMIT,
    TINY_CLIP_VISION,
    TINY_LLAMA,
    lay_out,
    noise_image,
    tokenizer_with_image,
)

IMAGE_SIZE, PATCH = 28, 7
GRID = IMAGE_SIZE // PATCH

CASES = {  # (vision_feature_layer, vision_feature_select_strategy, projector_hidden_act)
    "llava-1.5": (-2, "default", "gelu"),
    "full_strategy_positive_layer": (1, "full", "gelu"),
    "last_layer_quick_gelu": (-1, "default", "quick_gelu"),
}


def save_reference(tmp_path, case: str = "llava-1.5", seed: int = 0, tie: bool = False):
    """A random LLaVA, its norms set away from their initial values, written to ``tmp_path``
    by transformers with its tokenizer and image processor: (model, directory)."""
    layer, strategy, act = CASES[case]
    tokenizer = tokenizer_with_image()
    config = LlavaConfig(
        vision_config=dict(TINY_CLIP_VISION, projection_dim=16),
        text_config=dict(
            TINY_LLAMA,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            tie_word_embeddings=tie,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=GRID * GRID + int(strategy == "full"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    reference = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0.0, 0.2)  # large enough that the images move the logits by > 1e-4
    directory = tmp_path / case
    reference.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(directory)
    return reference, directory


def batch_of(processor: FlamingoProcessor):
    """Two sequences of different lengths (left padding), three images, two in one row."""
    a, b, c = (noise_image(s, (IMAGE_SIZE + 6, IMAGE_SIZE)) for s in range(3))
    return processor(
        [
            "USER: <image>\nWhat is here? ASSISTANT: a cat.</s>USER: <image>\nAnd here?",
            "<image> one",
        ],
        [[a, b], [c]],
    )


def reference_inputs(batch):
    """The same ids and pixels for transformers (its flat (M, C, H, W) images), with the left
    padding's positions counted from each row's first real token, as ours are."""
    mask = batch["attention_mask"]
    return dict(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        pixel_values=batch["pixel_values"][:, 0],
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_equal_transformers_llava(tmp_path, case):
    reference, directory = save_reference(tmp_path, case)
    ours = Flamingo.from_pretrained(directory)  # a LLaVA directory: converted in memory
    processor = FlamingoProcessor.from_pretrained(directory)
    batch = batch_of(processor)
    assert batch["attention_mask"][1, 0] == 0  # the second sequence is left padded
    tokens = GRID * GRID + int(CASES[case][1] == "full")
    assert processor.image_tokens == tokens
    assert (batch["input_ids"][0] == processor.special_tokens.image_id).sum() == 2 * tokens
    with torch.no_grad():
        expected = reference(**reference_inputs(batch)).logits
        got = ours(**batch).logits
    assert not any(p.is_meta for p in ours.parameters())
    real = batch["attention_mask"].bool()
    assert got.shape == expected.shape
    assert (got - expected)[real].abs().max().item() <= 1e-4
    # the images matter: other images give other logits
    with torch.no_grad():
        other = ours(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).logits
    assert (other - got)[real].abs().max().item() > 1e-2


def test_tied_embeddings_convert(tmp_path):
    reference, directory = save_reference(tmp_path, tie=True)
    ours = Flamingo.from_pretrained(directory)
    head, embed = ours.lm.hf.get_output_embeddings(), ours.lm.hf.get_input_embeddings()
    assert head.weight is embed.weight
    batch = batch_of(FlamingoProcessor.from_pretrained(directory))
    with torch.no_grad():
        expected = reference(**reference_inputs(batch)).logits
        got = ours(**batch).logits
    real = batch["attention_mask"].bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4


def test_greedy_generation_gives_transformers_tokens(tmp_path):
    reference, directory = save_reference(tmp_path)
    ours = Flamingo.from_pretrained(directory)
    processor = FlamingoProcessor.from_pretrained(directory)
    batch = batch_of(processor)
    banned = [[processor.special_tokens.image_id]]
    with torch.no_grad():
        inputs = reference_inputs(batch)
        del inputs["position_ids"]  # transformers' generate derives them from the mask
        expected = reference.generate(
            **inputs, max_new_tokens=6, do_sample=False, bad_words_ids=banned, eos_token_id=None
        )[:, batch["input_ids"].shape[1] :]
        for use_cache in (True, False):
            got = ours.generate(**batch, max_new_tokens=6, eos_token_id=-1, use_cache=use_cache)
            assert torch.equal(got[:, -6:], expected), use_cache


def test_our_processor_gives_llava_processor_ids_and_pixels(tmp_path):
    from transformers import LlavaProcessor

    _, directory = save_reference(tmp_path)
    theirs = LlavaProcessor.from_pretrained(directory, patch_size=PATCH)
    theirs.tokenizer.padding_side = "left"  # as ours pads prompts
    ours = FlamingoProcessor.from_pretrained(directory)
    images = [noise_image(s, (IMAGE_SIZE + 9, IMAGE_SIZE + 2)) for s in range(2)]
    text = "USER: <image>\nWhat is it? ASSISTANT:"
    expected = theirs(text=[text, "<image> x"], images=images, return_tensors="pt", padding=True)
    got = ours([text, "<image> x"], [[images[0]], [images[1]]])
    assert torch.equal(got["input_ids"], expected["input_ids"])
    # the same crop; the resampling is PIL's bicubic in both (uint8 rounding apart)
    diff = (got["pixel_values"][:, 0] - expected["pixel_values"]).abs().max().item()
    assert diff < 0.05


def test_both_key_layouts_convert_the_same(tmp_path):
    """transformers writes LLaVA with the names the llava-hf repos were uploaded with
    (``language_model.model.``, ``vision_tower.vision_model.``, ...), and holds it in memory
    under transformers 5's (``model.language_model.``, ``model.vision_tower.``, ...): a file
    in either layout gives the same model."""
    reference, directory = save_reference(tmp_path)
    saved = load_file(str(directory / "model.safetensors"))
    in_memory = {n: t.contiguous() for n, t in reference.state_dict().items()}
    assert any(n.startswith("language_model.model.") for n in saved)
    assert any(n.startswith("model.language_model.") for n in in_memory)
    batch = batch_of(FlamingoProcessor.from_pretrained(directory))
    with torch.no_grad():
        expected = reference(**reference_inputs(batch)).logits
    real = batch["attention_mask"].bool()
    for layout in (saved, in_memory):
        save_file(layout, str(directory / "model.safetensors"))
        with torch.no_grad():
            got = Flamingo.from_pretrained(directory)(**batch).logits
        assert (got - expected)[real].abs().max().item() <= 1e-4


def test_hub_repo_and_cli_convert_offline(tmp_path, offline_cache, capsys):
    reference, directory = save_reference(tmp_path)
    lay_out(offline_cache, "llava-hf/tiny-llava", directory)
    by_id = Flamingo.from_pretrained("llava-hf/tiny-llava")  # converted once, then kept
    kept = hub.converted_dir("llava-hf/tiny-llava", COMMIT)
    assert (kept / "config.json").is_file()
    said = capsys.readouterr().err  # a first load says what it is doing; a later one is quiet
    assert f"converting the llava checkpoint llava-hf/tiny-llava once, into {kept}" in said
    Flamingo.from_pretrained("llava-hf/tiny-llava")
    assert "converting" not in capsys.readouterr().err
    out = tmp_path / "converted"
    convert_main(["llava", "llava-hf/tiny-llava", str(out)])
    again = Flamingo.from_pretrained(out)
    processor = FlamingoProcessor.from_pretrained("llava-hf/tiny-llava")
    batch = batch_of(processor)
    with torch.no_grad():
        expected = reference(**reference_inputs(batch)).logits
        for model in (by_id, again):
            got = model(**batch).logits
            real = batch["attention_mask"].bool()
            assert (got - expected)[real].abs().max().item() <= 1e-4
    assert again.cfg.connector == "llava" and again.cfg.vision.feature_layer == -2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vision_feature_layer": [-2, -1]}, "one layer is read"),
        ({"projector_hidden_act": "silu"}, "projector_hidden_act"),
        ({"vision_feature_layer": 7}, "the tower has 3 blocks"),
        ({"vision_feature_layer": 0}, "the tower has 3 blocks"),
    ],
)
def test_what_cannot_be_reproduced_is_refused(tmp_path, change, message):
    _, directory = save_reference(tmp_path)
    config = {**json.loads((directory / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=message):
        llava_config(config, directory)
