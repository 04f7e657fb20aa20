"""Perceiver Resampler: shapes, per-item independence, time embeddings for video."""

from __future__ import annotations

import pytest
import torch

from flamingo.config import ResamplerConfig
from flamingo.resampler import PerceiverResampler

DIM = 32


def make(max_num_frames: int = 4) -> PerceiverResampler:
    torch.manual_seed(0)
    cfg = ResamplerConfig(
        depth=2, heads=2, dim_head=8, num_latents=5, ff_mult=2, max_num_frames=max_num_frames
    )
    return PerceiverResampler(cfg, DIM).eval()


def test_shapes():
    out = make()(torch.randn(2, 3, 1, 7, DIM))
    assert out.shape == (2, 3, 5, DIM)


def test_media_items_are_resampled_independently():
    resampler = make()
    x = torch.randn(2, 3, 1, 7, DIM)
    y = x.clone()
    y[1, 2] += torch.randn_like(y[1, 2])
    a, b = resampler(x), resampler(y)
    changed = (a - b).abs().amax(dim=(-1, -2)) > 1e-6
    assert changed.tolist() == [[False, False, False], [False, False, True]]


def test_video_uses_time_embeddings_and_images_do_not():
    resampler = make()
    video, image = torch.randn(1, 1, 3, 7, DIM), torch.randn(1, 1, 1, 7, DIM)
    before_video, before_image = resampler(video), resampler(image)
    with torch.no_grad():
        resampler.time_embeddings.add_(torch.randn_like(resampler.time_embeddings))
    assert not torch.allclose(resampler(video), before_video)
    assert torch.equal(resampler(image), before_image)
    # frame order matters only through the time embeddings
    swapped = video[:, :, [1, 0, 2]]
    assert not torch.allclose(resampler(swapped), resampler(video))


def test_too_many_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="max_num_frames=4"):
        make()(torch.randn(1, 1, 5, 7, DIM))
    with pytest.raises(ValueError, match="max_num_frames is 0"):
        make(max_num_frames=0)(torch.randn(1, 1, 2, 7, DIM))


def test_bad_rank_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(B, N, F, V, D\)"):
        make()(torch.randn(2, 7, DIM))


def test_spatial_embeddings_start_at_zero_and_make_token_order_matter():
    torch.manual_seed(0)
    plain = make()
    cfg = ResamplerConfig(
        depth=2, heads=2, dim_head=8, num_latents=5, ff_mult=2, max_num_frames=4,
        spatial_embeddings=True,
    )  # fmt: skip
    spatial = PerceiverResampler(cfg, DIM, num_tokens=7).eval()
    spatial.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 2, 1, 7, DIM)
    shuffled = x[:, :, :, torch.randperm(7)]
    # at init: the paper's resampler, which cannot tell where a token came from
    torch.testing.assert_close(spatial(x), plain(x))
    torch.testing.assert_close(plain(shuffled), plain(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        spatial.spatial_embeddings.normal_()
    assert not torch.allclose(spatial(shuffled), spatial(x), atol=1e-3)
    with pytest.raises(ValueError, match="built for 7"):
        spatial(torch.randn(1, 1, 1, 6, DIM))
    with pytest.raises(ValueError, match="number of vision tokens"):
        PerceiverResampler(cfg, DIM)


def test_qk_norm_makes_the_resampler_independent_of_the_query_and_key_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 1, 10, DIM)
    for qk_norm, same in ((True, True), (False, False)):
        torch.manual_seed(0)
        r = PerceiverResampler(ResamplerConfig(depth=1, heads=2, dim_head=8, qk_norm=qk_norm), DIM)
        before = r(x)
        with torch.no_grad():
            attn = r.layers[0].attn
            attn.to_q.weight.mul_(5.0)
            attn.to_kv.weight[:16].mul_(5.0)  # the key half
        assert torch.allclose(r(x), before, atol=1e-3) == same


def test_relu_feed_forward_is_a_choice():
    torch.manual_seed(0)
    relu = PerceiverResampler(
        ResamplerConfig(depth=1, heads=2, dim_head=8, ff_activation="relu"), DIM
    )
    torch.manual_seed(0)
    gelu = PerceiverResampler(ResamplerConfig(depth=1, heads=2, dim_head=8), DIM)
    assert isinstance(relu.layers[0].ff[2], torch.nn.ReLU)
    x = torch.randn(2, 1, 1, 10, DIM)
    ff = relu.layers[0].ff
    h = torch.randn(3, DIM)
    torch.testing.assert_close(ff(h), ff[3](torch.relu(ff[1](ff[0](h)))))
    assert not torch.allclose(relu(x), gelu(x))
