"""lmms-eval's own command line runs our models through the plugin (flamingo/lmms_eval.py),
offline, on local tasks in its format: a generation task and a multiple-choice task, whose
answers and log-likelihoods equal what our processor, ``generate`` and ``score`` give for
the same prompts (the ones ``eval/`` uses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from flamingo import Flamingo, FlamingoProcessor
from tests.helpers import build, noise_image, set_gates

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
QUESTIONS = ["what colour is it?", "which colour fills the picture?", "name the colour."]
CHOICES = list(COLOURS)


def write_tasks(root: Path) -> Path:
    """Two lmms-eval tasks over a local JSON dataset of 6 pictures (dataset_path: json)."""
    tasks = root / "tasks"
    tasks.mkdir()
    docs = []
    for i in range(6):
        name = CHOICES[i % 3]
        path = root / f"picture_{i}.png"
        if i % 2:
            Image.new("RGB", (40, 30), COLOURS[name]).save(path)
        else:
            noise_image(seed=i).save(path)
        docs.append(
            {"image": str(path), "question": QUESTIONS[i % 3], "answer": name, "label": i % 3}
        )
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "utils.py").write_text(
        "from PIL import Image\n\n\ndef doc_to_visual(doc):\n"
        "    return [Image.open(doc['image']).convert('RGB')]\n"
    )
    common = f"""\
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        """
    (tasks / "tiny_vqa.yaml").write_text(
        textwrap.dedent(common)
        + textwrap.dedent("""\
        task: flamingo_tiny_vqa
        output_type: generate_until
        doc_to_text: "Question: {{question}} Short answer:"
        doc_to_target: answer
        generation_kwargs:
          until: ["."]
          max_new_tokens: 6
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)
    )
    (tasks / "tiny_colour.yaml").write_text(
        textwrap.dedent(common)
        + textwrap.dedent(f"""\
        task: flamingo_tiny_colour
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}} Answer:"
        doc_to_choice: {json.dumps(CHOICES)}
        doc_to_target: label
        metric_list:
          - metric: acc
        """)
    )
    return tasks


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    model = build()
    set_gates(model, 0.5)
    model.save_pretrained(root / "ckpt")
    tasks = write_tasks(root)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "flamingo"]
    cmd += ["--model_args", f"pretrained={root / 'ckpt'},num_beams=1"]
    cmd += ["--tasks", "flamingo_tiny_vqa,flamingo_tiny_colour", "--include_path", str(tasks)]
    cmd += ["--batch_size", "2", "--output_path", str(root / "out"), "--log_samples"]
    # from another folder than the repository: no stale flamingo.egg-info of a source build
    # there can hide the installed entry point
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    samples = {}
    for path in (root / "out").rglob("*_samples_*.jsonl"):
        task = "vqa" if "tiny_vqa" in path.name else "colour"
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    (results_file,) = (root / "out").rglob("*_results.json")
    return root, samples, json.loads(results_file.read_text())["results"]


def docs_of(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "docs.jsonl").read_text().splitlines()]


def prompt_images(doc: dict) -> list[list[Image.Image]]:
    return [[Image.open(doc["image"]).convert("RGB")]]


def test_a_generation_task_answers_as_our_generate(lmms_run):
    root, samples, results = lmms_run
    model = Flamingo.from_pretrained(root / "ckpt")
    processor = FlamingoProcessor.from_pretrained(root / "ckpt")
    logged = sorted(samples["vqa"], key=lambda s: s["doc_id"])
    assert len(logged) == 6
    hits = 0
    for sample in logged:
        doc = docs_of(root)[sample["doc_id"]]
        prompt = f"<image>Question: {doc['question']} Short answer:"
        enc = processor([prompt], images=prompt_images(doc))
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6)
        text = processor.decode(out[0, enc["input_ids"].shape[1] :])
        text = text.split(processor.tokenizer.eos_token)[0].split(".")[0]
        got = sample["filtered_resps"]  # the answer (a list of one in some releases)
        got = got[0] if isinstance(got, list) else got
        assert got.strip() == text.strip(), sample["doc_id"]
        hits += text.strip() == doc["answer"]
        assert text.strip()  # something to compare: the tiny model's words, not an empty cut
    assert results["flamingo_tiny_vqa"]["exact_match,none"] == pytest.approx(hits / 6)


def test_a_multiple_choice_task_scores_as_our_score(lmms_run):
    root, samples, results = lmms_run
    model = Flamingo.from_pretrained(root / "ckpt")
    processor = FlamingoProcessor.from_pretrained(root / "ckpt")
    tok = processor.tokenizer
    logged = sorted(samples["colour"], key=lambda s: s["doc_id"])
    assert len(logged) == 6
    correct = 0
    for sample in logged:
        doc = docs_of(root)[sample["doc_id"]]
        enc = processor([f"<image>Question: {doc['question']} Answer:"], images=prompt_images(doc))
        candidates = [
            torch.tensor(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in CHOICES
        ]
        with torch.no_grad():
            ours = model.score(
                enc["input_ids"], candidates, **{k: v for k, v in enc.items() if k != "input_ids"}
            )
        # lmms-eval logs each (value, is_greedy) pair as text; the value is the summed
        # negative log-likelihood, which its multiple choice ranks by the smallest
        theirs = [float(value) for value, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx((-ours).tolist(), abs=1e-4), sample["doc_id"]
        correct += int(ours.argmax()) == doc["label"]
    assert results["flamingo_tiny_colour"]["acc,none"] == pytest.approx(correct / 6)


def test_what_the_plugin_cannot_run_is_refused_by_name(lmms_run):
    from lmms_eval.api.instance import Instance

    from flamingo.lmms_eval import FlamingoLMMs

    root = lmms_run[0]
    with pytest.raises(ValueError, match=r"unknown model_args \['beams'\]"):
        FlamingoLMMs(pretrained=str(root / "ckpt"), beams=3)
    lm = FlamingoLMMs(pretrained=str(root / "ckpt"))
    lm.task_dict = {"t": {"test": [{"video": "clip.mp4"}]}}
    video = Instance(
        "generate_until",
        ("describe", {"until": ["."]}, lambda doc: [doc["video"]], 0, "t", "test"),
        0,
        {"task": "t", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(ValueError, match="not video or audio"):
        lm.generate_until([video])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([video])
