"""The flex_attention cross-attention path computes what the SDPA float-mask path computes.

PyTorch's flex_attention has no CPU backward, so on the CPU the equivalence is shown for the
forward (the block, the whole model's logits over several media layouts, generation); the GPU
bench compares gradients too.
"""

from __future__ import annotations

import pytest
import torch

from flamingo import xattn
from flamingo.config import CrossAttentionConfig
from flamingo.layers import ExecutionPolicy
from flamingo.training.config import EngineConfig
from flamingo.training.engine import cross_attention_kernel
from flamingo.xattn import (
    GatedCrossAttentionBlock,
    cross_attention_bias,
    cross_attention_block_mask,
    flex_attention,
)
from tests.helpers import build, noise_image, set_gates

pytestmark = pytest.mark.skipif(flex_attention is None, reason="flex_attention needs torch>=2.5")

DIM, DIM_MEDIA, N, R = 16, 12, 5, 4


def media_indices() -> torch.Tensor:
    """Rows with 0, 1 and 5 media items, text before the first, the last item at the end."""
    no_media = [-1] * 23
    one = [-1] * 4 + [0] * 19
    five = [-1, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4]
    return torch.tensor([no_media, one, five])


@pytest.mark.parametrize("attend", ["last", "all_previous"])
def test_a_gated_block_gives_the_same_outputs_through_both_kernels(attend):
    torch.manual_seed(0)
    cfg = CrossAttentionConfig(heads=2, dim_head=8, ff_mult=2, attend=attend)
    block = GatedCrossAttentionBlock(cfg, DIM, DIM_MEDIA).eval()
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.ff_gate.fill_(1.0)
    media_index = media_indices()
    x = torch.randn(3, media_index.shape[1], DIM)
    latents = torch.randn(3, N, R, DIM_MEDIA)
    bias = cross_attention_bias(media_index, N, R, attend, x.dtype)
    blocks = cross_attention_block_mask(media_index, N, R, attend)
    with torch.no_grad():
        sdpa = block(x, latents, media_index, bias)
        flex = block(x, latents, media_index, blocks)
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-5)
    assert not torch.equal(sdpa[0], sdpa[2])  # the media mattered


def test_a_packed_rows_lower_bound_is_kept_by_both_kernels():
    """attend: all_previous in packed rows: a token sees its document's images only
    (media_first), through the float bias and the block mask alike."""
    torch.manual_seed(0)
    cfg = CrossAttentionConfig(heads=2, dim_head=8, ff_mult=2, attend="all_previous")
    block = GatedCrossAttentionBlock(cfg, DIM, DIM_MEDIA).eval()
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    media_index = media_indices()
    first = torch.zeros_like(media_index)
    first[2, 12:] = 3  # row 2's second document starts at its 4th image
    x = torch.randn(3, media_index.shape[1], DIM)
    latents = torch.randn(3, N, R, DIM_MEDIA)
    with torch.no_grad():
        sdpa = block(
            x,
            latents,
            media_index,
            cross_attention_bias(media_index, N, R, "all_previous", x.dtype, first),
        )
        flex = block(
            x,
            latents,
            media_index,
            cross_attention_block_mask(media_index, N, R, "all_previous", first),
        )
        unbounded = block(
            x,
            latents,
            media_index,
            cross_attention_bias(media_index, N, R, "all_previous", x.dtype),
        )
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-5)
    assert torch.equal(sdpa[:, :12], unbounded[:, :12])
    assert not torch.allclose(sdpa[2, 12:], unbounded[2, 12:])  # the bound mattered


def test_the_block_mask_skips_what_no_token_may_see():
    """A query block ending before the last media item never computes its keys' block."""
    media_index = torch.tensor([[0] * 128 + [1] * 128 + [2] * 128])
    mask = cross_attention_block_mask(media_index, num_media=3, num_latents=128, attend="last")
    # 3 query blocks x 3 key blocks, of which exactly the diagonal is computed
    assert mask.sparsity() == pytest.approx(100 * 6 / 9)


def flex_model():
    model = build()
    set_gates(model, 1.0)
    return model


def test_model_logits_are_the_same_through_both_kernels(processor, monkeypatch):
    model = flex_model()
    calls = []
    kernel = xattn.flex_cross_attention
    monkeypatch.setattr(xattn, "flex_cross_attention", lambda *a: calls.append(1) or kernel(*a))
    images = [[noise_image(1), noise_image(2)], [], [noise_image(3)]]
    enc = processor(
        ["<image>a red<|endofchunk|><image>b blue", "just text", "x <image>Output: y"],
        images=images,
    )
    with torch.no_grad():
        sdpa = model(**enc).logits
        model.set_execution_policy(ExecutionPolicy(cross_attention="flex"))
        flex = model(**enc).logits
    assert len(calls) == len(model.lm.gated_blocks)
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-5)


def test_generation_gives_the_same_tokens_through_both_kernels(processor):
    model = flex_model()
    enc = processor(
        ["<image>Output:", "a <image>b <image>Output:"],
        images=[[noise_image(4)], [noise_image(5), noise_image(6)]],
    )
    sdpa = model.generate(**enc, max_new_tokens=6)
    model.set_execution_policy(ExecutionPolicy(cross_attention="flex"))
    assert torch.equal(model.generate(**enc, max_new_tokens=6), sdpa)


def test_the_engine_refuses_flex_where_it_cannot_train():
    with pytest.raises(ValueError, match="GPUs only"):
        cross_attention_kernel(EngineConfig(cross_attention="flex"), "cpu")
    assert cross_attention_kernel(EngineConfig(cross_attention="flex"), "cuda") == "flex"
    with pytest.raises(ValueError, match="'sdpa' or 'flex'"):
        ExecutionPolicy(cross_attention="triton")
