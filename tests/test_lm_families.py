"""Every LM family in the decoder-layer table builds from a tiny config and runs with images."""

from __future__ import annotations

import pytest
import torch

from flamingo import Flamingo, FlamingoProcessor
from flamingo.lm import DECODER_LAYOUTS, build_causal_lm, decoder_layout
from tests.helpers import noise_image, set_gates, tiny_config

# Vocabulary 871 = the tiny tokenizer's base size, so the new tokens' logits are appended;
# 896 leaves padding rows, so they overwrite rows inside the LM's vocabulary (OPT/MPT-style).
TINY_LMS = {
    "gpt2": dict(vocab_size=871, n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "gpt_neox": dict(
        vocab_size=896,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    ),
    "llama": dict(
        vocab_size=896,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    ),
    "mistral": dict(
        vocab_size=871,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
    "mpt": dict(
        vocab_size=896, d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=128
    ),
    "opt": dict(
        vocab_size=896,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=32,
    ),
    "qwen2": dict(
        vocab_size=896,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
    "qwen3": dict(
        vocab_size=896,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    ),
}


def test_every_family_in_the_table_has_a_tiny_config():
    assert set(TINY_LMS) == set(DECODER_LAYOUTS)


def family_config(model_type: str):
    cfg = tiny_config("xattn.every_n_layers=2", "xattn.first_layer=1")
    return cfg.replace({"lm.architecture": {"model_type": model_type, **TINY_LMS[model_type]}})


@pytest.mark.parametrize("model_type", sorted(TINY_LMS))
def test_family_builds_and_runs_with_images(model_type: str, processor):
    torch.manual_seed(0)
    model = Flamingo.from_config(family_config(model_type)).eval()
    assert model.lm.layer_indices == [1]
    set_gates(model)
    enc = processor(
        ["some text <image>a red circle<|endofchunk|><image>a", "<image>Question: what?"],
        images=[[noise_image(1), noise_image(2)], [noise_image(3)]],
    )
    logits = model(**enc).logits
    assert logits.shape == (*enc["input_ids"].shape, model.lm.vocab_size)
    assert torch.isfinite(logits).all()
    other = model(**{**enc, "pixel_values": torch.randn_like(enc["pixel_values"])}).logits
    assert not torch.allclose(logits, other), "images must influence the logits"
    logits.sum().backward()
    assert model.lm.gated_blocks[0].attn_gate.grad is not None


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"'bert'.*supported types: \['gpt2'"):
        decoder_layout("bert")
    cfg = tiny_config().replace({"lm.architecture": {"model_type": "t5"}})
    with pytest.raises(ValueError, match="not supported"):
        build_causal_lm(cfg.lm)


@pytest.mark.parametrize("model_type", sorted(TINY_LMS))
def test_family_left_padding_invariance(model_type: str, processor):
    torch.manual_seed(0)
    model = Flamingo.from_config(family_config(model_type)).eval()
    set_gates(model)
    short = "<image>a red circle<|endofchunk|>"
    images = [[noise_image(1)], [noise_image(2)]]
    padded = processor(
        ["a much longer text that forces padding <image>hello", short], images=images
    )
    alone = processor([short], images=[images[1]])
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(
        model(**padded).logits[1, -n:], model(**alone).logits[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("model_type", sorted(TINY_LMS))
def test_family_identity_at_init(model_type: str, processor):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = Flamingo.from_config(family_config(model_type)).eval()
    bare = AutoModelForCausalLM.from_config(model.lm.hf.config).eval()
    bare.load_state_dict(model.lm.hf.state_dict())
    enc = processor(["a red circle on the left. Short answer: red"])
    ours = model(**enc).logits
    ref = bare(**enc).logits
    keep = torch.ones(ref.shape[-1], dtype=torch.bool)
    keep[[i for i in model.special_tokens.new_ids if i < ref.shape[-1]]] = False
    torch.testing.assert_close(ours[..., : ref.shape[-1]][..., keep], ref[..., keep])


def test_mpt_attention_through_sdpa_equals_the_eager_one(processor):
    """MPT has no SDPA path in transformers; ours (flamingo/mpt.py) gives eager's logits,
    gradients and cached generation, with left padding, to 1e-5 in fp32."""
    from flamingo.mpt import SdpaMptAttention

    models = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        cfg = family_config("mpt").replace({"lm.attn_implementation": impl})
        models[impl] = Flamingo.from_config(cfg).eval()
        set_gates(models[impl])
    attentions = {type(m.attn) for m in models["sdpa"].lm.hf.transformer.blocks}
    assert attentions == {SdpaMptAttention}
    enc = processor(
        ["a much longer text that forces padding <image>hello", "<image>a red"],
        images=[[noise_image(1)], [noise_image(2)]],
    )
    logits, grads = {}, {}
    for impl, model in models.items():
        out = model(**enc).logits
        # the loss of real tokens only, as in training: a padding row is fully masked, and
        # eager's masked_fill stops its gradient where an additive mask lets it through
        (out.square().mean(-1) * enc["attention_mask"]).sum().backward()
        logits[impl] = out.detach()
        grads[impl] = model.lm.gated_blocks[0].attn.to_q.weight.grad
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=0, atol=1e-5)
    torch.testing.assert_close(grads["sdpa"], grads["eager"], rtol=1e-4, atol=1e-6)
    tokens = {impl: m.generate(**enc, max_new_tokens=5) for impl, m in models.items()}
    assert torch.equal(tokens["sdpa"], tokens["eager"])


def test_a_tied_lm_saved_whole_loads_tied_with_the_same_logits(tmp_path):
    """A random LM travels in the checkpoint (frozen.safetensors); loading builds the model
    without storage and assigns the tensors, so a tied LM must come back tied."""
    torch.manual_seed(0)
    model = Flamingo.from_config(family_config("gpt2")).eval()
    hf = model.lm.hf
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    set_gates(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    out = loaded.lm.hf
    assert out.get_output_embeddings().weight is out.get_input_embeddings().weight
    assert not any(p.is_meta for p in loaded.parameters())
    processor = FlamingoProcessor.from_pretrained(tmp_path / "ckpt")
    enc = processor(["<image>a red circle<|endofchunk|>"], images=[[noise_image(0)]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits, rtol=0, atol=0)
