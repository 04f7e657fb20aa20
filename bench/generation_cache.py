"""Cached vs uncached decoding on one config (default: tiny), same tokens asserted.

    python -m bench.generation_cache [--config configs/model/tiny.yaml] [--beams 3] [--new 20]

Prints a JSON line: seconds per call for each mode and the speed-up. Uncached decoding
recomputes the whole sequence (and the media keys/values) at every step, as a loop over
``forward`` would.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from demo.model_smoke import shape_image
from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/model/tiny.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--new", type=int, default=20, help="new tokens")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = FlamingoConfig.from_yaml(args.config)
    model = Flamingo.from_config(cfg).eval()
    with torch.no_grad():  # open the gates so the images matter
        for block in model.lm.gated_blocks:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    processor = FlamingoProcessor.from_config(cfg)
    colours = ["red", "green", "blue", "yellow", "purple"]
    shots = "".join(
        f"<image>Output: a {colours[i % 5]} circle.<|endofchunk|>" for i in range(args.shots)
    )
    texts = [shots + "<image>Output:"] * args.batch
    images = [
        [shape_image(colours[(i + b) % 5], "circle") for i in range(args.shots + 1)]
        for b in range(args.batch)
    ]
    batch = processor(texts, images=images)
    # eos_token_id=-1: never stop early, so both modes decode exactly args.new tokens
    kwargs = dict(max_new_tokens=args.new, num_beams=args.beams, eos_token_id=-1)

    results = {}
    outputs = {}
    for use_cache in (True, False):
        model.generate(**batch, **kwargs, use_cache=use_cache)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs[use_cache] = model.generate(**batch, **kwargs, use_cache=use_cache)
            times.append(time.perf_counter() - start)
        results["cached_s" if use_cache else "uncached_s"] = min(times)
    assert torch.equal(outputs[True], outputs[False]), "cached and uncached tokens differ"
    results.update(
        speedup=results["uncached_s"] / results["cached_s"],
        config=str(
            args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
        ),
        batch=args.batch,
        beams=args.beams,
        new_tokens=args.new,
        prompt_tokens=batch["input_ids"].shape[1],
        images_per_prompt=args.shots + 1,
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        torch=torch.__version__,
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
