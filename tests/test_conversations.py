"""Conversations (LLaVA's instruction data): the template, the loss on the assistant's replies
only, the shard schema, LLaVA's JSON converter, the loader, and training on them."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

import train
from data_prep import conversations as convert_conversations
from flamingo import Flamingo, FlamingoProcessor
from flamingo.chat import VICUNA_SYSTEM, render
from flamingo.data.config import DatasetConfig
from flamingo.data.images import ImagePreprocessor
from flamingo.data.pipeline import FlamingoLoader
from flamingo.data.preprocess import Preprocessor
from flamingo.data.schema import SkipSample, decode_conversation, encode_conversation
from flamingo.data.shards import expand_shards, read_shard
from flamingo.losses import IGNORE, make_labels
from tests.helpers import ROOT, tiny_config
from tests.test_connectors import LLAVA, TOKENS
from tests.test_data import solid, write

TURNS = [
    {"role": "user", "text": "What colour is the square?"},
    {"role": "assistant", "text": "It is red."},
    {"role": "user", "text": "And its side?"},
    {"role": "assistant", "text": "Left."},
]


@pytest.fixture(scope="module")
def processor() -> FlamingoProcessor:
    return FlamingoProcessor.from_config(tiny_config(*LLAVA))


def preprocessor(processor, **kw) -> Preprocessor:
    cfg = DatasetConfig(name="chat", kind="conversation", shards="x.tar", seq_len=400, **kw)
    images = ImagePreprocessor(processor.vision_cfg)
    return Preprocessor(cfg, processor.tokenizer, processor.special_tokens, images, TOKENS)


def test_the_vicuna_template_writes_llavas_text():
    text, spans = render(TURNS, "vicuna_v1", "</s>", image=True)
    assert text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the square? ASSISTANT: It is red.</s>"
        "USER: And its side? ASSISTANT: Left.</s>"
    )
    assert [text[a:b] for a, b in spans] == ["It is red.</s>", "Left.</s>"]
    prompt, _ = render(TURNS[:1], "vicuna_v1", "</s>", image=False, generation_prompt=True)
    assert prompt.endswith("USER: What colour is the square? ASSISTANT:")
    with pytest.raises(ValueError, match="turn 1 must be"):
        render([TURNS[0], TURNS[2]], "vicuna_v1", "</s>", image=False)


def test_only_the_replies_are_targets(processor):
    raw = encode_conversation("k", TURNS, (solid((200, 10, 10)), "png"))
    ids, pixels, targets, _ = preprocessor(processor)(raw, random.Random(0), Counter())
    assert pixels.shape[:2] == (1, 1) and len(ids) == len(targets)
    image_id = processor.special_tokens.image_id
    assert ids.count(image_id) == TOKENS
    ids_t, targets_t = torch.tensor([ids]), torch.tensor([targets])
    labels = make_labels(ids_t, torch.ones_like(ids_t), processor.special_tokens, None, targets_t)
    taken = labels[0][labels[0] != IGNORE].tolist()
    eos = processor.tokenizer.eos_token
    assert processor.tokenizer.decode(taken).replace(" ", "") == f"Itisred.{eos}Left.{eos}"
    # the same text tokenized whole, as the processor does a prompt: the same ids
    text, _ = render(TURNS, "vicuna_v1", eos, image=True)
    assert processor([text], [[solid_image()]])["input_ids"][0].tolist() == ids


def solid_image():
    from PIL import Image

    return Image.new("RGB", (16, 16), (200, 10, 10))


def test_a_text_only_conversation_has_no_media(processor):
    raw = encode_conversation("k", TURNS[:2])
    ids, pixels, targets, _ = preprocessor(processor)(raw, random.Random(0), Counter())
    assert pixels.shape[0] == 0 and processor.special_tokens.image_id not in ids
    assert sum(targets) > 0


def test_bad_conversations_are_counted_skips():
    ok = encode_conversation("k", TURNS[:2])
    doc = json.loads(ok["json"])
    cases = {
        "no_turns": {**ok, "json": json.dumps({"x": 1}).encode()},
        "wrong_order": {**ok, "json": json.dumps({"turns": doc["turns"][::-1]}).encode()},
        "no_reply": {
            **ok,
            "json": json.dumps(
                {"turns": [doc["turns"][0], {"role": "assistant", "text": " "}]}
            ).encode(),
        },
        "missing_image": {**ok, "json": json.dumps({**doc, "image": "img0.png"}).encode()},
        # an empty reply among good ones is still an empty reply (learnt: answer with EOS)
        "one_empty_reply": {
            **ok,
            "json": json.dumps(
                {
                    "turns": [
                        *doc["turns"],
                        {"role": "user", "text": "more?"},
                        {"role": "assistant", "text": ""},
                    ]
                }
            ).encode(),
        },
        "no_assistant": {**ok, "json": json.dumps({"turns": doc["turns"][:1]}).encode()},
    }
    reasons = {}
    for name, raw in cases.items():
        with pytest.raises(SkipSample) as e:
            decode_conversation(raw, 10_000)
        reasons[name] = e.value.reason
    assert reasons == {
        "no_turns": "missing_key",
        "wrong_order": "bad_json",
        "no_reply": "empty_reply",
        "one_empty_reply": "empty_reply",
        "no_assistant": "empty_text",
        "missing_image": "missing_key",
    }


def test_llavas_json_converts_to_shards_and_loads(tmp_path, processor):
    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(solid((200, 10, 10)))
    (images / "broken.jpg").write_bytes(b"not an image")
    records = [
        {
            "id": "a",
            "image": "coco/a.png",
            "conversations": [
                {"from": "human", "value": "What is this?\n<image>"},
                {"from": "gpt", "value": "A red square."},
            ],
        },
        {
            "id": "t",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        },
        {"id": "m", "image": "coco/missing.jpg", "conversations": records_turns()},
        {"id": "b", "image": "coco/broken.jpg", "conversations": records_turns()},
        {"id": "g", "conversations": [{"from": "gpt", "value": "first"}]},
        "not a record",
    ]
    path = tmp_path / "llava_instruct.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "shards"
    convert_conversations.main(
        [
            "--max-skip-ratio",
            "1",
            "--llava",
            str(path),
            "--images",
            str(tmp_path / "images"),
            "--out",
            str(out),
        ]
    )
    summary = json.loads((out / "conversations-summary.json").read_text())
    assert summary["samples_written"] == 2
    assert summary["skipped"] == {
        "missing_image": 1,
        "image_decode_error": 1,
        "bad_record": 2,
    }
    samples = [
        s for url in expand_shards(str(out / "conversations-*.tar")) for s in read_shard(url)
    ]
    decoded = [decode_conversation(s, 10_000) for s in samples]
    first = next(d for d in decoded if d.image is not None)
    assert first.turns[0] == {"role": "user", "text": "What is this?"}  # <image> taken out
    assert first.meta["id"] == "a"
    cfg = DatasetConfig(
        name="chat",
        kind="conversation",
        shards=str(out / "conversations-*.tar"),
        batch_size=2,
        seq_len=160,
    )
    batch = next(iter(FlamingoLoader.from_processor(cfg, processor, num_workers=0)))
    assert batch["targets"].shape == batch["input_ids"].shape
    assert batch["pixel_values"].shape[0] == 1  # one of the two has an image
    assert not batch["targets"][batch["attention_mask"] == 0].any()


def records_turns():
    return [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]


def test_generation_prompts_come_from_the_processor(processor):
    batch = processor.chat([TURNS[:1], TURNS[:3]], [solid_image(), None])
    text = processor.tokenizer.decode(batch["input_ids"][1], skip_special_tokens=False)
    assert text.rstrip().endswith("ASSISTANT:") and "It is red." in text
    assert batch["pixel_values"].shape[0] == 1
    assert (batch["input_ids"][0] == processor.special_tokens.image_id).sum() == TOKENS


def test_stage_2_on_conversations_lowers_the_loss(tmp_path):
    """LLaVA's stage 2: instruction tuning with the LM unfrozen, on conversations only."""
    from PIL import Image

    samples = []
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rng = random.Random(0)
    for i in range(48):
        name = rng.choice(list(colours))
        image = Image.new("RGB", (16, 16), colours[name])
        import io

        buf = io.BytesIO()
        image.save(buf, "PNG")
        turns = [
            {"role": "user", "text": "What colour is it?"},
            {"role": "assistant", "text": f"It is {name}."},
        ]
        samples.append(encode_conversation(f"c{i}", turns, (buf.getvalue(), "png")))
    shards = write(tmp_path, samples, "chat", per_shard=12)
    out = tmp_path / "run"
    overrides = [
        "datasets=[{name: chat, kind: conversation, shards: '"
        + shards
        + "', batch_size: 4, seq_len: 160}]",
        "model_overrides=[connector=llava, vision.feature_layer=-2, vision.ln_post_on_tokens=false, lm.trainable=full]",
        f"output_dir={out}",
        "num_workers=0",
        "tensorboard=false",
        "log_every=1",
        "steps=30",
        "checkpoint_every=30",
        "optim.lr=1.0e-3",
    ]
    train.main(["--config", str(ROOT / "configs" / "train" / "tiny-llava.yaml"), *overrides])
    losses = [
        json.loads(line)["loss/chat"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    model = Flamingo.from_pretrained(out / "model")
    assert model.cfg.lm.trainable == "full"


def test_a_batch_of_text_only_conversations_still_reaches_the_projector(processor):
    """A batch with no media item at all (its pixel_values (0, F, C, H, W)) trains the LM and
    gives the projector zero gradients, not none (ZeRO-3's every-parameter contract)."""
    from flamingo.data.preprocess import collate
    from tests.test_connectors import llava

    pre = preprocessor(processor)
    raw = encode_conversation("k", TURNS[:2])
    items = [(f"k{i}", *pre(raw, random.Random(i), Counter())) for i in range(2)]
    batch = collate(items, processor.special_tokens.pad_id, "chat")
    assert batch["pixel_values"].shape[0] == 0 and batch["media_slots"].shape == (2, 0)
    model = llava().train()
    labels = make_labels(
        batch["input_ids"],
        batch["attention_mask"],
        processor.special_tokens,
        None,
        batch["targets"],
    )
    media = {k: batch[k] for k in ("pixel_values", "media_slots")}
    out = model(batch["input_ids"], batch["attention_mask"], labels=labels, **media)
    out.nll_sum.backward()
    assert torch.isfinite(out.nll_sum) and out.nll_sum > 0
    grad = model.projector.linear_1.weight.grad
    assert grad is not None and not grad.any()
