"""Evaluation protocols against their reference code: OpenFlamingo's evaluation functions, run
from the installed package with a stand-in for its model only, and the official VQA
evaluation, whose per-question values on a fixture were computed with its code."""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from eval.config import EvalConfig
from eval.metrics import vqa_accuracy
from eval.protocols import PROTOCOLS, get_protocol
from eval.run import Evaluator
from eval.tasks import get_task
from tests.helpers import free_port

# -- the VQA accuracy variants --------------------------------------------------------------------

TWO = ["two"] * 10
CASES = [  # (prediction, the ten answers): where the variants part ways, and where they agree
    ("Yes", ["yes"] * 10),
    ("yes", ["yes"] * 10),
    ("2", TWO),
    ("two", TWO),
    ("Dog.", ["dog"] * 10),
    ("the dog", ["dog"] * 6 + ["a dog"] * 4),
    ("red, white and blue", ["red white and blue"] * 5 + ["red, white, blue"] * 3 + ["red"] * 2),
    ("red", ["red white and blue"] * 5 + ["red, white, blue"] * 3 + ["red"] * 2),
    ("blue", ["blue", "blue"] + ["green"] * 8),
    ("isnt", ["isn't"] * 4 + ["no"] * 6),
    ("3,000", ["3000"] * 5 + ["3,000"] * 5),
    ("1.5", ["1.5"] * 7 + ["1 5"] * 3),
    (" none\n", ["0"] * 4 + ["none"] * 6),
    ("a cat", ["cat"] * 10),
    ("cat", ["a cat"] * 10),
    ("Left", ["left"] * 9 + ["Left"]),
    ("on the table.", ["table"] * 3 + ["on table"] * 7),
    ("5", ["five"] * 3 + ["5"] * 7),
    ("mice", ["mouse"] * 6 + ["mice"] * 4),
    ("", ["yes"] * 10),
]
# Per-question accuracies (VQAEval.evalQA) of GT-Vision-Lab/VQA's vqaEval.py on CASES, as it
# is today (a013f00, the 2021 fix) and before that commit; computed with that code (fetched
# to compute these, not kept here).
OFFICIAL = [0, 100, 0, 100, 0, 100, 100, 60, 60, 100, 100, 100, 100, 0, 0, 100, 100, 100, 100, 0]
OFFICIAL_2016 = [100, 100, 0, 0, 100, 100, 100, 60, 60, 100, 100, 100, 100, 100, 0, 100, 100]
OFFICIAL_2016 += [100, 100, 0]


@pytest.mark.parametrize(
    ("variant", "expected"), [("official", OFFICIAL), ("official_2016", OFFICIAL_2016)]
)
def test_vqa_accuracy_equals_the_official_code(variant, expected):
    got = [round(100 * vqa_accuracy(p, a, variant), 2) for p, a in CASES]
    assert got == expected


def question_file(questions: list[dict], subtype: str = "val2014") -> dict:
    """An official VQA questions file (the header keys its readers copy)."""
    meta = {"info": {}, "license": {}, "task_type": "Open-Ended", "data_type": "mscoco"}
    return {**meta, "data_subtype": subtype, "questions": questions}


def openflamingo_vqa_eval(cases):
    """OpenFlamingo's copy of the official evaluation (its VQA and VQAEval classes), per
    question, on ``cases`` written as official-format files."""
    from open_flamingo.eval.vqa_metric import VQA, VQAEval

    questions = question_file(
        [{"question_id": i, "image_id": i, "question": "q"} for i in range(len(cases))]
    )
    annotations = {
        "annotations": [
            {
                "question_id": i, "image_id": i, "question_type": "t", "answer_type": "a",
                "answers": [{"answer": a, "answer_id": k + 1, "answer_confidence": "yes"} for k, a in enumerate(answers)],
            }
            for i, (_, answers) in enumerate(cases)
        ]
    }  # fmt: skip
    results = [{"question_id": i, "answer": p} for i, (p, _) in enumerate(cases)]
    return questions, annotations, results, VQA, VQAEval


def test_the_openflamingo_variant_equals_its_code(tmp_path, capsys):
    questions, annotations, results, VQA, VQAEval = openflamingo_vqa_eval(CASES)
    for name, data in (("q", questions), ("a", annotations), ("r", results)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    vqa = VQA(str(tmp_path / "a.json"), str(tmp_path / "q.json"))
    evaluation = VQAEval(vqa, vqa.loadRes(str(tmp_path / "r.json"), str(tmp_path / "q.json")), n=2)
    evaluation.evaluate()
    theirs = [evaluation.evalQA[i] for i in range(len(CASES))]
    assert [round(100 * vqa_accuracy(p, a, "openflamingo"), 2) for p, a in CASES] == theirs
    assert theirs[2] == 100 and OFFICIAL[2] == 0  # "2" against ten "two": the variants differ


# -- post-processing --------------------------------------------------------------------------------

GENERATIONS = [
    "red, white and blue", "Yes", "two Question: what", "blue Answer: no", "the dog\nQuestion:",
    " Short answer: left", "yes<|endofchunk|><image>Question", "3,000 people", "a cat, a dog",
    "QuestionAnswer", "on the table.\n", ' "quoted" caption', "An image of Output: x",
    "stop sign Output:", "two dogs, one cat Question:", "", "tennis racket, ball, net",
]  # fmt: skip


def test_openflamingo_postprocessing_equals_its_functions():
    from open_flamingo.eval.coco_metric import postprocess_captioning_generation
    from open_flamingo.eval.vqa_metric import postprocess_vqa_generation

    from eval.prompts import postprocess

    for text in GENERATIONS:
        before_chunk = text.split("<|endofchunk|>")[0]  # where its generation stops
        assert postprocess("vqa", text, "openflamingo") == postprocess_vqa_generation(before_chunk)
        caption = postprocess_captioning_generation(before_chunk).replace('"', "")
        assert postprocess("caption", text, "openflamingo") == caption
    # where the protocols part ways: a list answer and a caption that quotes
    assert postprocess("vqa", "red, white and blue", "openflamingo") == "red"
    assert postprocess("vqa", "red, white and blue") == "red, white and blue"


# -- OpenFlamingo's evaluate_vqa itself, on official-format files -----------------------------------


def openflamingo_function(name: str, namespace: dict):
    """One function of open_flamingo/eval/evaluate.py, compiled from the installed file into
    ``namespace`` (the module itself imports packages this environment lacks: inflection)."""
    import open_flamingo

    path = Path(open_flamingo.__file__).parent / "eval" / "evaluate.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


QUESTIONS = [
    ("What colour is the car?", "red, white and blue", ["red"] * 6 + ["red white and blue"] * 4),
    ("Is it raining?", "Yes", ["yes"] * 10),
    ("How many dogs?", "two Question: how", ["two"] * 10),
    ("What is on the table?", "a cup, a plate", ["cup"] * 7 + ["cups"] * 3),
    ("Which side?", "left\nQuestion:", ["left"] * 10),
    ("What sport?", "tennis Answer: yes", ["tennis"] * 9 + ["Tennis"]),
    ("What animal?", "Short answer: cat", ["cat"] * 10),
    ("How many people?", "3", ["three"] * 5 + ["3"] * 5),
]
TRAIN = [(f"Train question {i}?", f"answer {i}") for i in range(6)]


def vqa_files(root: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for split, subtype, rows in (
        ("train", "train2014", [(q, [a] * 10) for q, a in TRAIN]),
        ("val", "val2014", [(q, ans) for q, _, ans in QUESTIONS]),
    ):
        (root / subtype).mkdir(parents=True)
        questions, annotations = [], []
        for i, (question, answers) in enumerate(rows):
            Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(
                root / subtype / f"COCO_{subtype}_{i:012d}.jpg"
            )
            qid = 100 * (split == "val") + i
            questions.append({"image_id": i, "question": question, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": i, "question_type": "what", "answer_type": "other",
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
            })  # fmt: skip
        (root / f"{split}_q.json").write_text(json.dumps(question_file(questions, subtype)))
        (root / f"{split}_a.json").write_text(json.dumps({"annotations": annotations}))
        paths |= {f"{split}_questions": root / f"{split}_q.json", f"{split}_annotations": root / f"{split}_a.json", f"{split}_images": root / subtype}  # fmt: skip
    return paths


class StandInModel:
    """What evaluate_vqa needs of a model: OpenFlamingo's VQA prompt (its
    eval/models/open_flamingo.py format) and canned generations, per query question."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def get_vqa_prompt(self, question, answer=None) -> str:
        return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}{'<|endofchunk|>' if answer is not None else ''}"

    def get_outputs(self, batch_images, batch_text, **kwargs):
        self.prompts += batch_text
        canned = {q: g for q, g, _ in QUESTIONS}
        return [canned[t.rsplit("Question:", 1)[1].split(" Short answer:")[0]] for t in batch_text]


@pytest.fixture
def single_process():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("shots", [0, 2])
def test_our_openflamingo_protocol_equals_its_evaluate_vqa(
    tmp_path, monkeypatch, single_process, shots
):
    from open_flamingo.eval import utils
    from open_flamingo.eval.eval_datasets import VQADataset
    from open_flamingo.eval.vqa_metric import compute_vqa_accuracy, postprocess_vqa_generation
    from tqdm import tqdm

    paths = vqa_files(tmp_path / "vqav2")
    names = dict(
        np=np, torch=torch, json=json, os=os, uuid=uuid, random=random, tqdm=tqdm, utils=utils
    )
    names |= dict(VQADataset=VQADataset, compute_vqa_accuracy=compute_vqa_accuracy, postprocess_vqa_generation=postprocess_vqa_generation, postprocess_ok_vqa_generation=None, RICES=None, argparse=argparse)  # fmt: skip
    evaluate_vqa = openflamingo_function("evaluate_vqa", names)
    args = argparse.Namespace(
        vqav2_train_image_dir_path=str(paths["train_images"]), vqav2_train_questions_json_path=str(paths["train_questions"]),
        vqav2_train_annotations_json_path=str(paths["train_annotations"]), vqav2_test_image_dir_path=str(paths["val_images"]),
        vqav2_test_questions_json_path=str(paths["val_questions"]), vqav2_test_annotations_json_path=str(paths["val_annotations"]),
        num_samples=-1, batch_size=3, rices=False, query_set_size=len(TRAIN), model="open_flamingo", rank=0, world_size=1,
    )  # fmt: skip
    model = StandInModel()
    monkeypatch.chdir(tmp_path)  # it writes its predictions file into the working directory
    theirs = evaluate_vqa(args, model, num_shots=shots, dataset_name="vqav2")

    tasks = {"vqav2": {"paths": {k: str(v) for k, v in paths.items()}, "eval_split": "val"}}
    cfg = EvalConfig.from_dict({"tasks": tasks, "protocol": "openflamingo"})
    task = get_task("vqav2", cfg.tasks["vqav2"].paths, get_protocol("openflamingo"))
    train, test = {it.question: it for it in task.load("train")}, task.load("val")
    evaluator = Evaluator.__new__(Evaluator)  # only its prompt assembly: no model needed
    predictions = {}
    by_question = {it.question: it for it in test}
    for prompt in model.prompts:  # each of its prompts, rebuilt by ours from the same demos
        query = prompt.rsplit("Question:", 1)[1].split(" Short answer:")[0]
        demos = [train[q.split(" Short answer:")[0]] for q in prompt.split("Question:")[1:-1]]
        ours, images = evaluator._prompt(task, demos, by_question[query], shots)
        assert ours == prompt and len(images) == (shots + 1 if shots else 1)
        generated = dict((q, g) for q, g, _ in QUESTIONS)[query]
        predictions[by_question[query].id] = task.postprocess(generated)
    assert len(model.prompts) == len(QUESTIONS)
    assert round(task.score(test, predictions)["accuracy"], 2) == theirs
    official = get_task("vqav2", cfg.tasks["vqav2"].paths, get_protocol("official"))
    generated = {by_question[q].id: g for q, g, _ in QUESTIONS}
    ours_official = official.score(test, {k: official.postprocess(g) for k, g in generated.items()})
    # the protocols part ways on these generations: 87.5 under openflamingo, 62.5 official
    assert ours_official["accuracy"] == 62.5 and theirs == 87.5


def test_every_protocol_names_its_settings_and_says_why_a_task_cannot_run(tmp_path):
    for protocol in PROTOCOLS.values():
        for task in protocol.unsupported:
            with pytest.raises(ValueError, match=f"task {task} under protocol {protocol.name}"):
                get_task(task, {}, protocol)
    assert (
        Evaluator.max_new_tokens(
            get_task("vizwiz", {}, get_protocol("openflamingo")),
            EvalConfig.from_dict({"tasks": {"vizwiz": {"paths": {}}}}).tasks["vizwiz"],
        )
        == 5
    )


# -- OpenFlamingo's evaluate_classification, on HatefulMemes-format files ---------------------------

MEMES = [  # (text, label, canned mean log-likelihoods of "no", "yes")
    ("love your neighbour", 0, (-0.2, -1.9)),
    ("go back home", 1, (-1.4, -0.3)),
    ("cats are the best", 0, (-0.5, -0.9)),
    ("you people again", 1, (-0.8, -0.6)),
    ("happy birthday", 0, (-0.1, -2.5)),
]
TRAIN_MEMES = [(f"train meme {i}", i % 2) for i in range(6)]


def meme_files(root: Path) -> dict[str, Path]:
    (root / "img").mkdir(parents=True)
    for split, rows in (
        ("train", [(t, y) for t, y in TRAIN_MEMES]),
        ("dev", [(t, y) for t, y, _ in MEMES]),
    ):
        lines = []
        for i, (text, label) in enumerate(rows):
            name = f"{split}{i}.png"
            Image.new("RGB", (8, 8), (40 * i, 100 * (split == "dev"), 0)).save(root / "img" / name)
            lines.append(
                json.dumps(
                    {"id": f"{split}{i}", "img": f"img/{name}", "label": label, "text": text}
                )
            )
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "image_root": root,
        "train_jsonl": root / "train.jsonl",
        "dev_jsonl": root / "dev.jsonl",
    }


class StandInClassifier:
    """What evaluate_classification needs of a model: OpenFlamingo's HatefulMemes prompt (its
    eval/models/open_flamingo.py format) and canned class log-likelihoods per query."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.images: list[list] = []

    def get_hateful_memes_prompt(self, text, label=None) -> str:
        return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"

    def get_rank_classifications(self, batch_text, batch_images, all_class_names, **kwargs):
        assert kwargs["normalize_length"] is True  # mean log-likelihood per token
        self.prompts += batch_text
        self.images += batch_images
        canned = {text: scores for text, _, scores in MEMES}
        return torch.tensor(
            [canned[t.rsplit("with: '", 1)[1].split("' written")[0]] for t in batch_text]
        )


@pytest.mark.parametrize("shots", [0, 2])
def test_our_openflamingo_protocol_equals_its_evaluate_classification(
    tmp_path, monkeypatch, single_process, shots
):
    from open_flamingo.eval import utils
    from open_flamingo.eval.classification_utils import HM_CLASSNAMES, IMAGENET_CLASSNAMES
    from open_flamingo.eval.eval_datasets import HatefulMemesDataset, ImageNetDataset
    from tqdm import tqdm

    paths = meme_files(tmp_path / "memes")
    recorded = {}

    def roc_auc_score(gts, scores):  # sklearn's is not installed: record what it is given
        recorded.update(gts=list(gts), scores=list(scores))
        return 0.0

    names = dict(
        np=np, torch=torch, os=os, random=random, math=__import__("math"), tqdm=tqdm, utils=utils
    )
    names |= dict(HatefulMemesDataset=HatefulMemesDataset, ImageNetDataset=ImageNetDataset, HM_CLASSNAMES=HM_CLASSNAMES, IMAGENET_CLASSNAMES=IMAGENET_CLASSNAMES, RICES=None, roc_auc_score=roc_auc_score)  # fmt: skip
    evaluate_classification = openflamingo_function("evaluate_classification", names)
    args = argparse.Namespace(
        hateful_memes_image_dir_path=str(tmp_path / "memes" / "img"), hateful_memes_train_annotations_json_path=str(paths["train_jsonl"]),
        hateful_memes_test_annotations_json_path=str(paths["dev_jsonl"]), num_samples=-1, batch_size=2, rices=False,
        query_set_size=len(TRAIN_MEMES), model="open_flamingo", rank=0, world_size=1,
    )  # fmt: skip
    model = StandInClassifier()
    evaluate_classification(args, model, num_shots=shots, dataset_name="hateful_memes")

    tasks = {"hateful_memes": {"paths": {k: str(v) for k, v in paths.items()}, "eval_split": "dev"}}
    cfg = EvalConfig.from_dict(
        {"tasks": tasks, "protocol": "openflamingo", "openflamingo_zero_shot_bug": True}
    )
    task = get_task("hateful_memes", cfg.tasks["hateful_memes"].paths, get_protocol("openflamingo"))
    train, test = (
        {it.text: it for it in task.load("train")},
        {it.text: it for it in task.load("dev")},
    )
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.cfg = cfg
    predictions = {}
    for prompt, their_images in zip(model.prompts, model.images, strict=True):
        texts = [t.split("' written")[0] for t in prompt.split("with: '")[1:]]
        demos, item = [train[t] for t in texts[:-1]], test[texts[-1]]
        ours, images = evaluator._prompt(task, demos, item, shots)
        assert ours == prompt
        # the image the query's <image> reads: its own, or (0-shot, the bug) the first demo's
        seen = their_images[0] if shots == 0 else their_images[-1]
        with Image.open(images[0] if shots == 0 else images[-1]) as mine:
            assert np.array_equal(np.asarray(mine.convert("RGB")), np.asarray(seen.convert("RGB")))
        predictions[item.id] = list(dict((t, s) for t, _, s in MEMES)[item.text])
    items = [test[t] for t, _, _ in MEMES]
    ours_p_yes = [1 / (1 + np.exp(predictions[it.id][0] - predictions[it.id][1])) for it in items]
    order = {t: i for i, (t, _, _) in enumerate(MEMES)}
    their_order = [order[p.rsplit("with: '", 1)[1].split("' written")[0]] for p in model.prompts]
    theirs = dict(zip(their_order, recorded["scores"], strict=True))
    assert [round(theirs[i], 6) for i in range(len(MEMES))] == [
        round(float(p), 6) for p in ours_p_yes
    ]
    assert [recorded["gts"][their_order.index(i)] for i in range(len(MEMES))] == [
        "no",
        "yes",
        "no",
        "yes",
        "no",
    ]
    assert task.score(items, predictions)["ROC-AUC"] == 100.0


def test_openflamingos_imagenet_path_raises_as_reported(tmp_path, single_process):
    from open_flamingo.eval import utils
    from open_flamingo.eval.classification_utils import IMAGENET_CLASSNAMES
    from open_flamingo.eval.eval_datasets import ImageNetDataset
    from tqdm import tqdm

    for split in ("train", "val"):
        for i in range(2):
            (tmp_path / split / f"n{i}").mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / f"n{i}" / "a.JPEG")

    class Model:
        def get_imagenet_prompt(self, label=None):
            return f"<image>Output:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"

    names = dict(
        np=np, torch=torch, os=os, random=random, math=__import__("math"), tqdm=tqdm, utils=utils
    )
    names |= dict(
        ImageNetDataset=ImageNetDataset, IMAGENET_CLASSNAMES=IMAGENET_CLASSNAMES, RICES=None
    )
    evaluate_classification = openflamingo_function("evaluate_classification", names)
    args = argparse.Namespace(imagenet_root=str(tmp_path), num_samples=-1, batch_size=2, rices=False, query_set_size=2, model="open_flamingo", rank=0, world_size=1)  # fmt: skip
    with pytest.raises(KeyError, match="ocr"):
        evaluate_classification(args, Model(), num_shots=2, dataset_name="imagenet")
    # ours runs ImageNet under openflamingo with its prompt as its prompt function writes it
    from eval.prompts import render
    from eval.tasks import Item

    item = Item(id="x", image=tmp_path / "x.png", answers=["goldfish"])
    assert render(
        "classification", item, True, classification="output"
    ) == Model().get_imagenet_prompt("goldfish")
    assert (
        render("classification", item, False, classification="output")
        == Model().get_imagenet_prompt()
    )


# -- OpenFlamingo's evaluate_captioning, on a Karpathy-format file ----------------------------------

CAPTIONS = {  # test image -> a canned generation
    "a red square": " a red square on white. Output: a",
    "a blue circle": 'a "blue" circle<|endofchunk|>',
    "two green dots": "two green dots, one big\nQuestion: what",
}


def karpathy_file(root: Path) -> Path:
    images = []
    rows = [(f"train caption {i}  ", "train") for i in range(4)] + [("restval caption", "restval")]
    rows += [(c, "test") for c in CAPTIONS]
    for i, (caption, split) in enumerate(rows):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(root / name)
        sentences = [{"raw": caption}, {"raw": f"another caption {i}"}]
        images.append({"filepath": "train2014", "filename": name, "split": split, "cocoid": i, "sentences": sentences})  # fmt: skip
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    return root / "karpathy.json"


@pytest.mark.parametrize("shots", [0, 2])
def test_our_openflamingo_protocol_equals_its_evaluate_captioning(
    tmp_path, monkeypatch, single_process, shots
):
    from open_flamingo.eval import utils
    from open_flamingo.eval.coco_metric import postprocess_captioning_generation
    from open_flamingo.eval.eval_datasets import CaptionDataset
    from tqdm import tqdm

    karpathy = karpathy_file(tmp_path)
    recorded = {}

    def compute_cider(result_path, annotations_path):  # record what it would score
        recorded.update(
            {r["image_id"]: r["caption"] for r in json.loads(Path(result_path).read_text())}
        )
        return {"CIDEr": 0.0}

    class Model:
        prompts: list[str] = []

        def get_caption_prompt(self, caption=None):
            return f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"

        def get_outputs(self, batch_images, batch_text, **kwargs):
            assert kwargs["max_generation_length"] == 20 and kwargs["num_beams"] == 3
            self.prompts += batch_text
            # decoded as its get_outputs does: generation stops at <|endofchunk|>, skipped
            order = [g.split("<|endofchunk|>")[0] for g in CAPTIONS.values()]
            return [order[len(self.prompts) - len(batch_text) + i] for i in range(len(batch_text))]

    names = dict(
        np=np, torch=torch, json=json, os=os, uuid=uuid, random=random, tqdm=tqdm, utils=utils
    )
    names |= dict(defaultdict=__import__("collections").defaultdict, CaptionDataset=CaptionDataset, compute_cider=compute_cider, postprocess_captioning_generation=postprocess_captioning_generation, RICES=None)  # fmt: skip
    evaluate_captioning = openflamingo_function("evaluate_captioning", names)
    args = argparse.Namespace(
        coco_train_image_dir_path=str(tmp_path), coco_val_image_dir_path=str(tmp_path), coco_karpathy_json_path=str(karpathy),
        coco_annotations_json_path="unused", num_samples=-1, batch_size=2, rices=False, query_set_size=4,
        model="open_flamingo", rank=0, world_size=1,
    )  # fmt: skip
    model = Model()
    monkeypatch.chdir(tmp_path)
    # its test loader visits the images in its own order: record which image each prompt is for
    seen = []
    real_outputs = model.get_outputs

    def outputs(batch_images, batch_text, **kwargs):
        for images in batch_images:
            seen.append(int(np.asarray(images[-1])[0, 0, 0]) // 30)
        return real_outputs(batch_images, batch_text, **kwargs)

    model.get_outputs = outputs
    evaluate_captioning(args, model, num_shots=shots, dataset_name="coco")

    tasks = {"coco": {"paths": {"karpathy_json": str(karpathy), "image_root": str(tmp_path)}}}
    cfg = EvalConfig.from_dict({"tasks": tasks, "protocol": "openflamingo"})
    task = get_task("coco", cfg.tasks["coco"].paths, get_protocol("openflamingo"))
    train = {it.answers[0]: it for it in task.load("train")}
    assert "restval caption" not in train  # its demonstration pool: Karpathy train only
    test = {int(it.id): it for it in task.load("test")}
    evaluator = Evaluator.__new__(Evaluator)
    generations = list(CAPTIONS.values())
    for n, (prompt, image_id) in enumerate(zip(model.prompts, seen, strict=True)):
        demos = [train[c.split("<|endofchunk|>")[0]] for c in prompt.split("Output:")[1:-1]]
        ours, _ = evaluator._prompt(task, demos, test[image_id], shots)
        assert ours == prompt
        assert task.postprocess(generations[n]) == recorded[image_id]


@pytest.mark.parametrize(("protocol", "nearest"), [("official", False), ("openflamingo", True)])
def test_zero_shot_demonstrations_follow_the_protocol(protocol, nearest):
    """With demos: rices, the two text-only 0-shot demonstrations are random under official
    (the paper) and the RICES ones under openflamingo (evaluate.py picks them as k-shot ones)."""
    from eval.tasks import Item

    pool = [Item(id=f"p{i}", image=None) for i in range(12)]
    query = Item(id="q", image=None)
    features = {it.id: torch.tensor([1.0, 0.0]) for it in pool} | {"q": torch.tensor([0.0, 1.0])}
    features["p5"] = features["p9"] = torch.tensor([0.1, 1.0])  # the query's nearest two
    tasks = {"vqav2": {"paths": {}}}
    cfg = EvalConfig.from_dict({"tasks": tasks, "demos": "rices", "protocol": protocol})
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.cfg = cfg
    evaluator._features = lambda items, tag, shared=False: torch.stack(
        [features[i.id] for i in items]
    )
    task = get_task("vqav2", {}, get_protocol(protocol))
    picked = {d.id for d in evaluator.demonstrations(task, pool, [query], 0, seed=0)[0]}
    assert (picked == {"p5", "p9"}) == nearest
