"""The micro-batches of one optimiser step, from every dataset's loader.

An epoch-mode loader that runs out starts its next epoch (logged) or, with ``at_epoch_end:
stop``, ends the run: every rank learns which datasets ran out anywhere through the step's
one all-reduce (the target counts each dataset's loss is normalised by), and the loaders go
back to the step's start so that the checkpoint written then resumes there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from flamingo.data.pipeline import FlamingoLoader
from flamingo.losses import count_targets, make_labels
from flamingo.tokens import SpecialTokens
from flamingo.training.config import TrainConfig

log = logging.getLogger("flamingo.train")


class DatasetExhausted(Exception):
    """An epoch-mode dataset with ``at_epoch_end: stop`` ran out of batches."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass
class StepBatches:
    micro: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(dataset name, batch with labels), in the order they go through the model."""
    targets: dict[str, float] = field(default_factory=dict)
    """Target tokens per dataset over the whole step and every rank."""
    stopped_by: list[str] = field(default_factory=list)
    """Datasets that ran out on some rank (``at_epoch_end: stop``): the run ends here."""


class Batches:
    """Endless batches from every dataset's loader, a step's worth at a time."""

    def __init__(
        self, loaders: dict[str, FlamingoLoader], cfg: TrainConfig, special: SpecialTokens
    ) -> None:
        self.loaders, self.cfg, self.special = loaders, cfg, special
        self.iterators: dict[str, Any] = {}  # opened on first use: after a restored state
        self.can_stop = any(not d.resampled and d.at_epoch_end == "stop" for d in cfg.datasets)

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        processor: Any,
        rank: int,
        world_size: int,
        pin_memory: bool = False,
    ) -> Batches:
        """A loader per dataset of ``cfg``, this rank's share of each (in page-locked memory
        with ``pin_memory``, for asynchronous copies to a CUDA device)."""
        loaders = {
            d.name: FlamingoLoader.from_processor(
                d,
                processor,
                seed=cfg.seed,
                num_workers=cfg.num_workers,
                rank=rank,
                world_size=world_size,
                pin_memory=pin_memory,
            )
            for d in cfg.datasets
        }
        return cls(loaders, cfg, processor.special_tokens)

    def next(self, name: str, step: int) -> dict:
        loader = self.loaders[name]
        if name not in self.iterators:
            self.iterators[name] = iter(loader)
        try:
            return next(self.iterators[name])
        except StopIteration:
            pass
        if loader.cfg.at_epoch_end == "stop":
            raise DatasetExhausted(name)
        log.info("dataset %s: starting epoch %d at step %d", name, loader.epoch, step)
        self.iterators[name] = iter(loader)
        try:
            return next(self.iterators[name])
        except StopIteration:
            raise RuntimeError(
                f"dataset {name}: a whole epoch gave no batch; check its shards "
                f"({loader.cfg.shards}) and what was skipped: {dict(loader.stats())}"
            ) from None

    def for_step(self, step: int, all_reduce_sum: Any, device: torch.device) -> StepBatches:
        """The step's micro-batches (``accumulation`` per dataset in it), labelled, and the
        target counts summed over ranks (one collective)."""
        cfg = self.cfg
        names = [d.name for d in cfg.datasets]
        taking = names if cfg.mixing == "all" else [names[step % len(names)]]
        before = self.state_dict() if self.can_stop else None
        out, ran_out = StepBatches(), None
        try:
            out.micro = [(n, self.next(n, step)) for n in taking for _ in range(cfg.accumulation)]
        except DatasetExhausted as e:
            out.micro, ran_out = [], e.name
        for _, batch in out.micro:
            labels = make_labels(
                batch["input_ids"],
                batch["attention_mask"],
                self.special,
                batch.get("document_ids"),
                batch.get("targets"),
            )
            pinned = batch["input_ids"].is_pinned()  # as the loader delivered the rest
            batch["labels"] = labels.pin_memory() if pinned else labels
        counts = [
            sum(int(count_targets(b["labels"])) for n, b in out.micro if n == m) for m in names
        ]
        flags = [float(m == ran_out) for m in names]
        summed = all_reduce_sum(torch.tensor(counts + flags, dtype=torch.float64, device=device))
        summed = summed.cpu().tolist()
        out.targets = dict(zip(names, summed[: len(names)], strict=True))
        out.stopped_by = [m for m, f in zip(names, summed[len(names) :], strict=True) if f]
        if out.stopped_by:
            self.load_state_dict(before)  # the checkpoint resumes at this step's start
            out.micro = []
        return out

    def stats(self) -> dict[str, int]:
        """Skipped samples and damaged shards per dataset, for the metrics."""
        return {
            f"data/{name}/{reason}": count
            for name, loader in self.loaders.items()
            for reason, count in loader.stats().items()
            if reason.startswith(("skip/", "shard_error", "image_dropped/"))
        }

    def state_dict(self) -> dict[str, dict]:
        return {name: loader.state_dict() for name, loader in self.loaders.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, loader in self.loaders.items():
            loader.load_state_dict(state[name])
        self.iterators = {}
