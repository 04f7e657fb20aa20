"""Pretrain a Flamingo model: frozen vision tower and LM, weighted NLL over several datasets.

One process:      python train.py --config configs/train/tiny.yaml [key=value ...]
Several (ZeRO):   deepspeed --num_gpus 8 train.py --config configs/train/x.yaml deepspeed=configs/deepspeed/zero2.json
Several nodes:    deepspeed --hostfile hosts train.py --config ...   (or --num_nodes 2 --no_ssh
                  --node_rank R --master_addr A on each node)

Each optimiser step takes ``accumulation`` micro-batches from every dataset (paper: gradients
accumulated over all datasets; ``mixing=round_robin`` for the ablation), normalises each
dataset's NLL by its target tokens over the whole step and all ranks, and weights it by the
dataset's ``loss_weight``. Checkpoints are resumable exactly (``--resume auto``); the final
model is exported with ``save_pretrained`` to ``OUTPUT/model``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.config import EvalConfig
from eval.run import evaluate
from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor
from flamingo.config import TrainConfig, to_dict
from flamingo.data.pipeline import FlamingoLoader
from flamingo.distributed import build_engine
from flamingo.losses import count_targets, make_labels, weighted_loss
from flamingo.runs import CheckpointDir, RunLogger, read_json

log = logging.getLogger("flamingo.train")


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as JSON-friendly values (no pickle in checkpoints)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class DatasetExhausted(Exception):
    """An epoch-mode dataset with ``at_epoch_end: stop`` ran out of batches."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Batches:
    """Endless batches from every dataset's loader. An epoch-mode loader that runs out starts
    its next epoch (logged), or raises :class:`DatasetExhausted` (``at_epoch_end: stop``)."""

    def __init__(self, loaders: dict[str, FlamingoLoader]) -> None:
        self.loaders = loaders
        self.iterators = {name: iter(loader) for name, loader in loaders.items()}

    def next(self, name: str, step: int) -> dict:
        try:
            return next(self.iterators[name])
        except StopIteration:
            pass
        loader = self.loaders[name]
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

    def state_dict(self) -> dict[str, dict]:
        return {name: loader.state_dict() for name, loader in self.loaders.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, loader in self.loaders.items():
            loader.load_state_dict(state[name])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    out = Path(cfg.output_dir)

    # -- setup: model, data, engine, state -----------------------------------------------------
    model_cfg = FlamingoConfig.from_yaml(cfg.model, cfg.model_overrides)
    if cfg.precision == "bf16" and not cfg.deepspeed:
        model_cfg.frozen_dtype = "bfloat16"
    seed_everything(cfg.seed)  # same model initialisation on every rank
    model = Flamingo.from_config(model_cfg)
    processor = FlamingoProcessor.from_config(model_cfg)
    datasets = {d.name: d for d in cfg.datasets}
    per_step = [d.name for d in cfg.datasets] if cfg.mixing == "all" else [cfg.datasets[0].name]
    engine = build_engine(model, cfg, micro_batches_per_step=len(per_step) * cfg.accumulation)
    eval_cfg = EvalConfig.from_yaml(cfg.eval_config, cfg.eval_overrides) if cfg.eval_every else None
    if eval_cfg is not None and getattr(engine, "zero_stage", 0) == 3:
        raise ValueError(
            "eval during training runs on rank 0 and cannot use ZeRO-3 sharded weights; evaluate the exported model"
        )
    logging.basicConfig(
        level=logging.INFO if engine.is_main else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    loaders = {
        name: FlamingoLoader.from_processor(
            d, processor, seed=cfg.seed, num_workers=cfg.num_workers
        )
        for name, d in datasets.items()
    }
    special = processor.special_tokens
    checkpoints = CheckpointDir(out / "checkpoints")
    step, skipped_steps, history = 0, 0, []

    def everywhere(ok: bool) -> bool:
        failed = torch.tensor([0.0 if ok else 1.0], device=engine.device)
        return float(engine.all_reduce_sum(failed)) == 0.0

    resume_from = checkpoints.resolve(
        args.resume, part=(engine.rank, engine.world_size), everywhere=everywhere
    )
    if resume_from is not None:
        saved = read_json(resume_from / "train_config.json")
        if FlamingoConfig.from_dict(saved["model"]) != model_cfg:
            raise ValueError(
                f"{resume_from} was trained with another model config; start a new output_dir"
            )
        state_file = resume_from / f"trainer_rank{engine.rank:05d}.json"
        saved_ranks = len(list(resume_from.glob("trainer_rank*.json")))
        if not state_file.is_file() or saved_ranks != engine.world_size:
            raise ValueError(
                f"{resume_from} was written by {saved_ranks} process(es); resume it with the same "
                f"number (this run has {engine.world_size}), or start a new output_dir"
            )
        state = read_json(state_file)
        try:
            engine.load(resume_from)
        except Exception as e:  # a checkpoint from before manifests can still be damaged
            raise RuntimeError(f"cannot load the checkpoint {resume_from}: {e}") from e
        step, skipped_steps = state["step"], state["skipped_steps"]
        for name, loader in loaders.items():
            loader.load_state_dict(state["loaders"][name])
        history = state.get("history", [])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", resume_from, step)
    runlog = RunLogger(
        out, enabled=engine.is_main, tensorboard=cfg.tensorboard, history=history, step=step
    )

    def save_checkpoint() -> None:
        if engine.is_main:
            checkpoints.prepare(step)
        engine.barrier()
        tmp = checkpoints.tmp_path(step)
        engine.save(tmp)
        state = {
            "step": step,
            "skipped_steps": skipped_steps,
            "loaders": {name: loader.state_dict() for name, loader in loaders.items()},
            "history": runlog.history,
            "rng": rng_state(),
        }
        (tmp / f"trainer_rank{engine.rank:05d}.json").write_text(json.dumps(state))
        engine.barrier()
        if engine.is_main:
            (tmp / "train_config.json").write_text(
                json.dumps({"train": cfg.to_dict(), "model": to_dict(model_cfg)})
            )
            checkpoints.commit(step)
            checkpoints.prune(cfg.keep_checkpoints)
            runlog.plot()
        engine.barrier()

    # -- the loop ---------------------------------------------------------------------------------
    model = engine.module
    model.train()
    batches = Batches(loaders)
    # a dataset that can stop the run: each step's fetch may have to be undone
    can_stop = any(not d.resampled and d.at_epoch_end == "stop" for d in cfg.datasets)
    stopped_by: list[str] = []
    gate_names = [n for n, p in model.named_parameters() if n.endswith(("attn_gate", "ff_gate"))]
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not engine.is_main,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    while step < cfg.steps:
        start = time.perf_counter()
        lr = cfg.optim.lr_at(step, cfg.steps)
        names = per_step if cfg.mixing == "all" else [cfg.datasets[step % len(cfg.datasets)].name]
        before = batches.state_dict() if can_stop else None
        try:
            micro = [(n, batches.next(n, step)) for n in names for _ in range(cfg.accumulation)]
            ran_out = None
        except DatasetExhausted as e:
            micro, ran_out = [], e.name
        for _, batch in micro:
            batch["labels"] = make_labels(batch["input_ids"], batch["attention_mask"], special)
        # each dataset's NLL is normalised by its target tokens over the step, on every rank;
        # the same collective tells every rank which datasets ran out anywhere
        counts = torch.tensor(
            [
                sum(int(count_targets(b["labels"])) for n, b in micro if n == name)
                for name in datasets
            ]
            + [float(name == ran_out) for name in datasets],
            dtype=torch.float64,
        )
        counts = engine.all_reduce_sum(counts.to(engine.device)).cpu().tolist()
        stopped_by = [n for n, f in zip(datasets, counts[len(datasets) :], strict=True) if f]
        if stopped_by:
            batches.load_state_dict(before)  # the checkpoint resumes at this step's start
            break
        step_targets = dict(zip(datasets, counts[: len(datasets)], strict=True))
        nll_sums = defaultdict(float)
        samples = 0
        engine.begin_step(lr)
        for name, batch in micro:
            # the head is fused with the loss: no (B, T, vocab) logits are built
            nll = engine.forward(
                batch["input_ids"].to(engine.device),
                batch["attention_mask"].to(engine.device),
                pixel_values=batch["pixel_values"].to(engine.device),
                labels=batch["labels"].to(engine.device),
            ).nll_sum
            nll_sums[name] += float(nll.detach())
            loss = weighted_loss(nll, datasets[name].loss_weight, step_targets[name])
            samples += batch["input_ids"].shape[0]
            engine.micro_step(loss)
        info = engine.finish_step()
        skipped_steps += not info.applied
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            sums = engine.all_reduce_sum(
                torch.tensor(
                    [nll_sums[n] for n in datasets], dtype=torch.float64, device=engine.device
                )
            ).cpu()
            seconds = time.perf_counter() - start
            metrics = {
                f"loss/{n}": s / max(step_targets[n], 1)
                for n, s in zip(datasets, sums.tolist(), strict=True)
                if step_targets[n] > 0
            }
            metrics["loss/total"] = sum(
                datasets[n].loss_weight * metrics.get(f"loss/{n}", 0.0) for n in datasets
            )
            metrics.update(
                lr=lr, grad_norm=info.grad_norm, skipped_steps=skipped_steps, step_seconds=seconds
            )
            metrics["tokens_per_s"] = sum(step_targets.values()) / seconds
            metrics["samples_per_s"] = samples * engine.world_size / seconds
            gates = engine.full_tensors(gate_names)
            for n, g in gates.items():
                layer = n.split(".")[2]
                metrics[f"gate/{layer}.{n.rsplit('.', 1)[1]}"] = float(g.tanh().abs().mean())
            for name, loader in loaders.items():
                for reason, count in loader.stats().items():
                    if reason.startswith(("skip/", "shard_error", "image_dropped/")):
                        metrics[f"data/{name}/{reason}"] = count
            runlog.log(step, metrics)
            bar.set_postfix(
                loss=f"{metrics['loss/total']:.3f}", lr=f"{lr:.2e}", gnorm=f"{info.grad_norm:.2f}"
            )
            if not math.isfinite(info.grad_norm):
                log.warning(
                    "step %d skipped: non-finite loss or gradient (%d skipped so far)",
                    step,
                    skipped_steps,
                )

        if eval_cfg is not None and step % cfg.eval_every == 0:
            if engine.is_main:
                model.eval()
                # the run's name keys the RICES feature cache: the vision tower is frozen, so
                # the features of every eval are the same
                results = evaluate(model, processor, eval_cfg, str(out), shard=(0, 1))
                model.train()
                scores = {
                    f"eval/{task}/{shots}shot/{metric}": s["mean"]
                    for task, by_shots in results.items()
                    for shots, entry in by_shots.items()
                    for metric, s in entry["scores"].items()
                }
                runlog.log(step, scores)
                log.info(
                    "step %d eval: %s", step, ", ".join(f"{k}={v:.2f}" for k, v in scores.items())
                )
            engine.barrier()

        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
    bar.close()
    if stopped_by:
        if step == 0:
            raise RuntimeError(f"dataset(s) {stopped_by} gave no batch: check their shards")
        log.warning(
            "stopping at step %d of %d: dataset(s) %s ran out (at_epoch_end: stop)",
            step,
            cfg.steps,
            ", ".join(stopped_by),
        )
        if step % cfg.checkpoint_every:  # else this step's checkpoint is written already
            save_checkpoint()

    # -- export -----------------------------------------------------------------------------------
    names = model.exported_names()
    tensors = engine.full_tensors(names)
    if engine.is_main:
        model.save_pretrained(out / "model", processor, tensors=tensors)
        runlog.plot()
        log.info("exported %s (%d skipped steps)", out / "model", skipped_steps)
    runlog.close()
    engine.close()


if __name__ == "__main__":
    sys.exit(main())
