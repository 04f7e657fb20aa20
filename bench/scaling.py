"""How the training step's cost grows with images per sequence and with sequence length,
ours and OpenFlamingo (tiny config by default), each point in fresh processes.

    python -m bench.scaling [--config tiny] [--images 1 2 4 8 16 32] [--seq-lens 64 128 256 512 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.report import scaling_table

ROOT = Path(__file__).resolve().parents[1]


def point(
    config: str, images: int, seq_len: int, batch: int, steps: int, repeats: int, out: Path
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.train_step",
        "--config",
        config,
        "--images",
        str(images),
        "--seq-len",
        str(seq_len),
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--repeats",
        str(repeats),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    (path,) = out.glob(f"train_step-{config}-{images}img-{seq_len}tok-*.json")
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per point")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling")
    args = parser.parse_args()
    rows = []
    for images in args.images:  # sequence long enough for every image
        rows.append(
            point(
                args.config,
                images,
                max(256, 8 * images),
                args.batch,
                args.steps,
                args.repeats,
                args.out,
            )
        )
    for seq_len in args.seq_lens:
        rows.append(point(args.config, 5, seq_len, args.batch, args.steps, args.repeats, args.out))
    print("\n".join(scaling_table(rows)))
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
