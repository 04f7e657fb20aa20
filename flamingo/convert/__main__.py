"""Convert foreign checkpoints into flamingo checkpoint directories (the command line).

    python -m flamingo.convert openflamingo checkpoint.pt out_dir --config configs/model/openflamingo-4b.yaml
    python -m flamingo.convert openflamingo openflamingo/OpenFlamingo-9B-vitl-mpt7b out_dir
    python -m flamingo.convert idefics HuggingFaceM4/idefics-9b-instruct out_dir
    python -m flamingo.convert llava llava-hf/llava-1.5-7b-hf out_dir
    python -m flamingo.convert blip2 Salesforce/blip2-opt-2.7b out_dir
    python -m flamingo.convert mllama meta-llama/Llama-3.2-11B-Vision-Instruct out_dir
    python -m flamingo.convert to-mllama our_finetuned_dir out_dir   # back to transformers'

An OpenFlamingo checkpoint is a ``checkpoint.pt`` file or a Hub repo id holding one
(``--revision``); a release of ``flamingo.hub.OPENFLAMINGO_RELEASES`` needs no ``--config``.
A checkpoint of a registered transformers format (``flamingo.formats``: IDEFICS, LLaVA, BLIP-2,
Llama 3.2 Vision)
is a directory in transformers' format or a Hub repo id; its config comes from its own
``config.json``; each format is a sub-command. The result loads with
``Flamingo.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flamingo.formats as formats
import flamingo.hub as hub
from flamingo import cli
from flamingo.config import FlamingoConfig
from flamingo.model import Flamingo


def make_parser() -> argparse.ArgumentParser:
    """The command line: a sub-command per registered format, and ``to-mllama``."""
    parser = argparse.ArgumentParser(
        prog="python -m flamingo.convert", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(
        dest="source",
        required=True,
        metavar="FORMAT",
        help="the checkpoint's format (each takes its own arguments: FORMAT --help)",
    )
    of = sub.add_parser(
        "openflamingo", help="an OpenFlamingo checkpoint.pt (read with weights_only=True)"
    )
    of.add_argument("checkpoint", help="OpenFlamingo checkpoint.pt, or a Hub repo id holding one")
    of.add_argument("out_dir", type=Path, help="where to write the flamingo checkpoint")
    of.add_argument(
        "--config",
        type=Path,
        help="model config naming the same backbones (default: the release's, for a release id)",
    )
    of.add_argument("--revision", help="branch, tag or commit of a Hub repo (default main)")
    of.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. lm.name_or_path=/models/mpt"
    )
    transformers_formats = sorted(n for n in formats.formats() if n != "openflamingo")
    for name in transformers_formats:  # a directory in transformers' format, or a Hub id
        fmt = formats.FORMATS[name]
        command = sub.add_parser(name.replace("-", ""), help=fmt.description)
        command.add_argument("checkpoint", help=f"{name} checkpoint directory, or its Hub repo id")
        command.add_argument("out_dir", type=Path, help="where to write the flamingo checkpoint")
        command.add_argument(
            "--revision", help="branch, tag or commit of a Hub repo (default main)"
        )
        command.set_defaults(format=name)
    back = sub.add_parser(
        "to-mllama",
        help="one of our connector: mllama checkpoints (a fine-tuned Llama 3.2 Vision) back "
        "into transformers' format (MllamaForConditionalGeneration)",
    )
    back.add_argument("checkpoint", help="our checkpoint directory (or Hub repo id)")
    back.add_argument("out_dir", type=Path, help="where to write the transformers checkpoint")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)

    if args.source == "to-mllama":
        from flamingo.convert.mllama import export_mllama
        from flamingo.processing import FlamingoProcessor

        model = Flamingo.from_pretrained(args.checkpoint)
        export_mllama(model, FlamingoProcessor.from_pretrained(args.checkpoint), args.out_dir)
        print(
            f"wrote {args.out_dir}: {model.num_parameters():,} parameters in transformers' format"
        )
        return

    if args.source != "openflamingo":
        snap = hub.transformers_snapshot(args.checkpoint, args.revision)
        model = formats.convert(args.format, snap, Flamingo.from_config)
        model.save_pretrained(args.out_dir)
        total = model.num_parameters()
        print(f"wrote {args.out_dir}: {total:,} parameters from {args.checkpoint}")
        return

    if args.config is not None:
        cfg = FlamingoConfig.from_yaml(args.config, args.overrides)
    elif args.checkpoint in hub.OPENFLAMINGO_RELEASES:
        cfg = hub.release_config(args.checkpoint, args.overrides)
    else:
        parser.error(
            f"--config is needed: {args.checkpoint} is not one of the OpenFlamingo releases "
            f"({', '.join(hub.OPENFLAMINGO_RELEASES)})"
        )
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():  # a Hub repo id
        checkpoint = hub.download(args.checkpoint, "checkpoint.pt", args.revision)
    model = Flamingo.from_openflamingo(checkpoint, cfg)
    model.save_pretrained(args.out_dir)
    trainable = model.num_parameters(trainable_only=True)
    print(f"wrote {args.out_dir}: {trainable:,} trainable parameters from {args.checkpoint}")


if __name__ == "__main__":
    cli.run(main)
