"""Typed evaluation config (``configs/eval/*.yaml``), on flamingo's config base (frozen, loaded
from YAML with overrides, changed with ``replace``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flamingo.typed_config import YamlConfig


@dataclass(frozen=True)
class TaskConfig(YamlConfig):
    """Where a benchmark's files are and how to decode for it."""

    paths: dict[str, Any]
    """The task's files (see eval/tasks/<task>.py for the keys)."""
    train_split: str = "train"
    """Split the demonstrations come from."""
    eval_split: str = "test"
    """Split that is evaluated."""
    max_new_tokens: int | None = None
    """Generation budget; None: the protocol's for this task (``eval/protocols.py``: captions
    20, VQA 5 or 10), else 20."""


@dataclass(frozen=True)
class EvalConfig(YamlConfig):
    """A few-shot evaluation run."""

    tasks: dict[str, TaskConfig]
    """Benchmarks by registered name (coco, flickr30k, vqav2, okvqa, textvqa, vizwiz,
    hateful_memes, imagenet)."""
    protocol: Literal["official", "openflamingo"] = "official"
    """Which evaluation code the numbers are comparable with: the benchmarks' official code
    (``official``) or OpenFlamingo's (``openflamingo``, for OpenFlamingo's and IDEFICS's
    published tables). ``eval/protocols.py`` names every setting each one fixes."""
    openflamingo_zero_shot_bug: bool = False
    """Reproduce a bug of OpenFlamingo's 0-shot classification (ImageNet, HatefulMemes) that
    its published numbers carry: its prompt drops the two text-only demonstrations' ``<image>``
    but still passes their images first, so the query's ``<image>`` reads the first
    demonstration's image instead of the query's. Only with ``protocol: openflamingo``."""
    shots: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 32])
    """Numbers of demonstrations; 0 = two text-only demonstrations (paper)."""
    trials: int = 3
    """Repetitions with different demonstration seeds (reported as mean +- std)."""
    seed: int = 0
    """Seed of the first trial; trial t uses seed + t."""
    demos: Literal["random", "rices"] = "random"
    """Random demonstrations per item, or RICES (nearest by frozen vision features)."""
    query_set_size: int = 2048
    """Demonstrations are drawn from this many train items (sampled once per trial)."""
    max_items: int | None = None
    """Evaluate at most this many items per task (None: the whole split)."""
    num_beams: int = 3
    """Beam search width (paper: 3)."""
    length_penalty: float = 0.0
    """Beam search length penalty (0: plain summed log-probability, OpenFlamingo's eval)."""
    batch_size: int = 8
    """Items per generation batch."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Model dtype for evaluation."""
    blank_images: bool = False
    """Replace every image by a blank one: the *blind* baseline that shows what the model
    gets from the images."""
    cache_dir: str = "runs/eval-cache"
    """RICES features are cached here (computed once per checkpoint, task and split)."""
    output_dir: str = "runs/eval"
    """Results JSON goes here."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: name at least one")
        if any(s < 0 for s in self.shots):
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        if self.openflamingo_zero_shot_bug and self.protocol != "openflamingo":
            raise ValueError(
                "openflamingo_zero_shot_bug reproduces OpenFlamingo's code: "
                "set protocol: openflamingo too"
            )
        if self.trials < 1 or self.batch_size < 1 or self.num_beams < 1 or self.query_set_size < 2:
            raise ValueError("trials, batch_size, num_beams must be >= 1 and query_set_size >= 2")
