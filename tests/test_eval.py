"""Evaluation: metrics on known answers, RICES ordering, every task end to end, 2 processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from eval.fewshot import RICES
from eval.metrics import okvqa_accuracy, process_punctuation, roc_auc, vqa_accuracy
from eval.protocols import PROTOCOLS
from eval.run import main as eval_main
from eval.tasks import TASKS, Item
from tests.eval_fixtures import write_all
from tests.helpers import ROOT, build, free_port, set_gates
from tests.processes import run_group

BENCHMARKS = {
    "coco",
    "flickr30k",
    "vqav2",
    "okvqa",
    "textvqa",
    "vizwiz",
    "hateful_memes",
    "imagenet",
    "names",
}

# -- metrics on hand-checked cases ------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("two", ["2"] * 10, 1.0),  # numbers as words
        ("The dog.", ["dog"] * 10, 1.0),  # articles and a final period
        ("dont know", ["don't know"] * 10, 1.0),  # contractions map dont -> don't
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),  # 8 subsets with 2 matches (2/3), 2 with 1 (1/3)
        ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),  # 7 subsets with 3 matches, 3 with 2 (2/3)
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
        ("red", ["blue"] * 10, 0.0),
        (
            "hot-dog",
            ["hot dog"] * 5 + ["hotdog"] * 5,
            1.0,
        ),  # a hyphen inside a word becomes a space
        (
            "hot dog",
            ["hot-dog"] * 5 + ["x"] * 5,
            1.0,
        ),  # GT punctuation only applied when GTs differ
        ("1,000", ["1000"] * 5 + ["many"] * 5, 1.0),  # comma between digits removes all punctuation
    ],
)
def test_vqa_accuracy_known_cases(prediction, answers, expected):
    """vqaEval.py before its 2021 fix (what this project scored with until now); today's and
    OpenFlamingo's are held to their code in tests/test_protocols.py."""
    assert vqa_accuracy(prediction, answers, "official_2016") == pytest.approx(expected)


def test_vqa_quirks_are_kept():
    # GTs all identical: no normalisation of the GT at all (official quirk), and since the
    # 2021 fix none of the prediction either
    assert vqa_accuracy("hot dog", ["hot-dog"] * 10, "official_2016") == 0.0
    assert vqa_accuracy("The dog.", ["dog"] * 10, "official_2016") == 1.0
    assert vqa_accuracy("The dog.", ["dog"] * 10) == 0.0
    # the period regex removes at most 32 periods (re.UNICODE passed as the count)
    assert process_punctuation("." * 40) == "." * 8


def test_okvqa_stemming_and_roc_auc():
    assert okvqa_accuracy("running", ["run"] * 10) == 1.0
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_cider_equals_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from eval.metrics import caption_scores

    preds = {"1": "a man riding a horse", "2": "a cat on a mat", "3": "two dogs play"}
    refs = {
        "1": ["a man rides a horse", "a person on a horse"],
        "2": ["a cat sitting on a mat"],
        "3": ["two dogs playing in grass"],
    }
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    expected = Cider().compute_score(gts, res)[0]
    assert caption_scores(preds, refs, meteor=False)["CIDEr"] == pytest.approx(expected)


def test_rices_picks_nearest_most_similar_last():
    pool = [Item(id=str(i), image=None) for i in range(5)]
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    demos = RICES(pool, features).demos(torch.tensor([[1.0, 0.05]]), 3)
    # cosine: item 0 = .9988, item 1 = .9982, item 3 = .7424, ... -> the nearest comes last
    assert [d.id for d in demos[0]] == ["3", "1", "0"]


def test_grouped_items_take_demonstrations_from_their_own_group_only():
    """A task whose answers only an item's own episode gives (``Item.group``): random and
    RICES demonstrations come from that episode, never the item itself, however near
    another episode's images are."""
    from eval.fewshot import random_demos

    pool = [Item(id=f"{g}{i}", image=None, group=g) for g in "ab" for i in range(3)]
    query = Item(id="a0", image=None, group="a")  # also in the pool: never its own demo
    for seed in range(5):
        demos = random_demos(pool, query, 4, seed)
        assert {d.id for d in demos} == {"a1", "a2"}  # fewer than asked: the group is small
    features = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)  # episode b looks like it
    features[1] = torch.tensor([0.6, 0.8])
    demos = RICES(pool, features).demos(torch.tensor([[0.0, 1.0]]), 2, [query])
    assert [d.id for d in demos[0]] == ["a2", "a1"]  # its group's, the nearest last
    ungrouped = Item(id="x", image=None)
    assert len(random_demos(pool, ungrouped, 4, 0)) == 4


def test_names_items_carry_their_episode_and_keep_every_demonstration(tmp_path):
    """The names benchmark's items are grouped by episode; its pool is every train item
    (a draw over all episodes would thin some below their demonstrations), and a question
    without an episode is refused by name."""
    from eval.fewshot import query_set
    from eval.tasks import get_task

    tasks = write_all(tmp_path)
    task = get_task("names", tasks["names"]["paths"])
    train, val = task.load("train"), task.load("val")
    assert [it.group for it in train] == ["0", "1"] * 3 and [it.group for it in val] == list("010")
    assert query_set(train, 2, seed=0) == train
    plain = get_task("vqav2", tasks["vqav2"]["paths"]).load("train")
    assert len(query_set(plain, 2, seed=0)) == 2
    # under either protocol, scored as VQA; OpenFlamingo's cut stops a listed answer at ", "
    for protocol in PROTOCOLS.values():
        scored = get_task("names", tasks["names"]["paths"], protocol)
        answers = {it.id: scored.postprocess(f"{it.answers[0]}, blue") for it in val}
        expected = 100.0 if protocol.name == "openflamingo" else 0.0
        assert scored.score(scored.load("val"), answers) == {"accuracy": expected}, protocol
    questions = tmp_path / "names" / "train_q.json"
    record = json.loads(questions.read_text())
    del record["questions"][3]["episode"]
    questions.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="question 30 has no 'episode'"):
        task.load("train")


# -- every task through the command -----------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = build()
    set_gates(model, 0.5)
    model.save_pretrained(root / "ckpt")
    tasks = write_all(root / "data")
    cfg = {
        "tasks": tasks,
        "shots": [0, 2],
        "trials": 2,
        "num_beams": 2,
        "batch_size": 2,
        "query_set_size": 4,
        "output_dir": str(root / "out"),
        "cache_dir": str(root / "cache"),
    }
    (root / "eval.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_registry_covers_the_benchmarks():
    assert set(TASKS) >= BENCHMARKS


@pytest.mark.parametrize("demos", ["random", "rices"])
def test_every_task_runs_end_to_end(setup, demos, capsys):
    record = eval_main(
        [
            "--config",
            str(setup / "eval.yaml"),
            "--checkpoint",
            str(setup / "ckpt"),
            f"demos={demos}",
        ]
    )
    results = record["results"]
    assert set(results) == BENCHMARKS
    for task, by_shots in results.items():
        assert set(by_shots) == {"0", "2"}, task
        for entry in by_shots.values():
            for metric in entry["scores"].values():
                assert len(metric["trials"]) == 2 and 0 <= metric["mean"] <= 100 + 1e-6, task
            assert all(len(p) > 0 for p in entry["predictions"])
    assert len(results["coco"]["2"]["predictions"][0]) == 3  # the Karpathy test split here
    table = capsys.readouterr().out
    assert "| coco | CIDEr | 2 |" in table and "| hateful_memes | ROC-AUC | 0 |" in table
    if demos == "rices":
        assert any((setup / "cache").glob("rices-*.safetensors"))


@pytest.mark.multiprocess
def test_two_processes_evaluate_each_item_once(setup):
    cfg = yaml.safe_load((setup / "eval.yaml").read_text())
    cfg["tasks"] = {"vqav2": cfg["tasks"]["vqav2"], "coco": cfg["tasks"]["coco"]}
    cfg["shots"], cfg["trials"], cfg["output_dir"] = [2], 1, str(setup / "out2")
    cfg["demos"], cfg["cache_dir"] = "rices", str(setup / "cache2")
    (setup / "eval2.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        free_port(),
        "-m",
        "eval.run",
        "--config",
        str(setup / "eval2.yaml"),
        "--checkpoint",
        str(setup / "ckpt"),
    ]
    result = run_group(cmd, 300, cwd=ROOT, env=env)  # the ranks die with torchrun
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (setup / "out2").glob("results-*.json")
    record = json.loads(path.read_text())
    assert record["world_size"] == 2
    predictions = record["results"]["vqav2"]["2"]["predictions"][0]
    assert sorted(predictions) == ["60", "70", "80"]  # every val question once, no padding

    # one cached pool per task, and each process's own items per task
    assert len(list((setup / "cache2").glob("rices-*.safetensors"))) == 2 + 2 * 2
    # the two processes encoded half the RICES pool each: the cached whole equals one process's
    from eval.config import EvalConfig
    from eval.fewshot import features_path, load_features, query_set
    from eval.run import Evaluator
    from eval.tasks import get_task
    from flamingo import Flamingo, FlamingoProcessor

    ecfg = EvalConfig.from_yaml(setup / "eval2.yaml", [f"cache_dir={setup / 'cache1'}"])
    ckpt = setup / "ckpt"
    model, processor = Flamingo.from_pretrained(ckpt), FlamingoProcessor.from_pretrained(ckpt)
    evaluator = Evaluator(model, processor, ecfg, str(ckpt), shard=(0, 1))
    for name in ("vqav2", "coco"):
        task = get_task(name, ecfg.tasks[name].paths)
        pool = query_set(task.load(ecfg.tasks[name].train_split), ecfg.query_set_size, ecfg.seed)
        tag = f"{name}/pool/{ecfg.seed}"
        split = load_features(features_path(setup / "cache2", evaluator._features_key(tag), pool))
        torch.testing.assert_close(split, evaluator._features(pool, tag, shared=True))


def test_blind_baseline_blanks_every_image(setup):
    from eval.run import blank_like

    path = next((setup / "data" / "vqav2").rglob("*.jpg"))
    blank = blank_like(path)
    assert blank.size == (20, 20) and blank.getextrema() == ((128, 128), (128, 128), (128, 128))
    args = [
        "--config",
        str(setup / "eval.yaml"),
        "--checkpoint",
        str(setup / "ckpt"),
        "blank_images=true",
        "trials=1",
    ]
    record = eval_main([*args, "--tasks", "vqav2", "--shots", "2"])
    assert set(record["results"]["vqav2"]) == {"2"}


def test_an_answer_ends_at_the_lm_end_of_text_too(setup, monkeypatch):
    """Beams that emit the LM's own end-of-text keep going until <|endofchunk|> or the token
    limit; what follows it is not part of the answer."""
    from eval.config import EvalConfig
    from eval.run import Evaluator
    from eval.tasks import get_task
    from flamingo import Flamingo, FlamingoProcessor

    cfg = EvalConfig.from_yaml(setup / "eval.yaml")
    model = Flamingo.from_pretrained(setup / "ckpt")
    processor = FlamingoProcessor.from_pretrained(setup / "ckpt")
    tok = processor.tokenizer
    assert tok.eos_token
    answer = tok("blue", add_special_tokens=False)["input_ids"]
    junk = tok(" left", add_special_tokens=False)["input_ids"]
    tail = torch.tensor([*answer, tok.eos_token_id, *junk])

    def fake_generate(input_ids, **kwargs):
        return torch.cat([input_ids, tail.expand(len(input_ids), -1)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    tcfg = cfg.tasks["vqav2"]
    task = get_task("vqav2", tcfg.paths)
    item = task.load(tcfg.eval_split)[0]
    evaluator = Evaluator(model, processor, cfg, str(setup / "ckpt"))
    prompt, images = evaluator._prompt(task, [], item, shots=0)
    assert evaluator._generate(task, tcfg, [(item, prompt, images)]) == {item.id: "blue"}


def _damage(tasks: dict, damage: str) -> tuple[str, str]:
    """Damage one benchmark file of ``tasks`` (the fixture's); returns (the file, the id) the
    error must name."""
    vqa = tasks["vqav2"]["paths"]
    annotations, questions = Path(vqa["val_annotations"]), Path(vqa["val_questions"])
    if damage in ("duplicate_annotation", "empty_answers"):
        data = json.loads(annotations.read_text())
        if damage == "duplicate_annotation":  # a later record with other answers
            twin = dict(data["annotations"][0], answers=[{"answer": "no"}] * 10)
            data["annotations"].append(twin)
        else:
            data["annotations"][1]["answers"] = []
        annotations.write_text(json.dumps(data))
        return str(annotations), "60" if damage == "duplicate_annotation" else "70"
    if damage == "duplicate_question":
        data = json.loads(questions.read_text())
        data["questions"].append(data["questions"][2])
        questions.write_text(json.dumps(data))
        return str(questions), "80"
    if damage == "missing_image":
        Path(vqa["val_images"], "COCO_val2014_000000000007.jpg").unlink()
        return "COCO_val2014_000000000007.jpg", "70"
    coco = Path(tasks["coco"]["paths"]["karpathy_json"])  # a JSON file cut short
    coco.write_bytes(coco.read_bytes()[:100])
    return str(coco), "cut short"


@pytest.mark.parametrize(
    "damage",
    ["duplicate_annotation", "duplicate_question", "empty_answers", "missing_image", "cut_json"],
)
def test_bad_benchmark_files_are_refused_before_anything_is_generated(
    setup, tmp_path, monkeypatch, damage
):
    from eval.run import Evaluator

    tasks = write_all(tmp_path / "data")
    file, ident = _damage(tasks, damage)
    cfg = {"tasks": tasks, "shots": [0], "trials": 1, "output_dir": str(tmp_path / "out")}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))

    def no_trial(*args, **kwargs):
        raise AssertionError("a trial ran before the files were checked")

    monkeypatch.setattr(Evaluator, "trial", no_trial)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        eval_main(["--config", str(tmp_path / "eval.yaml"), "--checkpoint", str(setup / "ckpt")])
    assert file in str(error.value) and ident in str(error.value), str(error.value)


def test_finished_trials_are_on_disk_when_a_later_task_fails(setup, tmp_path, monkeypatch):
    from eval.tasks.vqa import VQAv2

    tasks = write_all(tmp_path / "data")
    cfg = {
        "tasks": {"coco": tasks["coco"], "vqav2": tasks["vqav2"]},
        "shots": [0],
        "trials": 2,
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))

    def crash(self, items, predictions):
        raise RuntimeError("the metric broke")

    monkeypatch.setattr(VQAv2, "score", crash)
    with pytest.raises(RuntimeError, match="the metric broke"):
        eval_main(["--config", str(tmp_path / "eval.yaml"), "--checkpoint", str(setup / "ckpt")])
    (written,) = (tmp_path / "out").glob("results-*.json")
    record = json.loads(written.read_text())
    assert not record["complete"] and set(record["results"]) == {"coco"}
    assert len(record["results"]["coco"]["0"]["scores"]["CIDEr"]["trials"]) == 2


def test_list_flags_leave_the_overrides_that_follow_them_and_bad_tasks_stop_before_loading(
    tmp_path,
):
    """``--tasks coco max_items=4`` once evaluated every item of coco and then crashed on a
    task named ``max_items=4``; an unknown task now stops the run before the model loads."""
    from eval.run import main, parse_args
    from tests.eval_fixtures import small_eval_config

    args = parse_args(["--config", "c.yaml", "--checkpoint", "x", "--tasks", "coco",
                       "max_items=4", "--shots", "0", "4", "trials=1"])  # fmt: skip
    assert args.tasks == ["coco"] and args.shots == [0, 4]
    assert sorted(args.overrides) == ["max_items=4", "trials=1"]
    with pytest.raises(SystemExit):
        parse_args(["--config", "c.yaml", "--checkpoint", "x", "--shots", "two"])
    config = small_eval_config(tmp_path)
    missing = tmp_path / "no-such-checkpoint"  # never read: the task check comes first
    with pytest.raises(SystemExit, match="cocoa"):
        main(["--config", str(config), "--checkpoint", str(missing), "--tasks", "cocoa"])
