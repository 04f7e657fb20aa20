"""The training-step benchmark: it runs both implementations and writes its record (tiny, one
step), under DeepSpeed in bf16 too, and its FLOP formula counts what the model computes.

Speed and memory are measured by ``python -m bench.train_step``, not asserted here."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.run_flops import MatmulFlops
from tests.helpers import ROOT


def run_bench(tmp_path, *extra: str) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "bench.train_step", "--config", "tiny", "--batch", "1"]
    cmd += ["--steps", "1", "--repeats", "1", "--out", str(tmp_path), *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("train_step-tiny*.json")
    return json.loads(path.read_text()), done.stdout


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory) -> tuple[dict, str, object]:
    """One profiled run of the bench, shared: (record, stdout, its output folder)."""
    out = tmp_path_factory.mktemp("bench")
    record, stdout = run_bench(out, "--profile", "3")
    return record, stdout, out


def test_train_step_bench_writes_ratios_and_a_profile(profiled_run):
    record, stdout, _ = profiled_run
    for impl in ("ours", "openflamingo"):
        result = record["results"][impl]
        assert result["samples_per_s"] > 0 and result["peak_mib"] > 0
        assert len(result["top_ops"]) == 3 and all(op["ms"] >= 0 for op in result["top_ops"])
        # live tensors: at least the weights, less than the whole process
        weights_mib = result["trainable_params"] * 4 / 2**20
        assert weights_mib < result["peak_live_mib"] < result["peak_mib"]
        assert result["flops_per_step"]["total"] > 0 and result["tflops_per_s"] > 0
        assert result["mfu"] > 0  # against a measured matrix product on this CPU
        assert any("scaled_dot_product" in op for op in result["attention_ops"])
    assert record["ratios"]["samples_per_s"] > 0 and record["ratios"]["peak_live_memory"] > 0
    assert record["peak_source"] == "measured fp32 matmul" and record["peak_tflops"] > 0
    assert "| samples/s |" in stdout and "costliest ops" in stdout
    assert "| flash attention |" in stdout


def test_train_step_bench_runs_both_under_deepspeed_zero2_in_bf16(tmp_path):
    record, _ = run_bench(tmp_path, "--engine", "zero2", "--precision", "bf16")
    assert (record["engine"], record["precision"]) == ("zero2", "bf16")
    for impl in ("ours", "openflamingo"):
        assert record["results"][impl]["samples_per_s"] > 0


def test_the_report_tabulates_every_record(profiled_run, tmp_path):
    import shutil

    from bench.report import report

    record, _, out = profiled_run
    for path in out.glob("*.json"):
        shutil.copy(path, tmp_path)
    (tmp_path / "generation-tiny-cpu.json").write_text(
        json.dumps(
            dict(config="tiny", batch=8, beams=3, new_tokens=20, machine="m", speedup=30.0)
            | {"seconds": {"ours": 0.3, "openflamingo": 9.0}, "identical_tokens": True}
        )
    )
    (tmp_path / "generation-idefics-tiny-cpu.json").write_text(
        json.dumps(
            dict(config="tiny", batch=8, beams=1, new_tokens=20, machine="m", speedup=2.5)
            | {"seconds": {"ours": 0.2, "idefics": 0.5}, "identical_tokens": True}
            | {"against": "idefics"}
        )
    )
    page = report(tmp_path)
    assert "| tiny | transformers' IDEFICS | 8, 1, 20 | m | 0.20 | 0.50 | **2.5x** |" in page
    speed = record["ratios"]["samples_per_s"]
    assert f"**{speed:.2f}x**" in page and "train_step-tiny-cpu.json" in page
    assert "**30.0x**" in page and "## Data loader" not in page
    # the speed ceiling: OpenFlamingo's step over the model FLOPs at the measured peak
    flops = record["results"]["ours"]["flops_per_step"]["total"]
    ceiling = record["results"]["openflamingo"]["step_s"] * record["peak_tflops"] * 1e12 / flops
    assert f"at most {ceiling:.2f}x OpenFlamingo" in page


def test_mfu_uses_the_datasheet_peak_of_the_named_device():
    from bench.flops import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # not the SXM figure
    assert peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0  # not the SXM figure either
    assert peak_tflops("NVIDIA H200 NVL", "fp32") == 60.0
    assert peak_tflops("x86_64 CPU, 2 threads", "fp32") is None


def test_bf16_without_deepspeed_is_refused_with_the_fix(capsys):
    from bench.train_step import main

    with pytest.raises(SystemExit) as ended:
        main(["--precision", "bf16"])
    assert ended.value.code == 2 and "--engine zero2" in capsys.readouterr().err


@pytest.fixture
def counted_vision_attention():
    # nn.MultiheadAttention's inference fast path is one fused op: let its products show
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(True)


def test_the_flop_formula_counts_what_the_model_computes(counted_vision_attention):
    from bench.flops import forward_flops, train_step_flops
    from bench.train_step import SEQ_LEN, batch_on_device, bench_config, prepare_ours, step_shape
    from flamingo.losses import make_labels, summed_nll

    torch.manual_seed(0)
    seq_len = SEQ_LEN["tiny"]
    args = argparse.Namespace(batch=2, seq_len=seq_len, images=3, device="cpu", precision="fp32")
    model = prepare_ours("tiny", args)[0].train()
    special = model.lm.special_tokens
    ids, mask, pixels = batch_on_device(args, model.vision.cfg.image_size, special)
    shape = step_shape(bench_config("tiny"), 2, seq_len, 3)
    with MatmulFlops() as forward:
        model(ids, mask, pixel_values=pixels)
    assert "convolution" in forward.ops and any("attention" in op for op in forward.ops)
    labels = make_labels(ids, mask, special)
    with MatmulFlops() as train:  # the head on every row, as the formula counts it
        summed_nll(model(ids, mask, pixel_values=pixels).logits, labels).backward()
    assert sum(forward_flops(shape).values()) == pytest.approx(forward.total, 1e-3)
    assert train_step_flops(shape)["total"] == pytest.approx(train.total, 1e-3)


def test_the_flop_formula_counts_swiglu_grouped_query_attention_and_video_frames(
    counted_vision_attention,
):
    # configs/model/tiny.yaml: a Llama LM (gated MLP, 2 key/value heads for 4 query heads),
    # time embeddings for video
    from bench.flops import forward_flops
    from bench.train_step import step_shape
    from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor

    cfg = FlamingoConfig.from_yaml(ROOT / "configs/model/tiny.yaml")
    torch.manual_seed(0)
    model = Flamingo.from_config(cfg).eval()
    special = FlamingoProcessor.from_config(cfg).special_tokens
    batch, seq_len, images, frames = 2, 24, 2, 3
    ids = torch.randint(3, 800, (batch, seq_len))
    ids[:, 0], ids[:, 12] = special.image_id, special.image_id
    pixels = torch.randn(batch, images, frames, 3, 32, 32)
    shape = step_shape(cfg, batch, seq_len, images, frames=frames)
    assert (shape.lm_mlp_matrices, shape.lm_kv_width) == (3, 32)  # 2 heads x 16
    with torch.no_grad(), MatmulFlops() as forward:
        model(ids, torch.ones_like(ids), pixel_values=pixels)
    assert sum(forward_flops(shape).values()) == pytest.approx(forward.total, 1e-3)


def test_the_hand_count_counts_attention_whichever_kernel_runs():
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    forward = 2 * (2 * 3) * 5 * 5 * (4 + 4)  # q k^T and p v over (B H) = 6 heads
    expected = 3 * forward  # the backward is twice the forward
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend), MatmulFlops() as count:
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
        assert count.total == expected, (backend, count.ops)


# -- the GPU bench (bench/gpu.py): its smoke mode, every section tiny on the CPU -----------------


def test_the_gpu_bench_runs_every_section_in_smoke_mode(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == [
        *("env", "kernels", "step_1b", "step_9b", "generation", "vs_openflamingo", "packing"),
    ]
    captions = sections["packing"]["captions"]
    assert captions["packed"]["padding_tokens"] < captions["one_a_row"]["padding_tokens"]
    assert captions["packed"]["rows"] < captions["one_a_row"]["rows"]
    for section, results in sections.items():
        for name, result in results.items():
            assert not {"error", "skipped"} & set(result), (section, name, result)
    assert set(sections["step_1b"]) == {
        *("zero1_bf16", "zero2_bf16", "zero2_bf16_checkpointing", "torch_bf16"),
        "zero2_bf16_checkpoint_gated_blocks",
    }
    for step in (*sections["step_1b"].values(), *sections["step_9b"].values()):
        for key in ("step_s_median", "step_s_min", "peak_mib", "syncs_per_step"):
            assert key in step
        assert step["mfu_measured"] > 0 and step["mfu_6nt_measured"] > 0
        kernels = step["attention_kernels"]
        assert any(site.startswith("flamingo/xattn.py") for site in kernels), kernels
    kernels = sections["kernels"]
    from flamingo.xattn import flex_attention

    if flex_attention is not None:  # torch >= 2.5
        assert kernels["cross_attention"]["max_abs_diff_out"] < 1e-5  # flex == SDPA
    assert kernels["mpt_attention"]["max_abs_diff"] < 1e-5  # ours == eager
    assert {"fused_chunk_16", "fused_chunk_default", "unfused"} <= set(kernels["fused_loss"])
    assert sections["generation"]["1b"]["beams_3"]["new_tokens_per_s"] > 0
    # the report tabulates a (non-smoke) GPU record
    from bench.report import report

    record = json.loads(out.read_text()) | {"smoke": False}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "gpu-test.json").write_text(json.dumps(record))
    page = report(tmp_path / "results")
    assert "## GPU bench (`gpu-test.json`)" in page and "| step_9b | torch_bf16_16_tokens |" in page


def test_the_gpu_bench_records_failures_and_what_the_budget_left_out(tmp_path):
    import time

    from bench.gpu import Bench

    bench = Bench(tmp_path / "gpu.json", budget_s=30, smoke=False, device="cpu")
    bench.measure("kernels", "works", lambda: {"ms": 1.0})
    bench.measure("kernels", "fails", lambda: 1 / 0)
    bench.measure("step_9b", "too_long", lambda: {"ms": 2.0}, cost=75)  # 75 s of the 30
    started = time.time()
    bench.measure("step_1b", "slower", lambda: time.sleep(30) or {}, cost=1.0)  # its own alarm
    assert time.time() - started < 5
    saved = json.loads((tmp_path / "gpu.json").read_text())["sections"]  # rewritten each time
    assert saved["kernels"]["works"]["ms"] == 1.0
    assert "ZeroDivisionError" in saved["kernels"]["fails"]["error"]
    assert saved["step_9b"]["too_long"]["skipped"].startswith("budget")
    assert saved["step_1b"]["slower"]["error"].startswith("timed out: stopped after 2 s")


def test_the_gpu_bench_plans_what_decides_a_default_first_and_fits_the_device():
    from bench.gpu import DEFAULT_BUDGET_S, FULL, plan

    planned = [
        (f"{section}/{name}", cost) for section, name, cost, _, _ in plan(FULL, "cuda", False)
    ]
    names = [name for name, _ in planned]
    decisions = [
        *("kernels/cross_attention", "kernels/fused_loss", "step_1b/torch_bf16"),
        *("step_1b/torch_bf16_flex", "step_1b/torch_bf16_compile", "step_1b/zero2_bf16"),
        *("step_1b/zero2_bf16_checkpoint_gated_blocks", "step_1b/zero2_bf16_checkpointing"),
    ]
    assert names[: len(decisions)] == decisions
    assert names[len(decisions)] == "step_9b/torch_bf16_1024_tokens"  # the MFU to report
    # the decisions fit the default budget; the budget, the wheels' install and the machine's
    # start fit a lent device's 15 minutes twice over (a rerun)
    assert 10 + sum(cost for _, cost in planned[: len(decisions)]) <= DEFAULT_BUDGET_S
    assert 2 * (DEFAULT_BUDGET_S + 60) + 120 <= 15 * 60


def test_the_padding_bench_measures_less_padding_after_and_the_same_samples():
    """bench/padding.py on its two distributions, small: packing and real media only leave
    under 5% padding tokens and no padding image; both layouts carry the same samples, and a
    step runs on each."""
    import random

    from bench.padding import DISTRIBUTIONS, batches, draw, measure, padding_of, step_of
    from bench.report import padding_table
    from tests.helpers import build

    model = build().train()
    special = model.special_tokens
    for name in DISTRIBUTIONS:
        samples = draw(name, 256, random.Random(0), special)
        before = batches(samples, 32, 8, packed=False)
        after = batches(samples, 32, 4 if name == "mmc4" else 1, packed=True)
        assert sorted(k for b in before for k in b["keys"]) == sorted(
            k for b in after for k in b["keys"]
        )
        tokens, pad, images, pad_images = (
            sum(v) for v in zip(*(padding_of(b, True) for b in after), strict=True)
        )
        assert pad / tokens < 0.05 and pad_images == 0 and images == sum(n for _, n in samples)
        old = [sum(v) for v in zip(*(padding_of(b, False) for b in before), strict=True)]
        assert old[1] / old[0] > pad / tokens
        step_of(model, special, after[0], True)()
        step_of(model, special, before[0], False)()
    measured = measure(model, special, "laion", samples[:64], 32, steps=1)
    assert measured["after"]["padding_tokens"] < measured["before"]["padding_tokens"]
    record = {"config": "tiny", "machine": "cpu", "file": "padding-tiny-cpu.json"}
    lines = padding_table([record | {"results": {"laion": measured}}])
    assert len(lines) == 3 and "laion" in lines[2] and "x**" in lines[2]


def test_the_converter_bench_times_each_worker_count_and_the_report_shows_it(tmp_path):
    cmd = [sys.executable, "-m", "bench.convert", "--inputs", "2", "--docs", "2"]
    cmd += ["--workers", "1", "2", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    record = json.loads((tmp_path / "convert-cpu.json").read_text())
    assert record["corpus"] == {"inputs": 2, "docs": 4, "images": 12, "image_px": "256-512 JPEG"}
    assert [r["workers"] for r in record["rows"]] == [1, 2]
    assert all(r["seconds"] > 0 and r["startup_s"] > 0 for r in record["rows"])
    assert "scaling_vs_1" in record["rows"][1]
    from bench.report import report

    assert "## Converter (MMC4-style, 4 documents, 12 images" in report(tmp_path)


@pytest.mark.parametrize("stage", ["none", "full"])
def test_the_flop_formula_counts_the_llava_connector(counted_vision_attention, stage):
    """The LLaVA connector: the tower to its feature layer, the projector, the LM over the
    image tokens; with the LM trained (stage 2) its weight gradients too."""
    from bench.flops import forward_flops, train_step_flops
    from bench.train_step import step_shape
    from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor
    from flamingo.losses import make_labels, summed_nll

    llava = ["connector=llava", "vision.feature_layer=-2", "vision.ln_post_on_tokens=false"]
    cfg = FlamingoConfig.from_yaml(
        ROOT / "configs/model/tiny.yaml", [*llava, f"lm.trainable={stage}"]
    )
    torch.manual_seed(0)
    model = Flamingo.from_config(cfg).train()
    processor = FlamingoProcessor.from_config(cfg)
    special = processor.special_tokens
    batch, images, seq_len = 2, 2, 48
    ids = torch.randint(3, 800, (batch, seq_len))
    ids[:, 2:18], ids[:, 24:40] = special.image_id, special.image_id  # 16 tokens an image
    pixels = torch.randn(batch, images, 1, 3, 32, 32)
    mask = torch.ones_like(ids)
    shape = step_shape(cfg, batch, seq_len, images, new_tokens=len(special.new_ids))
    assert (shape.vision_layers, shape.image_tokens, shape.lm_trains) == (1, 16, stage == "full")
    with torch.no_grad(), MatmulFlops() as forward:
        model(ids, mask, pixel_values=pixels)
    assert sum(forward_flops(shape).values()) == pytest.approx(forward.total, 1e-6)
    labels = make_labels(ids, mask, special)
    with MatmulFlops() as train:
        summed_nll(model(ids, mask, pixel_values=pixels).logits, labels).backward()
    assert train_step_flops(shape)["total"] == pytest.approx(train.total, 1e-6)


def test_the_flop_formula_counts_the_qformer_connector(counted_vision_attention):
    """BLIP-2's connector: queries, the tower's keys and values in the cross-attention layers
    (no gradient into the frozen tower), the projection into the frozen LM."""
    from bench.flops import forward_flops, train_step_flops
    from bench.train_step import step_shape
    from flamingo import Flamingo, FlamingoConfig, FlamingoProcessor
    from flamingo.losses import make_labels, summed_nll
    from tests.test_blip2 import QFORMER

    overrides = [*QFORMER, "qformer.layers=3", "qformer.dropout=0", "qformer.attention_dropout=0"]
    cfg = FlamingoConfig.from_yaml(ROOT / "configs/model/tiny.yaml", overrides)
    torch.manual_seed(0)
    model = Flamingo.from_config(cfg).train()
    special = FlamingoProcessor.from_config(cfg).special_tokens
    batch, images, seq_len = 2, 2, 24
    ids = torch.randint(3, 800, (batch, seq_len))
    ids[:, 2:6], ids[:, 10:14] = special.image_id, special.image_id  # 4 queries an image
    pixels = torch.randn(batch, images, 1, 3, 32, 32)
    mask = torch.ones_like(ids)
    shape = step_shape(cfg, batch, seq_len, images, new_tokens=len(special.new_ids))
    assert (shape.image_tokens, shape.queries) == (17, 4)  # 16 patches and the CLS token
    with torch.no_grad(), MatmulFlops() as forward:
        model(ids, mask, pixel_values=pixels)
    assert sum(forward_flops(shape).values()) == pytest.approx(forward.total, 1e-6)
    labels = make_labels(ids, mask, special)
    with MatmulFlops() as train:
        summed_nll(model(ids, mask, pixel_values=pixels).logits, labels).backward()
    assert train_step_flops(shape)["total"] == pytest.approx(train.total, 1e-6)


# -- a run's FLOPs, counted on its own steps ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from data_prep.tiny import write_tiny_shards

    return write_tiny_shards(tmp_path_factory.mktemp("shards"), per_kind=16, shards=1)


def tiny_run(shards: dict[str, str], out, config: str = "tiny.yaml", **changes):
    from flamingo.training.config import TrainConfig

    kinds = ("pairs",) if "blip2" in config else ("interleaved", "pairs", "video")
    base = {f"datasets.{i}.shards": shards[kind] for i, kind in enumerate(kinds)}
    base |= {"output_dir": str(out), "num_workers": 0, "tensorboard": False, "steps": 6}
    items = [f"{k}={v}" for k, v in {**base, **changes}.items()]
    return TrainConfig.from_yaml(ROOT / "configs" / "train" / config, items)


def test_a_runs_flops_add_up_over_its_datasets_and_steps(tiny_shards, tmp_path):
    """A step over all three datasets counts what the three steps of a round robin (each
    dataset's first batch alone) count together; the run's total is its mean step times its
    steps; nothing is written to the run's directory."""
    from bench.run_flops import run_flops

    together = run_flops(tiny_run(tiny_shards, tmp_path / "a"), count=1)
    alone = run_flops(tiny_run(tiny_shards, tmp_path / "b", mixing="round_robin"), count=3)
    assert together["step"] > 0
    assert together["step"] == pytest.approx(3 * alone["step"], rel=1e-9)
    assert together["total"] == together["step"] * 6 and together["steps"] == 6
    assert not (tmp_path / "a").exists()


def test_blip2_stage1_is_counted_forward_and_backward(tiny_shards, tmp_path):
    """BLIP-2's stage 1 (the Q-Former's three losses) is counted through its own step: more
    than its forward alone, at most three times it (the frozen tower runs forward only)."""
    import train
    from bench.run_flops import run_flops

    cfg = tiny_run(tiny_shards, tmp_path, "tiny-blip2.yaml")
    step = run_flops(cfg, count=1)["step"]
    run = train.setup(cfg)
    batch = run.batches.for_step(0, run.engine.all_reduce_sum, run.engine.device).micro[0][1]
    model = run.engine.module.train()
    text, mask = model.texts(batch["input_ids"], batch["labels"])
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), MatmulFlops() as forward:
            model(batch["pixel_values"][batch["media_slots"][:, 0], 0], text, mask)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
        run.engine.close()
    assert forward.total < step <= 3 * forward.total
