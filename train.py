"""Pretrain a Flamingo model: frozen vision tower and LM, weighted NLL over several datasets.

One process:      python train.py --config configs/train/tiny.yaml [key=value ...]
Several (ZeRO):   deepspeed --num_gpus 8 train.py --config configs/train/x.yaml engine.deepspeed=configs/deepspeed/zero2.json
Several nodes:    deepspeed --hostfile hosts train.py --config ...   (or --num_nodes 2 --no_ssh
                  --node_rank R --master_addr A on each node)

Each optimiser step takes ``accumulation`` micro-batches from every dataset (paper: gradients
accumulated over all datasets; ``mixing=round_robin`` for the ablation), normalises each
dataset's NLL by its target tokens over the whole step and all ranks, and weights it by the
dataset's ``loss_weight``. Checkpoints are resumable exactly (``--resume auto``); the final
model is exported with ``save_pretrained`` to ``OUTPUT/model``.

``objective: qformer_stage1`` trains BLIP-2's stage 1 instead (the Q-Former's three losses on
pairs, no LM: ``flamingo/training/stage1.py``); ``init_qformer`` starts stage 2 from its export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flamingo import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, required=True, help="train config YAML (configs/train/)"
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (latest complete checkpoint), none, or a checkpoint folder",
    )
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides, e.g. steps=100 datasets.0.batch_size=4",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and usage errors before the imports below (seconds)

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor, hub
from flamingo.data.shards import expand_shards, missing_local_shards
from flamingo.layers import is_partitioned, torch_dtype
from flamingo.losses import weighted_loss
from flamingo.parts import parts_of
from flamingo.qformer_pretraining import QFormerPretraining
from flamingo.training import stage1
from flamingo.training.batches import Batches, StepBatches
from flamingo.training.checkpoints import Checkpointer
from flamingo.training.config import TrainConfig
from flamingo.training.engine import Engine, build_engine, model_construction, zero_stage_of
from flamingo.training.runlog import RunLogger
from flamingo.typed_config import apply_overrides

if TYPE_CHECKING:
    from eval.config import EvalConfig

log = logging.getLogger("flamingo.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(engine: Engine, step: StepBatches, cfg: TrainConfig, lr: float) -> tuple:
    """One optimiser step over the step's micro-batches: (NLL sums per dataset, samples,
    StepInfo). Each dataset's NLL is normalised by its target tokens over the step and all
    ranks, and weighted by its ``loss_weight``."""
    weights = {d.name: d.loss_weight for d in cfg.datasets}
    across = {d.name: d.packing == "cross_document" for d in cfg.datasets}
    nll_sums: dict[str, torch.Tensor] = {}  # on the device: read only when logging
    samples = 0
    engine.begin_step(lr)
    for name, batch in step.micro:
        # the head is fused with the loss: no (B, T, vocab) logits are built
        ids, mask, pixels, slots, labels = (
            batch[k].to(engine.device, non_blocking=True)
            for k in ("input_ids", "attention_mask", "pixel_values", "media_slots", "labels")
        )
        packed = {}
        if "document_ids" in batch:  # packed rows (flamingo/packing.py)
            packed["document_ids"] = batch["document_ids"].to(engine.device, non_blocking=True)
            packed["across_documents"] = across[name]
        if "aspect_ratio_ids" in batch:  # a tiled tower's (Llama 3.2 Vision)
            ratios = batch["aspect_ratio_ids"].to(engine.device, non_blocking=True)
            packed["aspect_ratio_ids"] = ratios
        nll = engine.forward(
            ids, mask, pixel_values=pixels, media_slots=slots, labels=labels, **packed
        ).nll_sum
        nll_sums[name] = nll_sums.get(name, 0.0) + nll.detach().double()
        samples += len(batch["keys"]) if "keys" in batch else len(ids)  # packed: rows < samples
        engine.micro_step(weighted_loss(nll, weights[name], step.targets[name]))
    return nll_sums, samples, engine.finish_step()


def step_metrics(engine, cfg, step, nll_sums, samples, info, lr, seconds, skipped) -> dict:
    """The logged figures of a step (collective: the NLL sums and gates are gathered)."""
    names = [d.name for d in cfg.datasets]
    zero = torch.zeros((), dtype=torch.float64, device=engine.device)
    sums = torch.stack([nll_sums.get(n, zero) for n in names])
    sums = engine.all_reduce_sum(sums).cpu().tolist()
    metrics = {
        f"loss/{n}": s / step.targets[n]
        for n, s in zip(names, sums, strict=True)
        if step.targets[n] > 0
    }
    metrics["loss/total"] = sum(
        d.loss_weight * metrics.get(f"loss/{d.name}", 0.0) for d in cfg.datasets
    )
    metrics.update(
        lr=lr, grad_norm=float(info.grad_norm), skipped_steps=int(skipped), step_seconds=seconds
    )
    metrics["tokens_per_s"] = sum(step.targets.values()) / seconds
    metrics["samples_per_s"] = samples * engine.world_size / seconds
    for name, gate in engine.full_tensors(engine.module.gate_names()).items():
        layer = name.split(".")[2]
        metrics[f"gate/{layer}.{name.rsplit('.', 1)[1]}"] = float(gate.tanh().abs().mean())
    return metrics


def evaluate_during_training(model, processor, eval_cfg: EvalConfig, out: Path) -> dict:
    """(Every rank, a collective) The eval config's benchmarks on the model as it is, each
    rank its share of the items, the predictions gathered: ``eval/...`` scores. No rank waits
    at a barrier while another evaluates alone, so an evaluation may last longer than the
    process group's timeout."""
    from eval.run import evaluate  # a run without evaluation never imports it (each rank)

    model.eval()
    # the run's name keys the RICES feature cache: the frozen tower's features never change
    results = evaluate(model, processor, eval_cfg, str(out))
    model.train()
    return {
        f"eval/{task}/{shots}shot/{metric}": s["mean"]
        for task, by_shots in results.items()
        for shots, entry in by_shots.items()
        for metric, s in entry["scores"].items()
    }


def eval_config(cfg: TrainConfig, engine: Engine) -> EvalConfig | None:
    """The benchmarks run every ``eval_every`` steps, if any."""
    if not cfg.eval_every:
        return None
    if engine.zero_stage == 3:
        raise ValueError(
            "eval during training generates on each rank with the whole weights, which ZeRO-3 "
            "partitions; evaluate the exported model (python -m eval.run)"
        )
    from eval.config import EvalConfig

    return EvalConfig.from_yaml(cfg.eval_config, cfg.eval_overrides, "eval_overrides")


def check_datasets(cfg: TrainConfig, model_cfg: FlamingoConfig) -> None:
    """Refuse, before the first step, a dataset the model's parts cannot take."""
    connector = parts_of(model_cfg).connector
    frames = {d.name: d.num_frames for d in cfg.datasets if d.kind == "video"}
    too_many = {name: n for name, n in frames.items() if n > connector.max_frames()}
    if too_many:
        takes = connector.max_frames()
        raise ValueError(
            f"datasets {too_many} are video of that many frames, which {connector.describe()} "
            f"cannot take ({'one image per <image>' if takes == 1 else f'at most {takes} frames'}):"
            " drop them, lower their num_frames, or train connector: flamingo with "
            "resampler.max_num_frames >= num_frames (its time embeddings)"
        )


def fine_tuned_model(cfg: TrainConfig, micro_batches: int = 1) -> Flamingo:
    """The checkpoint ``init_from`` names, its frozen parts in the engine's precision. With
    ZeRO-3's ``frozen_weights: partitioned`` it is built partitioned (``model_construction``;
    the engine's precision applied before the build) and its weights written into the
    partitions as they load, no rank holding the frozen LM whole."""
    if cfg.engine.frozen_weights == "partitioned" and zero_stage_of(cfg.engine) == 3:
        source = partitionable_source(cfg.init_from)
        with model_construction(cfg.engine, cfg.optim, micro_batches):
            model = Flamingo.from_pretrained(source, changes=cfg.engine.model_changes())
            head = model.lm.hf.get_output_embeddings().weight  # cut whole for lm.head_rows
            lm = model.lm.hf.named_parameters()
            whole = [n for n, p in lm if not is_partitioned(p) and p is not head]
        if whole:  # the build ignored zero.Init: a whole LM on every rank is what was refused
            raise RuntimeError(f"{cfg.init_from}: LM weights built whole: {whole[:5]}")
    else:
        model = Flamingo.from_pretrained(cfg.init_from)
    if cfg.model_overrides:  # what trains (TRAINING_FIELDS): lm.trainable, the adapters
        try:
            changed = apply_overrides(model.cfg.to_dict(), cfg.model_overrides)
            wanted = FlamingoConfig.from_dict(changed)
        except ValueError as e:
            raise ValueError(f"model_overrides (over {cfg.init_from}): {e}") from None
        if wanted.lm.lora != model.cfg.lm.lora and model.cfg.lm.trainable == "lora":
            raise ValueError(
                f"{cfg.init_from} has LoRA adapters already: their settings (lm.lora) stay"
            )
        model.cfg = model.cfg.replace({"lm.lora": wanted.lm.lora.to_dict()})
        model.set_lm_trainable(wanted.lm.trainable)
    changes = cfg.engine.model_changes()
    frozen = changes.get("frozen_dtype", model.cfg.frozen_dtype)
    if frozen != model.cfg.frozen_dtype:  # the engine owns precision, as for a new model
        dtype = torch_dtype(frozen)
        model.vision.to(dtype)
        model.lm.hf.to(dtype)
        model.cfg = model.cfg.replace(changes)
    return model


def partitionable_source(init_from: str | Path) -> str | Path:
    """Where ``init_from`` loads from partitioned: ours if its LM has a source (transformers
    loads it under ``zero.Init``), or the files of a foreign checkpoint whose loader writes
    into partitions (``Format.loads_partitioned``: Llama 3.2 Vision's; a Hub id's downloaded
    snapshot, converted in memory, not into the cache). Other formats, or ours with the LM's
    weights in its own files, load whole: refused by name."""
    from flamingo import formats
    from flamingo.checkpoint import read_checkpoint_config

    kind = formats.kind_of(init_from)
    if kind is not None:
        if not formats.lookup(kind).loads_partitioned:
            raise ValueError(
                f"init_from {init_from}: a {kind} checkpoint loads whole, so "
                "engine.frozen_weights=partitioned cannot apply; use engine.frozen_weights="
                "replicated"
            )
        return init_from if Path(init_from).is_dir() else hub.transformers_snapshot(init_from)
    model_cfg, _ = read_checkpoint_config(hub.snapshot(init_from))
    if model_cfg.lm.name_or_path is None:
        raise ValueError(
            f"init_from {init_from}: its LM has no source to load partitioned from "
            "(lm.name_or_path is null: its weights are in the checkpoint's files); use "
            "engine.frozen_weights=replicated"
        )
    return init_from


@dataclass
class Setup:
    """What a run needs before its first step: the model (in ``engine``), its data and its
    step function (BLIP-2's stage 1 has its own)."""

    model_cfg: FlamingoConfig
    processor: FlamingoProcessor
    engine: Engine
    batches: Batches
    first_stage: bool
    step_fn: Callable[..., tuple]
    metrics_fn: Callable[..., dict]


def check_shards(cfg: TrainConfig) -> None:
    """Every dataset's shards exist, before anything is built: a brace list of files that are
    not there used to surface after the model was built, deep in the loader."""
    for i, dataset in enumerate(cfg.datasets):
        try:
            urls = expand_shards(dataset.shards)
        except ValueError as e:
            raise ValueError(f"datasets.{i} ({dataset.name}): {e}") from None
        missing = missing_local_shards(urls)
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise ValueError(
                f"datasets.{i} ({dataset.name}): {len(missing)} of {len(urls)} shards do not "
                f"exist: {shown}. Write them first (data_prep/; for configs/train/tiny*.yaml: "
                f"python -m data_prep.tiny --out data/tiny) or point datasets.{i}.shards at yours"
            )


def setup(cfg: TrainConfig) -> Setup:
    """The run ``cfg`` describes, built: ``main`` runs its steps, ``bench.run_flops`` counts
    some."""
    check_shards(cfg)
    seed_everything(cfg.seed)  # same model initialisation on every rank
    first_stage = cfg.objective == "qformer_stage1"
    step_fn, metrics_fn = (
        (stage1.train_step, stage1.step_metrics) if first_stage else (train_step, step_metrics)
    )
    per_step = len(cfg.datasets) if cfg.mixing == "all" else 1
    micro_batches = per_step * cfg.accumulation
    if cfg.init_from is not None:
        model = fine_tuned_model(cfg, micro_batches)
        model_cfg, processor = model.cfg, FlamingoProcessor.from_config(model.cfg)
    else:
        model_cfg = FlamingoConfig.from_yaml(cfg.model, cfg.model_overrides, "model_overrides")
        model_cfg = model_cfg.replace(cfg.engine.model_changes())  # the engine owns precision
        processor = FlamingoProcessor.from_config(model_cfg)
        with model_construction(cfg.engine, cfg.optim, micro_batches):
            if first_stage:
                model = QFormerPretraining.from_config(model_cfg, processor.tokenizer)
            else:
                model = Flamingo.from_config(model_cfg, processor)
            if cfg.init_qformer is not None:  # BLIP-2's stage 2 from stage 1
                stage1.start_from_stage1(model, cfg.init_qformer)
    (stage1.check_datasets if first_stage else check_datasets)(cfg, model_cfg)
    engine = build_engine(model, cfg.engine, cfg.optim, micro_batches)
    pinned = engine.device.type == "cuda"  # page-locked: train_step's copies do not block
    batches = Batches.build(cfg, processor, engine.rank, engine.world_size, pin_memory=pinned)
    return Setup(model_cfg, processor, engine, batches, first_stage, step_fn, metrics_fn)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    out = Path(cfg.output_dir)

    # -- setup: model, engine, data, run state -------------------------------------------------
    run_setup = setup(cfg)
    engine, batches, processor = run_setup.engine, run_setup.batches, run_setup.processor
    model_cfg, first_stage = run_setup.model_cfg, run_setup.first_stage
    step_fn, metrics_fn = run_setup.step_fn, run_setup.metrics_fn
    eval_cfg = eval_config(cfg, engine)
    logging.basicConfig(
        level=logging.INFO if engine.is_main else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    runlog = RunLogger(out, enabled=engine.is_main, tensorboard=cfg.tensorboard)
    run = Checkpointer(out / "checkpoints", engine, batches, runlog, cfg, model_cfg)
    run.resume(args.resume)

    # -- the loop ---------------------------------------------------------------------------------
    model = engine.module
    model.train()
    bar = tqdm(
        total=cfg.steps, initial=run.step, disable=not engine.is_main, desc="train", unit="step"
    )
    stopped_by: list[str] = []
    while run.step < cfg.steps:
        log_now = (run.step + 1) % cfg.log_every == 0 or run.step + 1 == cfg.steps
        if log_now:  # a logged step is timed alone: the device first finishes the earlier ones
            engine.synchronize()
        start = time.perf_counter()
        lr = cfg.optim.lr_at(run.step, cfg.steps)
        step = batches.for_step(run.step, engine.all_reduce_sum, engine.device)
        if step.stopped_by:
            stopped_by = step.stopped_by
            break
        nll_sums, samples, info = step_fn(engine, step, cfg, lr)
        run.skipped_steps = run.skipped_steps + (~info.applied).long()  # a device count
        run.step += 1
        bar.update(1)
        if log_now:
            engine.synchronize()
            seconds = time.perf_counter() - start
            metrics = metrics_fn(
                engine, cfg, step, nll_sums, samples, info, lr, seconds, run.skipped_steps
            )
            runlog.log(run.step, {**metrics, **batches.stats()})
            gnorm = metrics["grad_norm"]
            bar.set_postfix(
                loss=f"{metrics['loss/total']:.3f}", lr=f"{lr:.2e}", gnorm=f"{gnorm:.2f}"
            )
            if not math.isfinite(gnorm):
                log.warning(
                    "step %d skipped: non-finite loss or gradient (%d skipped so far)",
                    run.step,
                    metrics["skipped_steps"],
                )
        if eval_cfg is not None and run.step % cfg.eval_every == 0:
            scores = evaluate_during_training(model, processor, eval_cfg, out)
            runlog.log(run.step, scores)  # rank 0's log only
            log.info(
                "step %d eval: %s", run.step, ", ".join(f"{k}={v:.2f}" for k, v in scores.items())
            )
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
            run.save()
            runlog.plot()
    bar.close()
    if stopped_by:
        if run.step == 0:
            raise RuntimeError(f"dataset(s) {stopped_by} gave no batch: check their shards")
        log.warning(
            "stopping at step %d of %d: dataset(s) %s ran out (at_epoch_end: stop)",
            run.step,
            cfg.steps,
            ", ".join(stopped_by),
        )
        if run.step % cfg.checkpoint_every:  # else this step's checkpoint is written already
            run.save()

    # -- export -----------------------------------------------------------------------------------
    tensors = engine.full_tensors(model.exported_names())
    if engine.is_main:
        saved_with = processor.tokenizer if first_stage else processor
        model.save_pretrained(out / "model", saved_with, tensors=tensors)
        runlog.plot()
        log.info("exported %s (%d skipped steps)", out / "model", int(run.skipped_steps))
    runlog.close()
    engine.close()


if __name__ == "__main__":
    sys.exit(cli.run(main))
