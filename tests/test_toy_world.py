"""The toy world: deterministic, held-out combinations only in test, readable by the real
loaders and eval tasks."""

from __future__ import annotations

import io
import json
import random

import numpy as np
from PIL import Image

from data_prep.toy_world import (
    COLOURS,
    HELD_OUT,
    NAME_QUESTION,
    NAMES,
    SHAPES,
    Shape,
    draw,
    write_world,
)
from eval.tasks import get_task
from flamingo.data.config import DatasetConfig
from flamingo.data.pipeline import FlamingoLoader
from flamingo.data.shards import expand_shards, read_shard

KINDS = ("pairs", "interleaved", "video")


def samples(spec: str) -> list[tuple[str, bytes]]:
    return [
        (s["__key__"], s.get("txt", s.get("json", b"")))
        for url in expand_shards(spec)
        for s in read_shard(url)
    ]


def pages(spec: str):
    """(sample, chunks) of every interleaved document in the shards ``spec`` names."""
    for url in expand_shards(spec):
        for sample in read_shard(url):
            yield sample, json.loads(sample["json"])["chunks"]


def vqa_paths(eval_dir, stem: str) -> dict:
    """The eval config paths of the world's VQA-format files ``eval/<stem>_<split>_*.json``."""
    files = {
        f"{s}_{k}": eval_dir / f"{stem}_{s}_{k}.json"
        for s in ("train", "test")
        for k in ("questions", "annotations")
    }
    return files | {"train_images": eval_dir / "images", "test_images": eval_dir / "images"}


def test_world_is_deterministic_and_holds_out_combinations(tmp_path):
    a = write_world(tmp_path / "a", seed=3, scale=0.02)
    b = write_world(tmp_path / "b", seed=3, scale=0.02)
    for name, spec in a["shards"].items():
        assert samples(spec) == samples(b["shards"][name]), name
    train_text = " ".join(
        t.decode() for kind in KINDS for _, t in samples(a["shards"][f"{kind}-train"])
    )
    assert "Output:" in train_text and "moving" in train_text  # pages and clips are in it too
    for colour, kind in HELD_OUT:
        assert f"{colour} {kind}" not in train_text
    captions = json.loads((tmp_path / "a" / "eval" / "captions.json").read_text())["images"]
    test_held = [im for im in captions if im["split"] == "test" and im["held_out"]]
    assert test_held and all(not im["held_out"] for im in captions if im["split"] == "train")


def test_rendered_shapes_are_where_the_caption_says():
    shape = Shape("red", "circle", "large", 0.25, 0.5)
    assert shape.position == "left"
    image = np.asarray(draw([shape], (245, 245, 245), random.Random(0)), dtype=float)
    centre = image[30:34, 14:18].mean(axis=(0, 1))  # around (x, y) = (0.25, 0.5) * 64
    assert np.abs(centre - (220, 40, 40)).max() < 25  # red, up to the noise
    assert np.abs(image[:, 40:].mean(axis=(0, 1)) - 245).max() < 5  # the right side is background


def test_real_loaders_and_eval_tasks_read_the_world(tmp_path, processor):
    world = write_world(tmp_path, seed=0, scale=0.02)
    for kind in ("pairs", "interleaved", "video"):
        cfg = DatasetConfig(
            name=kind,
            kind=kind,
            shards=world["shards"][f"{kind}-train"],
            batch_size=4,
            seq_len=64,
            num_frames=4,
            resampled=False,
        )
        batch = next(iter(FlamingoLoader.from_processor(cfg, processor, num_workers=0)))
        assert batch["input_ids"].shape[0] == 4
    eval_dir = tmp_path / "eval"
    coco = get_task(
        "coco", {"karpathy_json": eval_dir / "captions.json", "image_root": eval_dir / "images"}
    )
    assert len(coco.load("train")) >= 4 and coco.load("test")[0].image.is_file()
    vqa = get_task("vqav2", vqa_paths(eval_dir, "vqa"))
    items = vqa.load("test")
    assert items and items[0].image.is_file() and len(items[0].answers) == 10
    assert (tmp_path / "text" / "corpus.txt").read_text().count("\n") > 50


def test_pairs_come_with_twins_that_change_one_shape_only(tmp_path):
    world = write_world(tmp_path, seed=1, scale=0.02)
    pairs = samples(world["shards"]["pairs-train"])
    assert len(pairs) >= 100 and len(pairs) % 2 == 0
    for (_, a), (_, b) in zip(pairs[::2], pairs[1::2], strict=True):
        words_a, words_b = a.decode().split(), b.decode().split()
        assert len(words_a) == len(words_b)
        changed = [(x, y) for x, y in zip(words_a, words_b, strict=True) if x != y]
        # one word differs, a shape kind for a different kind (possibly with its punctuation)
        assert len(changed) == 1, (a, b)
        (x, y), kinds = changed[0], set(SHAPES)
        assert x.rstrip(".,") in kinds and y.rstrip(".,") in kinds


def test_pages_keep_one_caption_style_and_the_benchmark_uses_the_sentence_style(tmp_path):
    world = write_world(tmp_path, seed=2, scale=0.05)
    styles_per_page = []
    for _, chunks in pages(world["shards"]["interleaved-train"]):
        captions = [c["text"] for c in chunks if c.get("text", "").startswith("Output:")]
        styles_per_page.append({":" in c.removeprefix("Output:") for c in captions})
    assert all(len(s) <= 1 for s in styles_per_page)  # never two styles on one page
    seen = set().union(*styles_per_page)
    assert seen == {True, False}  # both styles occur across pages
    captions = json.loads((tmp_path / "eval" / "captions.json").read_text())["images"]
    for image in captions:
        raw = image["sentences"][0]["raw"]
        assert raw.startswith("a ") and ":" not in raw and " the " in raw, raw


def shown_colour(png_bytes: bytes) -> str:
    """The colour of the one shape on an image: the pixels far from the corner's background,
    matched to the nearest of the world's colours."""
    image = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"), dtype=float)
    background = image[:3, :3].reshape(-1, 3).mean(axis=0)
    shape = image[np.abs(image - background).sum(axis=-1) > 90]
    centre = np.median(shape, axis=0)
    return min(COLOURS, key=lambda c: np.abs(centre - COLOURS[c]).sum())


def test_naming_pages_bind_names_to_colours_anew_on_each_page(tmp_path):
    world = write_world(tmp_path, seed=4, scale=0.1)
    bindings = []
    for sample, chunks in pages(world["shards"]["interleaved-train"]):
        texts = [c.get("text", "") for c in chunks]
        if not any(NAME_QUESTION in t for t in texts):
            continue
        images = [sample[c["image"]] for c in chunks if "image" in c]
        answers = [t.rsplit(":", 1)[1].split() for t in texts if NAME_QUESTION in t]
        assert len(images) == len(answers) >= 4
        binding: dict[str, str] = {}
        for image, (colour, name) in zip(images, answers, strict=True):
            assert colour == shown_colour(image) and name in NAMES  # "red dax"
            assert binding.setdefault(colour, name) == name  # one name a colour
        assert len(set(binding.values())) == len(binding)  # and one colour a name
        bindings.append(binding)
    assert len(bindings) == 150  # half of the 300 pages
    assert len({tuple(sorted(b.items())) for b in bindings}) > len(bindings) // 2
    corpus = (tmp_path / "text" / "corpus.txt").read_text().splitlines()
    texts = [line for line in corpus if line.startswith("Question:" + NAME_QUESTION)]
    # three more bindings a page in text only, for the train pages and the 15 val ones
    assert len(texts) == 3 * (len(bindings) + 15)


def test_names_benchmark_episodes_bind_every_colour_for_their_own_items(tmp_path):
    """An answer is the image's colour and its name ("red dax"); within an episode one colour
    has one name, in demonstrations and queries alike; every colour has demonstrations; other
    episodes bind differently."""
    write_world(tmp_path, seed=5, scale=0.2)
    eval_dir = tmp_path / "eval"
    task = get_task("names", vqa_paths(eval_dir, "names"))
    train, test = task.load("train"), task.load("test")
    episodes: dict[str, dict[str, str]] = {}
    support: dict[str, list[str]] = {}
    for item in train + test:
        assert len(set(item.answers)) == 1
        colour, name = item.answers[0].split()
        assert colour == shown_colour(item.image.read_bytes()) and name in NAMES
        binding = episodes.setdefault(item.group, {})
        assert binding.setdefault(colour, name) == name, item.id
        if item in train:
            support.setdefault(item.group, []).append(colour)
    assert len(episodes) == 8 and len(test) == 40
    for group, binding in episodes.items():
        assert len(set(binding.values())) == len(binding) == len(COLOURS), group
        assert min(support[group].count(c) for c in COLOURS) >= 2
    assert len({tuple(sorted(b.items())) for b in episodes.values()}) == len(episodes)
