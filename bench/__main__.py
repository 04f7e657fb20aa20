"""Every benchmark this machine can run, then the report (``make bench``).

    python -m bench [--skip NAME ...]

On CPU: the training step (tiny; small at batch 2), the scaling sweep, generation against
OpenFlamingo and against transformers' IDEFICS (tiny; small with 5 tokens), the loaders, the converter with 1 and 2 workers and the padding a step computes before and after packing; with a GPU, also the small and ~1B configs in bf16 under
DeepSpeed ZeRO-2 and generation on the GPU. Each writes its JSON under ``bench/results``;
``bench.report`` then writes ``bench/results/README.md``. Takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from bench.report import ROOT

CPU = {
    "train_step-tiny": ["bench.train_step", "--config", "tiny", "--device", "cpu"],
    "train_step-small": [
        *("bench.train_step", "--config", "small", "--batch", "2", "--steps", "3"),
        *("--device", "cpu"),
    ],
    "scaling": ["bench.scaling"],
    "activations": ["bench.activations"],
    "generation-tiny": ["bench.generation", "--device", "cpu"],
    "generation-small": [
        *("bench.generation", "--config", "small", "--batch", "2", "--new", "5"),
        *("--device", "cpu"),
    ],
    "generation-idefics-tiny": ["bench.generation", "--against", "idefics", "--device", "cpu"],
    "generation-idefics-small": [
        *("bench.generation", "--against", "idefics", "--config", "small", "--device", "cpu"),
    ],
    "generation-mllama-tiny": ["bench.generation", "--against", "mllama", "--device", "cpu"],
    "generation-mllama-beam3-tiny": [
        *("bench.generation", "--against", "mllama", "--beams", "3", "--device", "cpu"),
    ],
    "generation-mllama-small": [
        *("bench.generation", "--against", "mllama", "--config", "small", "--device", "cpu"),
    ],
    "generation-mllama-beam3-small": [
        *("bench.generation", "--against", "mllama", "--config", "small", "--beams", "3"),
        *("--device", "cpu"),
    ],
    "data_throughput": ["bench.data_throughput"],
    "convert": ["bench.convert"],
    "padding": ["bench.padding", "--config", "small"],
}
GPU = {
    "train_step-small-zero2-bf16": [
        *("bench.train_step", "--config", "small", "--batch", "8", "--steps", "10"),
        *("--engine", "zero2", "--precision", "bf16", "--device", "cuda"),
    ],
    "train_step-1b-zero2-bf16": [
        *("bench.train_step", "--config", "1b", "--batch", "8", "--steps", "10"),
        *("--engine", "zero2", "--precision", "bf16", "--device", "cuda"),
    ],
    "generation-small-gpu": ["bench.generation", "--config", "small", "--device", "cuda"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(CPU | GPU))
    args = parser.parse_args()
    runs = CPU | (GPU if torch.cuda.is_available() else {})
    failed = []
    for name, module_args in runs.items():
        if name in args.skip:
            continue
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", *module_args], cwd=ROOT)
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
        if done.returncode != 0:
            failed.append(name)
    subprocess.run([sys.executable, "-m", "bench.report"], cwd=ROOT, check=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
