"""Demo stages 1 and 2 on a small toy world: losses fall and the results load as the frozen
parts of a Flamingo model config."""

from __future__ import annotations

import random

import pytest
import torch

from data_prep.toy_world import write_world
from demo import pretrain_clip, pretrain_lm
from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor
from flamingo.typed_config import load_config
from tests.conftest import ROOT, noise_image


def test_stages_pretrain_and_load_into_the_demo_model(tmp_path):
    world = write_world(tmp_path / "world", seed=0, scale=0.05)
    clip_cfg = load_config(
        pretrain_clip.ClipPretrainConfig,
        ROOT / "configs/demo/clip.yaml",
        [f"shards={world['shards']['pairs-train']}", f"output={tmp_path / 'clip.pt'}", "steps=40"],
    )
    clip = pretrain_clip.pretrain(clip_cfg)
    assert clip["last_loss"] < clip["first_loss"] - 0.5
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
    saved = torch.load(tmp_path / "clip.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.vision.visual.conv1.weight, saved["visual.conv1.weight"])
    processor = FlamingoProcessor.from_config(cfg)
    enc = processor(["<image>a small red circle"], images=[[noise_image(0, (64, 64))]])
    assert torch.isfinite(model(**enc).logits).all()


def test_clip_batches_hold_whole_twin_groups():
    rng = random.Random(0)
    for _ in range(20):
        index = pretrain_clip.batch_indices(rng, 101, 64, 2)
        assert len(index) == 64 and len(set(index)) == 64 and max(index) < 100
        assert all(index[i] % 2 == 0 and index[i + 1] == index[i] + 1 for i in range(0, 64, 2))
    with pytest.raises(ValueError, match="group_size=3 must be >= 1 and divide batch_size=64"):
        pretrain_clip.ClipPretrainConfig(shards="x", output="y", architecture={}, group_size=3)
