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


def test_the_cls_token_can_be_kept_first(cfg):
    torch.manual_seed(0)
    clip = build_clip(cfg.vision).eval()
    x = torch.randn(2, 1, 1, 3, 32, 32)
    without = VisionEncoder(replace(cfg.vision, ln_post_on_tokens=False), clip.visual)
    kept = VisionEncoder(replace(cfg.vision, ln_post_on_tokens=False, cls_token=True), clip.visual)
    assert kept.num_tokens == without.num_tokens + 1 == 17
    tokens = kept(x)
    assert tokens.shape == (2, 1, 1, 17, 64)
    torch.testing.assert_close(tokens[:, :, :, 1:], without(x))


def test_squash_resizes_to_the_square_losing_the_aspect_ratio(cfg):
    from PIL import Image

    from flamingo.vision import square

    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 60, 20))  # left half red, right half blue
    out = square(image, replace(cfg.vision, resize="squash"))
    assert out.size == (32, 32)
    assert out.getpixel((2, 2)) == (255, 0, 0) and out.getpixel((29, 29)) == (0, 0, 255)
    assert out.getpixel((16, 0))[0] != 124  # no padding band at the top, unlike resize: pad
    padded = square(image, cfg.vision)
    assert padded.getpixel((16, 0)) == tuple(round(255 * m) for m in cfg.vision.image_mean)


def test_a_vision_only_architecture_builds_the_tower_alone(cfg):
    arch = {k: v for k, v in cfg.vision.architecture.items() if k != "text_cfg"}
    torch.manual_seed(0)
    alone = VisionEncoder(replace(cfg.vision, architecture=arch, pretrained=None))
    torch.manual_seed(0)
    whole = build_clip(cfg.vision)
    assert alone.visual.state_dict().keys() == whole.visual.state_dict().keys()
    with pytest.raises(ValueError, match="without text_cfg"):
        replace(cfg.vision, architecture=arch, pretrained="some/checkpoint.pt")
