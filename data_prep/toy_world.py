"""The toy world: a synthetic visual domain for running the whole Flamingo recipe on a CPU.

Images of 1-3 coloured shapes on a plain, noisy background; short clips of one moving shape;
captions, questions with answers (colour, shape, count, position, motion direction) and
interleaved documents. Half of the documents are naming pages: each image is asked its name,
the answer its colour and a made-up word ("red dax"), with a new binding of words to colours
per page, so only the page's earlier examples tell the word (Frozen's fast binding,
Tsimpoukelli et al. 2021); the names benchmark asks the same of an episode's demonstrations. Everything is deterministic from a seed. Some colour-shape
combinations are held out of train and validation and appear only in test (compositional
generalisation). Each image-caption pair is followed by its twin, the same scene with one
shape changed, so that contrastive pretraining must learn shapes; pages write their captions
in one of two styles, the benchmark's references in the rarer one.

Writes, under ``--out``:

* ``shards/{pairs,interleaved,video}-{train,val}-NNNNN.tar`` in the data schema real corpora use;
* ``eval/captions.json`` (COCO Karpathy format) and ``eval/vqa_{train,test}_{questions,annotations}.json``
  (official VQA format) with their images in ``eval/images/``, so the real eval tasks read them
  unchanged; test items are flagged ``held_out`` when they contain a held-out combination;
* ``eval/names_{train,test}_{questions,annotations}.json``: the names benchmark, in the VQA
  format with an ``episode`` per question: each episode binds the six colours to six of
  :data:`NAMES`; its train items are the demonstrations, its test items the queries;
* ``text/corpus.txt``: the world's text, for pretraining the toy LM;
* ``world.json``: the vocabulary, splits and held-out combinations.

    python -m data_prep.toy_world --out runs/demo/world [--seed 0] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flamingo.data.schema import encode_interleaved, encode_pair, encode_video
from flamingo.data.writing import write_shards

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.1, "large": 0.17}
"""Half-width of a shape as a fraction of the image width."""
BACKGROUNDS = [(245, 245, 245), (210, 210, 200), (40, 40, 50), (200, 225, 240)]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
CAPTION_STYLES = {"list": 0.7, "sentence": 0.3}
"""How often a page writes its captions in each style. ``list``: "2 shapes: small red circle at
left, large blue square at right."; ``sentence``: "a small red circle on the left and a large
blue square on the right." (also the pairs' captions). The captioning benchmark's references use
the pages' rarer ``sentence`` style, as COCO's captions are one style among the web's: a model
given no demonstrations writes the common style, demonstrations show which is wanted."""
BENCHMARK_STYLE = "sentence"
IMAGE_SIZE = 64
NAMES = ("dax", "wug", "fep", "mip", "sot", "lat", "pim", "rel")
"""Made-up words for colours, each 2 or 3 tokens in the tiny tokenizer after a space, the
first one its own (no two share it), so its first token tells the whole name."""
NAME_QUESTION = "what is its name?"
NAMING_EVERY = 2
"""Every second document is a naming page."""
EPISODE_SUPPORT = 2
"""Each colour's demonstrations in a names episode at the least (more are drawn at random)."""


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    x: float
    """Centre, as a fraction of the width."""
    y: float

    @property
    def position(self) -> str:
        horizontal = "left" if self.x < 0.4 else "right" if self.x > 0.6 else "center"
        vertical = "top" if self.y < 0.4 else "bottom" if self.y > 0.6 else "middle"
        if horizontal == "center":
            return "center" if vertical == "middle" else vertical
        return horizontal

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind}"


def draw(
    shapes: list[Shape],
    background: tuple[int, int, int],
    rng: random.Random,
    size: int = IMAGE_SIZE,
) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        r = SIZES[s.size] * size
        cx, cy = s.x * size, s.y * size
        colour = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif s.kind == "square":
            pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif s.kind == "triangle":
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        elif s.kind == "diamond":
            pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
        else:  # cross
            w = r / 3
            pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
            pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 6, (size, size, 3))
    return Image.fromarray(
        np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    )


def named(colour: str, names: dict[str, str]) -> str:
    """A naming answer: the colour, which the image tells, and its name under ``names``, which
    only the page's or the episode's own examples tell ("red dax")."""
    return f"{colour} {names[colour]}"


def qa_text(question: str, answer: str) -> str:
    """A question and its answer in the few-shot VQA prompt's format (eval/prompts.py)."""
    return f"Question:{question} Short answer:{answer}"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


class World:
    """Samples scenes, clips and their text for one split."""

    def __init__(self, seed: int, split: str) -> None:
        self.rng = random.Random(f"{seed}/{split}")
        self.split = split
        combos = [(c, k) for c in COLOURS for k in SHAPES]
        self.combos = combos if split == "test" else [c for c in combos if c not in HELD_OUT]
        self.corpus: list[str] = []
        self._scene: tuple[list[Shape], tuple[int, int, int]] = ([], BACKGROUNDS[0])

    def shape(self, taken: list[Shape]) -> Shape | None:
        """A new shape that does not overlap ``taken`` (None when there is no room)."""
        colour, kind = self.rng.choice(self.combos)
        size = self.rng.choice(list(SIZES))
        for _ in range(50):
            x, y = self.rng.uniform(0.2, 0.8), self.rng.uniform(0.2, 0.8)
            gap = [SIZES[size] + SIZES[t.size] + 0.04 for t in taken]
            if all(max(abs(x - t.x), abs(y - t.y)) > g for t, g in zip(taken, gap, strict=True)):
                return Shape(colour, kind, size, x, y)
        return None

    def scene(self, held_out_only: bool = False) -> tuple[list[Shape], tuple[int, int, int]]:
        shapes: list[Shape] = []
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            new = self.shape(shapes)
            if new is not None:
                shapes.append(new)
        if held_out_only:
            colour, kind = self.rng.choice(HELD_OUT)
            s = shapes[0]
            shapes[0] = Shape(colour, kind, s.size, s.x, s.y)
        return shapes, self.rng.choice(BACKGROUNDS)

    def caption(self, shapes: list[Shape], style: str = "sentence") -> str:
        if style == "list":
            parts = [f"{s.size} {s.colour} {s.kind} at {s.position}" for s in shapes]
            count = f"{len(shapes)} shape{'s' if len(shapes) > 1 else ''}"
            return f"{count}: {', '.join(parts)}."
        parts = [
            f"{s.phrase()} {'in' if s.position == 'center' else 'on'} the {s.position}"
            for s in shapes
        ]
        return (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + "."

    def page_style(self) -> str:
        return self.rng.choices(list(CAPTION_STYLES), weights=list(CAPTION_STYLES.values()))[0]

    def twin(self, shapes: list[Shape]) -> list[Shape]:
        """The scene with one shape's kind changed (its colour, size and place kept): a hard
        negative for contrastive pretraining, which otherwise tells captions apart by colour,
        size and place alone and never learns shapes."""
        i = self.rng.randrange(len(shapes))
        s = shapes[i]
        kinds = [k for c, k in self.combos if c == s.colour and k != s.kind]
        return [*shapes[:i], replace(s, kind=self.rng.choice(kinds)), *shapes[i + 1 :]]

    def single(self, colour: str) -> tuple[list[Shape], tuple[int, int, int]]:
        """A scene of one shape of ``colour``, of any kind this split shows in that colour."""
        kind = self.rng.choice([k for c, k in self.combos if c == colour])
        shape = Shape(
            colour,
            kind,
            self.rng.choice(list(SIZES)),
            self.rng.uniform(0.25, 0.75),
            self.rng.uniform(0.25, 0.75),
        )
        return [shape], self.rng.choice(BACKGROUNDS)

    def binding(self, colours: list[str]) -> dict[str, str]:
        """A new name for each of ``colours``, no two alike."""
        return dict(zip(colours, self.rng.sample(NAMES, len(colours)), strict=True))

    def question(self, shapes: list[Shape]) -> tuple[str, str]:
        s = self.rng.choice(shapes)
        kind = self.rng.choice(("colour", "shape", "count", "position"))
        if kind == "colour":
            return f"what colour is the {s.kind}?", s.colour
        if kind == "shape":
            return f"what shape is {s.colour}?", s.kind
        if kind == "count":
            return "how many shapes are there?", str(len(shapes))
        return f"where is the {s.colour} {s.kind}?", s.position

    def pair_sample(self, i: int) -> dict:
        """Even ``i``: a new scene; odd ``i``: the previous scene's twin (``twin``), so the
        two sit next to each other in the shards."""
        if i % 2 == 0:
            self._scene = self.scene()
            shapes, background = self._scene
        else:
            shapes, background = self.twin(self._scene[0]), self._scene[1]
        caption = self.caption(shapes)
        question, answer = self.question(shapes)
        self.corpus += [caption, qa_text(question, answer)]
        return encode_pair(
            f"{self.split}p{i}", png(draw(shapes, background, self.rng)), "png", caption
        )

    def naming_sample(self, i: int) -> dict:
        """A page of 4-5 one-shape images of 2-3 colours, each asked its name under the page's
        own binding; the corpus gets the page's text and three more pages' worth without
        images, other bindings of the same colours (from them the LM learns to copy the word
        that followed the same colour earlier in its context)."""
        colours = self.rng.sample(list(COLOURS), self.rng.randint(2, 3))
        names = self.binding(colours)
        chunks: list = [self.rng.choice(["Names of things.", "What is each one called?"])]
        shown = [self.rng.choice(colours) for _ in range(self.rng.randint(4, 5))]
        for colour in shown:
            shapes, background = self.single(colour)
            chunks += [(png(draw(shapes, background, self.rng)), "png")]
            chunks.append(qa_text(NAME_QUESTION, named(colour, names)))
        self.corpus.append(" ".join(c for c in chunks if isinstance(c, str)))
        for _ in range(3):  # more bindings, in text only
            names = self.binding(colours)
            spelled = [self.rng.choice(colours) for _ in range(10)]
            self.corpus.append(" ".join(qa_text(NAME_QUESTION, named(c, names)) for c in spelled))
        return encode_interleaved(f"{self.split}d{i}", chunks)

    def document_sample(self, i: int) -> dict:
        if i % NAMING_EVERY == NAMING_EVERY - 1:
            return self.naming_sample(i)
        chunks: list = [
            self.rng.choice(["Some shapes.", "Look at these pictures.", "A page about shapes."])
        ]
        style = self.page_style()
        for _ in range(self.rng.randint(2, 4)):
            shapes, background = self.scene()
            question, answer = self.question(shapes)
            # a toy web page: images followed by captions (one style per page) or questions,
            # in the formats few-shot prompts use (the paper's M3W pages teach such patterns)
            caption = f"Output:{self.caption(shapes, style)}"
            text = self.rng.choice([caption, qa_text(question, answer)])
            chunks += [(png(draw(shapes, background, self.rng)), "png"), text]
            self.corpus.append(text)
        return encode_interleaved(f"{self.split}d{i}", chunks)

    def video_sample(self, i: int) -> dict:
        frames, caption, _ = self.clip()
        self.corpus.append(caption)
        return encode_video(f"{self.split}v{i}", [png(f) for f in frames], "png", caption)

    def clip(self, frames: int = 4) -> tuple[list[Image.Image], str, str]:
        shape = self.shape([])
        assert shape is not None  # an empty image always has room
        direction = self.rng.choice(list(DIRECTIONS))
        dx, dy = DIRECTIONS[direction]
        background = self.rng.choice(BACKGROUNDS)
        start_x, start_y = 0.5 - dx * 0.25, 0.5 - dy * 0.25
        images = []
        for f in range(frames):
            t = f / max(frames - 1, 1) * 0.5
            moved = Shape(shape.colour, shape.kind, "small", start_x + dx * t, start_y + dy * t)
            images.append(draw([moved], background, self.rng))
        return images, f"{shape.phrase()} moving {direction}.", direction


def vqa_records(
    image_id: int, question: str, answer: str, held: bool, **extra: object
) -> tuple[dict, dict]:
    """One question and its annotation (ten agreeing answers) in the official VQA format."""
    qid = image_id * 10
    record = {"image_id": image_id, "question": question, "question_id": qid, **extra}
    annotation = {
        "question_id": qid,
        "image_id": image_id,
        "question_type": question.split()[0],
        "answer_type": "other",
        "held_out": held,
        "multiple_choice_answer": answer,
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)
        ],
    }
    return record, annotation


def write_vqa(
    folder: Path, stem: str, subtype: str, questions: list[dict], annotations: list[dict]
) -> None:
    (folder / f"{stem}_questions.json").write_text(
        json.dumps({"questions": questions, "data_subtype": subtype, "task_type": "Open-Ended"})
    )
    (folder / f"{stem}_annotations.json").write_text(
        json.dumps({"annotations": annotations, "data_subtype": subtype})
    )


def names_benchmark(
    world: World, episodes: int, images_dir: Path, queries: int = 5, support: int = 16
) -> dict[str, tuple[list[dict], list[dict]]]:
    """The names benchmark: ``episodes`` bindings of every colour to a made-up name, each with
    ``support`` demonstrations (train; every colour :data:`EPISODE_SUPPORT` times at the
    least) and ``queries`` test items, all one-shape images asked their name. Images are
    written to ``images_dir`` (ids from 200000, train, and 300000, test)."""
    out: dict[str, tuple[list[dict], list[dict]]] = {"train": ([], []), "test": ([], [])}
    colours = list(COLOURS)
    for episode in range(episodes):
        names = world.binding(colours)
        least = colours * EPISODE_SUPPORT
        shown = {
            "train": least + [world.rng.choice(colours) for _ in range(support - len(least))],
            "test": [world.rng.choice(colours) for _ in range(queries)],
        }
        world.rng.shuffle(shown["train"])
        for split, first in (("train", 200000), ("test", 300000)):
            for j, colour in enumerate(shown[split]):
                image_id = first + episode * 100 + j
                shapes, background = world.single(colour)
                name = f"COCO_{split}2014_{image_id:012d}.jpg"
                draw(shapes, background, world.rng).save(images_dir / name, "PNG")
                record, annotation = vqa_records(
                    image_id, NAME_QUESTION, named(colour, names), False, episode=episode
                )
                out[split][0].append(record)
                out[split][1].append(annotation)
    return out


def write_world(out: Path, seed: int = 0, scale: float = 1.0, items_per_shard: int = 500) -> dict:
    """Write the whole world under ``out``; returns the summary written to world.json."""
    counts = {
        "pairs": int(6000 * scale),  # 3000 scenes, each followed by its twin
        "interleaved": int(3000 * scale),  # half of them naming pages
        "video": int(800 * scale),
    }
    shards = out / "shards"
    summary: dict = {"seed": seed, "held_out": [list(c) for c in HELD_OUT], "shards": {}}
    corpus: list[str] = []
    for split, fraction in (("train", 1.0), ("val", 0.1)):
        world = World(seed, split)

        encoders = {
            "pairs": world.pair_sample,
            "interleaved": world.document_sample,
            "video": world.video_sample,
        }
        for kind, encode in encoders.items():
            n = max(1, int(counts[kind] * fraction))
            write_shards(
                range(n),
                encode,
                shards,
                f"{kind}-{split}",
                items_per_shard,
                total=n,
                desc=f"{kind} {split}",
            )
            last = (n - 1) // items_per_shard
            summary["shards"][f"{kind}-{split}"] = str(
                shards / f"{kind}-{split}-{{00000..{last:05d}}}.tar"
            )
        corpus.extend(world.corpus)

    # evaluation files in the official formats
    images_dir = out / "eval" / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    karpathy, vqa = [], {"train": ([], []), "test": ([], [])}
    for split, n in (("train", int(400 * scale)), ("test", int(200 * scale))):
        world = World(seed + 1, split)
        for i in range(max(4, n)):
            shapes, background = world.scene(held_out_only=split == "test" and i % 2 == 1)
            held = any((s.colour, s.kind) in HELD_OUT for s in shapes)
            image_id = (0 if split == "train" else 100000) + i
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            draw(shapes, background, world.rng).save(
                images_dir / name, "PNG"
            )  # a PNG under a .jpg name decodes fine
            caption = world.caption(shapes, BENCHMARK_STYLE)
            karpathy.append(
                {
                    "filepath": "",
                    "filename": name,
                    "imgid": image_id,
                    "cocoid": image_id,
                    "split": split,
                    "held_out": held,
                    "sentences": [{"raw": caption, "tokens": caption.rstrip(".").split()}],
                }
            )
            record, annotation = vqa_records(image_id, *world.question(shapes), held)
            vqa[split][0].append(record)
            vqa[split][1].append(annotation)
    (out / "eval" / "captions.json").write_text(json.dumps({"images": karpathy, "dataset": "toy"}))
    names = names_benchmark(World(seed + 2, "names"), max(2, int(40 * scale)), images_dir)
    for task, splits in (("vqa", vqa), ("names", names)):
        for split, (questions, answer_records) in splits.items():
            write_vqa(out / "eval", f"{task}_{split}", f"{split}2014", questions, answer_records)
    (out / "text").mkdir(parents=True, exist_ok=True)
    (out / "text" / "corpus.txt").write_text("\n".join(corpus) + "\n")
    summary.update(
        colours=list(COLOURS), shapes=list(SHAPES), image_size=IMAGE_SIZE, corpus_lines=len(corpus)
    )
    (out / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.toy_world",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of samples")
    parser.add_argument("--items-per-shard", type=int, default=500)
    args = parser.parse_args(argv)
    summary = write_world(args.out, args.seed, args.scale, args.items_per_shard)
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k in ("shards", "held_out", "corpus_lines")},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
