"""The model alone: build the tiny model and run one real forward pass on an interleaved batch.

Prints the tensor shapes along the way, the trainable-parameter counts per part and the gate
values, and checks the defining property of a fresh Flamingo: with its gates at 0 the images do
not change the logits; once the gates open, they do (only from each image's position on).

    python -m demo.model_smoke [--config configs/model/tiny.yaml] [overrides ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"


def shape_image(colour: str, kind: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. resampler.depth=3")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.manual_seed(0)
    cfg = FlamingoConfig.from_yaml(args.config, args.overrides)
    model = Flamingo.from_config(cfg).eval()
    processor = FlamingoProcessor.from_config(cfg)
    print(f"built {args.config} in {time.perf_counter() - start:.1f}s")

    texts = [
        "Some shapes: <image>A red circle.<|endofchunk|><image>A blue square.<|endofchunk|><image>A",
        "Question: what is this? <image>Short answer: a green circle<|endofchunk|>",
    ]
    images = [
        [shape_image("red", "circle"), shape_image("blue", "square"), shape_image("red", "square")],
        [shape_image("green", "circle")],
    ]
    batch = processor(texts, images=images)
    with torch.no_grad():
        out = model(**batch)
        # the flat media list reversed: every sequence sees other images
        other = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)})

    print("\nshapes")
    for name in ("input_ids", "attention_mask", "pixel_values", "media_slots"):
        print(f"  {name:15s} {tuple(batch[name].shape)}")
    with torch.no_grad():
        tokens = model.vision(batch["pixel_values"].unsqueeze(0)).squeeze(0)
    print(f"  {'vision_tokens':15s} {tuple(tokens.shape)}")
    print(f"  {'media_latents':15s} {tuple(out.media_latents.shape)}")
    print(f"  {'logits':15s} {tuple(out.logits.shape)}")

    print("\nparameters")
    total = model.num_parameters()
    for name, module in model.trainable_modules().items():
        print(f"  trainable {name:12s} {sum(p.numel() for p in module.parameters()):>10,}")
    print(f"  trainable total        {model.num_parameters(trainable_only=True):>10,}")
    print(f"  frozen                 {total - model.num_parameters(trainable_only=True):>10,}")

    print("\ngates (tanh of attn_gate, ff_gate) per gated block")
    for layer, block in zip(model.lm.layer_indices, model.lm.gated_blocks, strict=True):
        print(
            f"  before decoder layer {layer}: attn_gate={block.attn_gate.tanh().tolist()} "
            f"ff_gate={block.ff_gate.tanh().tolist()}"
        )

    diff = (out.logits - other.logits).abs().max().item()
    print(f"\nat init, max |logit change| when the images are swapped: {diff:.3g} (gates closed)")
    with torch.no_grad():
        for block in model.lm.gated_blocks:
            block.attn_gate.fill_(0.5)
        opened = model(**batch).logits
        swapped = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).logits
    first_image = int((batch["input_ids"][0] == model.special_tokens.image_id).nonzero()[0])
    changed = (opened[0] - swapped[0]).abs().amax(-1) > 1e-6
    print(
        f"with attn_gate=0.5: {int(changed.sum())}/{changed.numel()} positions of sequence 0 change, "
        f"none before its first <image> (position {first_image}): {not changed[:first_image].any().item()}"
    )
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
