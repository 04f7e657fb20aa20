"""A shortened ``make demo``: every stage runs, every artifact is written, the images matter."""

from __future__ import annotations

import json
import math

import pytest

from demo import run as demo_run

SHORT = [
    "--scale", "0.1",
    "--set", "clip.steps=150",
    "--set", "lm.steps=150",  # the LM must learn both caption styles
    # a constant learning rate: 300 steps give 176 CIDEr against the blind 67 (the demo's
    # cosine schedule needs 600 for that; with it 300 fell below the blind baseline)
    "--set", "flamingo.steps=300",
    "--set", "flamingo.optim.schedule=constant",
    "--set", "flamingo.checkpoint_every=150",
    "--set", "eval.max_items=24",
    "--set", "eval.shots=[0,4]",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo_run.main(["--out", str(out), *SHORT])
    return out


def test_every_artifact_is_written(demo_dir):
    for path in (
        "world/world.json",
        "world/eval/captions.json",
        "clip/toy-clip.pt",
        "lm/config.json",
        "flamingo/model/config.json",
        "flamingo/curves.png",
        "flamingo/metrics.jsonl",
        "configs/train.yaml",
        "results.md",
        "scores.json",
        "kshot.png",
    ):
        assert (demo_dir / path).is_file(), path
    assert any((demo_dir / "flamingo" / "tensorboard").iterdir())
    # every path in the effective configs points into the demo's own directory
    assert "runs/demo" not in (demo_dir / "configs" / "train.yaml").read_text()


def test_scores_are_finite_and_beat_the_blind_baseline(demo_dir):
    scores = json.loads((demo_dir / "scores.json").read_text())
    for setting in scores.values():
        for task, by_shots in setting.items():
            # the names benchmark has no held-out combinations: its one split is all
            splits = {"all"} if task == "names" else {"all", "seen", "held-out"}
            for by_split in by_shots.values():
                assert set(by_split) == splits, task
                assert all(math.isfinite(v) for _, v in by_split.values())
    seeing = scores["random demos"]["coco"]["0"]["all"][1]
    blind = scores["blind (blank images)"]["coco"]["0"]["all"][1]
    assert seeing > blind + 10, (seeing, blind)
    page = (demo_dir / "results.md").read_text()
    assert "| random demos | coco | CIDEr | held-out |" in page
    assert "![score against shots](kshot.png)" in page and "connectors" not in page


def test_finished_stages_are_reused(demo_dir, capsys):
    clip = demo_dir / "clip" / "toy-clip.pt"
    before = clip.stat().st_mtime_ns
    demo_run.main(["--out", str(demo_dir), "--stages", "clip", "lm", "flamingo", *SHORT])
    assert clip.stat().st_mtime_ns == before
    assert "stage 1" not in capsys.readouterr().err  # no CLIP progress bar: nothing retrained


def test_bad_set_names_the_expected_form():
    with pytest.raises(SystemExit, match="STAGE.KEY=VALUE"):
        demo_run.parse_sets(["flamingo:steps=3"])


def test_the_connector_stages_train_llava_and_blip2_and_compare_the_three(demo_dir):
    """``--stages connectors`` reuses the world, tower, LM and Flamingo model, trains LLaVA's
    and BLIP-2's two stages on half the steps each (here a few: what they learn is the full
    demo's to show), adds their rows at the shots their prompts fit, and writes the three
    connectors' table (one run for both connectors: each stage's run rescores every row)."""
    from flamingo import FlamingoConfig
    from flamingo.checkpoint import read_checkpoint_config
    from flamingo.qformer_pretraining import QFormerPretraining

    clip = demo_dir / "clip" / "toy-clip.pt"
    before = clip.stat().st_mtime_ns
    args = [*SHORT, "--set", "flamingo.steps=20", "--set", "eval.max_items=8"]  # 10 a stage
    demo_run.main(["--out", str(demo_dir), "--stages", "connectors", *args])
    assert clip.stat().st_mtime_ns == before
    # LLaVA: the projector alone, then the LM unfrozen; single images, no video
    first, _ = read_checkpoint_config(demo_dir / "llava-stage1" / "model")
    second, _ = read_checkpoint_config(demo_dir / "llava" / "model")
    assert isinstance(first, FlamingoConfig)
    assert (first.connector, first.lm.trainable) == ("llava", "none")
    assert (second.connector, second.lm.trainable) == ("llava", "full")
    train = (demo_dir / "configs" / "train-llava.yaml").read_text()
    assert "video" not in train and "runs/demo" not in train
    # BLIP-2: the Q-Former's stage 1 (no LM), then into the frozen LM
    first_qformer = QFormerPretraining.from_pretrained(demo_dir / "blip2-stage1" / "model")
    second, _ = read_checkpoint_config(demo_dir / "blip2" / "model")
    assert first_qformer.model_cfg.connector == second.connector == "qformer"
    scores = json.loads((demo_dir / "scores.json").read_text())
    for connector in ("LLaVA", "BLIP-2"):
        for setting in (f"{connector} connector, random demos", f"{connector} connector, blind"):
            assert set(scores[setting]["coco"]) == {"0", "4"}, setting
    assert "random demos" in scores and "RICES demos" in scores  # Flamingo's rows stay
    table = (demo_dir / "connectors.md").read_text().splitlines()
    page = (demo_dir / "results.md").read_text()
    assert "![score against shots](kshot.png)" in page and "\n".join(table) in page
    assert [row.split(" | ")[0] for row in table[2:]] == ["| Flamingo", "| LLaVA", "| BLIP-2"]
    assert " + " in table[4] and "nan" not in table[4]  # two stages, each timed
    for row in table[2:]:  # every stage's FLOPs counted, BLIP-2's stage 1 included
        assert float(row.split(" | ")[2]) > 0, row
