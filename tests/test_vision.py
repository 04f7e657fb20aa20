"""Vision tower: patch tokens (no CLS, no projection), ln_post as a config choice, frozen."""

from __future__ import annotations

from dataclasses import replace

import open_clip
import pytest
import torch

from flamingo.vision import VisionEncoder, build_clip


def test_patch_tokens_shape_and_no_grad(cfg):
    torch.manual_seed(0)
    enc = VisionEncoder(cfg.vision)
    x = torch.randn(2, 3, 1, 3, 32, 32, requires_grad=True)
    tokens = enc(x)
    assert tokens.shape == (2, 3, 1, 16, 64)  # 4x4 patches, width 64, CLS dropped
    assert not tokens.requires_grad
    assert not any(p.requires_grad for p in enc.parameters())


def test_tokens_match_open_clip_and_ln_post_is_explicit(cfg):
    torch.manual_seed(0)
    clip = build_clip(cfg.vision).eval()
    images = torch.randn(2, 3, 32, 32)
    clip.visual.output_tokens = True
    clip.visual.final_ln_after_pool = False  # open_clip >= 2.24: ln_post on every token
    _, reference = clip.visual(images)
    normed = VisionEncoder(replace(cfg.vision, ln_post_on_tokens=True), clip.visual)
    raw = VisionEncoder(replace(cfg.vision, ln_post_on_tokens=False), clip.visual)
    x = images[:, None, None]
    torch.testing.assert_close(normed(x)[:, 0, 0], reference)
    assert not torch.allclose(raw(x)[:, 0, 0], reference)
    torch.testing.assert_close(clip.visual.ln_post(raw(x)), normed(x))


def test_pretrained_checkpoint_path_loads(cfg, tmp_path):
    torch.manual_seed(0)
    clip = build_clip(cfg.vision)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": clip.state_dict()}, path)
    torch.manual_seed(1)
    loaded = build_clip(replace(cfg.vision, pretrained=str(path)))
    for (name, a), b in zip(clip.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_stays_in_eval_mode(cfg):
    enc = VisionEncoder(cfg.vision).train()
    assert not enc.training and not enc.visual.training


def test_bad_inputs_are_clear_errors(cfg):
    enc = VisionEncoder(cfg.vision)
    with pytest.raises(ValueError, match=r"\(B, N, F, 3, 32, 32\)"):
        enc(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="image_size=64"):
        VisionEncoder(replace(cfg.vision, image_size=64))
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        build_clip(replace(cfg.vision, architecture=None, model_name="ViT-Nope"))
    assert "ViT-L-14" in open_clip.list_models()
