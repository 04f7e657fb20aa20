"""Convert foreign checkpoints into flamingo checkpoint directories (the command line).

    python -m flamingo.convert openflamingo checkpoint.pt out_dir --config configs/model/openflamingo-3b.yaml

The result loads with ``Flamingo.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flamingo.config import FlamingoConfig
from flamingo.convert.openflamingo import from_openflamingo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flamingo.convert", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="source", required=True)
    of = sub.add_parser(
        "openflamingo", help="an OpenFlamingo checkpoint.pt (read with weights_only=True)"
    )
    of.add_argument("checkpoint", type=Path, help="OpenFlamingo checkpoint.pt")
    of.add_argument("out_dir", type=Path, help="where to write the flamingo checkpoint")
    of.add_argument(
        "--config", type=Path, required=True, help="model config naming the same backbones"
    )
    of.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. lm.name_or_path=/models/mpt"
    )
    args = parser.parse_args(argv)

    cfg = FlamingoConfig.from_yaml(args.config, args.overrides)
    model = from_openflamingo(args.checkpoint, cfg)
    model.save_pretrained(args.out_dir)
    trainable = model.num_parameters(trainable_only=True)
    print(f"wrote {args.out_dir}: {trainable:,} trainable parameters from {args.checkpoint}")


if __name__ == "__main__":
    main()
