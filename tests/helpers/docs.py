"""The README's and the docs pages' code blocks, and a check of each shell command by the
program it runs (its own argument parser, the config files it names), for the commands that
need data, the Hub or GPUs the suite does not have (tests/test_docs.py, tests/test_doc_pages.py).

A block that cannot run here says why in a comment on the line above it, which the site does
not show: ``<!-- needs: hub -->`` (a model by id), ``gpu`` (GPUs, a launcher over them),
``data`` (a corpus, benchmark files or a trained checkpoint); several: ``needs: data, gpu``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import ROOT

NEEDS = {"hub", "gpu", "data"}
FENCE = re.compile(
    r"^(?: *<!-- needs: ([\w, ]+) -->\n)?( *)```(\w*)\n(.*?)^\2```", flags=re.S | re.M
)
"""A fenced block (indented ones in list items too), with the needs comment above it."""


@dataclass(frozen=True)
class Block:
    page: str
    language: str
    code: str
    needs: frozenset[str]


def blocks(path: Path) -> list[Block]:
    return [
        Block(path.name, language, textwrap.dedent(code), frozenset(_needs(needs)))
        for needs, _, language, code in FENCE.findall(path.read_text())
    ]


def _needs(comment: str) -> list[str]:
    return [need.strip() for need in comment.split(",") if need.strip()]


def commands(code: str) -> list[list[str]]:
    """A bash block's commands: continuation lines joined, comments dropped, ``$VARIABLES``
    (a Slurm array's task id) given a value."""
    joined = code.replace("\\\n", " ")
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="0")
    parsed = (shlex.split(line, comments=True) for line in joined.splitlines())
    return [[_expand(arg, env) for arg in argv] for argv in parsed if argv]


def _expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), arg)


@contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def check_train(argv: list[str]) -> None:
    """``train.py``'s command line: its flags, the config and every override (typed)."""
    import train
    from flamingo.training.config import TrainConfig

    args = train.parse_args(argv)
    TrainConfig.from_yaml(ROOT / args.config, args.overrides)


def check_module(module: str, argv: list[str]) -> None:
    """``python -m MODULE ARGV`` parsed by the module's own parser."""
    if module == "eval.run":
        from eval.config import EvalConfig
        from eval.run import parse_args

        args = parse_args(argv)
        EvalConfig.from_yaml(ROOT / args.config, args.overrides)
    elif module == "flamingo.convert":
        from flamingo.convert.__main__ import make_parser

        args = make_parser().parse_args(argv)
        if getattr(args, "config", None):
            assert (ROOT / args.config).is_file(), args.config
    elif module.split(".")[0] == "data_prep":  # each converter, and the corpus merge
        __import__(module, fromlist=["make_parser"]).make_parser().parse_args(argv)
    elif module == "lmms_eval":
        from lmms_eval.__main__ import parse_eval_args
        from lmms_eval.models import get_model

        with _argv(["lmms_eval", *argv]):
            _, args = parse_eval_args()
        assert get_model(args.model).__name__ == "FlamingoLMMs", args.model
    elif module == "flamingo.training.clip_stage":
        from open_clip_train.params import parse_args

        parse_args(argv)
    else:
        raise AssertionError(f"no check for python -m {module}")


def check_command(argv: list[str]) -> str:
    """Parse a documented command as the program it runs would; returns the program's name."""
    if argv[0] == "python" and argv[1] == "-m":
        check_module(argv[2], argv[3:])
        return argv[2]
    if argv[:2] == ["python", "train.py"]:
        check_train(argv[2:])
        return "train.py"
    if argv[0] == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        args = parse_args(argv[1:])
        assert args.user_script == "train.py", args.user_script
        check_train(args.user_args)
        return "deepspeed"
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(argv[1:])
        assert args.module, "the documented torchrun commands run modules"
        check_module(args.training_script, args.training_script_args)
        return "torchrun"
    raise AssertionError(f"no check for the command {shlex.join(argv)}")
