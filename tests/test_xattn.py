"""Gated cross-attention: phi, masking locality, exact zeros, gates, options."""

from __future__ import annotations

import pytest
import torch

from flamingo.config import CrossAttentionConfig
from flamingo.xattn import (
    GatedCrossAttentionBlock,
    cross_attention_bias,
    cross_attention_mask,
    media_index_from_ids,
)

IMG = 9
DIM, DIM_MEDIA, N, R = 16, 12, 3, 4


def block(**kw) -> GatedCrossAttentionBlock:
    torch.manual_seed(0)
    cfg = CrossAttentionConfig(heads=2, dim_head=8, ff_mult=2, **kw)
    b = GatedCrossAttentionBlock(cfg, DIM, DIM_MEDIA).eval()
    with torch.no_grad():
        b.attn_gate.fill_(1.0)
        b.ff_gate.fill_(1.0)
    return b


def test_media_index_is_last_image_at_or_before():
    ids = torch.tensor([[1, 2, IMG, 3, 4, IMG, IMG, 5], [IMG, 1, 1, 1, 1, 1, 1, 1]])
    assert media_index_from_ids(ids, IMG).tolist() == [
        [-1, -1, 0, 0, 0, 1, 2, 2],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]


def inputs():
    torch.manual_seed(1)
    x = torch.randn(2, 8, DIM)
    latents = torch.randn(2, N, R, DIM_MEDIA)
    media_index = torch.tensor([[-1, -1, 0, 0, 1, 1, 2, 2], [-1, 0, 0, 0, 0, 0, 0, 0]])
    return x, latents, media_index


@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_token_sees_only_the_last_image_before_it(k: int):
    b = block(ff_on_imageless_tokens=False)
    x, latents, media_index = inputs()
    other = latents.clone()
    other[:, k] += torch.randn_like(other[:, k])
    changed = (b.attn(x, latents, media_index) - b.attn(x, other, media_index)).abs().amax(
        -1
    ) > 1e-6
    assert torch.equal(changed, media_index == k)


def test_all_previous_option_sees_every_earlier_image():
    b = block(attend="all_previous")
    x, latents, media_index = inputs()
    other = latents.clone()
    other[:, 0] += torch.randn_like(other[:, 0])
    changed = b.attn(x, latents, media_index, "all_previous") - b.attn(
        x, other, media_index, "all_previous"
    )
    assert torch.equal(changed.abs().amax(-1) > 1e-6, media_index >= 0)


def test_tokens_without_an_image_get_exactly_zero_cross_attention():
    b = block(ff_on_imageless_tokens=False)
    x, latents, media_index = inputs()
    out = b(x, latents, media_index)
    none = media_index < 0
    assert torch.equal(out[none], x[none])  # attention exactly zero, FFW switched off
    assert not torch.allclose(out[~none], x[~none])


def test_ffw_on_imageless_tokens_is_a_choice():
    b = block(ff_on_imageless_tokens=True)
    x, latents, media_index = inputs()
    with torch.no_grad():
        b.attn_gate.zero_()
    out = b(x, latents, media_index)
    assert not torch.allclose(out[media_index < 0], x[media_index < 0])


def test_gates_start_closed_so_the_block_is_the_identity():
    torch.manual_seed(0)
    for gate in ("scalar", "vector"):
        b = GatedCrossAttentionBlock(
            CrossAttentionConfig(heads=2, dim_head=8, gate=gate), DIM, DIM_MEDIA
        )
        assert b.attn_gate.shape == ((DIM,) if gate == "vector" else (1,))
        x, latents, media_index = inputs()
        assert torch.equal(b(x, latents, media_index), x)
        assert torch.equal(b(x, None, media_index), x)


def test_gates_receive_gradients_at_init():
    torch.manual_seed(0)
    b = GatedCrossAttentionBlock(CrossAttentionConfig(heads=2, dim_head=8), DIM, DIM_MEDIA)
    x, latents, media_index = inputs()
    b(x, latents, media_index).pow(2).sum().backward()
    assert b.attn_gate.grad.abs().item() > 0 and b.ff_gate.grad.abs().item() > 0


def test_no_gating_ablation_adds_the_branches_unscaled():
    """gating=none (paper Table 3's "w/o tanh gating") equals a tanh block whose gates are
    fully open, has no gate parameters, and so is not the identity at init."""
    torch.manual_seed(0)
    ungated = GatedCrossAttentionBlock(
        CrossAttentionConfig(heads=2, dim_head=8, gating="none"), DIM, DIM_MEDIA
    )
    assert not [n for n, _ in ungated.named_parameters() if n.endswith("gate")]
    gated = GatedCrossAttentionBlock(CrossAttentionConfig(heads=2, dim_head=8), DIM, DIM_MEDIA)
    gated.load_state_dict(ungated.state_dict(), strict=False)
    with torch.no_grad():
        gated.attn_gate.fill_(torch.inf)  # tanh(inf) == 1 exactly
        gated.ff_gate.fill_(torch.inf)
    x, latents, media_index = inputs()
    out = ungated(x, latents, media_index)
    assert not torch.allclose(out, x)
    torch.testing.assert_close(out, gated(x, latents, media_index), rtol=0, atol=0)


def test_zeroing_imageless_tokens_after_the_projection_changes_no_bit():
    # MaskedCrossAttention zeroes rows after its bias-free output projection (so that the
    # projection keeps a view of the attention output, not a masked copy)
    import torch.nn.functional as F
    from einops import rearrange

    attn = block().attn
    x, latents, media_index = inputs()
    x.requires_grad_(True)
    kv = attn.media_kv(latents)
    q = rearrange(attn.to_q(attn.norm(x)), "b t (h d) -> b h t d", h=attn.heads)
    bias = cross_attention_bias(media_index, N, R, "last", x.dtype)
    out = rearrange(
        F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=bias), "b h t d -> b t (h d)"
    )
    reference = attn.to_out(out * (media_index >= 0).unsqueeze(-1))
    y = attn(x, latents, media_index)
    assert torch.equal(y, reference)
    weights = torch.randn_like(y)
    grads = [
        torch.autograd.grad((t * weights).sum(), [x, attn.to_out.weight]) for t in (y, reference)
    ]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_a_given_bias_equals_the_mask_built_inside():
    attn = block().attn
    x, latents, media_index = inputs()
    bias = cross_attention_bias(media_index, N, R, "last", x.dtype)
    assert torch.equal(attn(x, latents, media_index, attn_mask=bias), attn(x, latents, media_index))
    assert torch.equal(bias == 0, cross_attention_mask(media_index, N, R, "last"))


def test_reset_after_eos_hides_earlier_images_from_later_text():
    eos = 7
    ids = torch.tensor([[IMG, 1, eos, 2, 3, IMG, 4, eos, eos, 5]])
    assert media_index_from_ids(ids, IMG, reset_token_id=eos).tolist() == [
        [0, 0, 0, -1, -1, 1, 1, 1, -1, -1]  # each eos keeps its image; what follows does not
    ]
    assert media_index_from_ids(ids, IMG).tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]


IDEFICS_SHAPED = dict(norm="rmsnorm", norm_eps=1e-6, qk_norm=True, ff="swiglu", ff_hidden=44)


@pytest.mark.parametrize(
    "variant", [{"norm": "rmsnorm"}, {"qk_norm": True}, {"ff": "swiglu"}, IDEFICS_SHAPED]
)
def test_each_block_variant_starts_as_the_identity(variant):
    torch.manual_seed(0)
    b = GatedCrossAttentionBlock(
        CrossAttentionConfig(heads=2, dim_head=8, **variant), DIM, DIM_MEDIA
    )
    x, latents, media_index = inputs()
    assert torch.equal(b(x, latents, media_index), x)


def test_rmsnorm_swiglu_blocks_have_the_named_shapes():
    b = block(**IDEFICS_SHAPED)
    assert isinstance(b.attn.norm, torch.nn.RMSNorm) and b.attn.norm.eps == 1e-6
    assert isinstance(b.ff.norm, torch.nn.RMSNorm)
    assert b.ff.gate_proj.weight.shape == b.ff.up_proj.weight.shape == (44, DIM)
    assert b.ff.down_proj.weight.shape == (DIM, 44)
    assert block(ff_hidden=20).ff[1].weight.shape == (20, DIM)  # the GELU MLP takes it too
    x = torch.randn(2, 5, DIM)
    normed = b.ff.norm(x)
    silu = torch.nn.functional.silu
    expected = b.ff.down_proj(silu(b.ff.gate_proj(normed)) * b.ff.up_proj(normed))
    torch.testing.assert_close(b.ff(x), expected)


def test_qk_norm_makes_attention_independent_of_the_query_and_key_scale():
    """With queries and keys normalised per head, scaling their projections changes nothing;
    without, it sharpens the attention."""
    x, latents, media_index = inputs()
    for qk_norm, same in ((True, True), (False, False)):
        b = block(qk_norm=qk_norm, norm="rmsnorm")
        before = b(x, latents, media_index)
        with torch.no_grad():
            b.attn.to_q.weight.mul_(5.0)
            b.attn.to_kv.weight[: 2 * 8].mul_(5.0)  # the key half
        assert torch.allclose(b(x, latents, media_index), before, atol=1e-3) == same
