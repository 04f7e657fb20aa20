"""Llama 3.2 Vision import: transformers' ``MllamaForConditionalGeneration`` on two tiny random
configs, saved by transformers itself, every parameter moved off its initial value, converted
through the public API and compared logit for logit, token for token, pixel for pixel.

Two semantics for a token that reads no image (text before the first): ``zero`` (Meta's
reference code and Flamingo's rule, our default) is compared with transformers patched to zero
the cross-attention output there; ``attend_uniformly`` with transformers as it is."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoTokenizer,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
)

from flamingo import formats, hub
from flamingo.config import OPENAI_MEAN, OPENAI_STD
from flamingo.convert.__main__ import main as convert_main
from flamingo.convert.mllama import export_mllama, mllama_config, read_mllama
from flamingo.formats import weights_all_in_files
from flamingo.model import Flamingo
from flamingo.processing import FlamingoProcessor
from flamingo.tokens import TINY_TOKENIZER_DIR
from tests.helpers import COMMIT, lay_out, noise_image

CASES = {
    # 4 tiles of 28 pixels, cross-attention layers inside the stack, a tokenizer that starts
    # every text with its start token (as Llama 3's)
    "11b-like": dict(
        bos=True,
        vision=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_global_layers=2,
            attention_heads=4, image_size=28, patch_size=14, max_num_tiles=4,
            vision_output_dim=96, intermediate_layers_indices=[0, 2],
            supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        ),
        text=dict(
            hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[1, 3],
        ),
    ),
    # 2 tiles of 21 pixels (patches padded to a multiple of 8), a cross-attention layer first
    # and two in a row, one key/value head, Llama 3's scaled rotary embedding, no start token
    "cross-first": dict(
        bos=False,
        vision=dict(
            hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_global_layers=1,
            attention_heads=2, image_size=21, patch_size=7, max_num_tiles=2,
            vision_output_dim=48, intermediate_layers_indices=[1],
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        ),
        text=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, cross_attention_layers=[0, 2, 3],
            rope_parameters=dict(
                rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=64,
            ),
        ),
    ),
}  # fmt: skip

TEXTS = [
    "A photo <|image|>of a cat<|image|> and then",
    "<|image|>What is it?",
    "<|image|><|image|>Two in a row: which",
]
SIZES = [[(60, 30), (20, 45)], [(33, 33)], [(90, 20), (28, 56)]]


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""A chat template of the Instruct models' form (the start token, headers, an image item as
``<|image|>``, an open assistant turn), saved with the tiny tokenizer."""


def tokenizer(bos: bool):
    """The packaged tiny tokenizer with Llama 3.2 Vision's tokens: a start token, a pad token
    and ``<|image|>`` last (its id is the text model's vocabulary size, the embedding's first
    extra row). With ``bos`` it starts every text with its start token."""
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "pad_token": "<pad>"})
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    if bos:
        start = tok.bos_token
        tok._tokenizer.post_processor = TemplateProcessing(
            single=f"{start} $A", pair=f"{start} $A $B", special_tokens=[(start, tok.bos_token_id)]
        )
    return tok


def save_reference(root, case: str, seed: int = 0):
    """A random Llama 3.2 Vision with every parameter (gates, gated positional embeddings,
    aspect-ratio embeddings, norms) off its initial value, written by transformers with its
    tokenizer and image processor: (model, directory)."""
    spec = CASES[case]
    tok = tokenizer(spec["bos"])
    image_id = tok.convert_tokens_to_ids("<|image|>")
    text = dict(
        spec["text"], vocab_size=image_id, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config = MllamaConfig(
        vision_config=spec["vision"], text_config=text, image_token_index=image_id
    )
    torch.manual_seed(seed)
    reference = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "gate" in name or "norm" in name:
                p.add_(0.4 + 0.2 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0.0, 0.2)
            else:
                p.add_(0.1 * torch.randn_like(p))
    directory = root / case
    reference.save_pretrained(directory)
    tok.save_pretrained(directory)
    size = spec["vision"]["image_size"]
    MllamaImageProcessor(
        size={"height": size, "width": size},
        max_image_tiles=spec["vision"]["max_num_tiles"],
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    ).save_pretrained(directory)
    return reference, directory


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("mllama"), request.param)


def images(seed: int = 0):
    return [
        [noise_image(seed + 10 * b + i, size) for i, size in enumerate(row)]
        for b, row in enumerate(SIZES)
    ]


def their_inputs(directory, batch=None):
    processor = MllamaProcessor.from_pretrained(directory)
    return processor(
        images=batch or images(), text=TEXTS, return_tensors="pt", padding=True, padding_side="left"
    )


@contextmanager
def meta_zeroing():
    """transformers' cross-attention layers with Meta's rule: a token whose row reads no vision
    token (``full_text_row_masked_out_mask`` 0) gets no attention output (transformers spreads
    its attention evenly; it zeroes the MLP's output only)."""
    import transformers.models.mllama.modeling_mllama as mm

    layer, attention = mm.MllamaCrossAttentionDecoderLayer, mm.MllamaTextCrossAttention
    layer_forward, attention_forward = layer.forward, attention.forward

    def forward_layer(self, *args, **kwargs):
        self.cross_attn.reads = kwargs.get(
            "full_text_row_masked_out_mask", args[4] if len(args) > 4 else None
        )
        return layer_forward(self, *args, **kwargs)

    def forward_attention(self, *args, **kwargs):
        out, weights = attention_forward(self, *args, **kwargs)
        return out * self.reads[:, 0], weights

    layer.forward, attention.forward = forward_layer, forward_attention
    try:
        yield
    finally:
        layer.forward, attention.forward = layer_forward, attention_forward


def their_logits(model, enc) -> torch.Tensor:
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding
    with torch.no_grad():
        return model(**enc, position_ids=positions).logits


def ours_of(directory, rows: str = "zero") -> Flamingo:
    if rows == "zero":
        return Flamingo.from_pretrained(directory)  # the public path: our default
    config = json.loads((directory / "config.json").read_text())
    pre = json.loads((directory / "preprocessor_config.json").read_text())
    cfg = mllama_config(config, directory, pre, rows_without_image=rows)
    from flamingo.convert.mllama import load_mllama

    return load_mllama(Flamingo.from_config(cfg), read_mllama(directory)).eval()


def our_logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits


def close(theirs: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor, atol: float = 1e-4):
    vocab = theirs.shape[-1]
    assert ours.shape[-1] == vocab  # no logit for <|image|>: the head has vocab_size rows
    diff = (theirs - ours[..., :vocab]).abs()[mask.bool()]
    assert diff.max() < atol, f"max |logit difference| {diff.max():.3g} on real tokens"


def test_every_tensor_is_placed_and_the_model_is_built_without_storage(reference):
    model, directory = reference
    ours = Flamingo.from_pretrained(directory)
    assert weights_all_in_files(ours.cfg)  # no random init of the weights to be overwritten
    theirs = sum(p.numel() for p in model.parameters())
    assert ours.num_parameters() == theirs
    assert ours.cfg.connector == "mllama" and ours.parts.tower.name == "mllama"


def test_logits_match_transformers_with_meta_zeroing(reference):
    """Our default: a left-padded batch, several images of different aspect ratios (other
    tilings), text before, between and after them, two images in a row; flat media."""
    model, directory = reference
    enc = their_inputs(directory)
    ours = FlamingoProcessor.from_pretrained(directory)(TEXTS, images())
    assert enc["attention_mask"][:, 0].min() == 0  # left padded
    assert len(set(ours["aspect_ratio_ids"].tolist())) > 2  # the tilings differ
    with meta_zeroing():
        theirs = their_logits(model, enc)
    close(theirs, our_logits(ours_of(directory), ours), enc["attention_mask"])


def test_logits_match_transformers_as_it_is_with_attend_uniformly(reference):
    """transformers' numerics: a token that reads no image attends evenly over its row's vision
    tokens, the empty image slots' too, so the padded media layout (every slot encoded, as
    transformers encodes them) reproduces it."""
    model, directory = reference
    enc = their_inputs(directory)
    theirs = their_logits(model, enc)
    padded = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values": enc["pixel_values"],
        "aspect_ratio_ids": enc["aspect_ratio_ids"],
    }
    close(theirs, our_logits(ours_of(directory, "attend_uniformly"), padded), enc["attention_mask"])


def test_flat_and_padded_media_give_the_same_logits(reference):
    _, directory = reference
    model = ours_of(directory)
    ours = FlamingoProcessor.from_pretrained(directory)(TEXTS, images())
    enc = their_inputs(directory)
    padded = {
        k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids")
    }
    torch.testing.assert_close(
        our_logits(model, ours), our_logits(model, padded), rtol=0, atol=1e-4
    )


def test_the_processor_gives_mllama_processors_ids_and_pixels(reference):
    _, directory = reference
    odd = [[noise_image(1, (5, 3)), noise_image(2, (200, 90))], [noise_image(3, (56, 28))], [
        noise_image(4, (17, 101)), noise_image(5, (42, 42))]]  # fmt: skip
    theirs = their_inputs(directory, odd)
    ours = FlamingoProcessor.from_pretrained(directory)(TEXTS, odd)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    slots = ours["media_slots"]
    assert torch.equal(
        ours["aspect_ratio_ids"], theirs["aspect_ratio_ids"][slots >= 0]
    )  # the flat layout: real media only, sequence by sequence
    level = (1 / 255) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)  # one 8-bit level
    diff = (ours["pixel_values"] - theirs["pixel_values"][slots >= 0]).abs()
    assert (diff <= level * 1.001).all(), f"{(diff / level).max():.2f} levels apart"
    # the same text written with our marker
    ours_marked = FlamingoProcessor.from_pretrained(directory)(
        [t.replace("<|image|>", "<image>") for t in TEXTS], odd
    )
    assert torch.equal(ours_marked["input_ids"], theirs["input_ids"])


def test_the_instruct_chat_template_gives_mllama_processors_ids(reference):
    """``processor.chat(..., template="checkpoint")``: the checkpoint's own chat template, an
    image opening the first user turn, tokenized as transformers' processors tokenize a
    rendered chat (no second start token)."""
    _, directory = reference
    turns = [
        {"role": "user", "text": "What is in the picture?"},
        {"role": "assistant", "text": "A red circle."},
        {"role": "user", "text": "And its colour?"},
    ]
    image = noise_image(9, (40, 70))
    messages = [
        {"role": t["role"], "content": ([{"type": "image", "image": image}] if i == 0 else [])
         + [{"type": "text", "text": t["text"]}]}
        for i, t in enumerate(turns)
    ]  # fmt: skip
    theirs = MllamaProcessor.from_pretrained(directory).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ours = FlamingoProcessor.from_pretrained(directory).chat(
        [turns], [image], template="checkpoint"
    )
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["aspect_ratio_ids"], theirs["aspect_ratio_ids"][0])
    with pytest.raises(ValueError, match="ends with a user turn"):
        FlamingoProcessor.from_pretrained(directory).chat(
            [turns[:2]], [image], template="checkpoint"
        )


def greedy_cases(directory):
    """Left-padded prompts of several images each (a run of two, text between), so that a
    generated token reads only the last run: (their inputs, ours)."""
    texts = ["A <|image|>photo of<|image|> a", "<|image|><|image|>It"]
    batch = [
        [noise_image(7, (50, 20)), noise_image(6, (30, 30))],
        [noise_image(8, (24, 70)), noise_image(5, (64, 20))],
    ]
    theirs = MllamaProcessor.from_pretrained(directory)(
        images=batch, text=texts, return_tensors="pt", padding=True, padding_side="left"
    )
    return theirs, FlamingoProcessor.from_pretrained(directory)(texts, batch)


def test_greedy_tokens_equal_transformers_generate(reference):
    """Ours with and without caches give transformers' greedy tokens (Meta's zeroing applied to
    both). transformers' own cache mishandles a cross-attention layer at index 0, so the
    ``cross-first`` case is compared with its uncached generate."""
    model, directory = reference
    theirs_in, ours_in = greedy_cases(directory)
    first_is_cross = 0 in model.config.text_config.cross_attention_layers
    with meta_zeroing(), torch.no_grad():
        theirs = model.generate(
            **theirs_in, max_new_tokens=6, do_sample=False, use_cache=not first_is_cross,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    ours = ours_of(directory)
    for cache in (True, False):
        tokens = ours.generate(**ours_in, max_new_tokens=6, eos_token_id=-1, use_cache=cache)
        assert torch.equal(tokens, theirs), (cache, tokens, theirs)
    beams = [
        ours.generate(**ours_in, max_new_tokens=4, num_beams=3, eos_token_id=-1, use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(*beams)


def test_the_convert_command_and_a_hub_id(reference, tmp_path, offline_cache):
    model, directory = reference
    convert_main(["mllama", str(directory), str(tmp_path / "ours")])
    enc = FlamingoProcessor.from_pretrained(tmp_path / "ours")(TEXTS, images())
    expected = our_logits(ours_of(directory), enc)
    assert torch.equal(our_logits(Flamingo.from_pretrained(tmp_path / "ours"), enc), expected)
    repo = "meta-llama/Llama-3.2-11B-Vision-Instruct"
    lay_out(offline_cache, repo, directory)
    from_hub = Flamingo.from_pretrained(repo)  # converted once into the cache, then loaded
    assert torch.equal(our_logits(from_hub, enc), expected)
    assert hub.converted_dir(repo, commit=COMMIT).joinpath("config.json").is_file()
    processor = FlamingoProcessor.from_pretrained(repo)
    assert torch.equal(processor(TEXTS, images())["input_ids"], enc["input_ids"])


def test_both_key_layouts_load_the_same(reference, tmp_path):
    """transformers saves the layout the Meta repos were uploaded with (``vision_model.*``,
    ``language_model.model.*``, ``language_model.lm_head.*``, ``multi_modal_projector.*``) and
    loads its own 5.x names too (``model.vision_model.*``, ``model.language_model.*``,
    ``lm_head.*``, ``model.multi_modal_projector.*``): the checkpoint rewritten in the other
    one gives the same model."""
    _, directory = reference
    other = tmp_path / "other"
    other.mkdir()
    for f in directory.iterdir():
        if f.suffix != ".safetensors":
            (other / f.name).write_bytes(f.read_bytes())
    old_to_new = {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_model.": "model.vision_model.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    }
    saved = load_file(str(directory / "model.safetensors"))
    old = all(k.startswith(tuple(old_to_new)) for k in saved)
    renames = old_to_new if old else {new: o for o, new in old_to_new.items()}
    state = {}
    for name, tensor in saved.items():
        prefix = next(p for p in renames if name.startswith(p))
        state[renames[prefix] + name.removeprefix(prefix)] = tensor
    save_file(state, str(other / "model.safetensors"))
    enc = FlamingoProcessor.from_pretrained(directory)(TEXTS, images())
    assert torch.equal(
        our_logits(Flamingo.from_pretrained(other), enc), our_logits(ours_of(directory), enc)
    )


def test_a_model_goes_back_to_transformers_format(reference, tmp_path):
    """Every tensor back in its place (the embedding's extra rows included); transformers loads
    the export; through our checkpoint and the command line too."""
    model, directory = reference
    ours = ours_of(directory)
    ours.save_pretrained(tmp_path / "ours", FlamingoProcessor.from_pretrained(directory))
    convert_main(["to-mllama", str(tmp_path / "ours"), str(tmp_path / "back")])
    back = MllamaForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    want = model.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    enc = their_inputs(directory)
    assert torch.equal(their_logits(back, enc), their_logits(model, enc))
    again = export_mllama(ours, FlamingoProcessor.from_pretrained(directory), tmp_path / "again")
    assert MllamaProcessor.from_pretrained(again)(images=images(), text=TEXTS, padding=True)


def test_what_cannot_be_reproduced_is_refused_by_name(reference):
    _, directory = reference
    config = json.loads((directory / "config.json").read_text())
    pre = json.loads((directory / "preprocessor_config.json").read_text())
    with pytest.raises(ValueError, match="max_image_tiles"):
        mllama_config(config, directory, {**pre, "max_image_tiles": 16})
    with pytest.raises(ValueError, match="resample"):
        mllama_config(config, directory, {**pre, "resample": 3})
    last = config["text_config"]["num_hidden_layers"] - 1
    bad = {**config, "text_config": {**config["text_config"], "cross_attention_layers": [last]}}
    with pytest.raises(ValueError, match="cross_attention_layers"):
        mllama_config(bad, directory, pre)
    model = ours_of(directory)
    enc = FlamingoProcessor.from_pretrained(directory)(TEXTS, images())
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        model(**{k: v for k, v in enc.items() if k != "aspect_ratio_ids"})


def test_every_eval_task_runs_on_a_llama_vision_checkpoint(tmp_path):
    """Few-shot prompts of several images in Llama 3.2's form (``<|image|>`` per image),
    RICES features from the tiled tower's real tiles, class ranking by scores."""
    import yaml

    from eval.run import main as eval_main
    from tests.eval_fixtures import assert_every_task_scored, small_eval_config
    from tests.test_eval import BENCHMARKS

    _, directory = save_reference(tmp_path, "cross-first")
    config = small_eval_config(tmp_path)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "demos": "rices"}))
    results = eval_main(["--config", str(config), "--checkpoint", str(directory)])["results"]
    assert any((tmp_path / "cache").glob("rices-*.safetensors"))
    assert_every_task_scored(results, BENCHMARKS)


def test_lmms_eval_plugin_writes_llama_vision_prompts_as_transformers_does(tmp_path):
    """``--model flamingo`` on a Llama 3.2 Vision checkpoint in transformers' format: each
    image's ``<|image|>`` before the task's text, the start token after them, tiles and
    aspect-ratio ids; its answers are transformers' own greedy tokens for that prompt."""
    from lmms_eval.api.instance import Instance

    from flamingo.lmms_eval import FlamingoLMMs

    reference, directory = save_reference(tmp_path, "cross-first")
    lm = FlamingoLMMs(pretrained=str(directory), batch_size=2)
    docs = [{"images": [noise_image(1, (60, 30))]}, {"images": [noise_image(2, (33, 33))] * 2}]
    lm.task_dict = {"t": {"test": docs}}
    contexts = ["What is in it? Answer:", "Which of the two is brighter?"]
    requests = [
        Instance(
            "generate_until",
            (
                context,
                {"until": ["\n"], "max_new_tokens": 4},
                lambda d: d["images"],
                i,
                "t",
                "test",
            ),
            0,
            {"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, context in enumerate(contexts)
    ]
    answers = lm.generate_until(requests)
    processor = MllamaProcessor.from_pretrained(directory)
    for doc, context, answer in zip(docs, contexts, answers, strict=True):
        prompt = "<|image|>" * len(doc["images"]) + context
        enc = processor(images=[doc["images"]], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(**enc, max_new_tokens=4, do_sample=False)
        text = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
        assert answer == text.split(processor.tokenizer.eos_token)[0].split("\n")[0]
        assert answer


@pytest.mark.parametrize("beams", [1, 3])
def test_the_generation_bench_against_mllama_gets_its_tokens(tmp_path, monkeypatch, beams):
    """Greedy and beam search: ours and transformers' give the same tokens (the bench fails
    otherwise), each kind of row in its own record."""
    from bench import generation

    argv = ["bench.generation", "--against", "mllama", "--batch", "2", "--new", "3"]
    argv += ["--beams", str(beams), "--device", "cpu", "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    generation.main()
    name = (
        "generation-mllama-tiny-cpu.json" if beams == 1 else "generation-mllama-beam3-tiny-cpu.json"
    )
    record = json.loads((tmp_path / name).read_text())
    assert record["identical_tokens"] and record["against"] == "mllama"
    assert record["beams"] == beams
    assert record["seconds"]["ours"] > 0 and record["seconds"]["mllama"] > 0


def test_config_changes_apply_before_the_build(reference):
    """``from_pretrained(..., changes=)``, as ``train.py`` gives an engine's precision to a
    checkpoint it builds partitioned: the frozen parts are built in it (not cast after), the
    trained ones stay float32; a Hub id of a foreign format takes none (converted whole into
    the cache)."""
    _, directory = reference
    model = Flamingo.from_pretrained(directory, changes={"frozen_dtype": "bfloat16"})
    assert model.cfg.frozen_dtype == "bfloat16"
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    with pytest.raises(ValueError, match="give its downloaded files"):
        formats.converted("mllama", "meta-llama/x", None, Flamingo.from_config, {"a": 1})


def fine_tune_config(tmp_path, init_from, run, steps: int, **extra) -> dict:
    from data_prep.tiny import write_tiny_shards

    shards = write_tiny_shards(tmp_path / "shards", per_kind=24, shards=2)
    return {
        "init_from": str(init_from),
        "output_dir": str(run),
        "steps": steps,
        "engine": {"precision": "fp32"},
        "num_workers": 0,
        "tensorboard": False,
        "log_every": 1,
        "checkpoint_every": steps,
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "datasets": [
            {"name": "docs", "kind": "interleaved", "shards": shards["interleaved"],
             "batch_size": 4, "seq_len": 48, "max_images": 2},
            {"name": "pairs", "kind": "pairs", "shards": shards["pairs"], "batch_size": 4,
             "seq_len": 24, "loss_weight": 0.5},
        ],
        **extra,
    }  # fmt: skip


def test_fine_tuning_with_the_lm_frozen_then_back_to_transformers(tmp_path):
    """train.py from a Llama 3.2 Vision checkpoint (transformers' format, converted on load):
    its tiles travel as uint8 with their aspect-ratio ids, the cross-attention layers and the
    projection train, the LM and the tower stay as they were, the loss falls, and the export
    goes back to transformers' format with its logits."""
    import yaml

    import train

    _, directory = save_reference(tmp_path, "11b-like")
    run = tmp_path / "run"
    config = fine_tune_config(tmp_path, directory, run, 30)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / "train.yaml")])
    losses = [json.loads(line)["loss/total"] for line in (run / "metrics.jsonl").open()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    tuned, start = Flamingo.from_pretrained(run / "model"), ours_of(directory)
    assert tuned.lm.new_tokens.token_ids.numel() == 0  # the tokenizer brings every token
    assert set(tuned.trainable_modules()) == {"projector", "gated_blocks", "new_tokens"}
    frozen = dict(start.named_parameters())
    for name, p in tuned.named_parameters():
        changed = not torch.equal(p, frozen[name])
        assert changed == name.startswith(("projector.", "lm.gated_blocks.")), name
    back = export_mllama(tuned, FlamingoProcessor.from_pretrained(run / "model"), tmp_path / "hf")
    reference = MllamaForConditionalGeneration.from_pretrained(back).eval()
    enc = their_inputs(directory)
    ours = FlamingoProcessor.from_pretrained(directory)(TEXTS, images())
    with meta_zeroing():
        close(their_logits(reference, enc), our_logits(tuned, ours), enc["attention_mask"])


@pytest.mark.multiprocess
def test_fine_tuning_on_two_processes_under_zero2_and_zero3(tmp_path):
    """The same recipe on two ranks (torchrun), ZeRO-2 and ZeRO-3 (the trainable parts
    partitioned), and ZeRO-3 with the frozen weights partitioned too (the checkpoint converted
    into a model built under ``zero.Init``, each tensor written into its partitions; a weight
    of the LM built whole stops the run): the same trained weights."""
    import yaml
    from safetensors.torch import load_file

    from tests.test_train import check, two_ranks

    _, directory = save_reference(tmp_path, "11b-like")
    weights = {}
    runs = {"zero2": ("zero2.json", {}), "zero3": ("zero3.json", {})}
    runs["zero3-partitioned"] = ("zero3.json", {"frozen_weights": "partitioned"})
    for stage, (ds, options) in runs.items():
        run = tmp_path / stage
        engine = {"precision": "fp32", "deepspeed": f"configs/deepspeed/{ds}", **options}
        config = fine_tune_config(tmp_path, directory, run, 3, engine=engine)
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(config))
        check(two_ranks(["train.py", "--config", str(tmp_path / f"{stage}.yaml")]))
        weights[stage] = load_file(str(run / "model" / "model.safetensors"))
    assert any(k.startswith("lm.gated_blocks.") for k in weights["zero2"])
    for name, want in weights["zero2"].items():
        for stage in ("zero3", "zero3-partitioned"):
            got = weights[stage][name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{stage}: {name}")


def test_the_flop_formula_counts_the_tiled_tower_and_the_cross_attention_layers():
    """Every tile's patches, the local and global layers over an image's padded tiles at once,
    the projection, and the cross-attention layers (queries, the media's keys and values,
    the SwiGLU MLP), forward and training step, against the matrix products counted."""
    from bench.flops import forward_flops, train_step_flops
    from bench.run_flops import MatmulFlops
    from bench.train_step import step_shape
    from flamingo.losses import make_labels, summed_nll
    from tests.helpers import PRESET_OVERRIDES, build, set_gates

    model = build(*PRESET_OVERRIDES["mllama"]).train()
    set_gates(model)
    special = model.special_tokens
    batch, images, seq_len = 2, 2, 24
    ids = torch.randint(3, 800, (batch, seq_len))
    ids[:, 2], ids[:, 10] = special.image_id, special.image_id
    pixels = torch.randn(batch, images, 2, 3, 16, 16)  # 2 tiles of 16 pixels an image
    ratios = torch.tensor([[1, 2], [3, 1]])  # 1x1, 1x2 and 2x1 tilings
    mask = torch.ones_like(ids)
    shape = step_shape(model.cfg, batch, seq_len, images, new_tokens=len(special.new_ids))
    assert (shape.tiles, shape.vision_seq, shape.image_tokens, shape.gated_blocks) == (2, 8, 10, 2)
    run = lambda: model(ids, mask, pixel_values=pixels, aspect_ratio_ids=ratios)  # noqa: E731
    with torch.no_grad(), MatmulFlops() as forward:
        run()
    assert sum(forward_flops(shape).values()) == pytest.approx(forward.total, 1e-6)
    labels = make_labels(ids, mask, special)
    with MatmulFlops() as train:
        summed_nll(run().logits, labels).backward()
    assert train_step_flops(shape)["total"] == pytest.approx(train.total, 1e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_the_loaders_uint8_tiles_are_the_processors_pixels(reference, flip):
    """The training loader ships uint8 tiles and their aspect-ratio id; normalised on the
    device (the missing tiles zeroed), they are what the processor gives at inference, and the
    tower reads the same tokens from either (odd sizes: every tiling)."""
    from PIL import ImageOps

    from flamingo.data.images import ImagePreprocessor

    _, directory = reference
    model = ours_of(directory)
    loader = ImagePreprocessor(model.cfg.vision)
    processor = FlamingoProcessor.from_pretrained(directory)
    for size in ((5, 3), (200, 90), (56, 28), (17, 101)):
        image = noise_image(sum(size), size)
        tiles, ratio = loader.media(image, flip)
        assert tiles.dtype == torch.uint8
        pixels, want_ratio = processor.tower.preprocess(ImageOps.mirror(image) if flip else image)
        assert ratio == want_ratio
        ids = torch.tensor([[ratio]])
        with torch.no_grad():
            from_loader = model.vision(tiles[None, None], ids)
            from_processor = model.vision(pixels[None, None], ids)
        torch.testing.assert_close(from_loader, from_processor, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="tiles of an image"):
        loader(image)  # one frame: not what a tiled tower makes
