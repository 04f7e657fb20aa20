"""IDEFICS import: transformers' ``IdeficsForVisionText2Text`` on tiny random configs, saved by
transformers itself, converted, and compared logit for logit, token for token."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
from transformers.models.idefics.image_processing_idefics import IdeficsImageProcessor

from flamingo import formats, hub
from flamingo.convert.__main__ import main as convert_main
from flamingo.convert.idefics import KNOWN_TOWERS, idefics_config
from flamingo.model import Flamingo
from flamingo.processing import FlamingoProcessor
from flamingo.tokens import AROUND_IMAGE, END_OF_UTTERANCE, IMAGE, TINY_TOKENIZER_DIR
from tests.helpers import COMMIT, lay_out, noise_image

IMAGE_SIZE = 28

BASE = dict(  # every field the tests vary is given by each case
    hidden_size=32,
    intermediate_size=44,
    num_hidden_layers=4,
    num_attention_heads=4,
    rms_norm_eps=1e-6,
    use_resampler=True,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    initializer_range=0.2,  # large enough that the images move the logits by far more than 1e-4
    alpha_initializer="zeros",  # "normal" with float alphas fails in transformers 5.24
    vision_config=dict(
        embed_dim=24,
        image_size=IMAGE_SIZE,
        patch_size=7,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),
)

CASES = {
    "plain": dict(
        cross_layer_interval=1,
        qk_layer_norms=False,
        alpha_type="float",
        perceiver_config=dict(
            resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8, resampler_n_latents=3
        ),
    ),
    "qk_norms_vector_gates": dict(
        cross_layer_interval=2,
        qk_layer_norms=True,
        alpha_type="vector",
        perceiver_config=dict(
            resampler_depth=1,
            resampler_n_heads=3,
            resampler_head_dim=6,
            resampler_n_latents=4,
            qk_layer_norms_perceiver=True,
        ),
    ),
    "interval_2_cross_qk_only": dict(
        cross_layer_interval=2,
        qk_layer_norms=True,
        alpha_type="float",
        perceiver_config=dict(
            resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8, resampler_n_latents=2
        ),
    ),
}


def idefics_tokenizer(tmp_path, instruct: bool):
    """The packaged tiny tokenizer with IDEFICS's tokens, as IDEFICS's tokenizers have them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    base = len(tokenizer)
    tokens = [AROUND_IMAGE, IMAGE] + ([END_OF_UTTERANCE] if instruct else [])
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer, base, len(tokens)


def save_reference(tmp_path, case: str, instruct: bool = False, seed: int = 0):
    """A random IDEFICS, its alphas and norms set away from their initial values, written to
    ``tmp_path`` by transformers with its tokenizer: (model, processor, directory)."""
    tokenizer, vocab, extra = idefics_tokenizer(tmp_path, instruct)
    config = IdeficsConfig(
        **BASE,
        **CASES[case],
        vocab_size=vocab,
        additional_vocab_size=extra,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    reference = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "alpha" in name:
                p.normal_(0.0, 0.8)
            elif name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path / case
    reference.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    images = IdeficsImageProcessor(image_size=IMAGE_SIZE)
    processor = IdeficsProcessor(images, tokenizer)
    return reference, processor, directory


def prompts(eos: str):
    """Two interleaved sequences of different lengths (left padding): several images,
    consecutive images, and a document boundary (an end-of-sequence token) after which text
    sees no image until the next one."""
    a, b, c, d = (noise_image(s, (IMAGE_SIZE + 5, IMAGE_SIZE)) for s in range(4))
    return [
        ["User:", a, "what is here?", "Assistant: a cat.", f"end{eos} new doc", b, c, "two"],
        [d, "one picture and a short answer"],
    ]


def our_inputs(theirs):
    """Our forward's inputs for the reference processor's batch: the same ids and pixels (the
    padded media layout, one frame per item)."""
    return dict(
        input_ids=theirs["input_ids"],
        attention_mask=theirs["attention_mask"],
        pixel_values=theirs["pixel_values"].unsqueeze(2),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_equal_transformers_idefics(tmp_path, case):
    reference, processor, directory = save_reference(tmp_path, case)
    batch = processor(text=prompts(processor.tokenizer.eos_token), return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0  # the second sequence is left padded
    ours = Flamingo.from_pretrained(directory)  # an IDEFICS directory: converted in memory
    with torch.no_grad():
        expected = reference(**batch).logits
        got = ours(**our_inputs(batch)).logits
    real = batch["attention_mask"].bool()
    # built without storage, then given the checkpoint's tensors: none left empty, and the
    # trained parts in float32 whatever the checkpoint stored
    assert not any(p.is_meta for p in ours.parameters())
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    assert got.shape == expected.shape
    assert (got - expected)[real].abs().max().item() <= 1e-4
    # the boundary matters: text after the end-of-sequence token sees no image
    index = ours.media_index(batch["input_ids"])
    eos = (batch["input_ids"][0] == processor.tokenizer.eos_token_id).nonzero().flatten()
    after = eos[-1] + 1
    assert index[0, after] == -1 and index[0, after - 1] == 0


def test_greedy_generation_gives_transformers_tokens(tmp_path):
    reference, processor, directory = save_reference(tmp_path, "qk_norms_vector_gates")
    batch = processor(text=prompts(processor.tokenizer.eos_token), return_tensors="pt")
    ours = Flamingo.from_pretrained(directory)
    tokenizer = processor.tokenizer
    banned = [[tokenizer.convert_tokens_to_ids(t)] for t in (IMAGE, AROUND_IMAGE)]
    with torch.no_grad():
        expected = reference.generate(
            **batch, max_new_tokens=6, do_sample=False, bad_words_ids=banned, eos_token_id=None
        )[:, batch["input_ids"].shape[1] :]
        for use_cache in (True, False):
            got = ours.generate(
                **our_inputs(batch), max_new_tokens=6, eos_token_id=-1, use_cache=use_cache
            )
            assert torch.equal(got[:, -6:], expected), use_cache


@pytest.mark.parametrize("instruct", [False, True])
def test_our_processor_builds_idefics_input_ids(tmp_path, instruct):
    _, processor, directory = save_reference(tmp_path, "plain", instruct=instruct)
    cfg = idefics_config(json.loads((directory / "config.json").read_text()), directory)
    ours = FlamingoProcessor.from_config(cfg)
    sequences = prompts(processor.tokenizer.eos_token)
    sequences.append(["two texts", "in a row", noise_image(9)])  # <end_of_utterance> between
    # said explicitly to both: transformers 5's IdeficsProcessor no longer finds the token in
    # the tokenizer's special-tokens map, so its default never adds it; ours adds it when the
    # tokenizer has it (what IDEFICS's instruct models were trained with)
    expected = processor(text=sequences, add_end_of_utterance_token=instruct, return_tensors="pt")
    got = ours.interleaved(sequences)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    got = ours.interleaved(sequences, add_end_of_utterance_token=instruct)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    # the same text in our <image>-marker form gives the same ids as well
    a, b, c = (noise_image(s) for s in range(3))
    marked = ours(["User:<image>what is here?", "<image><image>two"], [[a], [b, c]])
    theirs = processor(text=[["User:", a, "what is here?"], [b, c, "two"]], return_tensors="pt")
    assert torch.equal(marked["input_ids"], theirs["input_ids"])


def logits_of(model, batch):
    with torch.no_grad():
        return model(**our_inputs(batch)).logits


def test_an_idefics_repo_id_converts_once_and_its_processor_loads(
    tmp_path, offline_cache, monkeypatch
):
    reference, processor, directory = save_reference(tmp_path, "plain", instruct=True)
    repo = "HuggingFaceM4/idefics-9b-instruct"
    lay_out(offline_cache, repo, directory)
    sequences = prompts(processor.tokenizer.eos_token)
    batch = processor(text=sequences, add_end_of_utterance_token=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits
    real = batch["attention_mask"].bool()
    model = Flamingo.from_pretrained(repo)
    assert (logits_of(model, batch) - expected)[real].abs().max() <= 1e-4
    converted = hub.converted_dir(repo, COMMIT)
    assert (converted / "config.json").is_file() and (converted / "frozen.safetensors").is_file()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(formats, "convert", no_second_conversion)
    again = Flamingo.from_pretrained(repo)  # from the converted copy, in our format
    assert torch.equal(logits_of(again, batch), logits_of(model, batch))
    ours = FlamingoProcessor.from_pretrained(repo)
    assert torch.equal(ours.interleaved(sequences)["input_ids"], batch["input_ids"])


def test_the_converter_cli_writes_a_checkpoint_that_loads(tmp_path, capsys):
    reference, processor, directory = save_reference(tmp_path, "interval_2_cross_qk_only")
    convert_main(["idefics", str(directory), str(tmp_path / "out")])
    assert "parameters from" in capsys.readouterr().out
    batch = processor(text=prompts(processor.tokenizer.eos_token), return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits
    loaded = Flamingo.from_pretrained(tmp_path / "out")
    real = batch["attention_mask"].bool()
    assert (logits_of(loaded, batch) - expected)[real].abs().max() <= 1e-4
    assert loaded.cfg.xattn.every_n_layers == 2 and loaded.cfg.lm.special_tokens == "idefics"
    saved = FlamingoProcessor.from_pretrained(tmp_path / "out")  # its processor, in our format
    sequences = prompts(processor.tokenizer.eos_token)
    assert torch.equal(saved.interleaved(sequences)["input_ids"], batch["input_ids"])


def flat(config: dict) -> dict:
    """The nested config in the flat form: perceiver keys at the top, vision keys prefixed."""
    out = {k: v for k, v in config.items() if k not in ("vision_config", "perceiver_config")}
    inner = {
        k: v
        for k, v in config["perceiver_config"].items()
        if k not in ("model_type", "use_resampler")  # the top-level use_resampler is the one read
    }
    out.update(inner)
    out.update({f"vision_{k}": v for k, v in config["vision_config"].items() if k != "model_type"})
    return out


def test_flat_and_nested_hub_configs_give_the_same_model(tmp_path):
    _, _, directory = save_reference(tmp_path, "qk_norms_vector_gates")
    nested = json.loads((directory / "config.json").read_text())
    assert idefics_config(flat(nested), directory) == idefics_config(nested, directory)
    # a flat config naming a known tower may leave its dimensions out
    names = {k: v for k, v in flat(nested).items() if not k.startswith("vision_")}
    names["vision_model_name"] = next(iter(KNOWN_TOWERS))
    assert idefics_config(names, directory).vision.architecture["vision_cfg"]["width"] == 1280


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"use_resampler": False}, "use_resampler"),
        ({"alpha_type": "matrix"}, "alpha_type"),
        ({"cross_layer_interval": 3}, "cross_layer_interval"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"vision_config": {"hidden_act": "relu"}}, "vision_config.hidden_act"),
        ({"vision_config": {"layer_norm_eps": 1e-6}}, "vision_config.layer_norm_eps"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters"),
    ],
)
def test_options_that_cannot_be_reproduced_are_refused_by_name(tmp_path, change, field):
    _, _, directory = save_reference(tmp_path, "plain")
    config = json.loads((directory / "config.json").read_text())
    for key, value in change.items():
        config[key] = (
            {**config[key], **value} if isinstance(value, dict) and key in config else value
        )
    with pytest.raises(ValueError, match=f"IDEFICS config {field}="):
        idefics_config(config, directory)


def test_a_tokenizer_that_does_not_match_the_extra_rows_is_refused(tmp_path):
    _, _, directory = save_reference(tmp_path, "plain")
    tokenizer, _, _ = idefics_tokenizer(tmp_path, instruct=True)  # one IDEFICS token more
    tokenizer.save_pretrained(directory)
    with pytest.raises(ValueError, match="additional_vocab_size=2"):
        Flamingo.from_pretrained(directory)


def test_fine_tuning_a_converted_idefics_lowers_the_loss(tmp_path):
    import yaml

    import train
    from data_prep.tiny import write_tiny_shards

    reference, _, directory = save_reference(tmp_path, "plain")
    Flamingo.from_pretrained(directory).save_pretrained(tmp_path / "converted")
    shards = write_tiny_shards(tmp_path / "shards", per_kind=24, shards=2)
    run = tmp_path / "run"
    config = {
        "init_from": str(tmp_path / "converted"),
        "output_dir": str(run),
        "steps": 30,
        "engine": {"precision": "fp32"},
        "num_workers": 0,
        "tensorboard": False,
        "log_every": 1,
        "checkpoint_every": 30,
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "datasets": [
            {
                "name": "docs",
                "kind": "interleaved",
                "shards": shards["interleaved"],
                "batch_size": 4,
                "seq_len": 48,
                "max_images": 2,
            },
            {
                "name": "pairs",
                "kind": "pairs",
                "shards": shards["pairs"],
                "batch_size": 4,
                "seq_len": 24,
                "loss_weight": 0.5,
            },
        ],
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / "train.yaml")])
    losses = [json.loads(line)["loss/total"] for line in (run / "metrics.jsonl").open()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    tuned = Flamingo.from_pretrained(run / "model")
    start = Flamingo.from_pretrained(tmp_path / "converted")
    frozen = dict(start.lm.hf.named_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in tuned.lm.hf.named_parameters())
    assert not torch.equal(tuned.lm.gated_blocks[0].attn_gate, start.lm.gated_blocks[0].attn_gate)
    same = {"lm.tokenizer": "the checkpoint's own"}
    assert tuned.cfg.replace(same) == start.cfg.replace(same)


def test_every_eval_task_runs_on_an_idefics_checkpoint(tmp_path):
    from eval.run import main as eval_main
    from tests.eval_fixtures import assert_every_task_scored, small_eval_config
    from tests.test_eval import BENCHMARKS

    _, _, directory = save_reference(tmp_path, "qk_norms_vector_gates")
    args = ["--config", str(small_eval_config(tmp_path)), "--checkpoint", str(directory)]
    results = eval_main(args)["results"]
    assert_every_task_scored(results, BENCHMARKS)


def test_the_generation_bench_against_idefics_gets_its_tokens(tmp_path, monkeypatch, capsys):
    from bench import generation

    argv = ["bench.generation", "--against", "idefics", "--batch", "2", "--new", "3"]
    monkeypatch.setattr("sys.argv", [*argv, "--device", "cpu", "--out", str(tmp_path)])
    generation.main()
    record = json.loads((tmp_path / "generation-idefics-tiny-cpu.json").read_text())
    assert record["identical_tokens"] and record["against"] == "idefics"
    assert record["seconds"]["ours"] > 0 and record["seconds"]["idefics"] > 0


def test_training_text_takes_idefics_prompt_form_and_its_fake_tokens_are_no_targets(tmp_path):
    import random
    from collections import Counter

    from data_prep.tiny import square_png
    from flamingo.data.config import DatasetConfig
    from flamingo.data.images import ImagePreprocessor
    from flamingo.data.preprocess import Preprocessor
    from flamingo.losses import IGNORE, make_labels

    _, theirs, directory = save_reference(tmp_path, "plain")
    processor = FlamingoProcessor.from_config(
        idefics_config(json.loads((directory / "config.json").read_text()), directory)
    )
    pairs = DatasetConfig(name="pairs", kind="pairs", shards="x.tar", seq_len=40)
    pre = Preprocessor(
        pairs,
        processor.tokenizer,
        processor.special_tokens,
        ImagePreprocessor(processor.vision_cfg),
    )
    ids, pixels, _, _ = pre._caption(
        "a red square", [square_png((255, 0, 0))], random.Random(0), Counter()
    )
    tok = processor.tokenizer
    # what IDEFICS's processor makes of the same caption, with the end-of-sequence it ends on
    expected = theirs(text=[[noise_image(0), "a red square" + tok.eos_token]], return_tensors="pt")
    assert ids == expected["input_ids"][0].tolist() and pixels.shape[:2] == (1, 1)
    ids = torch.tensor([ids])
    labels = make_labels(ids, torch.ones_like(ids), processor.special_tokens)
    fake = tok.convert_tokens_to_ids(AROUND_IMAGE)
    assert (labels[ids == fake] == IGNORE).all()
    text = tok("a red square", add_special_tokens=False)["input_ids"]
    assert labels[0, -len(text) - 1 : -1].tolist() == text  # the caption is the target


def test_our_squash_gives_idefics_pixels_within_one_8_bit_step(tmp_path):
    _, processor, directory = save_reference(tmp_path, "plain")
    ours = FlamingoProcessor.from_config(
        idefics_config(json.loads((directory / "config.json").read_text()), directory)
    )
    step = 1 / 255 / min(ours.vision_cfg.image_std)  # one uint8 level, normalised
    for size in [(IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE + 5, IMAGE_SIZE), (200, 120), (64, 300)]:
        image = noise_image(3, size)
        theirs = processor(text=[[image, "x"]], return_tensors="pt")["pixel_values"][0, 0]
        mine = ours.interleaved([[image, "x"]])["pixel_values"][0, 0]
        assert mine.shape == theirs.shape
        difference = (mine - theirs).abs()
        assert difference.max() <= step * 1.01 and difference.mean() < step / 2, size
