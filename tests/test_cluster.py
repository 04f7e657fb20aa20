"""What a first cluster run meets, rehearsed on one CPU machine (DeepSpeed's own launcher for the
nodes; where only the ranks matter, ranks started as torchrun starts them, forked with the
imports done):
an evaluation during training longer than the process group's timeout, a node-local output
folder, a lost (or added) node, the export's memory (issue 41)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import train
from data_prep.tiny import write_tiny_shards
from tests.helpers import ROOT, free_port
from tests.processes import fork_ranks, process_group
from tests.test_train import CONFIG, launcher_env, metrics, overrides


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


def exported(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def whole_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint / "trainable_state.safetensors"), framework="pt") as f:
        return {
            k.removeprefix("weight."): f.get_tensor(k)
            for k in f.keys()  # noqa: SIM118 (safe_open has no __iter__)
            if k.startswith("weight.")
        }


def eval_config(tmp_path: Path) -> Path:
    from tests.eval_fixtures import write_all

    tasks = write_all(tmp_path / "bench")
    cfg = {
        "tasks": {"vqav2": tasks["vqav2"]},
        "shots": [0],
        "trials": 1,
        "num_beams": 1,
        "batch_size": 8,  # one batch a rank: 2 of vqav2's 3 items on rank 0, 1 on rank 1
        "output_dir": str(tmp_path / "eval"),
        "cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.multiprocess
@pytest.mark.parametrize(("config", "precision"), [("zero2", "bf16"), ("zero3", "fp32")])
def test_the_whole_trainable_state_carries_a_deepspeed_run_exactly(config, precision):
    # (first in this file: its one-rank DeepSpeed builds the CPU communication op if no test
    # has yet, so that the timed launches below never wait for a build)
    # taken after two steps, given to an engine with other trainable weights, taken back:
    # equal, and one more step on each gives the same weights (ZeRO-1/2's linked optimiser
    # views, ZeRO-3's partitioned working copies)
    command = ["-m", "tests.trainable_state_probe", f"configs/deepspeed/{config}.json"]
    result = fork_ranks([*command, precision], 1, 300, ROOT, launcher_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["moments"] == 2 * report["keys"] // 3 > 0 and report["steps"] == [2, 2]
    assert report["same_keys"] and report["loaded"] == 0.0 and report["after_step"] == 0.0


def test_the_whole_trainable_state_carries_a_plain_run_exactly():
    from flamingo import Flamingo, FlamingoProcessor
    from flamingo.losses import make_labels
    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import LocalEngine
    from tests.helpers import noise_image, tiny_config

    cfg = tiny_config()
    processor = FlamingoProcessor.from_config(cfg)
    enc = processor(
        ["<image>a red circle<|endofchunk|>"], images=[[noise_image(1)]], padding_side="right"
    )
    labels = make_labels(enc["input_ids"], enc["attention_mask"], processor.special_tokens)

    def engine(shift: float) -> LocalEngine:
        torch.manual_seed(0)
        model = Flamingo.from_config(cfg, processor)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(shift)
        return LocalEngine(model, EngineConfig(), OptimConfig(warmup_steps=1, lr=1e-2))

    def step(e: LocalEngine) -> None:
        e.begin_step(1e-2)
        media = {"pixel_values": enc["pixel_values"], "media_slots": enc["media_slots"]}
        e.micro_step(
            e.forward(enc["input_ids"], enc["attention_mask"], labels=labels, **media).nll_sum
        )
        e.finish_step()

    a = engine(0.0)
    step(a), step(a)
    state, steps = a.trainable_state()
    b = engine(0.5)
    b.load_trainable_state(state.get, steps)
    step(a), step(b)
    after_a, after_b = a.trainable_state()[0], b.trainable_state()[0]
    assert steps == 2 and after_a.keys() == after_b.keys()
    diff = {k: (after_a[k] - after_b[k]).abs().max().item() for k in after_a}
    assert not any(diff.values()), sorted(diff.items(), key=lambda kv: -kv[1])[:6]


@pytest.mark.multiprocess
def test_a_run_moves_between_one_and_two_processes_and_evaluates_past_the_timeout(shards, tmp_path):
    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
    # one process, the plain engine, to step 2
    train.main(["--config", str(CONFIG), *overrides(shards, one, steps=2, checkpoint_every=2)])
    # its checkpoint resumed on two processes under ZeRO-2, which evaluate for 12 s each at
    # step 3 while their collectives time out after 9 s: no rank waits for another's eval
    record = tmp_path / "record"
    args = overrides(
        shards,
        two,
        steps=3,
        checkpoint_every=3,
        eval_every=3,
        eval_config=eval_config(tmp_path),
        **{"engine.deepspeed": "configs/deepspeed/zero2.json", "engine.timeout_minutes": 0.15},
    )
    resume = ["--resume", str(one / "checkpoints" / "step-00000002")]
    command = ["tests/cluster_train.py", "--config", str(CONFIG), *resume, *args]
    env = dict(launcher_env(), FLAMINGO_TEST_EVAL_SLEEP="12", FLAMINGO_TEST_RECORD=str(record))
    result = fork_ranks(command, 2, 420, ROOT, env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "carried over to 2" in result.stdout + result.stderr  # the data positions
    logged = metrics(two)
    assert [m["step"] for m in logged if "loss/total" in m] == [1, 2, 3]  # the history too
    assert any("eval/vqav2/0shot/accuracy" in m for m in logged if m["step"] == 3)
    # the export was gathered to rank 0 alone, tensor by tensor
    held = {r: json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert held[1]["held"] == 0 and held[0]["held"] == held[0]["asked"] > 4
    step3 = two / "checkpoints" / "step-00000003"
    for name, tensor in exported(two).items():
        assert torch.equal(tensor, whole_weights(step3)[name]), name
    # and back on one process (the plain engine): the same weights, exactly
    train.main(["--config", str(CONFIG), "--resume", str(step3), *overrides(shards, back, steps=3)])
    for name, tensor in exported(two).items():
        assert torch.equal(tensor, exported(back)[name]), name
    # one more step from there: the optimiser went on counting from the 3 steps it had taken
    train.main(["--config", str(CONFIG), *overrides(shards, back, steps=4, checkpoint_every=4)])
    with safe_open(
        str(back / "checkpoints" / "step-00000004" / "trainable_state.safetensors"), "pt"
    ) as f:
        assert f.metadata()["optimizer_steps"] == "4"


@pytest.mark.multiprocess
def test_a_node_local_output_dir_is_refused_before_the_first_step(shards, tmp_path):
    # two "nodes" on one machine, each launched from its own folder: a relative output_dir is
    # then a folder of each node's own, as on machines without a shared filesystem
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: --no_ssh
    port = free_port()
    absolute = {
        "engine.deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json"),
        "model": str(ROOT / "configs" / "model" / "tiny.yaml"),
    }
    args = overrides(shards, Path("run"), steps=2, **absolute)
    outputs, codes = [], []
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile)]
        command += ["--no_ssh", "--master_addr", "127.0.0.1", "--master_port", port]
        command += [
            "--node_rank",
            str(rank),
            str(ROOT / "train.py"),
            "--config",
            str(CONFIG),
            *args,
        ]
        procs.append((command, node))
    with (
        process_group(
            procs[0][0],
            cwd=procs[0][1],
            env=launcher_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as first,
        process_group(
            procs[1][0],
            cwd=procs[1][1],
            env=launcher_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as second,
    ):
        for proc in (first, second):
            outputs.append(proc.communicate(timeout=300)[0])
            codes.append(proc.returncode)
    assert codes[0] != 0 and codes[1] != 0, outputs
    assert any("not one folder for every rank" in o for o in outputs), outputs[0][-3000:]
    for rank in (0, 1):
        assert not (tmp_path / f"node{rank}" / "run" / "metrics.jsonl").exists()
