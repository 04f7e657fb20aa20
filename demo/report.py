"""The demo's report: scores on seen and held-out colour-shape combinations, the results
table (markdown) and the k-shot plot, from the evaluation results ``eval.run`` returns.

The toy world flags each test item that shows a held-out combination (``held_out`` in its
``captions.json`` image record and VQA annotation); the split scores re-score each run's
saved predictions on those items and on the others with the task's own metric.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from eval.config import EvalConfig
from eval.tasks import get_task

SPLITS = ("all", "seen", "held-out")


def held_out_ids(task: str, paths: dict[str, Any]) -> set[str]:
    """Ids of the test items that show a held-out combination, from the world's eval files."""
    if task == "coco":
        images = json.loads(Path(paths["karpathy_json"]).read_text())["images"]
        return {str(im["cocoid"]) for im in images if im.get("held_out")}
    annotations = json.loads(Path(paths["test_annotations"]).read_text())["annotations"]
    return {str(a["question_id"]) for a in annotations if a.get("held_out")}


def split_scores(cfg: EvalConfig, results: dict[str, dict]) -> dict:
    """``{setting: {task: {shots: {split: (metric, mean over trials)}}}}``."""
    out: dict = {}
    for task_name, tcfg in cfg.tasks.items():
        task = get_task(task_name, tcfg.paths)
        items = {it.id: it for it in task.load(tcfg.eval_split)}
        held = held_out_ids(task_name, tcfg.paths)
        for setting, by_task in results.items():
            for shots, run in by_task[task_name].items():
                metric = next(iter(run["scores"]))
                cell = out.setdefault(setting, {}).setdefault(task_name, {})[shots] = {}
                cell["all"] = (metric, run["scores"][metric]["mean"])  # eval.run's own
                for split in ("seen", "held-out") if held else ():  # else "all" alone
                    values = []
                    for predictions in run["predictions"]:
                        chosen = [
                            items[i] for i in predictions if (i in held) == (split == "held-out")
                        ]
                        if chosen:
                            values.append(task.score(chosen, predictions)[metric])
                    if values:
                        cell[split] = (metric, sum(values) / len(values))
    return out


def results_table(scores: dict, shots: list[int]) -> str:
    head = "| setting | task | metric | split | " + " | ".join(f"{s}-shot" for s in shots) + " |"
    rows = [head, "|" + " --- |" * (4 + len(shots))]
    for setting, by_task in scores.items():
        for task, by_shots in by_task.items():
            for split in SPLITS:
                cells = [by_shots.get(str(s), {}).get(split) for s in shots]
                if not any(cells):
                    continue
                metric = next(c for c in cells if c)[0]
                values = [f"{c[1]:.1f}" if c else "-" for c in cells]
                rows.append(
                    f"| {setting} | {task} | {metric} | {split} | " + " | ".join(values) + " |"
                )
    return "\n".join(rows)


def kshot_plot(scores: dict, shots: list[int], path: Path) -> None:
    """One panel per task: score against the number of shots, a line per setting and split
    (seen and held-out; all, for a task with no held-out items)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(scores.values())))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for colour, (setting, by_task) in enumerate(scores.items()):
            has_held = any("held-out" in cell for cell in by_task[task].values())
            lines = (("seen", "-"), ("held-out", "--")) if has_held else (("all", "-"),)
            for split, style in lines:
                points = [
                    (s, by_task[task][str(s)][split][1])
                    for s in shots
                    if split in by_task[task].get(str(s), {})
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(
                        xs, ys, style, color=f"C{colour}", marker="o", label=f"{setting}, {split}"
                    )
        metric = next(iter(next(iter(scores.values()))[task].values()))["all"][0]
        ax.set(title=f"toy {task}", xlabel="shots", ylabel=metric, xticks=shots)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trainable_parameters(model_dir: Path) -> int:
    """Parameters in a train.py export's trained-weights file (what that stage trained)."""
    from safetensors import safe_open

    name = "qformer_stage1.safetensors"
    path = model_dir / name if (model_dir / name).is_file() else model_dir / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


COMPARED_TASKS = ("coco", "vqav2", "names")


def training_flops(stage_dir: Path) -> float:
    """A demo stage's training FLOPs (``train_flops.json``, counted on its first steps by
    ``bench.run_flops``); NaN for a stage trained before they were counted."""
    path = stage_dir / "train_flops.json"
    return float(json.loads(path.read_text())["total"]) if path.is_file() else float("nan")


def connectors_table(out: Path, scores: dict, shots: list[int], runs: dict) -> str:
    """The connectors side by side: each stage's trained parameters, the training FLOPs and
    seconds of all its stages, CIDEr and VQA and names accuracy (all test items) at each shot
    count its prompts fit, and its blind run's (blank images) beside them."""
    head = ["connector", "trained parameters", "training TFLOPs", "training s"]
    for task in COMPARED_TASKS:
        head += [f"{task} {s}-shot (blind)" for s in shots]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, (stages, seeing, blind) in runs.items():
        params = " + ".join(f"{trainable_parameters(out / s / 'model'):,}" for s in stages)
        seconds = 0.0
        for stage in stages:
            timing = out / stage / "train_seconds.txt"
            seconds += float(timing.read_text()) if timing.is_file() else float("nan")
        flops = sum(training_flops(out / stage) for stage in stages)
        cells = [name, params, f"{flops / 1e12:.3g}", f"{seconds:.0f}"]
        for task in COMPARED_TASKS:
            for s in shots:
                got = scores.get(seeing, {}).get(task, {}).get(str(s))
                base = scores.get(blind, {}).get(task, {}).get(str(s))
                cells.append(f"{got['all'][1]:.1f} ({base['all'][1]:.1f})" if got and base else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
