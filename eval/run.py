"""Run few-shot benchmarks on a checkpoint.

    python -m eval.run --config configs/eval/<name>.yaml --checkpoint DIR [--shots 0 4] [--tasks coco vqav2]
    torchrun --nproc_per_node 8 -m eval.run --config ... --checkpoint DIR      # many processes

Items are split over processes without padding (each evaluated exactly once); rank 0 gathers
the predictions, scores every (task, shots, trial), writes ``<output_dir>/results-<time>.json``
(config, checkpoint, per-trial scores, mean and std, predictions) and prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flamingo import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory or Hub id (ours, an OpenFlamingo release, an IDEFICS "
        "checkpoint: Flamingo.from_pretrained)",
    )
    parser.add_argument("--shots", nargs="+", help="override the config's shots")
    parser.add_argument("--tasks", nargs="+", help="evaluate only these tasks of the config")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (key=value)")
    args = parser.parse_args(argv)
    # a list flag takes every word after it, the overrides that follow too: they go back
    for flag in ("shots", "tasks"):
        values = getattr(args, flag)
        if values:
            args.overrides = [v for v in values if "=" in v] + args.overrides
            setattr(args, flag, [v for v in values if "=" not in v] or None)
    if args.shots:
        bad = [v for v in args.shots if not v.isdigit()]
        if bad:
            parser.error(f"--shots takes numbers of demonstrations, got {bad}")
        args.shots = [int(v) for v in args.shots]
    return args


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and usage errors before the imports below (seconds)

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from eval import prompts
from eval.config import EvalConfig, TaskConfig
from eval.fewshot import (
    RICES,
    encode_images,
    features_path,
    load_features,
    open_rgb,
    query_set,
    random_demos,
    save_features,
)
from eval.protocols import get_protocol
from eval.tasks import Item, Task, get_task
from flamingo import Flamingo, FlamingoProcessor
from flamingo.data.writing import write_json
from flamingo.hub import OPENFLAMINGO_RELEASES
from flamingo.layers import torch_dtype
from flamingo.typed_config import to_dict


class Evaluator:
    """Evaluates one model on tasks; every process calls every method (collectives inside)."""

    def __init__(
        self,
        model: Flamingo,
        processor: FlamingoProcessor,
        cfg: EvalConfig,
        checkpoint: str,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.model, self.processor, self.cfg, self.checkpoint = model, processor, cfg, checkpoint
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.open_image = blank_like if cfg.blank_images else open_rgb
        if shard is None:  # (rank, world): all processes of the job share the items
            shard = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.rank, self.world = shard

    # -- demonstrations ---------------------------------------------------------------------

    def _features_key(self, tag: str) -> str:
        vision = f"{Path(self.checkpoint).resolve()}|{self.model.cfg.vision}"
        return f"{vision}|{tag}|blank={self.cfg.blank_images}"

    @torch.no_grad()
    def _encode(self, images: list[Image.Image]) -> torch.Tensor:
        # (M, F, C, H, W), and a tiled tower's aspect-ratio ids (M,)
        pixels, _, ratios = self.processor.preprocess_images([[im] for im in images])
        extra = {} if ratios is None else {"aspect_ratio_ids": ratios[:, None].to(self.device)}
        tokens = self.model.vision(pixels.unsqueeze(1).to(self.device, self.dtype), **extra)
        tokens = tokens.flatten(1, 3).float()  # (M, tokens, Dv)
        if ratios is None:
            return tokens.mean(dim=1).cpu()  # (M, Dv)
        real = self.model.vision.token_mask(ratios.to(self.device)).float()  # real tiles only
        return ((tokens * real[..., None]).sum(1) / real.sum(1, keepdim=True)).cpu()

    def _features(self, items: list[Item], tag: str, shared: bool = False) -> torch.Tensor:
        """(N, Dv) mean-pooled vision features of ``items``' images, cached in ``cache_dir``.

        ``shared``: every process holds the same ``items`` (the demonstration pool); each
        encodes its share and they exchange them, and the cache counts only where every
        process sees it (a node-local ``cache_dir`` is recomputed, split, rather than read
        by some processes while the others wait)."""
        path = features_path(Path(self.cfg.cache_dir), self._features_key(tag), items)
        split = shared and self.world > 1
        cached = path.is_file()
        if split:  # every process must take the same branch
            flag = torch.tensor([int(cached)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            cached = bool(flag.item())
        if cached:
            return load_features(path)
        if not split:
            features = encode_images(self._encode, items, self.open_image)
        else:
            mine = items[self.rank :: self.world]
            part = encode_images(self._encode, mine, self.open_image) if mine else None
            parts: list[torch.Tensor | None] = [None] * self.world
            dist.all_gather_object(parts, part)
            width = next(p for p in parts if p is not None).shape[1]
            features = torch.empty(len(items), width)
            for rank, p in enumerate(parts):
                if p is not None:
                    features[rank :: self.world] = p
        if not split or self.rank == 0:
            save_features(path, features)
        return features

    def demonstrations(
        self, task: Task, pool: list[Item], items: list[Item], shots: int, seed: int
    ) -> list[list[Item]]:
        count = 2 if shots == 0 else shots  # 0-shot: two text-only demonstrations
        zero_at_random = shots == 0 and task.protocol.zero_shot_demos == "random"
        if self.cfg.demos == "random" or zero_at_random:
            return [random_demos(pool, it, count, seed) for it in items]
        rices = RICES(pool, self._features(pool, f"{task.name}/pool/{seed}", shared=True))
        return rices.demos(self._features(items, f"{task.name}/items"), count, items)

    # -- one trial -------------------------------------------------------------------------

    def _prompt(
        self, task: Task, demos: list[Item], item: Item, shots: int
    ) -> tuple[str, list[Path]]:
        generative = task.kind in ("caption", "vqa")
        separator = task.protocol.demo_separator if generative else ""
        context = "".join(task.prompt(d, with_answer=True) + separator for d in demos)
        images = [d.image for d in demos]
        if shots == 0:
            # OpenFlamingo's 0-shot classification keeps the demonstrations' images but not
            # their <image>: the query's text sees the first demonstration's image
            quirk = not generative and self.cfg.openflamingo_zero_shot_bug
            context, images = prompts.text_only(context), images[:1] if quirk else []
        query = [] if shots == 0 and images else [item.image]
        return context + task.prompt(item, with_answer=False), images + query

    @staticmethod
    def max_new_tokens(task: Task, tcfg: TaskConfig) -> int:
        """The task config's budget, else the protocol's for the task, else 20."""
        if tcfg.max_new_tokens is not None:
            return tcfg.max_new_tokens
        return task.protocol.max_new_tokens.get(task.name, 20)

    @torch.no_grad()
    def _generate(
        self, task: Task, tcfg: TaskConfig, batch: list[tuple[Item, str, list[Path]]]
    ) -> dict[str, str]:
        enc = self.processor(
            [p for _, p, _ in batch],
            images=[[self.open_image(x) for x in ims] for _, _, ims in batch],
            padding_side="left",
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        out = self.model.generate(
            **enc,
            max_new_tokens=self.max_new_tokens(task, tcfg),
            num_beams=self.cfg.num_beams,
            length_penalty=self.cfg.length_penalty,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new, skip_special_tokens=False)
        eos = self.processor.tokenizer.eos_token
        if eos:  # the LM's own end of text ends an answer as <|endofchunk|> does
            texts = [t.split(eos)[0] for t in texts]
        return {it.id: task.postprocess(t) for (it, _, _), t in zip(batch, texts, strict=True)}

    @torch.no_grad()
    def _rank_classes(self, task: Task, item: Item, prompt: str, images: list[Path]) -> list[float]:
        enc = self.processor([prompt], images=[[self.open_image(x) for x in images]])
        tok = self.processor.tokenizer
        candidates = [
            torch.tensor(
                tok(task.continuation(c), add_special_tokens=False)["input_ids"],
                device=self.device,
            )
            for c in task.class_names()
        ]
        scores = self.model.score(
            enc["input_ids"].to(self.device),
            candidates,
            attention_mask=enc["attention_mask"].to(self.device),
            pixel_values=enc["pixel_values"].to(self.device, self.dtype),
            media_slots=enc["media_slots"].to(self.device),
            aspect_ratio_ids=enc["aspect_ratio_ids"].to(self.device)
            if "aspect_ratio_ids" in enc
            else None,
        )
        if task.protocol.class_ranking == "mean":  # per token (OpenFlamingo)
            scores = scores / torch.tensor([len(c) for c in candidates], device=scores.device)
        return scores.tolist()

    def trial(
        self,
        task: Task,
        tcfg: TaskConfig,
        train: list[Item],
        test: list[Item],
        shots: int,
        seed: int,
    ) -> dict[str, Any]:
        pool = query_set(train, self.cfg.query_set_size, seed)
        mine = test[self.rank :: self.world]  # no padding: every item exactly once overall
        demos = self.demonstrations(task, pool, mine, shots, seed)
        work = [(it, *self._prompt(task, d, it, shots)) for it, d in zip(mine, demos, strict=True)]
        predictions: dict[str, Any] = {}
        bar = tqdm(
            total=len(work),
            desc=f"{task.name} {shots}-shot seed {seed}",
            disable=self.rank != 0,
            leave=False,
        )
        if task.kind in ("caption", "vqa"):
            for start in range(0, len(work), self.cfg.batch_size):
                predictions.update(
                    self._generate(task, tcfg, work[start : start + self.cfg.batch_size])
                )
                bar.update(len(work[start : start + self.cfg.batch_size]))
        else:
            for it, prompt, images in work:
                predictions[it.id] = self._rank_classes(task, it, prompt, images)
                bar.update(1)
        bar.close()
        if self.world > 1:
            gathered: list[dict[str, Any]] = [{} for _ in range(self.world)]
            dist.all_gather_object(gathered, predictions)
            predictions = {k: v for part in gathered for k, v in part.items()}
        assert len(predictions) == len(test), (len(predictions), len(test))
        return predictions


def blank_like(path: Path) -> Image.Image:
    """A mid-grey image of the same size (the blind baseline)."""
    with Image.open(path) as image:
        return Image.new("RGB", image.size, (128, 128, 128))


def summarize(trials: list[dict[str, float]]) -> dict[str, Any]:
    out = {}
    for metric in trials[0]:
        values = [t[metric] for t in trials]
        out[metric] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "trials": values,
        }
    return out


def markdown_table(results: dict[str, Any]) -> str:
    rows = [
        "| task | metric | shots | score (mean ± std over trials) |",
        "| --- | --- | --- | --- |",
    ]
    for task, by_shots in results.items():
        for shots, entry in by_shots.items():
            for metric, s in entry["scores"].items():
                rows.append(f"| {task} | {metric} | {shots} | {s['mean']:.2f} ± {s['std']:.2f} |")
    return "\n".join(rows)


Loaded = tuple[Task, TaskConfig, list[Item], list[Item]]
"""A task ready to run: the task, its config, its demonstration pool's split and its test
items."""


def load_tasks(cfg: EvalConfig, tasks: list[str] | None = None) -> dict[str, Loaded]:
    """Every task of ``cfg`` (or ``tasks`` of it), its items read and checked (``Task.items``):
    a bad file, id or image stops the run here, before anything is generated."""
    names = tasks or list(cfg.tasks)
    unknown = [n for n in names if n not in cfg.tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in the eval config (it has {sorted(cfg.tasks)})")
    loaded = {}
    for name in names:
        tcfg = cfg.tasks[name]
        task = get_task(name, tcfg.paths, get_protocol(cfg.protocol))
        train = task.items(tcfg.train_split)
        test = task.items(tcfg.eval_split)[: cfg.max_items]
        loaded[name] = (task, tcfg, train, test)
    return loaded


def evaluate(
    model: Flamingo,
    processor: FlamingoProcessor,
    cfg: EvalConfig,
    checkpoint: str,
    tasks: list[str] | None = None,
    shard: tuple[int, int] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every (task, shots, trial) of ``cfg``; returns {task: {shots: {scores, predictions}}}.

    Every task's files are read and checked first. ``on_trial(results)`` is called after each
    trial with the results so far (a late crash then loses nothing done). ``shard=(0, 1)``
    evaluates everything in this process."""
    loaded = load_tasks(cfg, tasks)
    evaluator = Evaluator(model, processor, cfg, checkpoint, shard)
    results: dict[str, Any] = {}
    for name, (task, tcfg, train, test) in loaded.items():
        results[name] = {}
        for shots in cfg.shots:
            trial_scores, trial_predictions = [], []
            for t in range(cfg.trials):
                predictions = evaluator.trial(task, tcfg, train, test, shots, cfg.seed + t)
                trial_scores.append(task.score(test, predictions))
                trial_predictions.append(predictions)
                results[name][str(shots)] = {
                    "scores": summarize(trial_scores),
                    "predictions": trial_predictions,
                }
                if on_trial is not None:
                    on_trial(results)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    cfg = EvalConfig.from_yaml(args.config, args.overrides)
    if args.shots:
        cfg = cfg.replace(shots=args.shots)
    unknown = [n for n in args.tasks or [] if n not in cfg.tasks]
    if unknown:  # before the model is loaded
        raise SystemExit(
            f"--tasks {unknown} are not in {args.config} (it has {sorted(cfg.tasks)}); a "
            "config override is written key=value"
        )
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = Flamingo.from_pretrained(args.checkpoint, dtype=torch_dtype(cfg.dtype), device=device)
    if args.checkpoint in OPENFLAMINGO_RELEASES:  # converted by name: its processor is the config's
        processor = FlamingoProcessor.from_config(model.cfg)
    else:
        processor = FlamingoProcessor.from_pretrained(args.checkpoint)
    start = time.time()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    path = Path(cfg.output_dir) / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def record(results: dict[str, Any], complete: bool) -> dict[str, Any]:
        value = {
            "config": to_dict(cfg),
            "checkpoint": str(args.checkpoint),
            "seconds": time.time() - start,
            "world_size": world_size,
            "complete": complete,
            "results": results,
        }
        if rank == 0:  # each finished trial on disk as it finishes
            write_json(path, value)
        return value

    results = evaluate(
        model,
        processor,
        cfg,
        str(args.checkpoint),
        args.tasks,
        on_trial=lambda partial: record(partial, complete=False),
    )
    if dist.is_initialized():
        dist.destroy_process_group()
    final = record(results, complete=True)
    if rank != 0:
        return None
    print(markdown_table(results))
    print(f"\nwrote {path}")
    return final


if __name__ == "__main__":
    cli.run(main)
