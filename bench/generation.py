"""Generation, ours vs OpenFlamingo: 4-shot captioning prompt, beam 3, 20 new tokens, batch 8,
same weights (OpenFlamingo's, converted with ``from_openflamingo``), same tokens asserted; or
ours vs transformers' IDEFICS (``--against idefics``) or Llama 3.2 Vision (``--against
mllama``, ``bench/generation_mllama.py``): its ``generate`` on a random
``IdeficsForVisionText2Text`` and ours on the same weights (``Flamingo.from_pretrained`` of its directory).

    python -m bench.generation [--config tiny|small] [--batch 8] [--beams 3] [--new 20]
    python -m bench.generation --against idefics [--config tiny|small] [--beams 1]
    python -m bench.generation --against mllama [--config tiny|small] [--beams 3|1]

OpenFlamingo's ``generate`` does not run with transformers 5 (its forward's signature), so its
side is our beam search driving *its* ``forward``: the full sequence every step, the images
re-encoded for every beam, no caches. Ours encodes the images once per call, caches the gated
blocks' keys/values and the LM's KV cache. Both use the same beam rules, so the tokens must be
identical. transformers' IDEFICS ``generate`` caches the LM's keys and values but not the gated
blocks' (its cross-attention recomputes them from the latents at every step); it runs greedy
here (``--beams 1``): its beam search's rules are not ours, so only greedy tokens must match.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from bench.train_step import CONFIGS, bench_config, build_backbones, openflamingo_model
from flamingo.media import place_in_slots

ROOT = Path(__file__).resolve().parents[1]


class OpenFlamingoDecoder(torch.nn.Module):
    """Lets flamingo.generation drive OpenFlamingo's forward (uncached decoding path)."""

    def __init__(self, of_model, special, tokenizer_size: int) -> None:
        super().__init__()
        self.of = of_model
        self.special_tokens = special
        self.lm = SimpleNamespace(tokenizer_size=tokenizer_size)

    def encode_media(self, pixel_values: torch.Tensor, media_slots=None) -> torch.Tensor:
        # OpenFlamingo's padded layout, re-encoded inside every forward as it does per beam
        return pixel_values if media_slots is None else place_in_slots(pixel_values, media_slots)

    def forward(self, input_ids, attention_mask, media_latents=None, **_):
        out = self.of(vision_x=media_latents, lang_x=input_ids, attention_mask=attention_mask)
        return SimpleNamespace(logits=out.logits.float(), cache=None)


def build(config: str, root: Path):
    """OpenFlamingo's model around the benchmark config's random backbones, and ours converted
    from its weights (``from_openflamingo``), the backbones saved to ``root`` as their sources."""
    from flamingo.convert import from_openflamingo
    from flamingo.tokens import load_tokenizer

    torch.manual_seed(0)
    cfg = bench_config(config)
    clip, lm, image_size = build_backbones(cfg)
    torch.save({"state_dict": clip.state_dict()}, root / "clip.pt")
    lm.save_pretrained(root / "lm")
    load_tokenizer(cfg.lm.tokenizer_source())[0].save_pretrained(root / "lm")
    tokenizer, special = load_tokenizer(str(root / "lm"))
    of = openflamingo_model(clip, lm, special, cfg.xattn.every_n_layers).eval()
    with torch.no_grad():
        for block in lm.gated_cross_attn_layers:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    sources = {"vision.pretrained": str(root / "clip.pt"), "lm.architecture": None}
    sources |= {"lm.name_or_path": str(root / "lm"), "lm.tokenizer": str(root / "lm")}
    ours = from_openflamingo(of.state_dict(), cfg.replace(sources)).eval()
    return ours, OpenFlamingoDecoder(of, special, len(tokenizer)), image_size


IDEFICS_SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=1,
        vision=dict(
            embed_dim=64,
            image_size=32,
            patch_size=8,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        perceiver=dict(
            resampler_depth=2, resampler_n_heads=4, resampler_head_dim=16, resampler_n_latents=16
        ),
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        cross_layer_interval=2,
        vision=dict(
            embed_dim=256,
            image_size=112,
            patch_size=14,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=4,
        ),
        perceiver=dict(
            resampler_depth=2, resampler_n_heads=8, resampler_head_dim=32, resampler_n_latents=64
        ),
    ),
}
"""Random IDEFICS models for ``--against idefics`` (IDEFICS-9B's proportions, scaled down)."""


def build_idefics(config: str, root: Path):
    """A random IDEFICS of :data:`IDEFICS_SHAPES` (qk norms on, gates open), written by
    transformers to ``root`` with a tokenizer, and ours converted from that directory:
    ``(ours, reference, processor, image_size)``."""
    from transformers import AutoTokenizer, IdeficsConfig, IdeficsForVisionText2Text

    from flamingo import Flamingo, FlamingoProcessor
    from flamingo.tokens import AROUND_IMAGE, IMAGE, TINY_TOKENIZER_DIR

    shape = dict(IDEFICS_SHAPES[config])
    vision, perceiver = shape.pop("vision"), shape.pop("perceiver")
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [AROUND_IMAGE, IMAGE]})
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    reference = IdeficsForVisionText2Text(
        IdeficsConfig(
            **shape,
            **ids,
            vocab_size=vocab,
            additional_vocab_size=2,
            use_resampler=True,
            qk_layer_norms=True,
            pad_token_id=tokenizer.pad_token_id,
            vision_config=vision,
            perceiver_config={**perceiver, "qk_layer_norms_perceiver": True},
        )
    ).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "alpha" in name:
                p.fill_(0.5)
    reference.save_pretrained(root)
    tokenizer.save_pretrained(root)
    ours = Flamingo.from_pretrained(root)
    return ours, reference, FlamingoProcessor.from_config(ours.cfg), vision["image_size"]


def idefics_prompts(image_size: int, batch: int, shots: int = 4) -> list[list]:
    """The 4-shot captioning prompt as IDEFICS's processor takes it (strings and images)."""
    rng = np.random.default_rng(1)

    def image():
        return Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))

    return [
        [x for i in range(shots) for x in (image(), f"Output: a photo of thing {i}.\n")]
        + [image(), "Output:"]
        for _ in range(batch)
    ]


def against_idefics(args) -> tuple[dict, dict]:
    """Time ours and transformers' IDEFICS ``generate`` on the same weights and prompts."""
    from transformers import IdeficsProcessor
    from transformers.models.idefics.image_processing_idefics import IdeficsImageProcessor

    from flamingo.tokens import AROUND_IMAGE, IMAGE

    with tempfile.TemporaryDirectory() as tmp:
        ours, reference, processor, image_size = build_idefics(args.config, Path(tmp))
    sequences = idefics_prompts(image_size, args.batch)
    theirs_processor = IdeficsProcessor(
        IdeficsImageProcessor(image_size=image_size), processor.tokenizer
    )
    theirs = theirs_processor(text=sequences, return_tensors="pt")
    mine = processor.interleaved(sequences)
    if not torch.equal(mine["input_ids"], theirs["input_ids"]):
        raise SystemExit("the two processors built different input_ids")
    # the same pixels on both sides: IDEFICS's, as our padded media layout
    mine = {
        "input_ids": theirs["input_ids"],
        "attention_mask": theirs["attention_mask"],
        "pixel_values": theirs["pixel_values"].unsqueeze(2),
    }
    device = args.device
    ours, reference = ours.to(device), reference.to(device)
    mine = {k: v.to(device) for k, v in mine.items()}
    theirs = {k: v.to(device) for k, v in theirs.items()}
    tok = processor.tokenizer
    banned = [[tok.convert_tokens_to_ids(t)] for t in (IMAGE, AROUND_IMAGE)]
    new, beams = args.new, args.beams
    runs = (
        (
            "ours",
            lambda: ours.generate(**mine, max_new_tokens=new, num_beams=beams, eos_token_id=-1)[
                :, -new:
            ],
        ),
        (
            "idefics",
            lambda: reference.generate(
                **theirs,
                max_new_tokens=new,
                min_new_tokens=new,
                num_beams=beams,
                do_sample=False,
                bad_words_ids=banned,
            )[:, -new:],
        ),
    )
    # warmed up on the CPU too: a cold first call of either side costs it more than its
    # decoding does at these sizes (measured: ours 3.8 s cold, 0.8 s warm)
    return timed(runs, device, warm_up=True)


def timed(runs, device: str, warm_up: bool = False) -> tuple[dict, dict]:
    """Each run's output and seconds, after a warm-up call on CUDA or when ``warm_up``."""
    timings, outputs = {}, {}
    cuda = device.startswith("cuda")
    with torch.no_grad():
        for name, run in runs:
            if cuda or warm_up:  # a first call loads kernels and caches; time a second one
                run()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = run()
            if cuda:
                torch.cuda.synchronize()
            timings[name] = time.perf_counter() - start
    return timings, outputs


def prompt_batch(ours, image_size: int, batch: int, shots: int = 4):
    from flamingo import FlamingoProcessor

    processor = FlamingoProcessor.from_config(ours.cfg)
    text = (
        "".join(f"<image>Output: a photo of thing {i}.<|endofchunk|>" for i in range(shots))
        + "<image>Output:"
    )
    rng = np.random.default_rng(1)
    images = [
        [
            Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
            for _ in range(shots + 1)
        ]
        for _ in range(batch)
    ]
    return processor([text] * batch, images=images)


REFERENCE_SIDE = {
    "openflamingo": "our beam search over OpenFlamingo's forward (no caches, images re-encoded per beam); its generate fails with transformers 5",
    "idefics": "transformers' IdeficsForVisionText2Text.generate (LM KV cache; cross-attention keys and values recomputed every step)",
    "mllama": "transformers' MllamaForConditionalGeneration.generate (LM KV cache with the cross-attention layers' keys and values cached)",
}


def against_openflamingo(args) -> tuple[dict, dict]:
    """Time ours and OpenFlamingo's forward under our beam search on the same weights."""
    from flamingo.generation import generate

    with tempfile.TemporaryDirectory() as tmp:
        ours, of, image_size = build(args.config, Path(tmp))
        enc = prompt_batch(ours, image_size, args.batch)
    ours, of = ours.to(args.device), of.to(args.device)
    enc = {k: v.to(args.device) for k, v in enc.items()}
    kwargs = dict(max_new_tokens=args.new, num_beams=args.beams)
    runs = (
        ("ours", lambda: ours.generate(**enc, **kwargs)),
        ("openflamingo", lambda: generate(of, **enc, **kwargs, use_cache=False)),
    )
    return timed(runs, args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default="tiny",
        help=f"a benchmark model of configs/bench/ ({', '.join(CONFIGS)}) or a model config YAML",
    )
    parser.add_argument(
        "--against",
        choices=("openflamingo", "idefics", "mllama"),
        default="openflamingo",
        help="the reference implementation timed against ours",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--beams", type=int, default=None, help="default 3 (1 against idefics and mllama)"
    )
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.beams is None:
        args.beams = 1 if args.against in ("idefics", "mllama") else 3
    if args.against == "idefics" and args.beams != 1:
        parser.error(
            "--against idefics compares greedy tokens (its beam search's rules are not ours): --beams 1"
        )
    if args.against == "idefics":
        timings, outputs = against_idefics(args)
    elif args.against == "mllama":
        from bench.generation_mllama import against_mllama

        timings, outputs = against_mllama(args, timed)
    else:
        timings, outputs = against_openflamingo(args)
    reference = args.against
    cuda = args.device.startswith("cuda")
    same = torch.equal(outputs["ours"], outputs[reference])
    record = {
        "config": args.config,
        "batch": args.batch,
        "beams": args.beams,
        "new_tokens": args.new,
        "shots": 4,
        "seconds": timings,
        "against": reference,
        "speedup": timings[reference] / timings["ours"],
        "identical_tokens": same,
        "device": args.device,
        "machine": torch.cuda.get_device_name()
        if cuda
        else f"{platform.machine()} CPU, {args.threads} threads",
        "torch": torch.__version__,
        "reference_side": REFERENCE_SIDE[reference],
        "warmed_up": cuda or reference != "openflamingo",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "generation" if reference == "openflamingo" else f"generation-{reference}"
    if reference == "mllama" and args.beams > 1:  # both kinds of row kept
        prefix += f"-beam{args.beams}"
    path = args.out / f"{prefix}-{Path(args.config).stem}-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"| generation ({args.config}, batch {args.batch}, beam {args.beams}, {args.new} tokens) | ours | {reference} | speed-up |"
    )
    print("| --- | --- | --- | --- |")
    print(
        f"| seconds per call | {timings['ours']:.2f} | {timings[reference]:.2f} | {record['speedup']:.1f}x |"
    )
    print(f"\nidentical tokens: {same}; wrote {path}")
    if not same:
        raise SystemExit("the two implementations generated different tokens")


if __name__ == "__main__":
    main()
