"""``make demo``: the toy world's whole Flamingo recipe, offline, on a CPU.

    python -m demo.run [--stages world clip lm flamingo eval] [--force] [--out runs/demo]
                       [--scale 1.0] [--set STAGE.KEY=VALUE ...]

Stages (each reused when its output exists, unless ``--force``):
  world     data_prep.toy_world -> OUT/world (shards, eval files, text corpus)
  clip      stage 1, demo.pretrain_clip (open_clip_train) with configs/demo/clip.yaml -> OUT/clip
  lm        stage 2, demo.pretrain_lm with configs/demo/lm.yaml -> OUT/lm
  flamingo  stage 3, train.py with configs/demo/train.yaml -> OUT/flamingo
  eval      eval.run with configs/demo/eval.yaml: random demos, RICES, the blind baseline
  ablation  (not run by default) two of the paper's ablations (Table 3), each stage 3 again
            with one change, evaluated with random demos beside the main model:
            round robin, one dataset per step, as many samples in all -> OUT/flamingo-round-robin;
            no tanh gating (xattn.gating=none) -> OUT/flamingo-no-gating
  llava     (not run by default; runs the stages before it as needed) the LLaVA connector on the
            same tower, LM, data and steps as stage 3: LLaVA's stage 1 (projector only) for half
            the steps -> OUT/llava-stage1, then its stage 2 (the LM unfrozen) for the other
            half -> OUT/llava; evaluated beside the main model at the shots it fits
  blip2     (not run by default; as llava) BLIP-2's Q-Former on the same tower, LM, data and
            steps: its stage 1 (the Q-Former alone on the pairs, no LM) for half the steps ->
            OUT/blip2-stage1, its stage 2 (into the frozen LM) for the other half -> OUT/blip2
  connectors  llava and blip2, then OUT/connectors.md: the three connectors side by side
            (trainable parameters, training time, CIDEr and VQA against each one's blind run)

The YAML files under configs/demo/ name paths under runs/demo/; the runner re-roots them under
OUT (absolute, so the checkpoints load from anywhere) and writes each stage's effective config
to OUT/configs/. ``--set`` overrides a stage's config, e.g. ``--set flamingo.steps=300
--set eval.max_items=20``. Writes OUT/results.md (scores on all, seen and held-out colour-shape
combinations, the k-shot plot OUT/kshot.png, and the connectors' table once they are trained)
and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "demo"
DEFAULT_OUT = "runs/demo"
STAGES = ("world", "clip", "lm", "flamingo", "ablation", "llava", "blip2", "eval")
"""In the order they run (``connectors`` selects llava, blip2 and the comparison)."""
DEFAULT_STAGES = tuple(s for s in STAGES if s not in ("ablation", "llava", "blip2"))
KINDS = ("interleaved", "pairs", "video")
LLAVA_MODEL = {"connector": "llava", "vision": {"feature_layer": -2, "ln_post_on_tokens": False}}
"""The demo's model config changed to LLaVA-1.5's connector: a 2-layer GELU projector over the
second-to-last block's patch tokens."""
LLAVA_KINDS = ("interleaved", "pairs")
"""The LLaVA connector takes single images: no video."""
LLAVA_SHOTS = [0, 4]
"""The shots a LLaVA prompt fits in the toy LM's 512 positions: 64 tokens per image, so 8
demonstrations and the query hold 576 image tokens alone."""
LLAVA_TRAIN = ["optim.weight_decay=0.0", "datasets.1.packed_len=400"]
"""LLaVA's optimiser has no weight decay; a pair is 80 tokens with its image's 64, so rows of
400 tokens hold five, as the main run's 96-token rows do."""


BLIP2_MODEL = {
    "connector": "qformer",
    "vision": {"cls_token": True},
    "qformer": {
        "queries": 16,
        "layers": 2,
        "width": 64,
        "heads": 4,
        "intermediate": 128,
        "contrastive_width": 32,
    },
}
"""BLIP-2's connector at the toy world's size: 16 queries (the resampler's 16 latents), two
BERT-style layers of the tower's width, reading every tower token, CLS included."""
BLIP2_STAGE1 = [
    "objective=qformer_stage1",
    "datasets.0.packing=none",
    "datasets.0.packed_len=null",
    "datasets.0.batch_size=16",
    "optim.weight_decay=0.05",
]
"""Stage 1 on the pairs alone, unpacked (each row one pair: the contrastive and matching losses
take the batch's other pairs as negatives), 16 pairs a batch as the main run's packed rows hold;
BLIP-2's weight decay."""
BLIP2_STAGE2 = ["optim.weight_decay=0.05", "datasets.1.packed_len=170"]
"""A pair is 33 tokens with its image's 16 queries: rows of 170 tokens hold five."""
CONNECTOR_RUNS = {  # the comparison's rows: (trained stages, full model, blind setting)
    "Flamingo": (("flamingo",), "random demos", "blind (blank images)"),
    "LLaVA": (("llava-stage1", "llava"), "LLaVA connector, random demos", "LLaVA connector, blind"),
    "BLIP-2": (
        ("blip2-stage1", "blip2"),
        "BLIP-2 connector, random demos",
        "BLIP-2 connector, blind",
    ),
}


def exported(output_dir: Path) -> bool:
    """Whether a train.py run left its export (a model, or BLIP-2's stage 1)."""
    model = output_dir / "model"
    return (model / "config.json").is_file() or (model / "qformer_stage1.json").is_file()


def rebase(value: Any, out: Path) -> Any:
    """Every string under ``runs/demo/`` in a loaded YAML tree, moved under ``out``."""
    if isinstance(value, dict):
        return {k: rebase(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [rebase(v, out) for v in value]
    if isinstance(value, str) and value.startswith(DEFAULT_OUT + "/"):
        return str(out / value[len(DEFAULT_OUT) + 1 :])
    return value


def stage_config(name: str, out: Path, filename: str | None = None, **replace: Any) -> Path:
    """configs/demo/NAME.yaml re-rooted under ``out`` (plus ``replace``), saved in OUT/configs
    (as ``filename``, default NAME.yaml)."""
    tree = rebase(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), out)
    tree.update(replace)
    path = out / "configs" / (filename or f"{name}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


class Demo:
    """The stages; ``force`` names the stages to redo even when done."""

    def __init__(self, out: Path, force: set[str], scale: float, sets: dict[str, list[str]]):
        self.out, self.force, self.scale, self.sets = out, force, scale, sets
        self.world: dict = {}

    def run_world(self) -> None:
        from data_prep.toy_world import write_world

        summary = self.out / "world" / "world.json"
        if summary.is_file() and "world" not in self.force:
            self.world = json.loads(summary.read_text())
            return
        shutil.rmtree(self.out / "world", ignore_errors=True)
        self.world = write_world(self.out / "world", seed=0, scale=self.scale)

    def run_clip(self) -> None:
        from demo.pretrain_clip import ClipPretrainConfig, pretrain
        from flamingo.typed_config import load_config

        shards = self.world["shards"]
        path = stage_config(
            "clip", self.out, shards=shards["pairs-train"], val_shards=shards["pairs-val"]
        )
        cfg = load_config(ClipPretrainConfig, path, self.sets["clip"])
        if "clip" in self.force or not Path(cfg.output).is_file():
            print(json.dumps(pretrain(cfg)))

    def run_lm(self) -> None:
        from demo.pretrain_lm import LMPretrainConfig, pretrain
        from flamingo.typed_config import load_config

        cfg = load_config(LMPretrainConfig, stage_config("lm", self.out), self.sets["lm"])
        if "lm" in self.force or not (Path(cfg.output_dir) / "config.json").is_file():
            print(json.dumps(pretrain(cfg)))

    def train(
        self,
        stage: str,
        output_dir: Path,
        extra: list[str],
        model_extra: dict | None = None,
        kinds: tuple[str, ...] = KINDS,
        init_from: Path | None = None,
    ) -> None:
        """Stage 3's training (configs/demo/train.yaml) into ``output_dir``, with ``extra``
        overrides, the model config changed by ``model_extra`` (a section's keys, or a
        top-level value), on the datasets of ``kinds`` only; or, with ``init_from``, going on
        from that checkpoint. Its FLOPs, counted on its first steps (``bench.run_flops``), go
        to ``train_flops.json``."""
        import train
        from bench.run_flops import run_flops
        from flamingo.training.config import TrainConfig

        if stage in self.force:
            shutil.rmtree(output_dir, ignore_errors=True)
        if not exported(output_dir):
            start = time.time()
            model = stage_config("model", self.out)
            if model_extra:  # a changed model config beside the main one
                tree = yaml.safe_load(model.read_text())
                for section, values in model_extra.items():
                    changed = isinstance(values, dict)
                    tree[section] = {**tree.get(section, {}), **values} if changed else values
                model = model.with_name(f"model-{output_dir.name}.yaml")
                model.write_text(yaml.safe_dump(tree, sort_keys=False))
            datasets = rebase(yaml.safe_load((CONFIGS / "train.yaml").read_text()), self.out)
            datasets = datasets["datasets"]
            kept = [d for d in datasets if d["kind"] in kinds]
            fields = {"model": str(model), "datasets": kept}
            if init_from is not None:
                fields.update(model=None, init_from=str(init_from))
            filename = None if stage == "flamingo" else f"train-{output_dir.name}.yaml"
            path = stage_config("train", self.out, filename, **fields)
            shards = [
                f"datasets.{i}.shards={self.world['shards'][kind + '-train']}"
                for i, kind in enumerate(d["kind"] for d in kept)
            ]
            overrides = [*shards, f"output_dir={output_dir}", *self.sets["flamingo"], *extra]
            train.main(["--config", str(path), *overrides])
            (output_dir / "train_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
            flops = run_flops(TrainConfig.from_yaml(path, overrides))  # its first 3 steps
            (output_dir / "train_flops.json").write_text(json.dumps(flops) + "\n")

    def run_flamingo(self) -> None:
        self.train("flamingo", self.out / "flamingo", [])

    def run_ablation(self) -> None:
        """Round robin over the datasets, one per step, with as many samples in all (the same
        compute as the main run, spread over len(datasets) times the steps); and the gated
        blocks without their tanh gates."""
        from flamingo.training.config import TrainConfig

        cfg = TrainConfig.from_yaml(CONFIGS / "train.yaml", self.sets["flamingo"])
        n = len(cfg.datasets)
        extra = [
            "mixing=round_robin",
            f"steps={cfg.steps * n}",
            f"optim.warmup_steps={cfg.optim.warmup_steps * n}",
            f"checkpoint_every={cfg.checkpoint_every * n}",
            f"log_every={cfg.log_every * n}",
        ]
        self.train("ablation", self.out / "flamingo-round-robin", extra)
        self.train("ablation", self.out / "flamingo-no-gating", [], {"xattn": {"gating": "none"}})

    def run_llava(self) -> None:
        """LLaVA's two stages on stage 3's budget: the projector alone for half the steps,
        then the LM unfrozen with it for the other half (the toy world has no conversations:
        stage 2 goes on with the same data)."""
        from flamingo.training.config import TrainConfig

        cfg = TrainConfig.from_yaml(CONFIGS / "train.yaml", self.sets["flamingo"])
        half = cfg.steps // 2
        steps = [f"steps={half}", f"checkpoint_every={half}"]
        first = self.out / "llava-stage1"
        self.train("llava", first, [*LLAVA_TRAIN, *steps], LLAVA_MODEL, LLAVA_KINDS)
        second = ["model_overrides=[lm.trainable=full]", f"optim.warmup_steps={half // 10}"]
        self.train(
            "llava",
            self.out / "llava",
            [*LLAVA_TRAIN, *steps, *second],
            kinds=LLAVA_KINDS,
            init_from=first / "model",
        )

    def run_blip2(self) -> None:
        """BLIP-2's two stages on stage 3's budget: the Q-Former alone on the pairs (its three
        losses, no LM) for half the steps, then into the frozen LM, started from stage 1's
        Q-Former, for the other half on the same data as LLaVA's."""
        from flamingo.training.config import TrainConfig

        cfg = TrainConfig.from_yaml(CONFIGS / "train.yaml", self.sets["flamingo"])
        half = cfg.steps // 2
        steps = [f"steps={half}", f"checkpoint_every={half}"]
        first = self.out / "blip2-stage1"
        self.train("blip2", first, [*BLIP2_STAGE1, *steps], BLIP2_MODEL, ("pairs",))
        second = [*BLIP2_STAGE2, *steps, f"init_qformer={first / 'model'}"]
        self.train("blip2", self.out / "blip2", second, BLIP2_MODEL, LLAVA_KINDS)

    def run_eval(self, ablations: dict[str, Path]) -> str:
        from demo.report import connectors_table, kshot_plot, results_table, split_scores
        from eval.config import EvalConfig
        from eval.run import main as eval_main

        path = stage_config("eval", self.out)

        model = self.out / "flamingo" / "model"
        variants = {
            "random demos": (model, []),
            "RICES demos": (model, ["demos=rices"]),
            "blind (blank images)": (model, ["blank_images=true"]),
        }
        variants.update({name: (ckpt, []) for name, ckpt in ablations.items()})
        llava = self.out / "llava" / "model"
        if (llava / "config.json").is_file():
            shots = f"shots=[{','.join(map(str, LLAVA_SHOTS))}]"
            first = self.out / "llava-stage1" / "model"
            variants["LLaVA connector, stage 1 only, random demos"] = (first, [shots])
            variants["LLaVA connector, random demos"] = (llava, [shots])
            variants["LLaVA connector, blind"] = (llava, [shots, "blank_images=true"])
        blip2 = self.out / "blip2" / "model"
        if (blip2 / "config.json").is_file():
            variants["BLIP-2 connector, random demos"] = (blip2, [])
            variants["BLIP-2 connector, blind"] = (blip2, ["blank_images=true"])
        results = {
            name: eval_main(
                ["--config", str(path), "--checkpoint", str(ckpt), *self.sets["eval"], *extra]
            )["results"]
            for name, (ckpt, extra) in variants.items()
        }
        cfg = EvalConfig.from_yaml(path, self.sets["eval"])
        scores = split_scores(cfg, results)
        (self.out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        kshot_plot(scores, cfg.shots, self.out / "kshot.png")
        table = results_table(scores, cfg.shots)
        page = ["# The toy world's results", "", table, "", "![score against shots](kshot.png)"]
        if all(exported(self.out / run) for runs, _, _ in CONNECTOR_RUNS.values() for run in runs):
            comparison = connectors_table(self.out, scores, cfg.shots, CONNECTOR_RUNS)
            (self.out / "connectors.md").write_text(comparison + "\n")
            table += "\n\n" + comparison
            page += ["", "## The three connectors", "", comparison]
        (self.out / "results.md").write_text("\n".join(page) + "\n")
        return table


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {s: [] for s in ("clip", "lm", "flamingo", "eval")}
    for item in items:
        stage, _, override = item.partition(".")
        if stage not in sets or "=" not in override:
            raise SystemExit(
                f"--set {item!r}: expected STAGE.KEY=VALUE with STAGE one of {sorted(sets)}"
            )
        sets[stage].append(override)
    return sets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m demo.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stages", nargs="+", choices=[*STAGES, "connectors"], default=list(DEFAULT_STAGES)
    )
    parser.add_argument("--force", action="store_true", help="redo the selected stages")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output directory")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the toy world")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE"
    )
    args = parser.parse_args(argv)
    sets = parse_sets(args.sets)
    out = args.out.resolve()
    selected = set(args.stages)
    if "ablation" in selected:
        selected.add("eval")  # an ablation is only worth its scores
    if "connectors" in selected:
        selected |= {"llava", "blip2"}
    if selected & {"llava", "blip2"}:  # the same tower and LM, scored beside the main model
        selected |= {"clip", "lm", "flamingo", "eval"}
    demo = Demo(out, selected if args.force else set(), args.scale, sets)
    ablations = {
        "round-robin ablation": out / "flamingo-round-robin" / "model",
        "no-gating ablation": out / "flamingo-no-gating" / "model",
    }
    times: dict[str, float] = {}
    start = time.time()
    for stage in STAGES:
        if stage not in selected and stage != "world":  # later stages read the world's shards
            continue
        t = time.time()
        if stage == "world":
            demo.run_world()
        elif stage == "clip":
            demo.run_clip()
        elif stage == "lm":
            demo.run_lm()
        elif stage == "flamingo":
            demo.run_flamingo()
        elif stage == "ablation":
            demo.run_ablation()
        elif stage == "llava":
            demo.run_llava()
        elif stage == "blip2":
            demo.run_blip2()
        else:  # an ablation's scores are reported whenever it has been trained
            trained = {k: v for k, v in ablations.items() if (v / "config.json").is_file()}
            print("\n" + demo.run_eval(trained))
        times[stage] = time.time() - t
        print(f"[demo] {stage} done in {times[stage]:.0f}s")
    print(
        f"[demo] total {time.time() - start:.0f}s: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
        + f"; results in {out}/results.md, plots in {out}"
    )


if __name__ == "__main__":
    from flamingo import cli

    cli.run(main)
