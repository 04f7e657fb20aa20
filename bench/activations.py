"""Activation memory: what one micro-batch keeps for its backward, and docs/training.md's rule from it.

    python -m bench.activations [--config small] [--seq-len 256] [--batch 2] [--out bench/results]

Counts the bytes of every tensor autograd saves during one forward (``saved_tensors_hooks``;
each storage once, parameters left out) of the benchmark model in bf16 autocast, frozen
weights in bf16, as ``engine.precision: bf16`` trains it. Varying one thing at a time (LM
layers with a gated block before each, gated blocks alone, images per sequence) gives the
bytes per token of an LM layer and of a gated block, and the bytes per image of the resampler,
in units of the LM width ``d`` and of ``d_v x (V + R) x depth``: the coefficients of the
docs/training.md's rule ("When to checkpoint activations"). Also the totals with each checkpointing
option. Device-independent counts (the same tensors are saved on a GPU), measured here on CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def saved_bytes(
    config: str, layers: int, every: int, images: int, seq_len: int, batch: int, checkpoint=False
) -> int:
    """Bytes autograd keeps for the backward of one forward with labels (the fused loss)."""
    from bench.train_step import bench_config, make_batch
    from flamingo import Flamingo, FlamingoProcessor
    from flamingo.layers import ExecutionPolicy
    from flamingo.losses import make_labels

    cfg = bench_config(config).replace(
        {"lm.architecture.num_hidden_layers": layers, "xattn.every_n_layers": every},
        frozen_dtype="bfloat16",
    )
    processor = FlamingoProcessor.from_config(cfg)
    torch.manual_seed(0)
    model = Flamingo.from_config(cfg, processor).train()
    model.set_execution_policy(
        ExecutionPolicy(
            checkpoint_layers=checkpoint is True, checkpoint_gated_blocks=checkpoint == "gated"
        )
    )
    ids, mask, pixels = make_batch(batch, seq_len, cfg.vision.image_size, processor.special_tokens,
                                   images)  # fmt: skip
    labels = make_labels(ids, mask, processor.special_tokens)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", torch.bfloat16),
    ):
        model(ids, mask, pixel_values=pixels, labels=labels)
    return sum(kept.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    from bench.train_step import bench_config, step_shape

    shape = step_shape(bench_config(args.config), args.batch, args.seq_len, 5)
    d, tokens = shape.lm_width, args.batch * args.seq_len
    run = lambda layers, every, images, checkpoint=False: saved_bytes(  # noqa: E731
        args.config, layers, every, images, args.seq_len, args.batch, checkpoint
    )
    base = run(8, 1, 5)
    per_pair = (base - run(4, 1, 5)) / 4 / tokens  # one LM layer + its gated block
    per_gated = (base - run(8, 2, 5)) / 4 / tokens
    per_image = (base - run(8, 1, 1)) / (4 * args.batch)
    resampler_unit = shape.vision_width * (shape.patches + shape.latents) * shape.resampler_depth
    record = {
        "config": args.config,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lm_width": d,
        "machine": "CPU (counts are device-independent)",
        "saved_mib": {
            "none": base / 2**20,
            "gated_blocks": run(8, 1, 5, "gated") / 2**20,
            "all": run(8, 1, 5, True) / 2**20,
        },
        "bytes_per_token_lm_layer_over_d": (per_pair - per_gated) / d,
        "bytes_per_token_gated_block_over_d": per_gated / d,
        "bytes_per_image_over_dv_tokens_depth": per_image / resampler_unit,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"activations-{args.config}-cpu.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
