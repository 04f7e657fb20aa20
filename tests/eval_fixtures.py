"""Tiny benchmark files in each official format, with tiny images, for eval tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
}
NAMES = list(COLOURS)


def png(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), COLOURS[colour]).save(path)


def write_all(root: Path) -> dict[str, dict]:
    """Write every benchmark's fixture files under ``root``; returns the eval config's tasks."""
    tasks: dict[str, dict] = {}

    # Karpathy COCO / Flickr30K
    for name, with_filepath in (("coco", True), ("flickr30k", False)):
        images = []
        for i in range(8):
            colour = NAMES[i % 4]
            split = "test" if i >= 5 else ("restval" if i == 4 else "train")
            filepath = "val2014" if with_filepath else ""
            filename = f"COCO_val2014_{i:012d}.jpg" if with_filepath else f"{1000 + i}.jpg"
            png(root / name / "images" / filepath / filename, colour)
            entry = {
                "filename": filename,
                "imgid": i,
                "split": split,
                "cocoid": 500 + i,
                "sentences": [
                    {"raw": f"a {colour} square.", "tokens": ["a", colour, "square"]},
                    {"raw": f"A {colour} image", "tokens": []},
                ],
            }
            if with_filepath:
                entry["filepath"] = filepath
            images.append(entry)
        (root / name / "dataset.json").write_text(json.dumps({"images": images, "dataset": name}))
        tasks[name] = {
            "paths": {
                "karpathy_json": str(root / name / "dataset.json"),
                "image_root": str(root / name / "images"),
            },
            "eval_split": "test",
            "max_new_tokens": 6,
        }

    # VQAv2 / OK-VQA official question + annotation files
    for name in ("vqav2", "okvqa", "names"):  # names: VQA files whose questions carry episodes
        paths = {}
        for split, subtype, ids in (
            ("train", "train2014", range(6)),
            ("val", "val2014", range(6, 9)),
        ):
            questions, annotations = [], []
            for i in ids:
                colour = NAMES[i % 4]
                png(root / name / subtype / f"COCO_{subtype}_{i:012d}.jpg", colour)
                question = {"image_id": i, "question": "What colour is it?", "question_id": 10 * i}
                if name == "names":
                    question["episode"] = i % 2
                questions.append(question)
                answers = [
                    {"answer": colour, "answer_confidence": "yes", "answer_id": k + 1}
                    for k in range(10)
                ]
                annotations.append(
                    {
                        "question_id": 10 * i,
                        "image_id": i,
                        "answers": answers,
                        "answer_type": "other",
                        "question_type": "what color",
                        "multiple_choice_answer": colour,
                    }
                )
            (root / name / f"{split}_q.json").write_text(
                json.dumps(
                    {"questions": questions, "data_subtype": subtype, "task_type": "Open-Ended"}
                )
            )
            (root / name / f"{split}_a.json").write_text(
                json.dumps({"annotations": annotations, "data_subtype": subtype})
            )
            paths.update(
                {
                    f"{split}_questions": str(root / name / f"{split}_q.json"),
                    f"{split}_annotations": str(root / name / f"{split}_a.json"),
                    f"{split}_images": str(root / name / subtype),
                }
            )
        tasks[name] = {"paths": paths, "eval_split": "val", "max_new_tokens": 3}

    # TextVQA
    paths = {}
    for split, ids in (("train", range(6)), ("val", range(6, 9))):
        data = []
        for i in ids:
            png(root / "textvqa" / split / f"img{i}.jpg", NAMES[i % 4])
            data.append(
                {
                    "question_id": i,
                    "question": "what does it say?",
                    "image_id": f"img{i}",
                    "answers": [NAMES[i % 4]] * 10,
                    "image_classes": [],
                }
            )
        (root / "textvqa" / f"TextVQA_0.5.1_{split}.json").write_text(
            json.dumps({"dataset_name": "textvqa", "dataset_type": split, "data": data})
        )
        paths.update(
            {
                f"{split}_json": str(root / "textvqa" / f"TextVQA_0.5.1_{split}.json"),
                f"{split}_images": str(root / "textvqa" / split),
            }
        )
    tasks["textvqa"] = {"paths": paths, "eval_split": "val", "max_new_tokens": 3}

    # VizWiz
    paths = {}
    for split, ids in (("train", range(6)), ("val", range(6, 9))):
        data = []
        for i in ids:
            name = f"VizWiz_{split}_{i:08d}.jpg"
            png(root / "vizwiz" / split / name, NAMES[i % 4])
            data.append(
                {
                    "image": name,
                    "question": "What colour?",
                    "answers": [{"answer": NAMES[i % 4], "answer_confidence": "yes"}] * 10,
                    "answer_type": "other",
                    "answerable": 1,
                }
            )
        (root / "vizwiz" / f"{split}.json").write_text(json.dumps(data))
        paths.update(
            {
                f"{split}_json": str(root / "vizwiz" / f"{split}.json"),
                f"{split}_images": str(root / "vizwiz" / split),
            }
        )
    tasks["vizwiz"] = {"paths": paths, "eval_split": "val", "max_new_tokens": 3}

    # HatefulMemes
    lines = {"train": [], "dev_seen": []}
    for i in range(10):
        split = "dev_seen" if i >= 6 else "train"
        png(root / "hm" / "img" / f"{i:05d}.png", NAMES[i % 4])
        lines[split].append(
            json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": i % 2, "text": f"meme {i}"})
        )
    paths = {"image_root": str(root / "hm")}
    for split, rows in lines.items():
        (root / "hm" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        paths[f"{split}_jsonl"] = str(root / "hm" / f"{split}.jsonl")
    tasks["hateful_memes"] = {"paths": paths, "eval_split": "dev_seen"}

    # ImageNet-style folders
    names = {f"n0000000{k}": NAMES[k] for k in range(4)}
    for split, per_class in (("train", 2), ("val", 1)):
        for wnid, colour in names.items():
            for j in range(per_class):
                png(root / "imagenet" / split / wnid / f"{wnid}_{j}.JPEG", colour)
    (root / "imagenet" / "classes.json").write_text(json.dumps(names))
    tasks["imagenet"] = {
        "paths": {
            "image_root": str(root / "imagenet"),
            "class_names": str(root / "imagenet" / "classes.json"),
        },
        "eval_split": "val",
    }
    return tasks


def small_eval_config(root: Path) -> Path:
    """An eval config over every benchmark's fixture (:func:`write_all`) at 0 and 2 shots, one
    trial, small batches: ``root/eval.yaml``."""
    import yaml

    cfg = {
        "tasks": write_all(root / "data"),
        "shots": [0, 2],
        "trials": 1,
        "num_beams": 2,
        "batch_size": 2,
        "query_set_size": 4,
        "output_dir": str(root / "out"),
        "cache_dir": str(root / "cache"),
    }
    path = root / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_every_task_scored(results: dict, benchmarks: set[str]) -> None:
    """Every benchmark of :func:`write_all` ran: each metric a percentage, each prediction
    non-empty (the checkpoint-format tests' check of an end-to-end ``eval.run``)."""
    assert set(results) == benchmarks
    for task, by_shots in results.items():
        for entry in by_shots.values():
            for metric in entry["scores"].values():
                assert 0 <= metric["mean"] <= 100 + 1e-6, task
            assert all(len(p) > 0 for p in entry["predictions"]), task
