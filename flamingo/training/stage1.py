"""``train.py``'s BLIP-2 stage 1 (``objective: qformer_stage1``) and the start of its stage 2.

Stage 1 trains :class:`flamingo.qformer_pretraining.QFormerPretraining` (tower frozen, no LM)
on pairs datasets with the same loaders, engines, schedule and checkpoints as every other run;
only the step differs: each micro-batch's ITC + ITM + ITG, weighted by its dataset's
``loss_weight``, averaged over the step's micro-batches and (by the engine) over the ranks,
whose contrastive features and ITM negatives come from the whole global batch.

Stage 2 is a ``connector: qformer`` run whose Q-Former starts from stage 1's export
(``init_qformer``): :func:`start_from_stage1`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from flamingo.config import FlamingoConfig
from flamingo.qformer_pretraining import (
    WEIGHTS_NAME,
    QFormerPretraining,
    check_qformer,
    connector_weights,
    read_export,
)
from flamingo.training.batches import StepBatches
from flamingo.training.config import TrainConfig
from flamingo.training.engine import Engine
from flamingo.training.runlog import OBJECTIVES

LOSSES = OBJECTIVES  # contrastive, matching, generation: each logged, and plotted, on its own
SHAPE = (
    "queries",
    "layers",
    "width",
    "heads",
    "intermediate",
    "cross_attention_every",
    "activation",
)
"""The ``qformer`` fields stage 1 and stage 2 must share (the rest says how it trains)."""


def check_datasets(cfg: TrainConfig, model_cfg: FlamingoConfig) -> None:
    """Refuse, before the first step, what stage 1 cannot train on."""
    check_qformer(model_cfg, "objective: qformer_stage1")
    other = [d.name for d in cfg.datasets if d.kind != "pairs"]
    if other:
        raise ValueError(
            f"objective: qformer_stage1 learns from image-text pairs; datasets {other} are not "
            "kind: pairs: drop them for stage 1 (stage 2 trains on every kind)"
        )
    packed = [d.name for d in cfg.datasets if d.packing != "none"]
    if packed:
        raise ValueError(
            f"datasets {packed} are packed: stage 1 takes one pair a row (its contrastive and "
            "matching losses compare the rows), set packing: none"
        )
    small = [d.name for d in cfg.datasets if d.batch_size < 2]
    if small:
        raise ValueError(
            f"datasets {small} have batch_size < 2: the contrastive and matching losses need "
            "other pairs of the batch as negatives"
        )
    longest = max(d.seq_len for d in cfg.datasets) + 1  # + [CLS]
    if longest > model_cfg.qformer.max_text_positions:
        raise ValueError(
            f"a caption of up to seq_len + 1 = {longest} tokens exceeds "
            f"qformer.max_text_positions={model_cfg.qformer.max_text_positions}: raise it or "
            "shorten the datasets' seq_len"
        )


def train_step(engine: Engine, step: StepBatches, cfg: TrainConfig, lr: float) -> tuple:
    """One optimiser step of stage 1: (per-dataset sums of the three losses over the step's
    micro-batches, a (3,) device tensor each; samples; StepInfo)."""
    weights = {d.name: d.loss_weight for d in cfg.datasets}
    model: QFormerPretraining = engine.module
    sums: dict[str, torch.Tensor] = {}
    samples, share = 0, 1.0 / (len(step.micro) * engine.world_size)
    engine.begin_step(lr)
    for name, batch in step.micro:
        ids, labels, pixels, slots = (
            batch[k].to(engine.device, non_blocking=True)
            for k in ("input_ids", "labels", "pixel_values", "media_slots")
        )
        if not engine.policy.sync_free and bool((slots[:, 0] < 0).any()):
            raise ValueError(f"dataset {name!r}: a pair without its image reached stage 1")
        text, mask = model.texts(ids, labels)
        out = engine.forward(pixels[slots[:, 0], 0], text, mask)
        parts = torch.stack([out.itc, out.itm, out.itg]).detach().double()
        sums[name] = sums.get(name, 0.0) + parts
        samples += len(ids)
        # the engine sums gradients over ranks (DeepSpeed: scaled back by world size): each
        # rank's share of the mean over ranks and micro-batches
        engine.micro_step(weights[name] * out.loss * share)
    return sums, samples, engine.finish_step()


def step_metrics(engine: Engine, cfg: TrainConfig, step, sums, samples, info, lr, seconds, skipped):
    """The logged figures of a stage-1 step (collective: the loss sums are gathered)."""
    counts = {n: sum(1 for m, _ in step.micro if m == n) for n in sums}
    zero = torch.zeros(len(LOSSES), dtype=torch.float64, device=engine.device)
    names = [d.name for d in cfg.datasets]
    stacked = torch.stack([sums.get(n, zero) for n in names])
    stacked = (engine.all_reduce_sum(stacked) / engine.world_size).cpu().tolist()
    metrics: dict[str, Any] = {}
    total = 0.0
    for d, row in zip(cfg.datasets, stacked, strict=True):
        if counts.get(d.name):
            means = [v / counts[d.name] for v in row]
            metrics.update({f"{k}/{d.name}": v for k, v in zip(LOSSES, means, strict=True)})
            metrics[f"loss/{d.name}"] = sum(means)
            total += d.loss_weight * sum(means)
    metrics["loss/total"] = total
    metrics.update(
        lr=lr,
        grad_norm=float(info.grad_norm),
        skipped_steps=int(skipped),
        step_seconds=seconds,
        samples_per_s=samples * engine.world_size / seconds,
    )
    gathered = engine.full_tensors(["temp.value"])  # rank 0's, which logs
    if gathered:
        metrics["temperature"] = float(gathered["temp.value"])
    return metrics


def start_from_stage1(model: Any, directory: str | Path) -> None:
    """Give a ``connector: qformer`` model (stage 2) the Q-Former that stage 1 trained: the
    queries and every layer's attention, cross-attention and query feed-forward from the
    export in ``directory`` (its weights file only: the tower is not rebuilt); its projection
    into the LM stays freshly initialised. Stage 1 must have read the same tower, with a
    Q-Former of the same shape."""
    check_qformer(model.cfg, "init_qformer")
    cfg, _ = read_export(directory)
    theirs, ours = cfg.qformer, model.cfg.qformer
    differ = {k: (getattr(theirs, k), getattr(ours, k)) for k in SHAPE}
    differ = {k: v for k, v in differ.items() if v[0] != v[1]}
    if cfg.vision != model.cfg.vision:
        differ["vision"] = "another tower (its queries learned to read that one)"
    if differ:
        raise ValueError(
            f"init_qformer {directory}: its Q-Former differs from this model's in "
            f"(stage 1, stage 2): {differ}"
        )
    state = connector_weights(load_file(str(Path(directory) / WEIGHTS_NAME)))
    expected = {n for n, _ in model.qformer.named_parameters() if not n.startswith("language_")}
    if set(state) != expected:
        raise ValueError(
            f"init_qformer {directory}: its Q-Former weights {sorted(set(state) ^ expected)[:6]} "
            "do not match this model's"
        )
    with torch.no_grad():
        params = dict(model.qformer.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor)
