"""train.py: the loss falls, resume is exact, bad steps are skipped, DeepSpeed multi-process.

The launcher's own tests (two nodes, a dying rank, a kill while checkpointing) run the real
``deepspeed`` launcher on the CPU accelerator (gloo); those of what ZeRO computes start their
ranks as ``torchrun`` does, forked from a server that has done the imports (the same engine,
started sooner: tests/processes.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train
from data_prep.tiny import write_tiny_shards
from flamingo import Flamingo, FlamingoProcessor
from flamingo.training.checkpoints import CheckpointDir
from flamingo.training.engine import adamw, param_groups
from flamingo.training.ops import SHM_DIR
from tests.helpers import ROOT, build, free_port, noise_image
from tests.processes import fork_ranks, process_group

CONFIG = ROOT / "configs" / "train" / "tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


def overrides(shards: dict[str, str], out: Path, config: Path = CONFIG, **kw) -> list[str]:
    """The tiny shards for every dataset of ``config`` (by its kind), and ``kw``."""
    datasets = yaml.safe_load(config.read_text())["datasets"]
    base = {
        "output_dir": str(out),
        **{f"datasets.{i}.shards": shards[d["kind"]] for i, d in enumerate(datasets)},
        "num_workers": 0,
        "tensorboard": False,
        "log_every": 1,
        **kw,
    }
    return [f"{k}={v}" for k, v in base.items()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_process_training_lowers_the_loss(shards, tmp_path):
    out = tmp_path / "run"
    train.main(["--config", str(CONFIG), *overrides(shards, out, steps=40, checkpoint_every=20)])
    losses = [m["loss/total"] for m in metrics(out)]
    assert len(losses) == 40 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    assert (out / "curves.png").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step-00000020", "step-00000040"}
    model = Flamingo.from_pretrained(out / "model")
    gates = [abs(float(b.attn_gate.detach().tanh())) for b in model.lm.gated_blocks]
    assert all(g > 0 for g in gates), "the gates moved away from 0"
    processor = FlamingoProcessor.from_pretrained(out / "model")
    enc = processor(["<image>a red square"], images=[[noise_image(0)]])
    assert torch.isfinite(model(**enc).logits).all()


BLIP2_CONFIG = ROOT / "configs" / "train" / "tiny-blip2.yaml"
LLAVA_CONFIG = ROOT / "configs" / "train" / "tiny-llava.yaml"
QFORMER = "connector=qformer,vision.cls_token=true,qformer.queries=8,qformer.layers=2,qformer.width=32,qformer.heads=2,qformer.intermediate=64"
RESUMED_RUNS = {
    # every objective and lm.trainable mode: the Q-Former's dropout, the matching loss's hard
    # negatives and LoRA's dropout draw from torch's generator, the Flamingo connector does not
    "flamingo-packed": (
        CONFIG,
        {"datasets.1.packing": "block_diagonal", "datasets.1.packed_len": 48},
    ),
    "llava-full": (
        LLAVA_CONFIG,
        {
            "model_overrides": "[connector=llava,vision.feature_layer=-2,vision.ln_post_on_tokens=false,lm.trainable=full]"
        },
    ),
    "llava-lora": (
        LLAVA_CONFIG,
        {
            "model_overrides": "[connector=llava,vision.feature_layer=-2,vision.ln_post_on_tokens=false,lm.trainable=lora]"
        },
    ),
    "qformer-stage1": (BLIP2_CONFIG, {}),
    "qformer-stage2": (LLAVA_CONFIG, {"model_overrides": f"[{QFORMER}]"}),
}


@pytest.mark.parametrize("run", sorted(RESUMED_RUNS))
def test_resume_is_exact_for_every_objective_and_trainable_mode(shards, tmp_path, run):
    config, extra = RESUMED_RUNS[run]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, steps in ((straight, 6), (resumed, 3), (resumed, 6)):
        args = overrides(shards, out, config, steps=steps, checkpoint_every=3, **extra)
        train.main(["--config", str(config), *args])
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        losses = {k: v for k, v in x.items() if k.startswith("loss/")}
        assert losses == {k: y[k] for k in losses}, x["step"]  # exact: 0.0 apart
    exported = [
        load_file(str(next((out / "model").glob("*.safetensors")))) for out in (straight, resumed)
    ]
    assert exported[0].keys() == exported[1].keys()
    for name, tensor in exported[0].items():
        assert torch.equal(tensor, exported[1][name]), name


def test_a_full_disk_is_named_at_a_checkpoint(shards, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from flamingo.training.checkpoints import CheckpointError
    from flamingo.training.engine import LocalEngine

    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    free = {"bytes": None}

    def disk_usage(path):
        total = real(path)
        return total if free["bytes"] is None else usage(total.total, total.used, free["bytes"])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    out = tmp_path / "run"
    args = ["--config", str(CONFIG), *overrides(shards, out, steps=2, checkpoint_every=1)]
    real_save = LocalEngine.save

    def save(self, directory):  # the first checkpoint fits; then 1 kB is left
        real_save(self, directory)
        free["bytes"] = 1000

    monkeypatch.setattr(LocalEngine, "save", save)
    with pytest.raises(CheckpointError) as error:  # checked before the second one starts
        train.main(args)
    message = str(error.value)
    assert "not enough disk space" in message and str(out / "checkpoints") in message
    assert "0.00 GiB free" in message and "step-00000001" in message
    assert [s for s, _ in CheckpointDir(out / "checkpoints").complete()] == [1]

    def full(self, directory):  # what torch's zip writer says when the disk fills up
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . unexpected pos 721984 vs 721936"
        )

    free["bytes"] = 0
    monkeypatch.setattr(LocalEngine, "save", full)
    with pytest.raises(CheckpointError, match="the disk is full") as error:
        train.main(["--config", str(CONFIG), *overrides(shards, tmp_path / "other", steps=1)])
    assert "unexpected pos" in str(error.value) and "0.00 GiB free" in str(error.value)


def test_fused_adamw_matches_the_for_loop_version():
    """The engine's AdamW is PyTorch's fused kernel on the CPU, and updates as the default."""
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(5)]
    updated = []
    for make in (adamw, torch.optim.AdamW):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:]}]
        opt = make(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.5 - step) + p.detach()
            opt.step()
        updated.append(params)
        if make is adamw:
            assert opt.defaults["fused"] is True
    for got, want in zip(*updated, strict=True):
        torch.testing.assert_close(got, want)


def test_weight_decay_falls_on_the_gated_blocks_matrices_alone():
    model = build()
    decay, no_decay = param_groups(model, 0.1)
    name = {id(p): n for n, p in model.named_parameters()}
    decayed = {name[id(p)] for p in decay["params"]}
    kept = {name[id(p)] for p in no_decay["params"]}
    assert decayed and not decayed & kept
    assert decayed | kept == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in decayed:  # matrices of the gated blocks: no gate, norm, resampler or token row
        assert n.startswith("lm.gated_blocks.") and model.get_parameter(n).ndim == 2
    assert any(n.startswith("lm.gated_blocks.") for n in kept)  # their gates and norms
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_a_run_loads_its_tokenizer_once(shards, tmp_path, monkeypatch):
    from transformers import AutoTokenizer  # flamingo.tokens imports it where it loads one

    calls = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        AutoTokenizer,
        "from_pretrained",
        lambda *a, **kw: calls.append(a) or real(*a, **kw),
    )
    out = tmp_path / "once"
    train.main(["--config", str(CONFIG), *overrides(shards, out, steps=1, checkpoint_every=1)])
    assert len(calls) == 1 and (out / "model" / "config.json").is_file()


def test_bf16_trains_under_autocast_and_tracks_fp32(shards, tmp_path):
    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import LocalEngine

    model = build().train()
    engine = LocalEngine(model, EngineConfig(precision="bf16"), OptimConfig())
    seen = []
    model.lm.gated_blocks[0].attn.to_q.register_forward_hook(
        lambda m, args, out: seen.append((m.weight.dtype, out.dtype))
    )
    processor = FlamingoProcessor.from_config(model.cfg)
    enc = processor(["<image>a red circle"], images=[[noise_image(1)]])
    engine.forward(**enc)
    assert seen == [(torch.float32, torch.bfloat16)]  # fp32 master weights, bf16 products

    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = overrides(
            shards, out, steps=12, checkpoint_every=12, **{"engine.precision": precision}
        )
        train.main(["--config", str(CONFIG), *args])
        runs[precision] = torch.tensor([m["loss/total"] for m in metrics(out)])
    assert runs["bf16"][-3:].mean() < runs["bf16"][:3].mean()  # it learns
    gap = ((runs["bf16"] - runs["fp32"]).abs() / runs["fp32"]).max()
    print(f"bf16 vs fp32 loss, largest relative gap over 12 steps: {gap:.2e}")  # 3.8e-05
    assert 0 < gap < 0.01  # bf16 products really ran, and the curve stays within 1% of fp32


def test_non_finite_loss_skips_the_whole_step(shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = Flamingo.forward

    def sometimes_nan(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if kwargs.get("labels") is not None:  # a training micro-batch
            calls["n"] += 1
            if calls["n"] == 5:  # step 2, second micro-batch
                out.nll_sum = out.nll_sum * float("nan")
        return out

    monkeypatch.setattr(Flamingo, "forward", sometimes_nan)
    out = tmp_path / "nan"
    train.main(["--config", str(CONFIG), *overrides(shards, out, steps=4, checkpoint_every=4)])
    m = metrics(out)
    assert [x["skipped_steps"] for x in m] == [0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(x["grad_norm"])) for i, x in enumerate(m) if i != 1)


def test_resume_auto_ignores_a_partial_checkpoint(shards, tmp_path, caplog):
    out = tmp_path / "partial"
    train.main(["--config", str(CONFIG), *overrides(shards, out, steps=2, checkpoint_every=2)])
    partial = out / "checkpoints" / "step-00000004.tmp"
    partial.mkdir()
    (partial / "engine.pt").write_bytes(b"truncated")
    resumed = overrides(shards, out, steps=3, checkpoint_every=3, **{"optim.lr": 5e-4})
    with caplog.at_level("WARNING", logger="flamingo.checkpoints"):
        train.main(["--config", str(CONFIG), *resumed])
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert not partial.exists()  # pruned once a newer checkpoint completed
    # a resume that changes the optimiser's settings says so (it was silent)
    (warning,) = [m for m in caplog.messages if "changed" in m]
    assert "optim.lr 0.001 -> 0.0005" in warning and "steps 2 -> 3" in warning


# -- multi-process, through the deepspeed launcher ------------------------------------------------


def launcher_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def two_ranks(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``args`` on two ranks as ``torchrun`` starts them, forked with the imports done
    (``tests/processes.py:fork_ranks``), for the tests of what ZeRO computes; the launchers'
    own tests below run DeepSpeed's launcher."""
    return fork_ranks(args, 2, timeout, ROOT, launcher_env())


def train_args(shards, out, ds: str, **kw) -> list[str]:
    return [
        "train.py",
        "--config",
        str(CONFIG),
        *overrides(shards, out, **{"engine.deepspeed": f"configs/deepspeed/{ds}.json"}, **kw),
    ]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


ZERO_RUNS = {
    "zero2": {},
    "zero3": {},
    "zero3-partitioned": {"engine.frozen_weights": "partitioned"},
}


@pytest.fixture(scope="module")
def zero_runs(shards, saved_lm, tmp_path_factory) -> dict[str, Path]:
    """Two processes under ZeRO-2, ZeRO-3, and ZeRO-3 with its frozen weights partitioned (the
    LM then built under zero.Init: from a saved LM, so that all three load one): 4 steps, a
    checkpoint every 2, round-robin mixing (the time embeddings take part in video steps
    only). The uninterrupted runs the ZeRO tests below compare with, launched once."""
    root = tmp_path_factory.mktemp("zero")
    lm = ["lm.architecture=null", f"lm.name_or_path={saved_lm}"]
    for run, options in ZERO_RUNS.items():
        args = train_args(
            shards, root / run, run.split("-")[0], steps=4, checkpoint_every=2,
            mixing="round_robin", **options,
        )  # fmt: skip
        args.append(f"model_overrides={json.dumps(lm)}")
        done = two_ranks(args)
        check(done)
        # DeepSpeed's deprecated gather warned at every step in every rank's log
        assert "all_gather_into_tensor" not in done.stdout + done.stderr, run
    return {run: root / run for run in ZERO_RUNS}


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_processes_resume_exactly_and_verify_their_files(
    zero_runs, shards, saved_lm, tmp_path, stage
):
    # the uninterrupted run's step-2 checkpoint, resumed to step 4 as after a kill there
    straight, resumed = zero_runs[stage], tmp_path / "resumed"
    shutil.copytree(
        straight / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002"
    )
    lm = ["lm.architecture=null", f"lm.name_or_path={saved_lm}"]
    args = train_args(shards, resumed, stage, steps=4, checkpoint_every=2, mixing="round_robin")
    args.append(f"model_overrides={json.dumps(lm)}")
    check(two_ranks(args))
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):  # per dataset, and the gradient norms
        for key in ("loss/total", *(k for k in x if k.startswith("loss/")), "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-6), (x["step"], key)
    wa, wb = (
        load_file(str(straight / "model" / "model.safetensors")),
        load_file(str(resumed / "model" / "model.safetensors")),
    )
    for name in wa:
        # ZeRO-3 included: a parameter that the step's first micro-batch leaves out (the time
        # embeddings, before video) once took its previous step's gradient along in the
        # uninterrupted run but not after the resume (3e-4 apart)
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)
    model = Flamingo.from_pretrained(straight / "model")
    assert any(float(b.attn_gate.detach().abs()) > 0 for b in model.lm.gated_blocks)
    # the manifest covers DeepSpeed's files too: damage one rank's optimiser state and resume
    # takes the checkpoint before
    checkpoints = CheckpointDir(resumed / "checkpoints")
    listed = json.loads((checkpoints.final_path(4) / "COMPLETE").read_text())["files"]
    optim = sorted(n for n in listed if n.endswith("optim_states.pt"))
    assert len(optim) == 2 and any(n.endswith("model_states.pt") for n in listed), listed
    damaged = checkpoints.final_path(4) / optim[1]
    damaged.write_bytes(damaged.read_bytes()[:-1])
    assert checkpoints.resolve("auto") == checkpoints.final_path(2)


@pytest.mark.multiprocess
def test_zero2_and_zero3_agree_when_a_step_leaves_a_parameter_out(zero_runs):
    # Round-robin mixing: the time embeddings take part in video steps only. ZeRO-3 keeps
    # gradient buffers across steps, so a parameter left out of a step must still get a
    # (zero) gradient, or the last video step's gradient is applied again (1.4e-4 apart here).
    weights = {
        run: load_file(str(out / "model" / "model.safetensors")) for run, out in zero_runs.items()
    }
    for name, want in weights["zero2"].items():
        for run in ("zero3", "zero3-partitioned"):
            got = weights[run][name]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{run}: {name}")


def probe(config: str, precision: str, *options: str) -> dict:
    """One watched step of ``tests/deepspeed_probe.py`` in a one-rank group."""
    cmd = ["-m", "tests.deepspeed_probe", f"configs/deepspeed/{config}.json", precision]
    done = fork_ranks([*cmd, *options], 1, 300, ROOT, launcher_env())
    check(done)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def test_zero1_in_bf16_accumulates_in_fp32_and_reduces_once_per_step():
    """configs/deepspeed/zero1.json: the step's three micro-batches accumulate their gradients
    in fp32 and nothing is communicated until the last, which all-reduces them once, in fp32
    (ZeRO-2 reduces after every micro-batch)."""
    report = probe("zero1", "bf16")
    assert report["optimizer"] == "BF16_Optimizer"  # DeepSpeed's fp32-accumulating optimiser
    assert report["collectives"] == {"micro2 all_reduce float32": 1}
    assert report["applied"]


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory) -> str:
    """The tiny config's LM written by ``save_pretrained``: a pretrained LM that every engine
    loads to the same weights (random initialisation differs under ZeRO-3's zero.Init)."""
    from flamingo.lm import build_causal_lm
    from tests.helpers import tiny_config

    directory = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    build_causal_lm(tiny_config().lm).save_pretrained(directory)
    return str(directory)


def test_zero3_partitions_the_frozen_weights_only_when_asked(saved_lm):
    """``frozen_weights: replicated`` keeps every frozen weight out of ZeRO-3; ``partitioned``
    builds the LM partitioned (no rank holds it whole, even while it is loaded) and the same
    step follows: equal new-token rows (their mean initialisation reads the gathered rows) and
    equal gradient norms."""
    replicated = probe("zero3", "fp32", saved_lm)  # engine.frozen_weights: replicated, the default
    partitioned = probe("zero3", "fp32", saved_lm, "frozen_weights=partitioned")
    assert replicated["partitioned"]["frozen"] == replicated["built_partitioned"] == 0
    assert partitioned["partitioned"]["frozen"] == partitioned["frozen_parameters"] > 0
    assert partitioned["built_partitioned"] == partitioned["lm_weights"] > 0
    for report in (replicated, partitioned):
        assert report["partitioned"]["trainable"] > 0
    assert replicated["new_rows"] == pytest.approx(partitioned["new_rows"], rel=1e-12)
    assert replicated["grad_norm"] == pytest.approx(partitioned["grad_norm"], rel=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_partitions_a_checkpoints_frozen_lm_when_asked(saved_lm, tmp_path, precision):
    """``init_from`` a checkpoint whose LM has a source (as an OpenFlamingo release converted
    by id has): ``partitioned`` builds that LM partitioned as it loads (no rank holds it whole),
    in the engine's precision (bf16: the checkpoint's fp32 frozen_dtype changed before the
    build, which refuses a mismatch), and the same step follows as with it replicated. A
    checkpoint whose LM weights are in its own files, or a foreign format whose partitioned
    load is untested, is refused by name (Llama 3.2 Vision's: tests/test_mllama.py)."""
    import train
    from tests.helpers import set_gates

    model = build("lm.architecture=null", f"lm.name_or_path={saved_lm}")
    set_gates(model)
    model.save_pretrained(tmp_path / "ckpt")
    checkpoint = f"init_from={tmp_path / 'ckpt'}"
    replicated = probe("zero3", precision, checkpoint)
    partitioned = probe("zero3", precision, checkpoint, "frozen_weights=partitioned")
    assert replicated["built_partitioned"] == 0
    assert partitioned["built_partitioned"] == partitioned["lm_weights"] > 0
    assert partitioned["partitioned"]["frozen"] == partitioned["frozen_parameters"] > 0
    assert replicated["new_rows"] == pytest.approx(partitioned["new_rows"], rel=1e-12)
    rel = 1e-6 if precision == "fp32" else 1e-2
    assert replicated["grad_norm"] == pytest.approx(partitioned["grad_norm"], rel=rel)
    if precision == "bf16":
        return
    build().save_pretrained(tmp_path / "own")  # the tiny config's LM: random, in the files
    with pytest.raises(ValueError, match="its LM has no source to load partitioned from"):
        train.partitionable_source(tmp_path / "own")
    from tests import test_llava  # a format whose partitioned load is not tested: refused

    _, llava = test_llava.save_reference(tmp_path / "llava")
    with pytest.raises(ValueError, match="a llava checkpoint loads whole"):
        train.partitionable_source(llava)


@pytest.mark.multiprocess
def test_two_nodes_on_one_machine(shards, tmp_path):
    out = tmp_path / "nodes"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(
        "node0 slots=1\nnode1 slots=1\n"
    )  # names only: --no_ssh never contacts them
    common = [
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        free_port(),
    ]
    args = train_args(shards, out, "zero2", steps=2, checkpoint_every=2)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                process_group(
                    [*cmd, *common, "--node_rank", str(r), *args],
                    cwd=ROOT,
                    env=launcher_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            for r in (0, 1)
        ]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert len(metrics(out)) == 2
    state = json.loads(
        (out / "checkpoints" / "step-00000002" / "trainer_rank00001.json").read_text()
    )
    assert state["step"] == 2  # rank 1 (the second node) wrote its part of the checkpoint


@pytest.mark.multiprocess
def test_a_dying_rank_ends_the_job(shards, tmp_path):
    import psutil

    out = tmp_path / "dying"
    args = train_args(shards, out, "zero2", steps=100000, checkpoint_every=100000)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    port = free_port()
    with process_group(
        [*cmd, "--master_port", port, *args],
        cwd=ROOT,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").is_file() or len(metrics(out)) < 2:
            assert time.time() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.5)
        ranks = [
            c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if "--local_rank=1" in " ".join(c.cmdline())
        ]
        assert ranks, "rank 1 not found"
        ranks[0].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "exits with return code" in output or "killed" in output.lower(), output[-2000:]
    # DeepSpeed's CPU communication op made a 66 MB shared-memory segment per rank (the
    # launcher's ranks are all local); a killed run leaves none behind in /dev/shm (RAM)
    assert "shm_comm" in output  # its op was loaded
    assert not [p.name for p in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*")]


@pytest.mark.multiprocess
def test_kill_during_checkpointing_leaves_a_loadable_checkpoint(shards, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        str(CONFIG),
        *overrides(shards, out, steps=100000, checkpoint_every=1, keep_checkpoints=2),
    ]
    checkpoints = out / "checkpoints"
    with process_group(
        cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as proc:
        deadline = time.time() + 240
        while len(list(checkpoints.glob("step-*"))) < 3:
            assert time.time() < deadline and proc.poll() is None, "no checkpoints appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # saving is continuous: lands during a save or between
        proc.wait(timeout=60)
    # a kill between the marker and the rename leaves step-N.tmp/COMPLETE: not a checkpoint
    complete = CheckpointDir(checkpoints).complete()
    assert complete
    last = complete[-1][0]
    train.main(
        ["--config", str(CONFIG), *overrides(shards, out, steps=last + 1, checkpoint_every=1000)]
    )
    assert metrics(out)[-1]["step"] == last + 1


@pytest.mark.multiprocess
def test_deepspeed_offload_in_bf16(shards, tmp_path):
    out = tmp_path / "offload"
    args = train_args(
        shards, out, "zero2-offload", steps=2, checkpoint_every=2, **{"engine.precision": "bf16"}
    )
    check(two_ranks(args, timeout=600))
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in metrics(out))
    model = Flamingo.from_pretrained(out / "model")
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_evaluation_during_training(shards, tmp_path):
    import yaml

    from tests.eval_fixtures import write_all

    tasks = write_all(tmp_path / "bench")
    eval_cfg = {
        "tasks": {k: tasks[k] for k in ("coco", "vqav2")},
        "shots": [0, 2],
        "trials": 1,
        "num_beams": 1,
        "query_set_size": 4,
        "max_items": 2,
        "output_dir": str(tmp_path / "eval"),
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_cfg))
    out = tmp_path / "run"
    train.main(
        [
            "--config",
            str(CONFIG),
            *overrides(
                shards,
                out,
                steps=4,
                checkpoint_every=4,
                eval_every=2,
                eval_config=tmp_path / "eval.yaml",
            ),
        ]
    )
    evals = [m for m in metrics(out) if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in evals] == [2, 4]
    assert {"eval/coco/0shot/CIDEr", "eval/coco/2shot/CIDEr", "eval/vqav2/2shot/accuracy"} <= set(
        evals[0]
    )


# -- damaged checkpoints, logs after a resume, datasets that run out ---------------------------


def test_resume_falls_back_past_a_damaged_checkpoint_and_rewrites_the_log(shards, tmp_path, caplog):
    straight, out = tmp_path / "straight", tmp_path / "damaged"
    train.main(["--config", str(CONFIG), *overrides(shards, straight, steps=4, checkpoint_every=2)])
    train.main(["--config", str(CONFIG), *overrides(shards, out, steps=3, checkpoint_every=2)])
    engine_pt = out / "checkpoints" / "step-00000003" / "engine.pt"
    engine_pt.write_bytes(engine_pt.read_bytes()[:-100])  # a disk that filled up, say
    with caplog.at_level("WARNING", logger="flamingo.checkpoints"):
        train.main(["--config", str(CONFIG), *overrides(shards, out, steps=4, checkpoint_every=2)])
    assert any("step-00000003" in m and "engine.pt" in m for m in caplog.messages)
    # resumed at step 2: the log holds steps 1..4 once each, the same as an uninterrupted run
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    for x, y in zip(metrics(straight), metrics(out), strict=True):
        assert x["loss/total"] == pytest.approx(y["loss/total"], rel=1e-5, abs=1e-6), x["step"]


@pytest.mark.parametrize("damaged", ["trainer_rank00000.json", "train_config.json", "COMPLETE"])
def test_every_file_of_a_checkpoint_is_verified(tmp_path, damaged):
    from flamingo.training.checkpoints import CheckpointError

    checkpoints = CheckpointDir(tmp_path)
    for step in (1, 2):
        tmp = checkpoints.prepare(step)
        (tmp / "engine.pt").write_bytes(b"weights %d" % step)
        (tmp / "trainer_rank00000.json").write_text(json.dumps({"step": step}))
        (tmp / "train_config.json").write_text("{}")
        (tmp / "deepspeed" / "zero").mkdir(parents=True)
        (tmp / "deepspeed" / "zero" / "optim_states.pt").write_bytes(b"state")
        checkpoints.commit(step)
    assert checkpoints.resolve("auto") == checkpoints.final_path(2)
    path = checkpoints.final_path(2) / damaged
    path.write_bytes(path.read_bytes()[:-1] + b"#")  # same size, other contents
    assert checkpoints.resolve("auto") == checkpoints.final_path(1)
    with pytest.raises(CheckpointError, match=f"step-00000002.*{damaged}"):
        checkpoints.resolve(str(checkpoints.final_path(2)))
    nested = checkpoints.final_path(1) / "deepspeed" / "zero" / "optim_states.pt"
    nested.unlink()
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):
        checkpoints.resolve("auto")


def test_a_checkpoint_from_before_manifests_still_resumes(tmp_path):
    checkpoints = CheckpointDir(tmp_path)
    tmp = checkpoints.prepare(5)
    (tmp / "engine.pt").write_bytes(b"weights")
    tmp.rename(checkpoints.final_path(5))
    (checkpoints.final_path(5) / "COMPLETE").write_text("5\n")
    assert checkpoints.resolve("auto") == checkpoints.final_path(5)


def test_an_epoch_mode_dataset_starts_its_next_epoch(shards, tmp_path, caplog):
    out = tmp_path / "epochs"
    epoch_mode = {"datasets.1.resampled": "false"}  # pairs: 48 samples, 6 batches of 8
    with caplog.at_level("INFO", logger="flamingo.train"):
        train.main(
            [
                "--config",
                str(CONFIG),
                *overrides(shards, out, steps=8, checkpoint_every=8, **epoch_mode),
            ]
        )
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))
    assert any("dataset pairs: starting epoch 1 at step 6" in m for m in caplog.messages)


def test_an_epoch_mode_dataset_can_stop_the_run_after_a_checkpoint(shards, tmp_path, caplog):
    out = tmp_path / "stop"
    stop = {"datasets.1.resampled": "false", "datasets.1.at_epoch_end": "stop"}
    with caplog.at_level("WARNING", logger="flamingo.train"):
        train.main(
            ["--config", str(CONFIG), *overrides(shards, out, steps=20, checkpoint_every=4, **stop)]
        )
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    assert any("stopping at step 6 of 20" in m and "pairs" in m for m in caplog.messages)
    assert CheckpointDir(out / "checkpoints").latest().name == "step-00000006"
    assert (out / "model" / "model.safetensors").is_file()
    # the step that found pairs empty had taken an interleaved batch already: the checkpoint
    # holds the loaders as they were at the step's start, as a run that ended at step 6 does
    ended = tmp_path / "ended"
    train.main(["--config", str(CONFIG), *overrides(shards, ended, steps=6, checkpoint_every=6)])

    def loaders(run):
        state = json.loads((run / "checkpoints/step-00000006/trainer_rank00000.json").read_text())
        return {k: v["streams"] for k, v in state["loaders"].items() if k != "pairs"}

    assert loaders(out) == loaders(ended)


def test_the_model_is_built_where_it_will_run(monkeypatch):
    from flamingo.training.engine import construction_device

    assert construction_device() == torch.device("cpu")  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert construction_device() == torch.device("cuda", 3)


def test_the_trainable_parts_are_exactly_the_models_trainable_parameters():
    """What ZeRO-3 is handed with replicated frozen weights: the trainable parameters under the
    model's own names, none frozen; a trainable parameter outside trainable_modules() is an
    error, not a weight ZeRO never sees."""
    from flamingo.training.engine import TrainableParts

    model = build()
    parts = TrainableParts(model)
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, _ in parts.named_parameters()} == want
    assert not any(name.startswith(("vision.", "lm.hf.")) for name, _ in parts.named_parameters())
    model.lm.hf.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable_modules"):
        TrainableParts(model)


def test_a_finished_builds_leftover_lock_is_found_and_a_live_one_kept(tmp_path):
    """tests/conftest.py removes the lock a killed DeepSpeed op build leaves behind (it hung
    the next build of that op for ever), never the lock of a build under way."""
    import os
    import time

    from tests.conftest import stale_extension_locks

    finished, running = tmp_path / "py311_cu130" / "shm_comm", tmp_path / "py311_cu130" / "adam"
    for d in (finished, running):
        d.mkdir(parents=True)
    old = time.time() - 600
    (finished / "lock").touch()
    os.utime(finished / "lock", (old, old))
    (finished / "shm_comm.so").touch()  # built after the lock was taken
    (running / "adam.so").touch()
    os.utime(running / "adam.so", (old, old))  # an older build, being rebuilt now
    (running / "lock").touch()
    assert stale_extension_locks(tmp_path) == [finished / "lock"]


def test_shards_that_do_not_exist_are_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """A brace list of missing files surfaced after the model was built, deep in the loader
    (a glob matching nothing was refused at once): now both before anything is built."""

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the shards were checked")

    monkeypatch.setattr(Flamingo, "from_config", built)
    base = ["--config", str(CONFIG), f"output_dir={tmp_path / 'out'}"]
    missing = f"datasets.0.shards={tmp_path}/nowhere-{{00000..00003}}.tar"
    with pytest.raises(ValueError, match=r"datasets\.0 \(interleaved\): 4 of 4 shards do not"):
        train.main([*base, missing])
    with pytest.raises(ValueError, match=r"datasets\.0 \(interleaved\): .* matches no file"):
        train.main([*base, f"datasets.0.shards={tmp_path}/nowhere-*.tar"])


def test_the_curves_show_each_dataset_the_weighted_total_and_stage_1_objectives_apart():
    """The weighted total shared the "NLL per target token" axis with the datasets, squashing
    them; BLIP-2's stage 1 showed one "NLL" of about 21 that was its three losses summed."""
    import matplotlib

    matplotlib.use("Agg")
    from flamingo.training.runlog import curves_figure

    def lines(ax):
        return {line.get_label() for line in ax.get_lines()}

    stage2 = [
        {"step": s, "loss/total": 9.0 - s, "loss/pairs": 2.0, "loss/docs": 1.5, "gate/0": 0.1}
        for s in (1, 2)
    ]
    axes = curves_figure(stage2).axes
    assert lines(axes[0]) == {"pairs", "docs"} and lines(axes[1]) == {"total"}
    assert axes[0].get_ylabel() == "NLL per target token" and lines(axes[2]) == {"0"}
    stage1 = [
        {"step": s, "loss/total": 21.0, "loss/pairs": 21.0, "itc/pairs": 9.0, "itm/pairs": 0.7}
        | {"itg/pairs": 11.3}
        for s in (1, 2)
    ]
    axes = curves_figure(stage1).axes
    assert lines(axes[0]) == {"itc (pairs)", "itm (pairs)", "itg (pairs)"}
    assert axes[0].get_ylabel() == "loss per objective" and len(axes) == 2
