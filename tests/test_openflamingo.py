"""OpenFlamingo import: our logits equal OpenFlamingo's own on converted weights.

OpenFlamingo's model is built from its published package (``open-flamingo``, installed with
``--no-deps`` by ``make install``) around the same tiny open_clip tower and tiny OPT LM.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, OPTConfig

from flamingo import Flamingo, FlamingoProcessor
from flamingo.convert import from_openflamingo
from flamingo.convert.__main__ import main as convert_main
from flamingo.tokens import TINY_TOKENIZER_DIR
from tests.helpers import noise_image, padded, tiny_config

of_flamingo = pytest.importorskip("open_flamingo.src.flamingo")
of_lm = pytest.importorskip("open_flamingo.src.flamingo_lm")
of_utils = pytest.importorskip("open_flamingo.src.utils")

EVERY = 2  # gated blocks before layers 1 and 3 (OpenFlamingo's n-1 placement)

# OpenFlamingo's forward passes ``past_key_values=`` to the LM, deprecated from transformers 5.24
# on: the reference's own warning, not ours.
of_forward = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny CLIP checkpoint and a tiny OPT directory (with the tiny tokenizer), on disk."""
    root = tmp_path_factory.mktemp("of")
    torch.manual_seed(0)
    arch = tiny_config().vision.architecture
    clip = open_clip.CLIP(**arch)
    torch.save({"state_dict": clip.state_dict()}, root / "clip.pt")
    opt = AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=896,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
            dropout=0.1,
        )
    )
    opt.save_pretrained(root / "opt")
    AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR).save_pretrained(root / "opt")
    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=871,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            tie_word_embeddings=False,
        )
    )
    llama.save_pretrained(root / "llama")
    AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR).save_pretrained(root / "llama")
    return root


LAYERS = {"opt": "model.decoder.layers", "llama": "model.layers"}


def openflamingo_model(root: Path, lm: str = "opt"):
    torch.manual_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(root / lm)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    clip = open_clip.CLIP(**tiny_config().vision.architecture)
    open_clip.load_checkpoint(clip, str(root / "clip.pt"))
    clip.visual.output_tokens = True
    lang = AutoModelForCausalLM.from_pretrained(root / lm)
    of_utils.extend_instance(lang, of_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name(LAYERS[lm])
    lang.resize_token_embeddings(len(tokenizer))
    model = of_flamingo.Flamingo(
        clip,
        lang,
        eoc_token_id=tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
        media_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vis_dim=64,
        cross_attn_every_n_layers=EVERY,
    )
    with torch.no_grad():  # open the gates and move the new rows so that everything matters
        for block in lang.gated_cross_attn_layers:
            if block is not None:
                block.attn_gate.fill_(0.7)
                block.ff_gate.fill_(-0.4)
        lang.get_input_embeddings().weight[-3:].normal_()
        lang.get_output_embeddings().weight[-3:].normal_()
    return model.eval(), tokenizer


def our_config(root: Path, lm: str = "opt"):
    cfg = tiny_config(
        f"vision.pretrained={root / 'clip.pt'}",
        "vision.ln_post_on_tokens=true",  # the installed open_clip normalises the tokens
        "resampler.depth=6",
        "resampler.heads=8",
        "resampler.dim_head=64",
        "resampler.num_latents=64",
        "resampler.ff_mult=4",
        "resampler.max_num_frames=0",
        f"xattn.every_n_layers={EVERY}",
        f"xattn.first_layer={EVERY - 1}",
        "xattn.heads=8",
        "xattn.dim_head=64",
        "xattn.ff_mult=4",
        f"lm.name_or_path={root / lm}",
        f"lm.tokenizer={root / lm}",
    )
    return cfg.replace({"lm.architecture": None})


BATCHES = [
    # text before the first image, several images, and left padding of the second row
    (
        [
            "some text first <image>a red circle<|endofchunk|><image>two<|endofchunk|><image>and",
            "<image>short",
        ],
        [[1, 2, 3], [4]],
    ),
    (
        [
            "<image>Question: what? Short answer: red<|endofchunk|><image>Question: and?",
            "only words, no image",
        ],
        [[5, 6], []],
    ),
]


@of_forward
@pytest.mark.parametrize("batch_index", range(len(BATCHES)))
def test_logits_match_openflamingo(backbones, batch_index):
    theirs, tokenizer = openflamingo_model(backbones)
    ours = from_openflamingo(theirs.state_dict(), our_config(backbones)).eval()
    processor = FlamingoProcessor.from_config(ours.cfg)
    texts, seeds = BATCHES[batch_index]
    images = [[noise_image(s) for s in row] for row in seeds]
    enc = processor(texts, images=images, padding_side="left")
    pixels = padded(enc)  # OpenFlamingo's layout: rows without images get zero-filled slots
    assert enc["attention_mask"][1, 0] == 0, "the second row must be left padded"
    with torch.no_grad():
        expected = theirs(
            vision_x=pixels, lang_x=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).logits
        got = ours(**enc).logits
    vocab = expected.shape[-1]
    assert vocab == len(tokenizer)
    real = enc["attention_mask"].bool()
    diff = (got[..., :vocab] - expected)[real].abs().max().item()
    print(f"max |ours - OpenFlamingo| = {diff:.2e}")
    assert diff <= 1e-4
    other = {**enc, "pixel_values": torch.randn_like(enc["pixel_values"])}
    assert not torch.allclose(ours(**other).logits[..., :vocab], got[..., :vocab]), (
        "images must matter"
    )


def test_converted_checkpoint_round_trips_and_cli(backbones, tmp_path):
    theirs, _ = openflamingo_model(backbones)
    torch.save(theirs.state_dict(), tmp_path / "checkpoint.pt")
    cfg_path = tmp_path / "of.yaml"
    cfg_path.write_text(yaml.safe_dump(our_config(backbones).to_dict()))
    convert_main(
        [
            "openflamingo",
            str(tmp_path / "checkpoint.pt"),
            str(tmp_path / "out"),
            "--config",
            str(cfg_path),
        ]
    )
    loaded = Flamingo.from_pretrained(tmp_path / "out")
    direct = from_openflamingo(tmp_path / "checkpoint.pt", our_config(backbones))
    processor = FlamingoProcessor.from_pretrained(tmp_path / "out")
    enc = processor(["a <image>b"], images=[[noise_image(0)]])
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, direct.eval()(**enc).logits)


def test_mismatched_config_and_foreign_keys_are_clear_errors(backbones):
    theirs, _ = openflamingo_model(backbones)
    state = theirs.state_dict()
    cfg = our_config(backbones).replace({"xattn.first_layer": 0})
    with pytest.raises(ValueError, match="xattn.first_layer=1"):
        from_openflamingo(state, cfg)
    cfg = our_config(backbones).replace({"xattn.gating": "none"})
    with pytest.raises(ValueError, match="xattn.gating='tanh'"):
        from_openflamingo(state, cfg)
    with pytest.raises(ValueError, match=r"outside OpenFlamingo's layout: \['extra.weight'\]"):
        from_openflamingo({**state, "extra.weight": torch.zeros(1)}, our_config(backbones))
    bad = dict(state)
    key = next(k for k in bad if k.startswith("vision_encoder.") and k.endswith("weight"))
    bad[key] = bad[key] + 1
    with pytest.raises(ValueError, match="frozen weights in the checkpoint differ"):
        from_openflamingo(bad, our_config(backbones))


@of_forward
def test_untied_llama_matches_and_a_missing_head_is_announced(backbones):
    """Llama: untied output rows. No left padding: with transformers 5, OpenFlamingo's Llama
    positions ignore the attention mask (ours count from each row's first real token)."""
    theirs, tokenizer = openflamingo_model(backbones, "llama")
    cfg = our_config(backbones, "llama")
    ours = from_openflamingo(theirs.state_dict(), cfg).eval()
    processor = FlamingoProcessor.from_config(ours.cfg)
    enc = processor(
        ["text <image>a red circle<|endofchunk|><image>and"],
        images=[[noise_image(1), noise_image(2)]],
    )
    with torch.no_grad():
        expected = theirs(
            vision_x=padded(enc),
            lang_x=enc["input_ids"],
            attention_mask=enc["attention_mask"],
        ).logits
        got = ours(**enc).logits
    assert (got[..., : expected.shape[-1]] - expected).abs().max() <= 1e-4

    state = {k: v for k, v in theirs.state_dict().items() if not k.endswith("lm_head.weight")}
    with pytest.warns(UserWarning, match="keep their initial values"):
        partial = from_openflamingo(state, our_config(backbones, "llama")).eval()
    with torch.no_grad():
        logits = partial(**enc).logits
    base = [i for i in range(expected.shape[-1]) if i not in partial.special_tokens.new_ids]
    assert (logits[..., base] - expected[..., base]).abs().max() <= 1e-4
