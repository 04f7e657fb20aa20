"""How much of a training step computes padding, before and after packing and real-media-only
batches, on synthetic data shaped like MMC4 and like LAION.

    python -m bench.padding [--config small] [--steps 3] [--smoke]

Samples are drawn from two distributions (their parameters are in the JSON):

- ``mmc4``: 256-token windows of interleaved documents, 1 to 5 images each; many documents are
  shorter than the window (a log-normal length, median 150 tokens, capped at 256);
- ``laion``: image-caption pairs, captions of 5 to 32 tokens (log-normal, median 14).

Each is batched the way the loader did before (one sample a row, right-padded to the batch's
longest, every sequence's media padded to the batch's most, all slots encoded) and the way it
does now (``packing: block_diagonal`` into 256-token rows, the real media only, flat). For
each: the fraction of computed token positions and of encoded images that are padding, and
samples/s of a training step (forward and backward, the head fused with the loss) on this
machine. Writes ``bench/results/padding-<config>-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch

from bench.train_step import bench_config

ROOT = Path(__file__).resolve().parents[1]
ROW = 256
DISTRIBUTIONS = {
    "mmc4": {"median_tokens": 150, "sigma": 0.6, "min": 24, "max": 256, "images": [1, 5]},
    "laion": {"median_tokens": 14, "sigma": 0.45, "min": 5, "max": 32, "images": [1, 1]},
}
BEFORE_BATCH = {"mmc4": 8, "laion": 32}
"""Rows per unpacked micro-batch (OpenFlamingo's interleaved and LAION batch sizes scaled to
what a CPU step can time); the packed batch takes as many rows as hold the same samples."""


def draw(name: str, count: int, rng: random.Random, special) -> list[tuple[list[int], int]]:
    """``count`` samples: (token ids, number of images), images at chunk starts."""
    spec = DISTRIBUTIONS[name]
    out = []
    for _ in range(count):
        length = round(rng.lognormvariate(math.log(spec["median_tokens"]), spec["sigma"]))
        length = min(max(length, spec["min"]), spec["max"])
        images = min(rng.randint(*spec["images"]), max(1, length // 8))
        ids = [rng.randrange(3, 800) for _ in range(length)]
        stride = length // images
        for k in range(images):  # <image> text ... <|endofchunk|>
            ids[k * stride] = special.image_id
            ids[(k + 1) * stride - 1] = special.end_of_chunk_id
        out.append((ids, images))
    return out


def pixels_for(images: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (images, 1, 3, size, size), dtype=torch.uint8, generator=g)


def batches(samples, size: int, rows: int, packed: bool) -> list[dict]:
    """The samples as the loader batches them: unpacked (one per row), or packed as the
    loader packs (``pack_window`` samples at a time into rows of 256 tokens, best-fit
    decreasing, the rows shuffled, ``rows`` a batch)."""
    from flamingo.data.config import DatasetConfig
    from flamingo.data.pipeline import pack_rows
    from flamingo.data.preprocess import collate, collate_packed

    items = [
        (f"s{i}", ids, pixels_for(n, size, i), None, None) for i, (ids, n) in enumerate(samples)
    ]
    if not packed:
        return [collate(items[i : i + rows], 0, "bench") for i in range(0, len(items), rows)]
    window = DatasetConfig.pack_window  # the loader's default
    out = []
    for w in range(0, len(items), window):
        packed_rows = pack_rows(items[w : w + window], ROW)
        random.Random(w).shuffle(packed_rows)
        out += [
            collate_packed(packed_rows[i : i + rows], 0, "bench")
            for i in range(0, len(packed_rows), rows)
        ]
    return out


def padding_of(batch: dict, packed: bool) -> tuple[int, int, int, int]:
    """(token positions, padding positions, encoded images, padding images) of a batch; the
    unpacked layout encodes every slot, as before."""
    tokens = batch["attention_mask"].numel()
    pad_tokens = int((batch["attention_mask"] == 0).sum())
    real = int(batch["pixel_values"].shape[0])
    encoded = real if packed else batch["media_slots"].numel()
    return tokens, pad_tokens, encoded, encoded - real


def step_inputs(batch: dict, special, packed: bool) -> tuple[dict, float]:
    """A batch as a training step gives it to the model (ids, mask, labels and its media in
    the layout named: packed with ``document_ids``, or before, every slot through the tower),
    and its target count."""
    from flamingo.losses import count_targets, make_labels
    from flamingo.media import place_in_slots

    ids, mask = batch["input_ids"], batch["attention_mask"]
    documents = batch.get("document_ids")
    labels = make_labels(ids, mask, special, documents)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        inputs.update(pixel_values=batch["pixel_values"], media_slots=batch["media_slots"])
        inputs["document_ids"] = documents
    else:
        inputs["pixel_values"] = place_in_slots(batch["pixel_values"], batch["media_slots"])
    return inputs, max(float(count_targets(labels)), 1.0)


def step_of(model, special, batch: dict, packed: bool):
    inputs, targets = step_inputs(batch, special, packed)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        (model(**inputs).nll_sum / targets).backward()

    return step


def measure(model, special, name: str, samples, size: int, steps: int) -> dict:
    result = {}
    for layout, packed in (("before", False), ("after", True)):
        rows = BEFORE_BATCH[name]
        if packed:  # rows of 256 holding as many samples as an unpacked batch, about
            mean = sum(len(ids) for ids, _ in samples) / len(samples)
            rows = max(1, math.ceil(BEFORE_BATCH[name] * mean / ROW))
        made = batches(samples, size, rows, packed)
        totals = [sum(v) for v in zip(*(padding_of(b, packed) for b in made), strict=True)]
        timed = made[:steps]
        for b in timed[:1]:  # warm-up
            step_of(model, special, b, packed)()
        start = time.perf_counter()
        for b in timed:
            step_of(model, special, b, packed)()
        seconds = time.perf_counter() - start
        result[layout] = {
            "rows_per_batch": rows,
            "batches": len(made),
            "padding_tokens": totals[1] / totals[0],
            "padding_images": totals[3] / max(totals[2], 1),
            "samples_per_s": sum(len(b["keys"]) for b in timed) / seconds,
            "timed_batches": len(timed),
        }
    result["speedup"] = result["after"]["samples_per_s"] / result["before"]["samples_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3, help="batches timed per layout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny, few samples (the suite's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.smoke:
        args.config, args.samples, args.steps = "tiny", 24, 1
    torch.set_num_threads(args.threads)
    from flamingo import Flamingo, FlamingoProcessor

    cfg = bench_config(args.config)
    processor = FlamingoProcessor.from_config(cfg)
    torch.manual_seed(0)
    model = Flamingo.from_config(cfg, processor).train()
    special = processor.special_tokens
    record = {
        "config": args.config,
        "device": "cpu",
        "machine": f"{platform.machine()} CPU, {args.threads} threads",
        "torch": torch.__version__,
        "row_len": ROW,
        "samples": args.samples,
        "distributions": DISTRIBUTIONS,
        "results": {},
    }
    rng = random.Random(0)
    for name in DISTRIBUTIONS:
        samples = draw(name, args.samples, rng, special)
        record["results"][name] = measure(
            model, special, name, samples, cfg.vision.image_size, args.steps
        )
        print(name, json.dumps(record["results"][name]), flush=True)
    if not args.smoke:
        path = args.out / f"padding-{args.config}-cpu.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    else:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
