"""The converters as datatrove pipeline steps: datatrove's executors run the tasks (local
processes, a Slurm job array, Ray), our converters write the shards.

    from datatrove.executor import LocalPipelineExecutor
    from data_prep.pipeline import Convert

    step = Convert("mmc4", "--jsonl", "docs/shard_{0..23098}.jsonl", "--images", "images/{stem}",
                   "--out", "shards/mmc4")
    LocalPipelineExecutor([step], tasks=64, workers=8, logging_dir="logs/mmc4").run()

``Convert(converter, *arguments)`` takes a converter's command line (``pairs``, ``mmc4``,
``obelics``, ``video`` or ``conversations``, then that command's options) and checks it at
once, on the launching side: a wrong option or an input that does not exist fails before a
task starts. Task ``rank`` of ``world_size`` converts what ``--part rank/world_size`` converts
(the inputs ``j`` with ``j % world_size == rank``, the split datatrove's readers make), so the
shards are byte-identical to a one-process run, to ``--workers N`` and to ``--part I/N`` for any
number of tasks. The executor owns the split: ``--part`` and ``--workers`` are refused here.

A relaunch after a failure is resumed twice over: datatrove skips the tasks it marked
complete, and inside a task that died our records keep its finished inputs and shards (what
``--part`` does on a re-run). The last task to finish merges the per-input summaries into
``PREFIX-summary.json``; a conversion that skipped more than ``--max-skip-ratio`` of its items
fails that task (datatrove logs the reasons) rather than completing quietly.
"""

from __future__ import annotations

import importlib
from typing import Any

from datatrove.pipeline.base import PipelineStep

from data_prep.corpus import SKIP_EXIT, Conversion, parse_command

CONVERTERS = {
    "pairs": ("data_prep.pairs", ()),
    "mmc4": ("data_prep.interleaved", ("mmc4",)),
    "obelics": ("data_prep.interleaved", ("obelics",)),
    "video": ("data_prep.video", ()),
    "conversations": ("data_prep.conversations", ()),
}
"""Converter name -> (module, arguments in front of the options): ``python -m MODULE ...``."""

OWNED_BY_THE_EXECUTOR = ("--part", "--workers")


def conversion(converter: str, arguments: list[str]) -> Conversion:
    """A converter's command line, parsed and its inputs listed (a bad one exits with the
    converter's own usage message, as on the command line)."""
    if converter not in CONVERTERS:
        raise ValueError(
            f"unknown converter {converter!r}: one of {', '.join(CONVERTERS)} (the command "
            "line of python -m data_prep.<module> without the module)"
        )
    owned = [a for a in arguments if a.split("=")[0] in OWNED_BY_THE_EXECUTOR]
    if owned:
        raise ValueError(
            f"{' '.join(owned)}: the executor splits the inputs over its tasks (task i of N "
            "converts what --part i/N would), and each task is one process; drop them and "
            "set the executor's tasks and workers"
        )
    module, front = CONVERTERS[converter]
    converter_module = importlib.import_module(module)
    return parse_command(
        converter_module.make_parser(), [*front, *arguments], converter_module.prepare
    )


class Convert(PipelineStep):
    """One converter as a datatrove step: task ``rank`` of ``world_size`` converts the
    inputs ``j`` with ``j % world_size == rank`` (see the module docstring)."""

    name = "flamingo shards"
    type = "💽 - WRITER"

    def __init__(self, converter: str, *arguments: str) -> None:
        self.converter = converter
        self.arguments = list(arguments)
        self.conversion = conversion(converter, self.arguments)
        super().__init__()  # names its stats after repr(self)

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1):
        try:
            self.conversion.run(part=(rank, world_size))
        except SystemExit as e:  # a converter's command-line exits, as an error of this task
            if e.code == SKIP_EXIT:
                raise RuntimeError(
                    f"{self.converter}: more than --max-skip-ratio of the items were skipped "
                    "(the reasons are printed above); the shards are written"
                ) from None
            raise RuntimeError(f"{self.converter} ended with exit status {e.code}") from None
        for summary in self.conversion.input_summaries(rank, world_size):
            self.stat_update("inputs")
            self.stat_update(
                "samples", value=summary["samples_written"] + summary["samples_reused"]
            )
            self.stat_update("skipped", value=sum(summary["skipped"].values()))
        if data:
            yield from data

    def __repr__(self) -> str:
        return f"{self.type}: {self.name} ({self.converter} -> {self.conversion.args.out})"
