"""The LLaVA connector (``connector: llava``) on the tiny config: the properties the Flamingo
connector's tests hold (``tests/test_model.py``) where they apply to a projector whose tokens
take the place of the ``<image>`` tokens, and its two training stages."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

import train
from data_prep.tiny import write_tiny_shards
from flamingo import Flamingo, FlamingoProcessor
from flamingo.data.images import ImagePreprocessor
from flamingo.data.preprocess import Preprocessor
from flamingo.data.schema import encode_pair
from flamingo.losses import IGNORE, make_labels
from flamingo.training.engine import param_groups
from tests.helpers import ROOT, build, noise_image, tiny_config
from tests.test_data import solid

LLAVA = ("connector=llava", "vision.feature_layer=-2", "vision.ln_post_on_tokens=false")
TOKENS = 16  # the tiny tower's 4 x 4 patches, the CLS token dropped
TRAIN_CONFIG = str(ROOT / "configs" / "train" / "tiny-llava.yaml")
TEXT = "hello <image>a red circle<|endofchunk|><image>a blue square<|endofchunk|>"


def llava(*overrides: str, seed: int = 0) -> Flamingo:
    return build(*LLAVA, *overrides, seed=seed)


@pytest.fixture(scope="module")
def processor() -> FlamingoProcessor:
    return FlamingoProcessor.from_config(tiny_config(*LLAVA))


def batch(processor, seeds=(1, 2), text=TEXT, **kw):
    return processor([text], [[noise_image(s) for s in seeds]], **kw)


def image_positions(processor, ids: torch.Tensor) -> torch.Tensor:
    return (ids == processor.special_tokens.image_id).nonzero()[:, -1]


def test_each_image_is_its_tokens_in_the_text_and_never_a_target(processor):
    enc = batch(processor)
    assert processor.image_tokens == TOKENS
    positions = image_positions(processor, enc["input_ids"][0])
    assert len(positions) == 2 * TOKENS
    labels = make_labels(enc["input_ids"], enc["attention_mask"], processor.special_tokens)
    assert (labels[0, positions] == IGNORE).all()
    assert (labels[0, positions[-1] + 1 :] != IGNORE).any()  # the text after an image is


def test_the_data_path_writes_the_same_runs(processor):
    """Training samples: ``seq_len`` counts an image once, and the run of its tokens is
    written after the window is taken (no window cuts an image's tokens in half)."""
    cfg = train.TrainConfig.from_yaml(
        TRAIN_CONFIG,
        ["datasets.1.shards=x.tar", "datasets.0.shards=x.tar"],
    ).datasets[1]
    images = ImagePreprocessor(processor.vision_cfg)
    special, tokenizer = processor.special_tokens, processor.tokenizer
    raw = encode_pair("k", solid((200, 10, 10)), "png", "a red square")
    ids, pixels, _, _ = Preprocessor(cfg, tokenizer, special, images, TOKENS)(
        raw, random.Random(0), Counter()
    )
    once, _, _, _ = Preprocessor(cfg, tokenizer, special, images)(raw, random.Random(0), Counter())
    assert pixels.shape[0] == 1 and ids.count(special.image_id) == TOKENS
    at = once.index(special.image_id)
    assert ids == once[:at] + [special.image_id] * TOKENS + once[at + 1 :]


def test_changing_image_k_changes_only_tokens_from_its_tokens_on(processor):
    model = llava()
    a, b = batch(processor, seeds=(1, 2)), batch(processor, seeds=(1, 3))
    with torch.no_grad():
        diff = (model(**a).logits - model(**b).logits).abs().amax(-1)[0]
    second = image_positions(processor, a["input_ids"][0])[TOKENS]
    assert diff[:second].max() == 0
    assert (diff[second:] > 1e-6).all()


def test_left_padding_invariance(processor):
    model = llava()
    enc = processor([TEXT, "<image>short"], [[noise_image(1), noise_image(2)], [noise_image(3)]])
    alone = processor(["<image>short"], [[noise_image(3)]])
    with torch.no_grad():
        both = model(**enc).logits[1, -alone["input_ids"].shape[1] :]
        single = model(**alone).logits[0]
    torch.testing.assert_close(both, single, atol=1e-5, rtol=1e-5)


def test_stage_1_trains_the_projector_and_new_rows_only(processor):
    model = llava().train()
    trainable = {
        n.split(".")[0] + "." + n.split(".")[1]
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"projector.linear_1", "projector.linear_2", "lm.new_tokens"}
    assert set(model.trainable_modules()) == {"projector", "new_tokens"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    enc = batch(processor)
    labels = make_labels(enc["input_ids"], enc["attention_mask"], processor.special_tokens)
    before = model.projector.linear_1.weight.detach().clone()
    model(**enc, labels=labels).nll_sum.backward()
    optimizer.step()
    assert not torch.equal(before, model.projector.linear_1.weight)
    after = dict(model.named_parameters())
    assert all(torch.equal(t, after[n]) for n, t in frozen.items())


def test_stage_2_trains_the_lm_and_round_trips(processor, tmp_path):
    model = llava("lm.trainable=full", seed=1)
    names = model.trainable_state_dict()
    assert any(n.startswith("lm.hf.model.layers.") for n in names)
    assert set(model.trainable_modules()) == {"projector", "lm", "new_tokens"}
    with torch.no_grad():  # a trained LM: its weights must come back from the checkpoint
        for p in model.lm.hf.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "ckpt", processor)
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg.lm.trainable == "full" and loaded.cfg.connector == "llava"
    enc = batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, model.eval()(**enc).logits)


def test_stage_1_round_trips(processor, tmp_path):
    model = llava(seed=2)
    model.save_pretrained(tmp_path / "ckpt", processor)
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    enc = batch(processor)
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, model(**enc).logits)
    saved = json.loads((tmp_path / "ckpt" / "processor_config.json").read_text())
    assert saved["padding_side"] == "left"
    assert FlamingoProcessor.from_pretrained(tmp_path / "ckpt").image_tokens == TOKENS


def test_cached_and_uncached_decoding_agree(processor):
    model = llava(seed=3)
    enc = processor([TEXT, "<image>short"], [[noise_image(1), noise_image(2)], [noise_image(3)]])
    for beams in (1, 3):
        cached = model.generate(**enc, max_new_tokens=5, num_beams=beams, eos_token_id=-1)
        full = model.generate(
            **enc, max_new_tokens=5, num_beams=beams, eos_token_id=-1, use_cache=False
        )
        assert torch.equal(cached, full), beams
    one = processor(["<image>a"], [[noise_image(4)]])
    candidates = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
    scores = model.score(
        one["input_ids"],
        candidates,
        pixel_values=one["pixel_values"],
        media_slots=one["media_slots"],
        candidates_per_call=2,
    )
    for i, c in enumerate(candidates):
        ids = torch.cat([one["input_ids"][0], c])[None]
        with torch.no_grad():
            logits = model(
                ids, pixel_values=one["pixel_values"], media_slots=one["media_slots"]
            ).logits
        logprobs = logits[0, :-1].log_softmax(-1)
        start = one["input_ids"].shape[1]
        expected = sum(logprobs[start - 1 + j, t] for j, t in enumerate(c.tolist()))
        torch.testing.assert_close(scores[i], expected, atol=1e-4, rtol=1e-4)


def test_a_step_without_images_still_reaches_the_projector(processor):
    """Every parameter takes part in every step (ZeRO-3's contract): a text-only step gives
    the projector zero gradients, not none."""
    model = llava().train()
    enc = processor(["just text, no image here"])
    labels = make_labels(enc["input_ids"], enc["attention_mask"], processor.special_tokens)
    labels[:, 1:] = enc["input_ids"][:, 1:]  # text-only: take every token
    model(**enc, labels=labels).nll_sum.backward()
    grad = model.projector.linear_1.weight.grad
    assert grad is not None and not grad.any()


def test_bad_media_are_clear_errors(processor):
    model = llava()
    enc = batch(processor)
    one = processor(["<image>x"], [[noise_image(1)]])
    with pytest.raises(ValueError, match="<image> tokens in a row but the media give"):
        model(enc["input_ids"], pixel_values=one["pixel_values"], media_slots=one["media_slots"])
    video = processor(["<image>x"], [[[noise_image(1), noise_image(2)]]])
    with pytest.raises(ValueError, match="single images"):
        model(**video)
    latents = model.encode_media(one["pixel_values"], one["media_slots"])
    assert latents.shape == (1, 1, TOKENS, model.lm.hf.config.hidden_size)
    with pytest.raises(ValueError, match="media_kv"):
        model(one["input_ids"], media_kv=[])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("lm.trainable=full",), "connector: llava"),
        (("connector=llava", "vision.feature_layer=-2"), "ln_post_on_tokens"),
        ((*LLAVA, "lm.special_tokens=idefics"), "IDEFICS's prompt form"),
        (("vision.feature_layer=0",), "counts from the last block"),
    ],
)
def test_connector_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(*overrides)


def train_args(tmp_path) -> list[str]:
    """configs/train/tiny-llava.yaml's overrides for a quick run on fresh tiny shards."""
    shards = write_tiny_shards(tmp_path / "shards")
    return [
        f"datasets.0.shards={shards['interleaved']}",
        f"datasets.1.shards={shards['pairs']}",
        "num_workers=0",
        "tensorboard=false",
        "log_every=1",
    ]


def test_train_stage_1_then_stage_2(tmp_path):
    config, common = TRAIN_CONFIG, train_args(tmp_path)
    one = tmp_path / "stage1"
    train.main(
        ["--config", config, *common, f"output_dir={one}", "steps=30", "checkpoint_every=30"]
    )
    losses = [
        json.loads(line)["loss/total"] for line in (one / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    stage1 = Flamingo.from_pretrained(one / "model")
    two = tmp_path / "stage2"
    train.main(
        [
            "--config",
            config,
            *common,
            "model=null",
            f"init_from={one / 'model'}",
            "model_overrides=[lm.trainable=full]",
            f"output_dir={two}",
            "steps=5",
            "checkpoint_every=5",
            "optim.lr=1.0e-3",
        ]
    )
    stage2 = Flamingo.from_pretrained(two / "model")
    assert stage2.cfg.lm.trainable == "full"
    layer = "lm.hf.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(stage1.state_dict()[layer], stage2.state_dict()[layer])
    with pytest.raises(ValueError, match="video"):
        train.main(
            [
                "--config",
                config,
                *common,
                f"output_dir={tmp_path / 'video'}",
                "datasets.1.kind=video",
                "steps=1",
            ]
        )


def test_a_checkpoints_architecture_cannot_change_with_init_from():
    with pytest.raises(ValueError, match="what trains"):
        train.TrainConfig.from_yaml(
            TRAIN_CONFIG,
            ["model=null", "init_from=x", "model_overrides=[connector=flamingo]"],
        )


def test_a_prompt_past_the_lms_positions_is_a_clear_error(processor):
    model = llava("lm.architecture.max_position_embeddings=40")
    enc = batch(processor)  # two images: 32 <image> tokens and the text
    with pytest.raises(ValueError, match="LM takes 40 positions"):
        model(**enc)


@pytest.mark.parametrize("connector", ["llava", "qformer"])
def test_eval_runs_every_task_on_a_splicing_connector(tmp_path, capsys, connector):
    from eval.run import main as eval_main
    from tests.eval_fixtures import small_eval_config
    from tests.test_blip2 import QFORMER
    from tests.test_eval import BENCHMARKS

    build(*(LLAVA if connector == "llava" else QFORMER), seed=4).save_pretrained(tmp_path / "ckpt")
    args = ["--config", str(small_eval_config(tmp_path)), "--checkpoint", str(tmp_path / "ckpt")]
    results = eval_main([*args, "demos=rices"])["results"]
    assert set(results) == BENCHMARKS
    for task, by_shots in results.items():
        assert set(by_shots) == {"0", "2"}, task
        for entry in by_shots.values():
            assert all(0 <= m["mean"] <= 100 + 1e-6 for m in entry["scores"].values()), task
    assert "| coco | CIDEr | 2 |" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_stage_2_under_zero2_and_zero3_gives_the_same_model(tmp_path):
    """The trainable LM is the case ZeRO-3 exists for: LLaVA's stage 2 on two processes under
    ZeRO-2 and ZeRO-3 (LM partitioned with the projector) ends with the same weights."""
    from safetensors.torch import load_file

    from tests.test_train import check, two_ranks

    shards = write_tiny_shards(tmp_path / "shards")
    stage2 = f"model_overrides={json.dumps([*LLAVA, 'lm.trainable=full'])}"
    weights = {}
    for stage in ("zero2", "zero3"):
        out = tmp_path / stage
        args = [
            "train.py",
            "--config",
            TRAIN_CONFIG,
            f"datasets.0.shards={shards['interleaved']}",
            f"datasets.1.shards={shards['pairs']}",
            f"engine.deepspeed=configs/deepspeed/{stage}.json",
            f"output_dir={out}",
            "num_workers=0",
            "tensorboard=false",
            "steps=3",
            "checkpoint_every=3",
            stage2,
        ]
        check(two_ranks(args))
        weights[stage] = load_file(str(out / "model" / "model.safetensors"))
    assert any(n.startswith("lm.hf.model.layers.") for n in weights["zero3"])
    for name, want in weights["zero2"].items():
        torch.testing.assert_close(weights["zero3"][name], want, rtol=1e-5, atol=1e-6, msg=name)


LORA = ("lm.trainable=lora", "lm.lora.rank=4", "lm.lora.alpha=8", "lm.lora.dropout=0.0")


def test_lora_starts_as_the_lm_trains_only_adapters_and_round_trips(processor, tmp_path):
    plain, adapted = llava(seed=5), llava(*LORA, seed=5)
    enc = batch(processor)
    with torch.no_grad():  # lora_B starts at zero: the adapted LM is the LM
        torch.testing.assert_close(adapted(**enc).logits, plain(**enc).logits)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert all(n.startswith(("projector.", "lm.new_tokens.")) or ".lora_" in n for n in trainable)
    assert any(".self_attn.q_proj.lora_A." in n for n in trainable)
    assert any(".mlp.down_proj.lora_B." in n for n in trainable)  # all-linear
    assert not any("lm_head" in n for n in trainable)
    assert set(adapted.trainable_modules()) == {"projector", "lora", "new_tokens"}
    covered = {id(p) for m in adapted.trainable_modules().values() for p in m.parameters()}
    assert {id(p) for p in adapted.parameters() if p.requires_grad} <= covered
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.1)
    changed = adapted(**enc).logits
    assert (changed - plain(**enc).logits).abs().max() > 1e-3
    adapted.save_pretrained(tmp_path / "ckpt", processor)
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, changed)


def test_lora_targets_are_checked():
    model = llava("lm.trainable=lora", "lm.lora.targets=[q_proj, v_proj]", "lm.lora.rank=2")
    adapted = {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, _ in model.named_parameters()
        if ".lora_" in n
    }
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="q_projection"):
        llava("lm.trainable=lora", "lm.lora.targets=[q_projection]")


def test_train_stage_2_with_lora_from_stage_1(tmp_path):
    config, common = TRAIN_CONFIG, train_args(tmp_path)
    one = tmp_path / "stage1"
    train.main(["--config", config, *common, f"output_dir={one}", "steps=3", "checkpoint_every=3"])
    two = tmp_path / "stage2"
    overrides = "[lm.trainable=lora, lm.lora.rank=4, lm.lora.alpha=8]"
    train.main(
        [
            "--config",
            config,
            *common,
            "model=null",
            f"init_from={one / 'model'}",
            f"model_overrides={overrides}",
            f"output_dir={two}",
            "steps=5",
            "checkpoint_every=5",
        ]
    )
    model = Flamingo.from_pretrained(two / "model")
    assert model.cfg.lm.trainable == "lora" and model.cfg.lm.lora.rank == 4
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # the adapters trained


BLIP2_CONFIG = str(ROOT / "configs" / "train" / "tiny-blip2.yaml")


def test_blip2_stage_1_through_train_py_then_stage_2_from_its_q_former(tmp_path):
    from flamingo.qformer_pretraining import QFormerPretraining

    shards = write_tiny_shards(tmp_path / "shards")
    common = [f"datasets.0.shards={shards['pairs']}", "num_workers=0", "tensorboard=false"]
    one = tmp_path / "stage1"
    train.main(
        ["--config", BLIP2_CONFIG, *common, f"output_dir={one}", "steps=40", "log_every=1"]
        + ["checkpoint_every=40", "optim.lr=3e-3"]
    )
    rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert {"itc/pairs", "itm/pairs", "itg/pairs", "temperature"} <= set(rows[0])
    for key in ("loss/total", "itg/pairs"):
        early, late = (sum(r[key] for r in part) / 5 for part in (rows[:5], rows[-5:]))
        assert late < early - 0.1, key
    stage1 = QFormerPretraining.from_pretrained(one / "model")
    assert stage1.vocab.cls == len(FlamingoProcessor.from_config(stage1.model_cfg).tokenizer)

    two = tmp_path / "stage2"
    train.main(
        ["--config", BLIP2_CONFIG, *common, "objective=nll", f"init_qformer={one / 'model'}"]
        + [f"output_dir={two}", "steps=1", "checkpoint_every=1", "optim.lr=1e-9"]
    )
    stage2 = Flamingo.from_pretrained(two / "model")
    assert stage2.cfg.connector == "qformer"
    ours = dict(stage2.qformer.named_parameters())
    for name, tensor in stage1.connector_state().items():  # lr 1e-9: what stage 1 left
        torch.testing.assert_close(ours[name], tensor, msg=name)
    assert "embeddings.word_embeddings.weight" not in ours  # the text side stays behind

    from flamingo.training.stage1 import start_from_stage1

    shapes = yaml.safe_load(Path(BLIP2_CONFIG).read_text())["model_overrides"]
    for change, message in (("qformer.layers=3", "layers"), ("vision.cls_token=false", "tower")):
        other = Flamingo.from_config(tiny_config(*shapes, change))
        with pytest.raises(ValueError, match=message):
            start_from_stage1(other, one / "model")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model_overrides=[]"], "connector=qformer"),
        (["datasets.0.kind=interleaved"], "kind: pairs"),
        (["datasets.0.batch_size=1"], "negatives"),
        (["datasets.0.packing=block_diagonal", "datasets.0.packed_len=48"], "packing: none"),
        (["eval_every=5", "eval_config=configs/eval/flamingo-benchmarks.yaml"], "evaluate stage 2"),
    ],
)
def test_blip2_stage_1_refuses_what_it_cannot_train(tmp_path, overrides, message):
    shards = write_tiny_shards(tmp_path / "shards")
    args = [f"datasets.0.shards={shards['pairs']}", "num_workers=0", f"output_dir={tmp_path}"]
    with pytest.raises(ValueError, match=message):
        train.main(["--config", BLIP2_CONFIG, *args, *overrides, "steps=1"])


@pytest.mark.multiprocess
def test_blip2_stage_1_on_two_processes_under_zero2(tmp_path):
    """Both ranks' features and negatives meet in the collectives (a mismatch hangs or
    raises); the run ends with an export that loads."""
    from flamingo.qformer_pretraining import QFormerPretraining
    from tests.test_train import check, two_ranks

    shards = write_tiny_shards(tmp_path / "shards")
    out = tmp_path / "zero2"
    args = [
        "train.py",
        "--config",
        BLIP2_CONFIG,
        f"datasets.0.shards={shards['pairs']}",
        "engine.deepspeed=configs/deepspeed/zero2.json",
        f"output_dir={out}",
        "num_workers=0",
        "tensorboard=false",
        "steps=3",
        "log_every=1",
        "checkpoint_every=3",
    ]
    check(two_ranks(args))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss/total"] > 0 for r in rows)
    QFormerPretraining.from_pretrained(out / "model")
