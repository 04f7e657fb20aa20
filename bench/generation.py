"""Generation, ours vs OpenFlamingo: 4-shot captioning prompt, beam 3, 20 new tokens, batch 8,
same weights (OpenFlamingo's, converted with ``from_openflamingo``), same tokens asserted.

    python -m bench.generation [--config tiny|small] [--batch 8] [--beams 3] [--new 20]

OpenFlamingo's ``generate`` does not run with transformers 5 (its forward's signature), so its
side is our beam search driving *its* ``forward``: the full sequence every step, the images
re-encoded for every beam, no caches. Ours encodes the images once per call, caches the gated
blocks' keys/values and the LM's KV cache. Both use the same beam rules, so the tokens must be
identical.
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
from flamingo.processing import place_in_slots

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default="tiny",
        help=f"a benchmark model of configs/bench/ ({', '.join(CONFIGS)}) or a model config YAML",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from flamingo.generation import generate

    with tempfile.TemporaryDirectory() as tmp:
        ours, of, image_size = build(args.config, Path(tmp))
        enc = prompt_batch(ours, image_size, args.batch)
    ours, of = ours.to(args.device), of.to(args.device)
    enc = {k: v.to(args.device) for k, v in enc.items()}
    kwargs = dict(max_new_tokens=args.new, num_beams=args.beams)
    timings, outputs = {}, {}
    cuda = args.device.startswith("cuda")
    with torch.no_grad():
        for name, run in (
            ("ours", lambda: ours.generate(**enc, **kwargs)),
            ("openflamingo", lambda: generate(of, **enc, **kwargs, use_cache=False)),
        ):
            if cuda:  # a first call loads the kernels; then time a second one
                run()
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = run()
            if cuda:
                torch.cuda.synchronize()
            timings[name] = time.perf_counter() - start
    same = torch.equal(outputs["ours"], outputs["openflamingo"])
    record = {
        "config": args.config,
        "batch": args.batch,
        "beams": args.beams,
        "new_tokens": args.new,
        "shots": 4,
        "seconds": timings,
        "speedup": timings["openflamingo"] / timings["ours"],
        "identical_tokens": same,
        "device": args.device,
        "machine": torch.cuda.get_device_name()
        if cuda
        else f"{platform.machine()} CPU, {args.threads} threads",
        "torch": torch.__version__,
        "openflamingo_side": "our beam search over OpenFlamingo's forward (no caches, images re-encoded per beam); its generate fails with transformers 5",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"generation-{Path(args.config).stem}-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"| generation ({args.config}, batch {args.batch}, beam {args.beams}, {args.new} tokens) | ours | OpenFlamingo | speed-up |"
    )
    print("| --- | --- | --- | --- |")
    print(
        f"| seconds per call | {timings['ours']:.2f} | {timings['openflamingo']:.2f} | {record['speedup']:.1f}x |"
    )
    print(f"\nidentical tokens: {same}; wrote {path}")
    if not same:
        raise SystemExit("the two implementations generated different tokens")


if __name__ == "__main__":
    main()
