"""``make demo``: the toy world's whole Flamingo recipe, offline, on a CPU.

    python -m demo.run [--stages world clip lm flamingo eval] [--force] [--scale 1.0]

Stages (each reused when its output exists, unless ``--force``):
  world     data_prep.toy_world -> runs/demo/world (shards, eval files, text corpus)
  clip      stage 1, demo.pretrain_clip with configs/demo/clip.yaml -> runs/demo/clip
  lm        stage 2, demo.pretrain_lm with configs/demo/lm.yaml -> runs/demo/lm
  flamingo  stage 3, train.py with configs/demo/train.yaml -> runs/demo/flamingo
  eval      eval.run with configs/demo/eval.yaml: random demos, RICES, and the blind baseline
Writes runs/demo/results.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "demo"
OUT = Path("runs/demo")
STAGES = ("world", "clip", "lm", "flamingo", "eval")


def world_stage(force: bool, scale: float) -> dict:
    from data_prep.toy_world import write_world

    summary_path = OUT / "world" / "world.json"
    if summary_path.is_file() and not force:
        return json.loads(summary_path.read_text())
    if force:
        shutil.rmtree(OUT / "world", ignore_errors=True)
    return write_world(OUT / "world", seed=0, scale=scale)


def clip_stage(world: dict, force: bool) -> None:
    from demo.pretrain_clip import ClipPretrainConfig, pretrain
    from flamingo.config import load_config

    cfg = load_config(
        ClipPretrainConfig, CONFIGS / "clip.yaml", [f"shards={world['shards']['pairs-train']}"]
    )
    if not Path(cfg.output).is_file() or force:
        print(json.dumps(pretrain(cfg)))


def lm_stage(force: bool) -> None:
    from demo.pretrain_lm import LMPretrainConfig, pretrain
    from flamingo.config import load_config

    cfg = load_config(LMPretrainConfig, CONFIGS / "lm.yaml")
    if not (Path(cfg.output_dir) / "config.json").is_file() or force:
        print(json.dumps(pretrain(cfg)))


def flamingo_stage(world: dict, force: bool) -> Path:
    import train

    out = OUT / "flamingo"
    if force:
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "model" / "config.json").is_file():
        shards = [
            f"datasets.{i}.shards={world['shards'][f'{kind}-train']}"
            for i, kind in enumerate(("interleaved", "pairs", "video"))
        ]
        train.main(["--config", str(CONFIGS / "train.yaml"), *shards])
    return out / "model"


def eval_stage(checkpoint: Path) -> dict[str, dict]:
    from eval.run import main as eval_main

    variants = {
        "random demos": [],
        "RICES demos": ["demos=rices"],
        "blind (blank images)": ["blank_images=true"],
    }
    return {
        name: eval_main(
            ["--config", str(CONFIGS / "eval.yaml"), "--checkpoint", str(checkpoint), *extra]
        )["results"]
        for name, extra in variants.items()
    }


def results_table(results: dict[str, dict]) -> str:
    rows = [
        "| setting | task | metric | " + " | ".join(f"{s}-shot" for s in ("0", "4", "8")) + " |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setting, by_task in results.items():
        for task, by_shots in by_task.items():
            metric = next(iter(next(iter(by_shots.values()))["scores"]))
            cells = [
                f"{by_shots[s]['scores'][metric]['mean']:.1f}" if s in by_shots else "-"
                for s in ("0", "4", "8")
            ]
            rows.append(f"| {setting} | {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m demo.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--force", action="store_true", help="redo the selected stages")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the toy world")
    args = parser.parse_args(argv)
    times = {}
    start = time.time()
    world = None
    for stage in STAGES:
        if stage not in args.stages and stage != "world":
            continue
        t = time.time()
        if stage == "world":
            world = world_stage(args.force and "world" in args.stages, args.scale)
        elif stage == "clip":
            clip_stage(world, args.force)
        elif stage == "lm":
            lm_stage(args.force)
        elif stage == "flamingo":
            flamingo_stage(world, args.force)
        else:
            results = eval_stage(OUT / "flamingo" / "model")
            table = results_table(results)
            (OUT / "results.md").write_text(table + "\n")
            print("\n" + table)
        times[stage] = time.time() - t
        print(f"[demo] {stage} done in {times[stage]:.0f}s")
    print(
        f"[demo] total {time.time() - start:.0f}s: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    )


if __name__ == "__main__":
    main()
