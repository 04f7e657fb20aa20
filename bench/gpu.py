"""The GPU benchmark: what the CUDA path gives on one GPU, in one process, within a short slot.

    python -m bench.gpu [--budget 450] [--out bench/results/gpu-<device>.json]
    python -m bench.gpu --smoke --out /tmp/gpu-smoke.json      # every section, tiny, on CPU

Sections, in order (the JSON is rewritten after every measurement, so a run stopped at its
time limit still leaves what it finished; a measurement that fails records its error and the
run goes on; one that would not fit in what is left of ``--budget`` is recorded as skipped):

- ``env``: versions, the device, a measured bf16 matrix-product peak beside the datasheet's.
- ``kernels``: the gated cross-attention with SDPA's float mask vs flex_attention's block mask
  (time, and how far outputs and gradients differ); the fused head+loss at several chunk sizes
  vs logits + cross-entropy (time, peak memory); MPT attention eager vs through SDPA.
- ``step_1b``: the ~1B model (``configs/bench/1b.yaml``: ViT-L/14 + OPT-1.3B's shape, 5 images,
  512 tokens) through the training engines ``train.py`` uses: one-rank DeepSpeed ZeRO-2 and
  ZeRO-1 (fp32 accumulation) in bf16, with activation checkpointing off, on, and on the gated
  blocks only, and the plain-PyTorch engine in bf16 autocast with each cross-attention kernel
  and, at the very end (compiling takes longest), with ``engine.compile``.
- ``step_9b``: the OpenFlamingo-9B-shaped model (``configs/bench/9b.yaml``: MPT-7B's shape,
  gated blocks every 4th layer) at 256 and 1024 tokens, plain-PyTorch engine, bf16.
- ``generation``: greedy and 3-beam generation on the ~1B model, bf16.
- ``vs_openflamingo``: ours against OpenFlamingo's package on the small model, fp32, as
  ``bench.train_step`` compares them.
- ``packing``: caption steps on the ~1B model, bf16: 32 rows of one LAION-like caption each
  against the same captions packed into 256-token rows (``bench/padding.py``'s samples).

Every step records step time (median, min), MFU against the datasheet and the measured peak
(both FLOP definitions of ``bench.flops``: what this frozen-backbone step needs, and 6·N·tokens),
peak memory, host syncs per step and which attention kernel ran at each call site. Random
weights throughout: nothing is downloaded. ``--smoke`` runs every section at tiny sizes on the
CPU (the suite does, so the GPU slot never meets a broken script).

The GPU image lacks deepspeed, open_clip and webdataset: ``make bench-gpu-wheels`` prepares
the wheels to carry, and ``tools/bench_gpu.sh`` installs them there and runs this.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import socket
import statistics
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.dispatch import KernelRecorder, SyncCounter
from bench.flops import conventional_flops, peak_tflops, train_step_flops

ROOT = Path(__file__).resolve().parents[1]

TINY_MPT = dict(
    model_type="mpt", d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=128,
    vocab_size=896,
)  # fmt: skip

FULL = {
    "gemm": 8192,
    "xattn": dict(batch=8, seq=512, media=5, latents=64, dim=2048, dim_media=1024, heads=8),
    "loss": dict(rows=4096, hidden=2048, vocab=50272, chunks=(1024, 4096, None)),
    "mpt": dict(batch=2, seq=2048, layers=4, config="9b"),
    "step_1b": dict(config="1b", batch=8, seq_len=512, images=5, steps=6),
    "step_9b": dict(config="9b", arch=None, batch=4, seq_lens=(256, 1024), images=5, steps=4),
    "generation": dict(config="1b", batch=8, prompt=128, new=32, images=2),
    "vs_openflamingo": dict(config="small", batch=8, seq_len=256, images=5, steps=5),
    "packing": dict(config="1b", samples=256, rows=32, steps=4),
}
SMOKE = {
    "gemm": 256,
    "xattn": dict(batch=2, seq=24, media=3, latents=4, dim=32, dim_media=16, heads=2),
    "loss": dict(rows=64, hidden=16, vocab=300, chunks=(16, None)),
    "mpt": dict(batch=2, seq=16, layers=2, config="tiny", arch=TINY_MPT),
    "step_1b": dict(config="tiny", batch=2, seq_len=32, images=2, steps=1),
    "step_9b": dict(config="tiny", arch=TINY_MPT, batch=2, seq_lens=(16,), images=2, steps=1),
    "generation": dict(config="tiny", batch=2, prompt=16, new=3, images=1),
    "vs_openflamingo": dict(config="tiny", batch=2, seq_len=32, images=2, steps=1),
    "packing": dict(config="tiny", samples=16, rows=8, steps=1),
}
DEFAULT_BUDGET_S = 300.0
"""Seconds for every measurement: a lent GPU gives 15 minutes in all, its start (1-2 minutes)
included, and 10 a command; 300 s of measurements plus installing the wheels and imports
leave room to run the bench twice."""


class MeasurementTimeout(Exception):
    """A measurement ran past its own alarm."""


class Bench:
    """The results so far, rewritten to ``out`` after every measurement."""

    def __init__(self, out: Path, budget_s: float, smoke: bool, device: str) -> None:
        self.out, self.deadline, self.smoke, self.device = (
            out,
            time.time() + budget_s,
            smoke,
            device,
        )
        self.sizes = SMOKE if smoke else FULL
        self.record: dict[str, Any] = {"smoke": smoke, "device": device, "sections": {}}
        self.started = time.time()

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.record["wall_s"] = time.time() - self.started
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        tmp.replace(self.out)

    def measure(self, section: str, name: str, fn, *args, cost: float = 10.0, **kwargs) -> None:
        """Run one measurement into ``sections[section][name]``: its result, its error, or
        that the budget had no room for it. ``cost``: its expected seconds; it is not started
        when less is left, and its own alarm stops it at twice that (or at the budget's end,
        if sooner), so that a slow one cannot take the command past the device's limit."""
        results = self.record["sections"].setdefault(section, {})
        cost = 0 if self.smoke else cost
        if self.left() < cost:
            results[name] = {"skipped": f"budget: {self.left():.0f} s left, needs ~{cost:.0f} s"}
        else:
            start = time.time()
            limit = None if self.smoke else max(1.0, min(2 * cost, self.left()))
            try:
                with alarm(limit):
                    results[name] = fn(*args, **kwargs)
            except MeasurementTimeout:
                results[name] = {
                    "error": f"timed out: stopped after {limit:.0f} s (~{cost:.0f} s expected)"
                }
            except Exception as error:  # recorded, and the next measurement runs
                results[name] = {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}
            results[name]["wall_s"] = time.time() - start
        free_memory()
        self.save()
        print(f"[{time.time() - self.started:6.0f} s] {section}/{name}: {brief(results[name])}")


@contextlib.contextmanager
def alarm(seconds: float | None) -> Iterator[None]:
    """Raise :class:`MeasurementTimeout` in this (the main) thread after ``seconds``."""
    if seconds is None:
        yield
        return

    def expire(signum, frame):
        raise MeasurementTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def brief(result: dict) -> str:
    keys = ("error", "skipped", "step_s_median", "ms", "tokens_per_s", "tflops")
    return ", ".join(f"{k}={result[k]}" for k in keys if k in result)[:200] or "done"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def timed(fn, device: str, steps: int, warmup: int = 1) -> dict:
    """Median and min seconds of ``fn`` over ``steps`` calls after ``warmup`` (each synced)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_all": times,
        "peak_mib": peak_mib(device),
    }


# -- env ------------------------------------------------------------------------------------------


def gemm_peak(n: int, device: str) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    result = timed(lambda: a @ b, device, steps=10, warmup=3)
    result["tflops"] = 2 * n**3 / result["step_s_min"] / 1e12
    result.update(n=n, dtype=str(dtype))
    return result


def environment(device: str) -> dict:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions["transformers"] = transformers.__version__
    for name in ("deepspeed", "open_clip", "webdataset", "open_flamingo"):
        try:
            versions[name] = getattr(__import__(name), "__version__", "installed")
        except ImportError as error:
            versions[name] = f"missing: {error}"
    env = {"versions": versions, "machine": f"{platform.machine()} CPU"}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        env.update(
            machine=name,
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
            datasheet_bf16_tflops=peak_tflops(name, "bf16"),
        )
    return env


# -- kernels --------------------------------------------------------------------------------------


def xattn_kernels(sizes: dict, device: str, smoke: bool) -> dict:
    """The gated cross-attention, float mask (SDPA) vs block mask (flex_attention)."""
    from flamingo.xattn import (
        MaskedCrossAttention,
        cross_attention_bias,
        cross_attention_block_mask,
        flex_attention,
    )

    s = sizes
    torch.manual_seed(0)
    dim_head = 8 if smoke else 64
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        attn = MaskedCrossAttention(s["dim"], s["dim_media"], s["heads"], dim_head).to(dtype)
        x = torch.randn(s["batch"], s["seq"], s["dim"], dtype=dtype)
        latents = torch.randn(s["batch"], s["media"], s["latents"], s["dim_media"], dtype=dtype)
        per_media = s["seq"] // s["media"]
        media_index = (torch.arange(s["seq"]) // per_media).clamp(max=s["media"] - 1) - 1
        media_index = media_index.expand(s["batch"], -1).contiguous()
    backward = not (smoke or not device.startswith("cuda"))  # flex has no CPU backward
    masks = {
        "sdpa": lambda: cross_attention_bias(media_index, s["media"], s["latents"], "last", dtype),
        "flex": lambda: cross_attention_block_mask(media_index, s["media"], s["latents"], "last"),
    }
    out: dict[str, Any] = {"shape": s, "dtype": str(dtype), "backward": backward}
    if flex_attention is None:  # torch < 2.5
        del masks["flex"]
        out["flex"] = {"skipped": f"flex_attention needs torch >= 2.5, this is {torch.__version__}"}
    values = {}
    for name, make_mask in masks.items():
        xg = x.detach().requires_grad_(backward)

        def run(make_mask=make_mask, xg=xg):
            y = attn(xg, latents, media_index, attn_mask=make_mask())
            if backward:
                y.float().square().mean().backward()
            return y

        with torch.set_grad_enabled(backward):
            out[name] = timed(run, device, steps=1 if smoke else 20, warmup=1 if smoke else 3)
            xg.grad = None
            y = run()
        values[name] = (y.detach().float(), None if xg.grad is None else xg.grad.float())
    if "flex" not in values:
        return out
    out["max_abs_diff_out"] = float((values["sdpa"][0] - values["flex"][0]).abs().max())
    if backward:
        out["max_abs_diff_grad"] = float((values["sdpa"][1] - values["flex"][1]).abs().max())
    out["flex_over_sdpa_time"] = out["flex"]["step_s_min"] / out["sdpa"]["step_s_min"]
    return out


def loss_kernels(sizes: dict, device: str, smoke: bool) -> dict:
    """The fused head+loss at several chunk sizes against logits + cross-entropy."""
    from flamingo.fused_nll import chunk_rows_for, fused_summed_nll
    from flamingo.losses import summed_nll

    s = sizes
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        hidden = torch.randn(1, s["rows"] + 1, s["hidden"], dtype=dtype)
        labels = torch.randint(0, s["vocab"], (1, s["rows"] + 1))
        base = torch.randn(s["vocab"] - 3, s["hidden"], dtype=dtype) * 0.02
        new = (torch.randn(3, s["hidden"]) * 0.02).requires_grad_()
        new_ids = torch.arange(s["vocab"] - 3, s["vocab"])
    out: dict[str, Any] = {"shape": {k: v for k, v in s.items() if k != "chunks"}}
    out["default_chunk_rows"] = chunk_rows_for(s["rows"], s["vocab"], torch.device(device).type)
    steps = 1 if smoke else 10

    def fused(chunk):
        h = hidden.detach().requires_grad_()
        loss = fused_summed_nll(h, labels, base, new, new_ids, s["vocab"], chunk_rows=chunk)
        loss.backward()

    def unfused():
        h = hidden.detach().requires_grad_()
        logits = torch.cat([h @ base.T, h.to(new.dtype) @ new.T], dim=-1).float()
        summed_nll(logits, labels).backward()

    for chunk in s["chunks"]:
        out[f"fused_chunk_{chunk or 'default'}"] = timed(lambda c=chunk: fused(c), device, steps)
        free_memory()
    out["unfused"] = timed(unfused, device, steps)
    return out


def mpt_kernels(sizes: dict, device: str, smoke: bool) -> dict:
    """MPT's decoder layers, transformers' eager attention vs ours through SDPA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flamingo.mpt import use_sdpa_attention

    s = sizes
    arch = dict(model_config(s["config"], s.get("arch")).lm.architecture, n_layers=s["layers"])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out: dict[str, Any] = {"shape": {**s, "arch": arch}, "dtype": str(dtype)}
    results = {}
    for name in ("eager", "sdpa"):
        config = AutoConfig.for_model(**arch)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config).to(dtype).requires_grad_(False)
            ids = torch.randint(0, arch["vocab_size"], (s["batch"], s["seq"]))
        if name == "sdpa":
            use_sdpa_attention(model)
        embeds = model.get_input_embeddings()(ids).detach()

        def run(model=model, embeds=embeds):
            e = embeds.requires_grad_()
            hidden = model.transformer(inputs_embeds=e).last_hidden_state
            hidden.float().square().mean().backward()
            return hidden

        out[name] = timed(run, device, steps=1 if smoke else 5)
        results[name] = run().detach().float()
        del model
        free_memory()
    out["max_abs_diff"] = float((results["eager"] - results["sdpa"]).abs().max())
    out["sdpa_over_eager_time"] = out["sdpa"]["step_s_min"] / out["eager"]["step_s_min"]
    return out


# -- training steps -------------------------------------------------------------------------------


def one_rank_group() -> None:
    """The environment a one-process DeepSpeed (or torch.distributed) group needs."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def model_config(name: str, arch: dict | None = None):
    from bench.train_step import bench_config

    cfg = bench_config(name)
    if arch is not None:  # the smoke's stand-in for configs/bench/9b.yaml: a tiny MPT
        cfg = cfg.replace({"lm.architecture": dict(arch), "lm.attn_implementation": "sdpa"})
    return cfg


def training_step(
    config: str,
    device: str,
    engine: str,
    batch: int,
    seq_len: int,
    images: int,
    steps: int,
    arch: dict | None = None,
    **engine_options: Any,
) -> dict:
    """Steps of ``train.py``'s engines on one synthetic batch (5 images per sequence, text
    chunks between them): times, MFU, memory, syncs and attention kernels."""
    from bench.train_step import make_batch, step_shape
    from flamingo import Flamingo, FlamingoProcessor
    from flamingo.losses import count_targets, make_labels
    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import DeepSpeedEngine, LocalEngine

    cfg = model_config(config, arch)
    deepspeed_json = {"zero1": "zero1.json", "zero2": "zero2.json"}.get(engine)
    engine_cfg = EngineConfig(
        precision="bf16",  # on the CPU too: the smoke runs the GPU configuration
        deepspeed=str(ROOT / "configs/deepspeed" / deepspeed_json) if deepspeed_json else None,
        **engine_options,
    )
    cfg = cfg.replace(engine_cfg.model_changes())
    processor = FlamingoProcessor.from_config(cfg)
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they run
        model = Flamingo.from_config(cfg, processor).train()
    optim = OptimConfig(warmup_steps=1)
    if deepspeed_json:
        one_rank_group()
        runner = DeepSpeedEngine(model, engine_cfg, optim, micro_batches_per_step=1)
    else:
        runner = LocalEngine(model, engine_cfg, optim)
    special = processor.special_tokens
    ids, mask, pixels = make_batch(batch, seq_len, cfg.vision.image_size, special, images)
    labels = make_labels(ids, mask, special)
    targets = float(count_targets(labels))
    ids, mask, pixels, labels = (t.to(device) for t in (ids, mask, pixels, labels))

    def step():
        runner.begin_step(1e-4)
        nll = runner.forward(ids, mask, pixel_values=pixels, labels=labels).nll_sum
        runner.micro_step(nll / targets)
        return runner.finish_step()

    result = timed(step, device, steps=steps, warmup=1 if steps == 1 else 2)
    shape = step_shape(cfg, batch, seq_len, images)
    flops = train_step_flops(shape)["total"]
    params = sum(p.numel() for p in runner.module.parameters())
    trainable = sum(p.numel() for p in runner.module.parameters() if p.requires_grad)
    result.update(
        engine=engine,
        options=engine_options,
        batch=batch,
        seq_len=seq_len,
        images=images,
        params=params,
        trainable_params=trainable,
        flops_per_step=flops,
        flops_6nt=conventional_flops(params, batch * seq_len),
        tokens_per_s=batch * seq_len / result["step_s_min"],
    )
    result["tflops"] = flops / result["step_s_min"] / 1e12
    counter = SyncCounter()
    with counter:
        step()
    result["syncs_per_step"] = sum(counter.found.values())
    result["syncs_by_site"] = {f"{op} @ {site}": n for (op, site), n in counter.found.items()}
    if engine_options.get("cross_attention") != "flex":  # flex_attention is not traced by modes
        kernels = KernelRecorder()
        with kernels, torch.no_grad():
            runner.forward(ids, mask, pixel_values=pixels, labels=labels)
        result["attention_kernels"] = kernels.by_site()
    synchronize(device)
    return result


def packing(config: str, device: str, samples: int, rows: int, steps: int) -> dict:
    """Caption steps (LAION-like samples of ``bench/padding.py``) under the plain-PyTorch bf16
    engine: ``rows`` rows of one caption each, against the same captions packed into
    256-token rows; samples/s and padding, for the GEMM sizes a CPU cannot show."""
    import random

    from bench.padding import ROW, batches, draw, step_inputs
    from flamingo import Flamingo, FlamingoProcessor
    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import LocalEngine

    cfg = model_config(config).replace({"frozen_dtype": "bfloat16"})
    processor = FlamingoProcessor.from_config(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = Flamingo.from_config(cfg, processor).train()
    runner = LocalEngine(model, EngineConfig(precision="bf16"), OptimConfig(warmup_steps=1))
    special = processor.special_tokens
    drawn = draw("laion", samples, random.Random(0), special)
    mean = sum(len(ids) for ids, _ in drawn) / len(drawn)
    out: dict[str, Any] = {"samples": samples, "mean_tokens": mean}
    layouts = {"one_a_row": (rows, False), "packed": (max(1, round(rows * mean / ROW)), True)}
    for name, (per_batch, packed) in layouts.items():
        made = batches(drawn, cfg.vision.image_size, per_batch, packed)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in made[0].items()}
        inputs, targets = step_inputs(batch, special, packed)

        def step(inputs=inputs, targets=targets):
            runner.begin_step(1e-4)
            runner.micro_step(runner.forward(**inputs).nll_sum / targets)
            return runner.finish_step()

        result = timed(step, device, steps=steps, warmup=1)
        result.update(
            rows=per_batch,
            samples_per_batch=len(batch["keys"]),
            shape=list(batch["input_ids"].shape),
            padding_tokens=float((batch["attention_mask"] == 0).float().mean()),
            samples_per_s=len(batch["keys"]) / result["step_s_min"],
        )
        out[name] = result
    out["speedup"] = out["packed"]["samples_per_s"] / out["one_a_row"]["samples_per_s"]
    return out


def add_mfu(result: dict, env: dict) -> None:
    """MFU of a step against the datasheet and the measured peak, both FLOP definitions."""
    if "step_s_min" not in result:
        return
    peaks = {"datasheet": env.get("datasheet_bf16_tflops"), "measured": env.get("gemm_tflops")}
    for label, peak in peaks.items():
        if peak:
            rate = 1 / result["step_s_min"] / 1e12 / peak
            result[f"mfu_{label}"] = result["flops_per_step"] * rate
            result[f"mfu_6nt_{label}"] = result["flops_6nt"] * rate


# -- generation and the comparison ------------------------------------------------------------


def generation(config: str, device: str, batch: int, prompt: int, new: int, images: int) -> dict:
    from bench.train_step import make_batch
    from flamingo import Flamingo, FlamingoProcessor

    cfg = model_config(config)
    processor = FlamingoProcessor.from_config(cfg)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = Flamingo.from_config(cfg, processor).to(dtype).eval()
    ids, mask, pixels = make_batch(batch, prompt, cfg.vision.image_size, processor.special_tokens,
                                   images)  # fmt: skip
    ids, mask, pixels = ids.to(device), mask.to(device), pixels.to(device, dtype)
    out: dict[str, Any] = {"batch": batch, "prompt": prompt, "new_tokens": new}
    for name, beams in (("greedy", 1), ("beams_3", 3)):

        def run(beams=beams):
            with torch.no_grad():
                return model.generate(
                    ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new,
                    num_beams=beams, eos_token_id=-1,  # never stops early: exactly `new` tokens
                )  # fmt: skip

        result = timed(run, device, steps=1 if config == "tiny" else 3)
        result["new_tokens_per_s"] = batch * new / result["step_s_min"]
        out[name] = result
    return out


def versus_openflamingo(config: str, device: str, batch: int, seq_len: int, images: int,
                        steps: int) -> dict:  # fmt: skip
    from bench.train_step import make_step, prepare_openflamingo, prepare_ours

    args = argparse.Namespace(batch=batch, seq_len=seq_len, images=images, device=device,
                              precision="fp32", engine="torch")  # fmt: skip
    out: dict[str, Any] = {"config": config, "batch": batch, "seq_len": seq_len}
    for name, prepare in (("ours", prepare_ours), ("openflamingo", prepare_openflamingo)):
        torch.manual_seed(0)
        step, _ = make_step(prepare(config, args), args)
        out[name] = timed(step, device, steps=steps)
        del step
        free_memory()
    out["ours_over_openflamingo_time"] = (
        out["ours"]["step_s_min"] / out["openflamingo"]["step_s_min"]
    )
    return out


# -- the run --------------------------------------------------------------------------------------


def plan(sizes: dict, device: str, smoke: bool) -> list[tuple[str, str, float, Any, dict]]:
    """Every measurement ``(section, name, cost_s, fn, kwargs)``, in the order of what it
    decides: the cross-attention kernel (SDPA or flex), the fused loss's chunk size and
    ``engine.compile``; the recipes' activation checkpointing; then the MFU of the 9B-shaped
    step; then the rest. ``cost_s``: expected seconds on an H100/H200 (builds included)."""
    s1, s9 = sizes["step_1b"], sizes["step_9b"]
    one = dict(config=s1["config"], device=device, batch=s1["batch"], seq_len=s1["seq_len"],
               images=s1["images"], steps=s1["steps"])  # fmt: skip
    nine = dict(config=s9["config"], device=device, engine="torch", batch=s9["batch"],
                images=s9["images"], steps=s9["steps"], arch=s9["arch"])  # fmt: skip
    steps: list[tuple[str, str, float, Any, dict]] = [
        (
            "kernels",
            "cross_attention",
            15,
            xattn_kernels,
            dict(sizes=sizes["xattn"], device=device, smoke=smoke),
        ),
        (
            "kernels",
            "fused_loss",
            15,
            loss_kernels,
            dict(sizes=sizes["loss"], device=device, smoke=smoke),
        ),
        ("step_1b", "torch_bf16", 25, training_step, dict(one, engine="torch")),
    ]
    if not smoke:  # flex trains on GPUs only; compiling on the CPU takes the smoke's time
        steps += [
            (
                "step_1b",
                "torch_bf16_flex",
                30,
                training_step,
                dict(one, engine="torch", cross_attention="flex"),
            ),
            (
                "step_1b",
                "torch_bf16_compile",
                90,
                training_step,
                dict(one, engine="torch", compile=True),
            ),
        ]
    steps += [
        ("step_1b", "zero2_bf16", 35, training_step, dict(one, engine="zero2")),
        ("step_1b", "zero2_bf16_checkpoint_gated_blocks", 35, training_step,
         dict(one, engine="zero2", activation_checkpointing="gated_blocks")),
        ("step_1b", "zero2_bf16_checkpointing", 35, training_step,
         dict(one, engine="zero2", activation_checkpointing=True)),
    ]  # fmt: skip
    for seq_len in sorted(s9["seq_lens"], reverse=True):  # 1024 tokens first: the MFU to report
        steps.append(("step_9b", f"torch_bf16_{seq_len}_tokens", 50 if seq_len > 512 else 35,
                      training_step, dict(nine, seq_len=seq_len)))  # fmt: skip
    steps += [
        ("step_1b", "zero1_bf16", 35, training_step, dict(one, engine="zero1")),
        ("generation", "1b", 25, generation, dict(device=device, **sizes["generation"])),
        ("vs_openflamingo", "train_step", 30, versus_openflamingo,
         dict(device=device, **sizes["vs_openflamingo"])),
        ("packing", "captions", 30, packing, dict(device=device, **sizes["packing"])),
        ("kernels", "mpt_attention", 15, mpt_kernels, dict(sizes=sizes["mpt"], device=device, smoke=smoke)),
    ]  # fmt: skip
    return steps


def run(bench: Bench) -> None:
    sizes, device, smoke = bench.sizes, bench.device, bench.smoke
    planned = plan(sizes, device, smoke)
    total = sum(cost for _, _, cost, _, _ in planned)
    fits, spent = [], 10.0  # the environment's two measurements
    for section, name, cost, _, _ in planned:
        spent += cost
        if spent <= bench.left():
            fits.append(f"{section}/{name}")
    print(
        f"plan: {len(planned)} measurements, ~{total + 10:.0f} s expected against a budget of "
        f"{bench.left():.0f} s: ~{len(fits)} fit, in this order (what decides a default first)"
    )
    for section, name, cost, _, _ in planned:
        print(f"  ~{cost:3.0f} s  {section}/{name}")
    bench.measure("env", "environment", environment, device, cost=5)
    bench.measure("env", "gemm", gemm_peak, sizes["gemm"], device, cost=5)
    env = {
        **bench.record["sections"]["env"]["environment"],
        "gemm_tflops": bench.record["sections"]["env"]["gemm"].get("tflops"),
    }
    for section, name, cost, fn, kwargs in planned:
        bench.measure(section, name, fn, cost=cost, **kwargs)
        if fn is training_step:
            add_mfu(bench.record["sections"][section][name], env)
    bench.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every section, tiny, on the CPU")
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for every measurement"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        raise SystemExit("bench.gpu: no CUDA device here; --smoke runs its tiny CPU version")
    if args.out is None:
        kind = "smoke" if args.smoke else torch.cuda.get_device_name().replace(" ", "-").lower()
        args.out = ROOT / "bench" / "results" / f"gpu-{kind}.json"
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    bench = Bench(args.out, args.budget, args.smoke, device)
    run(bench)
    failed = [
        f"{section}/{name}"
        for section, results in bench.record["sections"].items()
        for name, result in results.items()
        if "error" in result
    ]
    print(f"wrote {args.out} in {bench.record['wall_s']:.0f} s; failed: {failed or 'none'}")
    if failed and args.smoke:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
