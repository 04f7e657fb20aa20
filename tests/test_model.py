"""The Flamingo model's defining properties on the tiny config."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM

from flamingo import Flamingo
from flamingo.layers import ExecutionPolicy
from flamingo.parts.cross_attention import MediaContext
from flamingo.xattn import media_index_from_ids
from tests.helpers import build, noise_image, padded, set_gates

TEXT = "a red circle on the left. Question: what colour is the circle? Short answer: red"
INTERLEAVED = (
    "hello there <image>a red circle<|endofchunk|><image>a blue square on the<|endofchunk|>"
)


def batch(processor, text=INTERLEAVED, seeds=(1, 2), **kw):
    return processor([text], images=[[noise_image(s) for s in seeds]], **kw)


def non_new_columns(model: Flamingo) -> torch.Tensor:
    keep = torch.ones(model.lm.vocab_size, dtype=torch.bool)
    keep[list(model.special_tokens.new_ids)] = False
    return keep


# -- identity at initialisation ---------------------------------------------------------------


def test_at_init_logits_do_not_depend_on_images(model, processor):
    a = model(**batch(processor, seeds=(1, 2))).logits
    b = model(**batch(processor, seeds=(3, 4))).logits
    assert torch.equal(a, b)


def test_at_init_text_logits_equal_the_bare_lm(model, processor):
    bare = AutoModelForCausalLM.from_config(model.lm.hf.config).eval()
    bare.load_state_dict(model.lm.hf.state_dict())
    enc = processor([TEXT, "a blue square"], padding_side="right")
    assert not torch.isin(enc["input_ids"], torch.tensor(model.special_tokens.new_ids[:2])).any()
    ours = model(**enc).logits
    ref = bare(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    keep = non_new_columns(model)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(
        ours[real][:, keep[: ref.shape[-1]]], ref[real][:, keep[: ref.shape[-1]]]
    )


# -- masking locality ---------------------------------------------------------------------------


def test_changing_image_k_changes_only_tokens_from_its_image_on(model, processor):
    set_gates(model)
    enc = batch(processor, seeds=(1, 2))
    ids = enc["input_ids"][0]
    image_pos = (ids == model.special_tokens.image_id).nonzero().flatten().tolist()
    base = model(**enc).logits[0]
    for k, pos in enumerate(image_pos):
        pixels, item = enc["pixel_values"].clone(), enc["media_slots"][0, k]
        pixels[item] = torch.randn_like(pixels[item])
        changed = (model(**{**enc, "pixel_values": pixels}).logits[0] - base).abs().amax(-1) > 1e-5
        assert not changed[:pos].any(), f"tokens before <image> {k} changed"
        assert changed[pos:].all(), f"tokens from <image> {k} on did not change"


def test_text_before_the_first_image_ignores_all_images(model, processor):
    set_gates(model)
    enc = batch(processor)
    first = int((enc["input_ids"][0] == model.special_tokens.image_id).nonzero()[0])
    other = {**enc, "pixel_values": torch.randn_like(enc["pixel_values"])}
    assert torch.equal(model(**enc).logits[0, :first], model(**other).logits[0, :first])


# -- what trains --------------------------------------------------------------------------------


def test_only_resampler_gated_blocks_and_new_rows_train(model, processor):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = ("resampler.", "lm.gated_blocks.", "lm.new_tokens.")
    assert trainable and all(n.startswith(prefixes) for n in trainable)
    for name, module in model.trainable_modules().items():
        assert all(p.requires_grad for p in module.parameters()), name

    set_gates(model)
    model.train()
    model(**batch(processor)).logits.sum().backward()
    for name, p in model.named_parameters():
        if name == "resampler.time_embeddings":
            # single images get no time embedding, yet a gradient (zero): every trainable
            # parameter has one after every micro-batch, which DeepSpeed ZeRO-3 relies on
            assert p.grad is not None and not p.grad.any()
        elif p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_trainable_parameter_counts(model, cfg):
    dv, d, k = 64, 64, len(model.special_tokens.new_ids)
    r = cfg.resampler
    inner = r.heads * r.dim_head
    per_layer = 2 * 2 * dv + dv * inner * 4 + 2 * dv + 2 * dv * dv * r.ff_mult
    resampler = r.num_latents * dv + r.max_num_frames * dv + r.depth * per_layer + 2 * dv
    x = cfg.xattn
    inner = x.heads * x.dim_head
    block = 2 * d + d * inner + dv * 2 * inner + inner * d + 2 * d + 2 * d * d * x.ff_mult + 2
    counts = {
        n: sum(p.numel() for p in m.parameters()) for n, m in model.trainable_modules().items()
    }
    assert counts == {"resampler": resampler, "gated_blocks": 2 * block, "new_tokens": 2 * k * d}
    assert model.num_parameters(trainable_only=True) == sum(counts.values())


def test_vision_tower_stays_frozen_in_eval_mode(model):
    model.train()
    assert model.resampler.training and not model.vision.training
    assert not any(m.training for m in model.vision.modules())


# -- padding, text-only, dtypes, checkpointing -----------------------------------------------------


def test_left_padding_invariance(model, processor):
    set_gates(model)
    short = "<image>a red circle<|endofchunk|>"
    images = [[noise_image(1)], [noise_image(2)]]
    padded = processor(
        [INTERLEAVED.replace("<image>", "", 1), short], images=images, padding_side="left"
    )
    alone = processor([short], images=[images[1]])
    n = alone["input_ids"].shape[1]
    assert padded["attention_mask"][1, :-n].eq(0).any(), "the short sequence must be left padded"
    torch.testing.assert_close(
        model(**padded).logits[1, -n:], model(**alone).logits[0], atol=1e-5, rtol=1e-5
    )


def test_text_only_forward(model, processor):
    set_gates(model)
    out = model(**processor(["Question: what colour? Short answer: red"]))
    assert out.media_latents is None and torch.isfinite(out.logits).all()


def test_media_count_mismatch_is_a_clear_error(model, processor):
    enc = batch(processor)
    with pytest.raises(ValueError, match=r"refers to 2 media item\(s\).*only 1"):
        model(**{**enc, "media_slots": enc["media_slots"][:, :1]})
    with pytest.raises(ValueError, match=r"refers to 2 media item\(s\).*only 1"):
        model(**{**enc, "pixel_values": padded(enc)[:, :1], "media_slots": None})
    with pytest.raises(ValueError, match="not both"):
        model(**enc, media_latents=torch.zeros(1))


def test_media_latents_can_be_passed_instead_of_pixels(model, processor):
    set_gates(model)
    enc = batch(processor)
    out = model(**enc)
    again = model(enc["input_ids"], enc["attention_mask"], media_latents=out.media_latents)
    assert torch.equal(out.logits, again.logits)


def test_train_and_eval_mode_agree(model, processor):
    set_gates(model)
    enc = batch(processor)
    eval_logits = model.eval()(**enc).logits
    torch.testing.assert_close(model.train()(**enc).logits, eval_logits)


def test_bfloat16_frozen_parts_keep_trainable_parts_float32(processor):
    model = build("frozen_dtype=bfloat16")
    assert model.lm.hf.dtype == torch.bfloat16
    assert next(model.vision.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    set_gates(model)
    out = model(**batch(processor))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) > 10 and all(g.dtype == torch.float32 for g in grads)


CHECKPOINTING = {
    "none": ExecutionPolicy(),
    "gated_blocks": ExecutionPolicy(checkpoint_gated_blocks=True),
    "all": ExecutionPolicy(checkpoint_layers=True),
}


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(processor):
    enc = batch(processor)
    grads, kept = {}, {}
    for name, policy in CHECKPOINTING.items():
        model = build().train()
        model.set_execution_policy(policy)
        set_gates(model)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t, saved=saved, weights=weights):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**enc).logits.pow(2).mean()
        loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        kept[name] = sum(saved.values())
    for policy in ("gated_blocks", "all"):
        for name in grads["none"]:
            torch.testing.assert_close(grads[policy][name], grads["none"][name], msg=name)
    # what autograd keeps for the backward: each option keeps less than the one before
    assert kept["all"] < kept["gated_blocks"] < kept["none"], kept


def test_new_tokens_are_predicted_from_their_own_rows(model, processor):
    enc = batch(processor)
    eoc = model.special_tokens.end_of_chunk_id
    with torch.no_grad():
        model.lm.new_tokens.output_weight()[0].mul_(0).add_(
            model.lm.hf.get_output_embeddings().weight[5]
        )
    logits = model(**enc).logits
    torch.testing.assert_close(logits[..., eoc], logits[..., 5])


def test_media_context_always_clears(model, processor, monkeypatch):
    enc = batch(processor)

    def fail(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(model.lm.gated_blocks[1], "forward", fail)
    with pytest.raises(KeyError, match="boom"):
        model(**enc)
    assert model.lm._media is None
    monkeypatch.undo()
    model(**enc)
    assert model.lm._media is None
    with pytest.raises(RuntimeError, match="outside FlamingoLM.forward"):
        model.lm.hf(input_ids=enc["input_ids"])


def test_one_cross_attention_mask_is_built_per_call_and_shared(model, processor, monkeypatch):
    import flamingo.parts.cross_attention as fusion

    built = []
    original = fusion.cross_attention_bias
    monkeypatch.setattr(
        fusion, "cross_attention_bias", lambda *a: built.append(original(*a)) or built[-1]
    )
    model(**batch(processor))
    assert len(model.lm.gated_blocks) > 1 and len(built) == 1
    model(**batch(processor))  # not kept across calls
    assert len(built) == 2


def test_wrap_units_are_declared(model):
    names = {c.__name__ for c in model.wrap_unit_classes()}
    assert names == {"LlamaDecoderLayer", "GatedCrossAttentionBlock", "PerceiverLayer"}


def test_gradient_checkpointing_recomputes_layers_and_blocks(processor):
    model = build().train()
    model.set_execution_policy(ExecutionPolicy(checkpoint_layers=True))
    set_gates(model)
    calls = {"decoder_mlp": 0, "gated_block": 0}
    decoder_layer = model.lm.hf.get_submodule(model.lm.layout.layers)[0]
    # pre-hooks: recomputation stops early once the saved tensors it needs are rebuilt
    decoder_layer.mlp.register_forward_pre_hook(
        lambda *_: calls.__setitem__("decoder_mlp", calls["decoder_mlp"] + 1)
    )
    model.lm.gated_blocks[0].register_forward_pre_hook(
        lambda *_: calls.__setitem__("gated_block", calls["gated_block"] + 1)
    )
    model(**batch(processor)).logits.sum().backward()
    # Each ran again in the backward. The gated block runs a third time before transformers
    # 5.23, whose checkpointed decoder layer re-runs its pre-hook (the block) too.
    assert calls["decoder_mlp"] == 2 and calls["gated_block"] in (2, 3)


def test_a_checkpointed_layer_call_recomputes_its_gated_block_with_the_forward_media(processor):
    """transformers before 5.23 checkpoints a decoder layer's ``__call__``, pre-hooks included:
    the gated block runs again in the backward, after the media context has closed."""
    model = build().train()
    set_gates(model)
    lm, enc = model.lm, batch(processor)
    media = model.encode_media(enc["pixel_values"], enc["media_slots"]).detach()
    media_index = media_index_from_ids(enc["input_ids"], model.special_tokens.image_id)
    layer = nn.Identity()  # a stand-in decoder layer: only its pre-hook, the gated block, works
    layer.register_forward_pre_hook(partial(lm._run_block, 0), with_kwargs=True)
    hidden = torch.randn(*enc["input_ids"].shape, lm.hf.config.hidden_size, requires_grad=True)
    context = MediaContext(media, media_index, model.fusion.mask(lm, media, media_index, None))
    grads = []
    for checkpointed in (False, True):
        with lm.media_context(context):
            if checkpointed:
                out = checkpoint(
                    layer, hidden, use_reentrant=False, context_fn=lm._recompute_contexts
                )
            else:
                out = layer(hidden)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), hidden)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert lm._media is None


def test_cached_continuation_equals_the_full_forward(model, processor):
    set_gates(model)
    enc = processor(
        [INTERLEAVED, "<image>a red circle<|endofchunk|><image>a"],
        images=[[noise_image(1), noise_image(2)], [noise_image(3), noise_image(4)]],
    )
    full = model(**enc)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    media_index = (ids == model.special_tokens.image_id).long().cumsum(-1) - 1
    cut = ids.shape[1] - 3
    pixels, slots = enc["pixel_values"], enc["media_slots"]
    first = model(
        ids[:, :cut], mask[:, :cut], pixel_values=pixels, media_slots=slots, use_cache=True
    )
    with pytest.raises(ValueError, match="media_index is required"):
        model(
            ids[:, cut:],
            mask,
            media_latents=first.media_latents,
            cache=first.cache,
        )
    rest = model(
        ids[:, cut:],
        mask,
        media_latents=first.media_latents,
        cache=first.cache,
        media_index=media_index[:, cut:],
        use_cache=True,
    )
    # Real tokens only: what a left-padding position (attending to nothing) yields is up to the
    # attention kernel (torch 2.4 gives different values in the two calls).
    real = mask.bool()
    torch.testing.assert_close(
        torch.cat([first.logits, rest.logits], 1)[real], full.logits[real], atol=1e-5, rtol=1e-5
    )
