"""The latest benchmark figures as one markdown page: ``bench/results/README.md``.

    python -m bench.report [--results bench/results]

Reads the JSON records the benchmarks wrote (train step, scaling, generation, loader) and
tabulates ours / OpenFlamingo with the machine each ran on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(paths) -> list[dict]:
    return [json.loads(p.read_text()) | {"file": p.name} for p in sorted(paths)]


def fmt(value, spec: str = ".3g", suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def train_step_table(records: list[dict]) -> list[str]:
    lines = [
        "| config | batch | images x tokens | engine | machine | ours samples/s | "
        "OpenFlamingo samples/s | speed | peak memory | peak live tensors | "
        "ours TFLOP/s (MFU) | flash attention (ours / OF) | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        ours, of, ratios = r["results"]["ours"], r["results"]["openflamingo"], r["ratios"]
        engine = f"{r.get('engine', 'torch')}, {r.get('precision', 'fp32')}"
        mfu = f" ({ours['mfu']:.1%})" if ours.get("mfu") else ""
        flash = " / ".join(
            {True: "yes", False: "no", None: "-"}[x.get("flash_attention")] for x in (ours, of)
        )
        memory = "RSS" if r["device"] == "cpu" else "max allocated"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['images_per_sequence']} x {r['seq_len']} "
            f"| {engine} | {r['machine']} | {ours['samples_per_s']:.3g} "
            f"| {of['samples_per_s']:.3g} | **{ratios['samples_per_s']:.2f}x** "
            f"| {ratios['peak_memory']:.2f}x ({memory}) "
            f"| {fmt(ratios.get('peak_live_memory'), '.2f', 'x')} "
            f"| {fmt(ours.get('tflops_per_s'))}{mfu} | {flash} | `{r['file']}` |"
        )
    return lines


def generation_table(records: list[dict]) -> list[str]:
    lines = [
        "| config | batch, beams, new tokens | machine | ours s | OpenFlamingo s | speed-up "
        "| identical tokens |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        s = r["seconds"]
        lines.append(
            f"| {r['config']} | {r['batch']}, {r['beams']}, {r['new_tokens']} | {r['machine']} "
            f"| {s['ours']:.2f} | {s['openflamingo']:.2f} | **{r['speedup']:.1f}x** "
            f"| {r['identical_tokens']} |"
        )
    return lines


def loader_table(rows: list[dict], step: dict | None) -> list[str]:
    """Loader samples/s and, for 224 px, the multiple of what our small training step consumes
    on the same machine (samples of any kind: a conservative bound, since the step's 5-image
    sequences are the heaviest)."""
    consumption = step["results"]["ours"]["samples_per_s"] if step else None
    lines = [
        "| kind | image size | workers | samples/s | x the small step's consumption | machine |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        times = (
            f"{row['samples_per_s'] / consumption:.0f}x"
            if consumption and row["image_size"] == 224
            else "-"
        )
        lines.append(
            f"| {row['kind']} | {row['image_size']} | {row['workers']} | {row['samples_per_s']} "
            f"| {times} | {row['machine']} |"
        )
    return lines


def scaling_table(records: list[dict]) -> list[str]:
    lines = [
        "| images | tokens | ours step s | OpenFlamingo step s | speed | ours peak MiB "
        "| OpenFlamingo peak MiB | peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        ours, of = r["results"]["ours"], r["results"]["openflamingo"]
        lines.append(
            f"| {r['images_per_sequence']} | {r['seq_len']} | {ours['step_s']:.3f} "
            f"| {of['step_s']:.3f} | {of['step_s'] / ours['step_s']:.2f}x "
            f"| {ours['peak_mib']:.0f} | {of['peak_mib']:.0f} "
            f"| {ours['peak_mib'] / of['peak_mib']:.2f}x |"
        )
    return lines


def report(results: Path) -> str:
    steps = load(results.glob("train_step-*.json"))
    out = [
        "# Benchmark results, ours / OpenFlamingo",
        "",
        "Written by `python -m bench.report` from the JSON records in this folder (`make bench`",
        "runs every benchmark, then this). Ratios are ours / OpenFlamingo: above 1 is faster for",
        "speed, below 1 is less memory. On CPU, peak memory is the process's peak RSS, and",
        "peak live tensors the most memory tensors held at once (what CUDA's max allocated",
        "measures on a GPU); MFU uses the model FLOPs of `bench/flops.py`.",
        "",
        "## Training step",
        "",
        *train_step_table(steps),
    ]
    scaling = results / "scaling" / "scaling.json"
    if scaling.is_file():
        records = json.loads(scaling.read_text())
        config, machine = records[0]["config"], records[0]["machine"]
        out += ["", f"## Scaling ({config}, batch 2, {machine})", "", *scaling_table(records)]
    generation = load(results.glob("generation-*.json"))
    if generation:
        out += ["", "## Generation (4-shot captioning prompt)", "", *generation_table(generation)]
    loader = results / "data_throughput.json"
    if loader.is_file():
        rows = json.loads(loader.read_text())
        small = [r for r in steps if r["config"] == "small" and r["device"] == "cpu"]
        out += ["", "## Data loader", "", *loader_table(rows, small[0] if small else None)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    path = args.results / "README.md"
    path.write_text(report(args.results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
