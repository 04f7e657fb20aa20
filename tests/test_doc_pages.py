"""The docs pages' code blocks (docs/*.md; the README's: tests/test_docs.py). A block that can
run here runs as written, in a scratch folder holding tiny stand-ins for what it reads; one that
needs the Hub, GPUs or a corpus says so above it (tests/helpers/docs.py) and is compiled, its
imports run and its commands parsed by the programs they call, so a flag, a config path or a
name that drifts fails here. The Hub blocks of LLaVA and Llama 3.2 Vision run too, against
tiny checkpoints laid out under their ids in an offline Hub cache."""

from __future__ import annotations

import ast
import json
import sys

import pytest
import yaml

from tests.helpers import ROOT, lay_out
from tests.helpers.docs import NEEDS, blocks, check_command, commands

PAGES = sorted((ROOT / "docs").glob("*.md"))
BLOCKS = [block for page in PAGES for block in blocks(page)]


def where(block) -> str:
    return f"{block.page}: {block.code.splitlines()[0]}"


def test_every_block_is_code_of_a_known_kind_and_says_what_it_needs():
    for block in BLOCKS:
        assert block.language in {"bash", "python", "yaml", ""}, where(block)
        assert block.needs <= NEEDS, where(block)
        assert not (block.needs and block.language in {"yaml", ""}), where(block)
    runnable = [b for b in BLOCKS if b.language in {"bash", "python"} and not b.needs]
    assert {b.page for b in runnable} >= {"python.md", "checkpoints.md", "models.md"}


def test_every_command_on_the_pages_is_one_its_program_accepts():
    seen = set()
    for block in BLOCKS:
        if block.language == "bash":
            for argv in commands(block.code):
                seen.add(check_command(argv))
    assert seen >= {"train.py", "deepspeed", "torchrun", "eval.run", "lmms_eval"}
    assert seen >= {"flamingo.convert", "data_prep.pairs", "data_prep.interleaved"}


def test_every_python_block_compiles_and_its_imports_run():
    for block in BLOCKS:
        if block.language == "python":
            tree = ast.parse(block.code, block.page)
            imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
            exec(compile(ast.Module(imports, []), block.page, "exec"), {})


def test_the_yaml_fragments_are_valid_entries():
    from flamingo.training.config import DatasetConfig
    from flamingo.typed_config import from_dict

    fragments = [b for b in BLOCKS if b.language == "yaml"]
    assert fragments
    for block in fragments:
        for entry in yaml.safe_load(block.code):
            from_dict(DatasetConfig, entry)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder where the pages' commands run as written: the configs and train.py linked in,
    the tiny shards (data_prep.tiny), and LLaVA-format conversations converted by the
    conversations command of docs/data.md into shards/llava."""
    from PIL import Image

    from data_prep import conversations, tiny

    root = tmp_path_factory.mktemp("pages")
    for name in ("configs", "train.py"):
        (root / name).symlink_to(ROOT / name)
    tiny.write_tiny_shards(root / "data" / "tiny")
    (root / "data" / "coco").mkdir()
    records = []
    for i, colour in enumerate(["red", "green", "blue", "white"] * 3):
        Image.new("RGB", (32, 32), colour).save(root / "data" / "coco" / f"{i}.png")
        turns = [("human", "<image>\nWhat colour is it?"), ("gpt", f"It is {colour}.")]
        chat = [{"from": who, "value": text} for who, text in turns]
        records.append({"id": str(i), "image": f"coco/{i}.png", "conversations": chat})
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    (argv,) = [
        argv
        for block in BLOCKS
        if block.language == "bash"
        for argv in commands(block.code)
        if argv[:3] == ["python", "-m", "data_prep.conversations"]
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        conversations.main(argv[3:])
    assert list((root / "shards" / "llava").glob("conversations-*.tar"))
    return root


def test_the_python_blocks_that_need_nothing_run_as_written(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    ran = 0
    for block in BLOCKS:
        if block.language == "python" and not block.needs:
            exec(compile(block.code, block.page, "exec"), {"__name__": "__main__"})
            ran += 1
    assert ran >= 2
    assert (scratch / "ckpt" / "config.json").is_file()  # checkpoints.md's save, then load


def test_the_command_blocks_that_need_nothing_run_as_written(scratch, monkeypatch):
    """docs/models.md: BLIP-2's stages 1 and 2, LLaVA's stages 1 and 2 (on the conversations
    converted above), each from the one before, as the page shows them; docs/training.md:
    two processes through DeepSpeed's launcher (the real one, on the CPU)."""
    import train
    from tests.processes import run_group
    from tests.test_train import launcher_env

    monkeypatch.chdir(scratch)
    ran = []
    for block in BLOCKS:
        if block.language == "bash" and not block.needs:
            for argv in commands(block.code):
                if argv[0] == "deepspeed":
                    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", *argv[1:]]
                    done = run_group(launcher, 300, cwd=scratch, env=launcher_env())
                    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
                else:
                    assert argv[:2] == ["python", "train.py"], f"{block.page}: no runner: {argv}"
                    train.main(argv[2:])
                ran.append(argv)
    assert len(ran) == 5
    for run in ("tiny-zero2", "tiny-blip2", "tiny-blip2-stage2", "tiny-llava", "tiny-llava-stage2"):
        assert (scratch / "runs" / run / "checkpoints" / "step-00000020").is_dir(), run
    assert (scratch / "runs" / "tiny-blip2" / "model" / "qformer_stage1.safetensors").is_file()
    for run in ("tiny-zero2", "tiny-blip2-stage2", "tiny-llava", "tiny-llava-stage2"):
        assert (scratch / "runs" / run / "model" / "config.json").is_file(), run


def test_the_hub_blocks_run_on_tiny_stand_ins_under_their_ids(tmp_path, offline_cache, monkeypatch):
    """docs/checkpoints.md's LLaVA and Llama 3.2 Vision blocks by Hub id, run as written
    against tiny random checkpoints that transformers saved, laid out in an offline Hub cache
    under those ids (converted on the first load, as a real id would be)."""
    from PIL import Image

    from tests import test_llava, test_mllama

    stand_ins = {
        "llava-hf/llava-1.5-7b-hf": test_llava.save_reference(tmp_path / "llava")[1],
        "meta-llama/Llama-3.2-11B-Vision-Instruct": test_mllama.save_reference(
            tmp_path / "mllama", "11b-like"
        )[1],
    }
    for repo_id, directory in stand_ins.items():
        lay_out(offline_cache, repo_id, directory)
    Image.new("RGB", (64, 48), "red").save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    ran = set()
    for block in BLOCKS:
        named = {repo_id for repo_id in stand_ins if f'"{repo_id}"' in block.code}
        if block.language == "python" and named:
            scope = {"__name__": "__main__"}
            exec(compile(block.code, block.page, "exec"), scope)
            assert scope["out"].shape[1] > scope["batch"]["input_ids"].shape[1]  # it generated
            ran |= named
    assert ran == set(stand_ins)
    # their convert commands too: by id, from a directory in transformers' format, and back
    # (a fine-tuned model of ours: here the one just converted)
    import shutil

    from flamingo.convert.__main__ import main as convert

    (tmp_path / "path" / "to").mkdir(parents=True)
    ids = {
        "llava": "llava-hf/llava-1.5-7b-hf",
        "mllama": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    }
    for kind, repo_id in ids.items():
        (tmp_path / "path" / "to" / f"{kind}-checkpoint").symlink_to(stand_ins[repo_id])
    converted = []
    for block in BLOCKS:
        for argv in commands(block.code) if block.language == "bash" else []:
            if argv[:3] == ["python", "-m", "flamingo.convert"] and argv[3] in ids:
                convert(argv[3:])
                converted.append(argv[3:5])
            elif argv[3:4] == ["to-mllama"]:
                shutil.copytree(tmp_path / argv[5], tmp_path / argv[4])
                convert(argv[3:])
                config = json.loads((tmp_path / argv[5] / "config.json").read_text())
                assert config["model_type"] == "mllama"
                converted.append(argv[3:5])
    assert sorted(converted) == sorted(
        [[kind, source] for kind in ids for source in (ids[kind], f"path/to/{kind}-checkpoint")]
        + [["to-mllama", "our_finetuned_dir"]]
    )
