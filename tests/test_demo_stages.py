"""Demo stages 1 and 2 on a small toy world: losses fall and the results load as the frozen
parts of a Flamingo model config. Stage 1 runs open_clip's own trainer (open_clip_train)."""

from __future__ import annotations

import logging

import pytest
import torch

from data_prep.toy_world import write_world
from demo import pretrain_clip, pretrain_lm
from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor
from flamingo.config import VisionConfig
from flamingo.typed_config import load_config
from flamingo.vision import build_clip
from tests.helpers import ROOT, noise_image


def test_stages_pretrain_and_load_into_the_demo_model(tmp_path):
    from open_clip_train import data as oc_data

    world = write_world(tmp_path / "world", seed=0, scale=0.05)
    root_handlers = list(logging.getLogger().handlers)
    clip_cfg = load_config(
        pretrain_clip.ClipPretrainConfig,
        ROOT / "configs/demo/clip.yaml",
        [
            f"shards={world['shards']['pairs-train']}",
            f"val_shards={world['shards']['pairs-val']}",
            f"output={tmp_path / 'clip.pt'}",
            "steps=40",
            "log_every=1",
        ],
    )
    clip = pretrain_clip.pretrain(clip_cfg)
    assert clip["last_loss"] < clip["first_loss"] - 0.5
    assert clip["val"]["val_pairs"] == 30  # 10% of 300
    # retrieval over the 30 val pairs above chance (3.3%) both ways: at least 3 right of 30
    # (5 here after 40 steps; twins still at chance, 50%, so that only longer runs learn)
    assert min(clip["val"]["image_to_text_r1"], clip["val"]["text_to_image_r1"]) >= 10
    # open_clip_train's module settings and logging are as they were
    assert (
        oc_data._SAMPLE_SHUFFLE_SIZE == 5000 and oc_data.tar_file_expander.__module__ != "functools"
    )
    assert logging.getLogger().handlers == root_handlers
    # open_clip_train's own checkpoint (optimizer and all) loads as the tower too, the same weights
    run_checkpoint = tmp_path / "open_clip_train/clip/checkpoints/epoch_1.pt"
    vision = VisionConfig(
        model_name="clip",
        pretrained=str(run_checkpoint),
        architecture=clip_cfg.architecture,
        image_size=64,
    )
    raw = build_clip(vision).state_dict()
    saved = torch.load(tmp_path / "clip.pt", weights_only=True)["state_dict"]
    assert raw.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(raw[name], tensor, msg=name)
    lm_cfg = load_config(
        pretrain_lm.LMPretrainConfig,
        ROOT / "configs/demo/lm.yaml",
        [
            f"corpus={tmp_path / 'world/text/corpus.txt'}",
            f"output_dir={tmp_path / 'lm'}",
            "steps=40",
        ],
    )
    lm = pretrain_lm.pretrain(lm_cfg)
    assert lm["last_loss"] < lm["first_loss"] - 2.0

    cfg = FlamingoConfig.from_yaml(
        ROOT / "configs/demo/model.yaml",
        [
            f"vision.pretrained={tmp_path / 'clip.pt'}",
            f"lm.name_or_path={tmp_path / 'lm'}",
            f"lm.tokenizer={tmp_path / 'lm'}",
        ],
    )
    model = Flamingo.from_config(cfg).eval()
    torch.testing.assert_close(model.vision.visual.conv1.weight, saved["visual.conv1.weight"])
    processor = FlamingoProcessor.from_config(cfg)
    enc = processor(["<image>a small red circle"], images=[[noise_image(0, (64, 64))]])
    assert torch.isfinite(model(**enc).logits).all()


def test_retrieval_scores_known_features():
    eye = torch.eye(4)
    assert pretrain_clip.retrieval(eye, eye, twins=True) == {
        "image_to_text_r1": 100.0,
        "text_to_image_r1": 100.0,
        "twin_accuracy": 100.0,
    }
    # the captions of pair 0 and its twin swapped: both images of that pair pick the twin's
    swapped = eye[[1, 0, 2, 3]]
    assert pretrain_clip.retrieval(eye, swapped, twins=True) == {
        "image_to_text_r1": 50.0,
        "text_to_image_r1": 50.0,
        "twin_accuracy": 50.0,
    }
    # scale does not matter (cosine similarity); a twin-less run reports no twin accuracy
    assert pretrain_clip.retrieval(3 * eye, eye) == {
        "image_to_text_r1": 100.0,
        "text_to_image_r1": 100.0,
    }
    with pytest.raises(ValueError, match="3 pairs, an odd number"):
        pretrain_clip.retrieval(eye[:3], eye[:3], twins=True)


def test_clip_config_errors_name_the_field():
    arch = {"text_cfg": {"context_length": 32}}
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        pretrain_clip.ClipPretrainConfig(shards="x", output="y", architecture=arch, steps=0)
    with pytest.raises(ValueError, match="context_length=77 differs from .*context_length=32"):
        pretrain_clip.ClipPretrainConfig(
            shards="x", output="y", architecture=arch, context_length=77
        )
    arch["vision_cfg"] = {"image_size": 64}
    with pytest.raises(ValueError, match="image_size=96 differs from .*vision_cfg.image_size=64"):
        pretrain_clip.ClipPretrainConfig(
            shards="x", output="y", architecture=arch, context_length=32, image_size=96
        )


def test_open_clip_train_args_name_the_budget(tmp_path):
    cfg = pretrain_clip.ClipPretrainConfig(
        shards="s-{0..1}.tar",
        output="y",
        architecture={},
        context_length=77,
        image_size=224,
        steps=50,
    )
    args = pretrain_clip.train_args(cfg, "toy", tmp_path, "cpu")
    from open_clip_train.params import parse_args

    parsed = parse_args(args)  # open_clip_train's own parser accepts every flag
    assert parsed.train_num_samples == 50 * 64 and parsed.epochs == 1
    assert parsed.dataset_resampled and parsed.precision == "fp32"
    assert parsed.aug_cfg == {"scale": (1.0, 1.0)}
