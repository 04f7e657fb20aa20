"""Converter throughput: MMC4-style documents/s and images/s, with 1 and 2 worker processes.

    python -m bench.convert [--inputs 4] [--docs 400] [--images-per-doc 3]

Writes ``--inputs`` MMC4 jsonl files of ``--docs`` documents (JPEG photo-like images of
256-512 px, three per document by default, each matched to a sentence) to a temporary folder,
then times ``python -m data_prep.interleaved mmc4`` over them with each worker count, as a user
runs it, and over one document per input (what starting the processes costs: each worker
imports torch), and writes ``bench/results/convert-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data_throughput import photo, sentence

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(root: Path, inputs: int, docs: int, per_doc: int) -> int:
    rng = random.Random(0)
    images = 0
    for j in range(inputs):
        folder = root / "imgs" / f"docs_{j}"
        folder.mkdir(parents=True)
        lines = []
        for d in range(docs):
            names = [f"{d}_{k}.jpg" for k in range(per_doc)]
            for name in names:
                (folder / name).write_bytes(photo(rng))
            images += per_doc
            sims = [[0.3 if s == k else 0.1 for s in range(per_doc)] for k in range(per_doc)]
            doc = {"text_list": [sentence(rng, 25) for _ in range(per_doc)]}
            doc |= {"image_info": [{"image_name": n} for n in names], "similarity_matrix": sims}
            lines.append(json.dumps(doc))
        (root / f"docs_{j}.jsonl").write_text("\n".join(lines) + "\n")
    return images


def run(root: Path, workers: int) -> float:
    """Seconds of one conversion of ``root``'s corpus, as a user runs it."""
    out = root / f"out{workers}"
    command = [sys.executable, "-m", "data_prep.interleaved", "mmc4"]
    command += ["--jsonl", str(root / "docs_*.jsonl"), "--images", f"{root}/imgs/{{stem}}"]
    command += ["--out", str(out), "--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=4)
    parser.add_argument("--docs", type=int, default=400, help="documents per input")
    parser.add_argument("--images-per-doc", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root, small = Path(tmp) / "corpus", Path(tmp) / "small"
        images = write_corpus(root, args.inputs, args.docs, args.images_per_doc)
        write_corpus(small, args.inputs, 1, args.images_per_doc)
        docs = args.inputs * args.docs
        for workers in args.workers:
            startup = run(small, workers)  # one document per input: the processes' start
            seconds = run(root, workers)
            work = seconds - startup
            row = {
                "workers": workers,
                "seconds": round(seconds, 2),
                "startup_s": round(startup, 2),
                "docs_per_s": round(docs / seconds, 1),
                "docs_per_s_after_startup": round(docs / work, 1),
                "images_per_s_after_startup": round(images / work, 1),
                "docs_per_s_per_worker": round(docs / work / workers, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        last["scaling_vs_1"] = round(last["docs_per_s"] / first["docs_per_s"], 2)
        last["scaling_vs_1_after_startup"] = round(
            last["docs_per_s_after_startup"] / first["docs_per_s_after_startup"], 2
        )
    result = {
        "bench": "convert",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "corpus": {
            "inputs": args.inputs,
            "docs": args.inputs * args.docs,
            "images": images,
            "image_px": "256-512 JPEG",
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert-cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
