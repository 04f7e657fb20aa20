"""BLIP-2 import: transformers' ``Blip2ForConditionalGeneration`` (OPT) on tiny random configs,
saved by transformers itself, converted, and compared logit for logit, token for token."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from flamingo import hub
from flamingo.convert.__main__ import main as convert_main
from flamingo.convert.blip2 import blip2_config
from flamingo.data.config import DatasetConfig
from flamingo.data.images import ImagePreprocessor
from flamingo.data.preprocess import Preprocessor
from flamingo.data.schema import encode_pair
from flamingo.model import Flamingo
from flamingo.processing import FlamingoProcessor
from flamingo.tokens import IMAGE
from tests.helpers import COMMIT, TINY_OPT, lay_out, noise_image, tokenizer_with_image

IMAGE_SIZE, PATCH, QUERIES = 28, 7, 4

VISION = dict(
    hidden_size=24,
    intermediate_size=52,  # not a multiple of the width, as ViT-g's 6144 / 1408
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH,
)
"""The tiny EVA tower of the BLIP-2 references (stage 2's and stage 1's)."""

CASES = {  # (Q-Former layers, cross-attention frequency, tied LM embeddings)
    "every_other_layer": (3, 2, False),
    "every_layer_tied": (2, 1, True),
}


def save_reference(tmp_path, case: str = "every_other_layer", seed: int = 0, bos: bool = False):
    """A random BLIP-2, its norms and biases set away from their initial values, written by
    transformers with its tokenizer (``bos``: one that adds a start token, as OPT's does):
    (model, directory)."""
    layers, every, tie = CASES[case]
    tokenizer = tokenizer_with_image(bos)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=dict(
            hidden_size=16,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=40,
            cross_attention_frequency=every,
        ),
        text_config=dict(
            TINY_OPT,
            vocab_size=len(tokenizer),
            max_position_embeddings=128,
            tie_word_embeddings=tie,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        num_query_tokens=QUERIES,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    torch.manual_seed(seed)
    reference = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))  # q/v and patch-embedding biases too
            elif p.ndim >= 2:
                p.normal_(0.0, 0.2)  # large enough that the images move the logits by > 1e-4
    directory = tmp_path / f"{case}-bos" if bos else tmp_path / case
    reference.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return reference, directory


def solid_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def batch_of(processor: FlamingoProcessor):
    """Two sequences of different lengths (left padding), three images, two in one row."""
    a, b, c = (noise_image(s, (IMAGE_SIZE + 6, IMAGE_SIZE)) for s in range(3))
    return processor(["<image>a cat and<image>a dog, and", "<image> one"], [[a, b], [c]])


def reference_inputs(batch):
    mask = batch["attention_mask"]
    return dict(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        pixel_values=batch["pixel_values"][:, 0],
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_equal_transformers_blip2(tmp_path, case):
    reference, directory = save_reference(tmp_path, case)
    ours = Flamingo.from_pretrained(directory)  # a BLIP-2 directory: converted in memory
    processor = FlamingoProcessor.from_pretrained(directory)
    batch = batch_of(processor)
    assert processor.image_tokens == QUERIES
    assert batch["attention_mask"][1, 0] == 0  # the second sequence is left padded
    with torch.no_grad():
        expected = reference(**reference_inputs(batch)).logits
        got = ours(**batch).logits
        other = ours(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).logits
    assert not any(p.is_meta for p in ours.parameters())
    real = batch["attention_mask"].bool()
    assert got.shape == expected.shape
    assert (got - expected)[real].abs().max().item() <= 1e-4
    assert (other - got)[real].abs().max().item() > 1e-2  # the images matter


def test_blip2_processors_prompt_order_with_a_start_token(tmp_path):
    # OPT's tokenizer starts a text with </s>; Blip2Processor puts the queries before it
    reference, directory = save_reference(tmp_path, bos=True)
    theirs = Blip2Processor(
        BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        AutoTokenizer.from_pretrained(directory),
        num_query_tokens=QUERIES,
    )
    ours = FlamingoProcessor.from_pretrained(directory)
    model = Flamingo.from_pretrained(directory)
    image = noise_image(5, (IMAGE_SIZE + 6, IMAGE_SIZE))
    prompt = "Question: what is it? Answer:"
    expected = theirs(images=[image], text=prompt, return_tensors="pt")
    got = ours([IMAGE + prompt], [[image]])
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    assert got["input_ids"][0, QUERIES] == ours.tokenizer.bos_token_id  # after the queries
    assert torch.equal(got["pixel_values"][:, 0], expected["pixel_values"])
    with torch.no_grad():
        difference = (model(**got).logits - reference(**expected).logits).abs().max().item()
        assert difference <= 1e-4
        banned = [[ours.special_tokens.image_id]]
        want = reference.generate(
            **expected, max_new_tokens=6, do_sample=False, bad_words_ids=banned, eos_token_id=None
        )[:, -6:]
        assert torch.equal(model.generate(**got, max_new_tokens=6, eos_token_id=-1)[:, -6:], want)
    # the training loader writes a pair in the same order
    pairs = DatasetConfig(
        name="pairs", kind="pairs", shards="x.tar", seq_len=40, p_leading_space=0.0
    )
    pre = Preprocessor(
        pairs,
        ours.tokenizer,
        ours.special_tokens,
        ImagePreprocessor(ours.vision_cfg),
        ours.image_tokens,
        ours.images_before_bos,
    )
    raw = encode_pair("k", solid_png(), "png", "a cat")
    ids, _, _, _ = pre(raw, random.Random(0), Counter())
    caption = theirs(images=[image], text="a cat<|endofchunk|>", return_tensors="pt")["input_ids"]
    assert ids[: QUERIES + 1] == caption[0, : QUERIES + 1].tolist()


def test_greedy_generation_gives_transformers_tokens(tmp_path):
    reference, directory = save_reference(tmp_path)
    ours = Flamingo.from_pretrained(directory)
    processor = FlamingoProcessor.from_pretrained(directory)
    batch = batch_of(processor)
    banned = [[processor.special_tokens.image_id]]
    with torch.no_grad():
        expected = reference.generate(
            **reference_inputs(batch),
            max_new_tokens=6,
            do_sample=False,
            bad_words_ids=banned,
            eos_token_id=None,
        )[:, -6:]
        for use_cache in (True, False):
            got = ours.generate(**batch, max_new_tokens=6, eos_token_id=-1, use_cache=use_cache)
            assert torch.equal(got[:, -6:], expected), use_cache


def test_hub_repo_and_cli_convert_offline(tmp_path, offline_cache):
    reference, directory = save_reference(tmp_path)
    lay_out(offline_cache, "Salesforce/tiny-blip2", directory)
    by_id = Flamingo.from_pretrained("Salesforce/tiny-blip2")
    assert (hub.converted_dir("Salesforce/tiny-blip2", COMMIT) / "config.json").is_file()
    out = tmp_path / "converted"
    convert_main(["blip2", "Salesforce/tiny-blip2", str(out)])
    again = Flamingo.from_pretrained(out)
    batch = batch_of(FlamingoProcessor.from_pretrained("Salesforce/tiny-blip2"))
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**reference_inputs(batch)).logits
        for model in (by_id, again):
            assert (model(**batch).logits - expected)[real].abs().max().item() <= 1e-4
    assert again.cfg.connector == "qformer" and again.cfg.vision.layer_norm_eps == 1e-6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qformer_config": {"use_qformer_text_input": True}}, "instruction text"),
        ({"text_config": {"model_type": "t5"}}, "decoder-only"),
        ({"vision_config": {"hidden_act": "silu"}}, "hidden_act"),
    ],
)
def test_what_cannot_be_reproduced_is_refused(tmp_path, change, message):
    _, directory = save_reference(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    for key, values in change.items():
        config[key] = {**config[key], **values}
    with pytest.raises(ValueError, match=message):
        blip2_config(config, directory)


# -- the Q-Former connector on the tiny config: the properties the other connectors hold -----

QFORMER = (
    "connector=qformer",
    "vision.cls_token=true",
    "qformer.queries=4",
    "qformer.layers=2",
    "qformer.width=32",
    "qformer.heads=2",
    "qformer.intermediate=64",
)


@pytest.fixture(scope="module")
def tiny_processor() -> FlamingoProcessor:
    from tests.helpers import tiny_config

    return FlamingoProcessor.from_config(tiny_config(*QFORMER))


def tiny_batch(processor):
    images = [[noise_image(1), noise_image(2)], [noise_image(3)]]
    return processor(["hello <image>a red circle<|endofchunk|><image>a", "<image>short"], images)


def test_stage_2_trains_the_qformer_and_new_rows_only(tiny_processor):
    from flamingo.losses import make_labels
    from flamingo.training.engine import param_groups
    from tests.helpers import build

    model = build(*QFORMER).train()
    assert set(model.trainable_modules()) == {"qformer", "new_tokens"}
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"qformer", "lm"}  # lm: its new token rows only
    assert all(
        n.startswith("lm.new_tokens.")
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith("lm.")
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    enc = tiny_batch(tiny_processor)
    labels = make_labels(enc["input_ids"], enc["attention_mask"], tiny_processor.special_tokens)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    before = model.qformer.query_tokens.detach().clone()
    model(**enc, labels=labels).nll_sum.backward()
    optimizer.step()
    assert not torch.equal(before, model.qformer.query_tokens)
    after = dict(model.named_parameters())
    assert all(torch.equal(t, after[n]) for n, t in frozen.items())


def test_train_py_trains_the_qformer(tmp_path):
    import train
    from data_prep.tiny import write_tiny_shards
    from tests.helpers import ROOT

    shards = write_tiny_shards(tmp_path / "shards")
    out = tmp_path / "run"
    train.main(
        [
            "--config",
            str(ROOT / "configs" / "train" / "tiny-llava.yaml"),
            f"datasets.0.shards={shards['interleaved']}",
            f"datasets.1.shards={shards['pairs']}",
            f"model_overrides={json.dumps(list(QFORMER))}",
            f"output_dir={out}",
            "num_workers=0",
            "tensorboard=false",
            "log_every=1",
            "steps=30",
            "checkpoint_every=30",
        ]
    )
    losses = [
        json.loads(line)["loss/total"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    assert Flamingo.from_pretrained(out / "model").cfg.connector == "qformer"


def test_the_towers_layer_norm_epsilon_is_its_own_unless_given():
    from tests.helpers import build

    def epsilons(model):
        return {m.eps for m in model.vision.modules() if isinstance(m, torch.nn.LayerNorm)}

    assert epsilons(build()) == {1e-5}  # what open_clip built
    assert epsilons(build("vision.layer_norm_eps=1e-6")) == {1e-6}  # BLIP-2's EVA tower


@pytest.mark.parametrize(("saved", "frozen"), [("bfloat16", "bfloat16"), ("float32", "float32")])
def test_the_checkpoints_precision_is_the_frozen_parts(tmp_path, saved, frozen):
    """The frozen tower and LM keep the dtype the checkpoint was saved in, for LLaVA and
    BLIP-2 alike (the Q-Former and the projector train in float32 whatever it was)."""
    from flamingo.convert.llava import llava_config
    from tests.test_llava import save_reference as save_llava

    for save, read in ((save_reference, blip2_config), (save_llava, llava_config)):
        _, directory = save(tmp_path / read.__name__)
        config = json.loads((directory / "config.json").read_text())
        config["text_config"]["dtype"] = saved
        assert read(config, directory).frozen_dtype == frozen, read.__name__
