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


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def train_step_table(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        ours, of, ratios = r["results"]["ours"], r["results"]["openflamingo"], r["ratios"]
        mfu = f" ({ours['mfu']:.1%})" if ours.get("mfu") else ""
        flash = {True: "yes", False: "no", None: "-"}
        memory = "RSS" if r["device"] == "cpu" else "max allocated"
        rows.append(
            [
                r["config"],
                r["batch"],
                f"{r['images_per_sequence']} x {r['seq_len']}",
                f"{r.get('engine', 'torch')}, {r.get('precision', 'fp32')}",
                r["machine"],
                f"{ours['samples_per_s']:.3g}",
                f"{of['samples_per_s']:.3g}",
                f"**{ratios['samples_per_s']:.2f}x**",
                f"{ratios['peak_memory']:.2f}x ({memory})",
                fmt(ratios.get("peak_live_memory"), ".2f", "x"),
                fmt(ours.get("tflops_per_s")) + mfu,
                " / ".join(flash[x.get("flash_attention")] for x in (ours, of)),
                f"`{r['file']}`",
            ]
        )
    header = ["config", "batch", "images x tokens", "engine", "machine", "ours samples/s"]
    header += ["OpenFlamingo samples/s", "speed", "peak memory", "peak live tensors"]
    header += ["ours TFLOP/s (MFU)", "flash attention (ours / OF)", "file"]
    return table(header, rows)


def speed_ceilings(records: list[dict]) -> list[str]:
    """Where the peak was measured (CPU): the fastest step that does all the model FLOPs."""
    lines = []
    for r in records:
        if r.get("peak_source") != "measured fp32 matmul":
            continue
        ours, of = r["results"]["ours"], r["results"]["openflamingo"]
        floor = ours["flops_per_step"]["total"] / (r["peak_tflops"] * 1e12)
        lines.append(
            f"- {r['config']}, {r['machine']}: a {r['peak_tflops'] * 1e3:.0f} GFLOP/s fp32 "
            f"matrix product (measured) does the step's model FLOPs in {floor:.3g} s; "
            f"OpenFlamingo's step takes {of['step_s']:.3g} s and ours {ours['step_s']:.3g} s "
            f"({ours['mfu']:.0%} of that peak), so an implementation that does them all is at "
            f"most {of['step_s'] / floor:.2f}x OpenFlamingo here."
        )
    return ["", *lines] if lines else []


REFERENCES = {
    "openflamingo": "OpenFlamingo",
    "idefics": "transformers' IDEFICS",
    "mllama": "transformers' Llama 3.2 Vision",
}


def generation_table(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        against = r.get("against", "openflamingo")
        rows.append(
            [
                r["config"],
                REFERENCES[against],
                f"{r['batch']}, {r['beams']}, {r['new_tokens']}",
                r["machine"],
                f"{r['seconds']['ours']:.2f}",
                f"{r['seconds'][against]:.2f}",
                f"**{r['speedup']:.1f}x**",
                r["identical_tokens"],
            ]
        )
    header = ["config", "against", "batch, beams, new tokens", "machine", "ours s", "theirs s"]
    return table(header + ["speed-up", "identical tokens"], rows)


def loader_table(rows: list[dict], step: dict | None) -> list[str]:
    """Loader samples/s and, for 224 px, the multiple of what our small training step consumes
    on the same machine (samples of any kind: a conservative bound, since the step's 5-image
    sequences are the heaviest)."""
    consumption = step["results"]["ours"]["samples_per_s"] if step else None
    cells = []
    for row in rows:
        times = "-"
        if consumption and row["image_size"] == 224:
            times = f"{row['samples_per_s'] / consumption:.0f}x"
        cells.append(
            [row["kind"], row["image_size"], row["workers"], row["samples_per_s"], times]
            + [row["machine"]]
        )
    header = ["kind", "image size", "workers", "samples/s", "x the small step's consumption"]
    return table(header + ["machine"], cells)


def scaling_table(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        ours, of = r["results"]["ours"], r["results"]["openflamingo"]
        rows.append(
            [
                r["images_per_sequence"],
                r["seq_len"],
                f"{ours['step_s']:.3f}",
                f"{of['step_s']:.3f}",
                f"{of['step_s'] / ours['step_s']:.2f}x",
                f"{ours['peak_mib']:.0f}",
                f"{of['peak_mib']:.0f}",
                f"{ours['peak_mib'] / of['peak_mib']:.2f}x",
            ]
        )
    header = ["images", "tokens", "ours step s", "OpenFlamingo step s", "speed"]
    return table(header + ["ours peak MiB", "OpenFlamingo peak MiB", "peak memory"], rows)


def gpu_tables(record: dict) -> list[str]:
    """The GPU bench's training steps (time, MFU, memory, syncs) and kernel comparisons."""
    sections = record["sections"]
    env = sections.get("env", {}).get("environment", {})
    gemm = sections.get("env", {}).get("gemm", {}).get("tflops")
    out = [f"{env.get('machine', '?')}, torch {env.get('versions', {}).get('torch', '?')}; "
           f"measured bf16 GEMM {gemm or float('nan'):.0f} TFLOP/s, datasheet "
           f"{env.get('datasheet_bf16_tflops') or float('nan'):.0f}.", ""]  # fmt: skip
    rows = []
    for section in ("step_1b", "step_9b"):
        for name, r in sections.get(section, {}).items():
            if "step_s_min" not in r:
                rows.append([section, name, r.get("error", r.get("skipped", ""))[:60], *[""] * 5])
                continue
            mfu = r.get("mfu_datasheet")
            rows.append(
                [
                    section,
                    name,
                    f"{r['step_s_median']:.3f} / {r['step_s_min']:.3f}",
                    f"{r['tokens_per_s']:.0f}",
                    "" if mfu is None else f"{mfu:.1%} / {r.get('mfu_6nt_datasheet', 0):.1%}",
                    "" if r.get("peak_mib") is None else f"{r['peak_mib'] / 1024:.1f}",
                    str(r.get("syncs_per_step", "")),
                    str(r.get("seq_len", "")),
                ]
            )
    header = ["section", "run", "step s (median / min)", "tokens/s", "MFU (step / 6NT)"]
    out += table(header + ["peak GiB", "syncs", "tokens"], rows)
    kernels = sections.get("kernels", {})
    ratios = [
        ("cross-attention flex / SDPA time", kernels.get("cross_attention", {}), "flex_over_sdpa_time"),
        ("MPT SDPA / eager time", kernels.get("mpt_attention", {}), "sdpa_over_eager_time"),
    ]  # fmt: skip
    out.append("")
    for label, result, key in ratios:
        if key in result:
            out.append(f"- {label}: {result[key]:.2f}")
    captions = sections.get("packing", {}).get("captions", {})
    if "speedup" in captions:
        one, packed = captions["one_a_row"], captions["packed"]
        out.append(
            f"- captions packed into {packed['rows']} rows of 256 tokens against "
            f"{one['rows']} rows of one each: {captions['speedup']:.2f}x samples/s "
            f"(padding tokens {one['padding_tokens']:.0%} -> {packed['padding_tokens']:.0%})"
        )
    return out


def padding_table(records: list[dict]) -> list[str]:
    """bench/padding.py: padding computed and samples/s, one sample a row with every media
    slot encoded (before) against packed rows and real media only (after)."""
    rows = []
    for r in records:
        for name, res in r["results"].items():
            before, after = res["before"], res["after"]
            rows.append([
                name, r["config"], r["machine"],
                f"{before['padding_tokens']:.1%} / {after['padding_tokens']:.1%}",
                f"{before['padding_images']:.1%} / {after['padding_images']:.1%}",
                f"{before['samples_per_s']:.3g} / {after['samples_per_s']:.3g}",
                f"**{res['speedup']:.2f}x**", f"`{r['file']}`",
            ])  # fmt: skip
    header = ["data", "config", "machine", "padding tokens (before / after)",
              "padding images", "samples/s", "speed-up", "file"]  # fmt: skip
    return table(header, rows)


def report(results: Path) -> str:
    steps = load(results.glob("train_step-*.json"))
    out = [
        "# Benchmark results, ours / OpenFlamingo",
        "",
        "Written by `python -m bench.report` from the JSON records in this folder (`make bench`",
        "runs every benchmark, then this). Ratios are ours / OpenFlamingo: above 1 is faster for",
        "speed, below 1 is less memory. On CPU, peak memory is the process's peak RSS, and",
        "peak live tensors the most memory tensors held at once (what CUDA's max allocated",
        "measures on a GPU); MFU uses the model FLOPs of `bench/flops.py` over the GPU's",
        "datasheet peak, or on CPU over a measured fp32 matrix product.",
        "",
        "## Training step",
        "",
        *train_step_table(steps),
        *speed_ceilings(steps),
    ]
    scaling = results / "scaling" / "scaling.json"
    if scaling.is_file():
        records = json.loads(scaling.read_text())
        config, machine = records[0]["config"], records[0]["machine"]
        out += ["", f"## Scaling ({config}, batch 2, {machine})", "", *scaling_table(records)]
    generation = load(results.glob("generation-*.json"))
    if generation:
        out += ["", "## Generation (4-shot captioning prompt)", "", *generation_table(generation)]
    for record in load(results.glob("gpu-*.json")):
        if not record.get("smoke"):
            out += ["", f"## GPU bench (`{record['file']}`)", "", *gpu_tables(record)]
    activations = load(results.glob("activations-*.json"))
    if activations:
        out += ["", "## Activation memory (kept for the backward, bf16)", ""]
        for r in activations:
            kept = ", ".join(f"{k} {v:.0f} MiB" for k, v in r["saved_mib"].items())
            out.append(
                f"- {r['config']}, batch {r['batch']} x {r['seq_len']} tokens: checkpointing "
                f"{kept}; per token {r['bytes_per_token_lm_layer_over_d']:.1f} d bytes an LM "
                f"layer, {r['bytes_per_token_gated_block_over_d']:.1f} d a gated block "
                f"(`{r['file']}`)"
            )
    padding = load(results.glob("padding-*.json"))
    if padding:
        out += ["", "## Padding computed: one sample a row vs packed rows, real media only", ""]
        out += padding_table(padding)
    loader = results / "data_throughput.json"
    if loader.is_file():
        rows = json.loads(loader.read_text())
        small = [r for r in steps if r["config"] == "small" and r["device"] == "cpu"]
        out += ["", "## Data loader", "", *loader_table(rows, small[0] if small else None)]
    convert = results / "convert-cpu.json"
    if convert.is_file():
        record = json.loads(convert.read_text())
        corpus = record["corpus"]
        out += [
            "",
            f"## Converter (MMC4-style, {corpus['docs']} documents, {corpus['images']} images, "
            f"{record['machine']})",
            "",
            "| workers | seconds | start of the processes (s) | docs/s | docs/s after the start "
            "| images/s after the start | docs/s a worker |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in record["rows"]:
            out.append(
                f"| {r['workers']} | {r['seconds']} | {r['startup_s']} | {r['docs_per_s']} | "
                f"{r['docs_per_s_after_startup']} | {r['images_per_s_after_startup']} | "
                f"{r['docs_per_s_per_worker']} |"
            )
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
