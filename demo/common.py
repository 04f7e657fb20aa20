"""Pieces both pretraining stages share: the learning-rate schedule and the command line."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flamingo.typed_config import load_config


def warmup_cosine(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up then cosine decay to 0."""
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def summary(losses: list[float], **extra: Any) -> dict[str, Any]:
    """First loss and the mean of the last ten, plus ``extra``."""
    return {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]), **extra}


def cli(
    prog: str, doc: str, config_cls: type, pretrain: Callable[[Any], dict], argv: list[str] | None
) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100")
    args = parser.parse_args(argv)
    print(json.dumps(pretrain(load_config(config_cls, args.config, args.overrides)), indent=2))
