"""Training step, ours vs OpenFlamingo: forward + backward + AdamW step on the same batch.

    python -m bench.train_step [--config tiny|small] [--steps 5] [--batch 4] [--repeats 3]
        [--profile N] [--out bench/results]

Both models are built around the same architecture (open_clip ViT + OPT LM, random weights,
gated blocks before every layer, 8x64 heads, 6-layer resampler, 64 latents, 5 images per
sequence); OpenFlamingo's comes from its published package (``open-flamingo``, installed with
``--no-deps``) with its own freeze policy (it also trains the whole input embedding). Each
implementation runs in its own process so that peak memory (max RSS on CPU, max allocated on
GPU) is its own, each with its training script's optimiser (ours: fused AdamW, as
``train.py``; OpenFlamingo's: ``torch.optim.AdamW`` with defaults). The processes alternate
``--repeats`` times and the fastest step of each implementation counts (a shared machine's
noise only ever slows a step down); every step time is kept in the JSON. On CPU, besides the
peak RSS, one extra profiled step measures the peak memory of live tensors (what the allocator
was asked for, like CUDA's max allocated; RSS also counts what malloc keeps after frees).
Prints a markdown table of ratios and writes a JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.flops import (
    StepShape,
    conventional_flops,
    matmul_peak_tflops,
    peak_tflops,
    train_step_flops,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "bench").glob("*.yaml"))
"""The benchmark models, ``configs/bench/<name>.yaml``: model configs with OpenFlamingo's
numerics around random backbones (any model config YAML may be given by path instead)."""
SEQ_LEN = {"tiny": 64, "small": 256, "1b": 512}
"""Tokens per sequence of each benchmark model's runs (``--seq-len`` overrides it)."""
NUM_IMAGES = 5


def bench_config(config: str):
    """The model config of a benchmark: a name in ``configs/bench/`` or a YAML path. It must
    have OpenFlamingo's numerics (``flamingo.convert.openflamingo.check_config``), since both
    implementations are built from it."""
    from flamingo.config import FlamingoConfig
    from flamingo.convert.openflamingo import check_config

    path = (
        Path(config) if config.endswith(".yaml") else ROOT / "configs" / "bench" / f"{config}.yaml"
    )
    cfg = FlamingoConfig.from_yaml(path)
    check_config(cfg)
    return cfg


def build_backbones(cfg):
    """The open_clip model and the HF causal LM of ``cfg``, by the library's builders."""
    from flamingo.lm import build_causal_lm
    from flamingo.vision import build_clip

    clip = build_clip(cfg.vision)
    return clip, build_causal_lm(cfg.lm), cfg.vision.image_size


def make_batch(batch: int, seq_len: int, image_size: int, special, num_images: int = NUM_IMAGES):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 800, (batch, seq_len), generator=g)
    stride = seq_len // num_images
    for k in range(num_images):  # <image> text <|endofchunk|> chunks
        ids[:, k * stride] = special.image_id
        ids[:, (k + 1) * stride - 1] = special.end_of_chunk_id
    mask = torch.ones_like(ids)
    pixels = torch.randn(batch, num_images, 1, 3, image_size, image_size, generator=g)
    return ids, mask, pixels


def step_shape(
    cfg, batch: int, seq_len: int, images: int, frames: int = 1, new_tokens: int = 0
) -> StepShape:
    """The dimensions the FLOP count of a step needs, from the model config (and the
    tokenizer's count of new token rows, when given)."""
    from transformers import AutoConfig

    from flamingo.lm import decoder_layout
    from flamingo.parts import parts_of

    parts = parts_of(cfg)
    if cfg.lm.architecture is not None:
        arch = dict(cfg.lm.architecture)
        lm = AutoConfig.for_model(arch.pop("model_type"), **arch)
    else:
        lm = AutoConfig.from_pretrained(cfg.lm.name_or_path, revision=cfg.lm.revision)
    ffn = (
        getattr(lm, "ffn_dim", None)
        or getattr(lm, "intermediate_size", None)
        or lm.expansion_ratio * lm.hidden_size  # MPT
    )
    heads = lm.num_attention_heads
    head_dim = getattr(lm, "head_dim", None) or lm.hidden_size // heads
    kv_heads = getattr(lm, "num_key_value_heads", None) or heads
    return StepShape(
        batch=batch,
        seq_len=seq_len,
        images=images,
        **parts.tower.shape(),  # its width, layers, patches, tokens an image (and tiles)
        tower=cfg.vision.kind,
        resampler_depth=cfg.resampler.depth,
        resampler_inner=cfg.resampler.heads * cfg.resampler.dim_head,
        latents=cfg.resampler.num_latents,
        resampler_ff_mult=cfg.resampler.ff_mult,
        gated_blocks=len(parts.fusion.layer_indices(lm.num_hidden_layers)),
        xattn_inner=cfg.xattn.heads * cfg.xattn.dim_head,
        xattn_ff_mult=cfg.xattn.ff_mult,
        lm_width=lm.hidden_size,
        lm_layers=lm.num_hidden_layers,
        lm_ffn=ffn,
        vocab=cfg.lm.head_rows or lm.vocab_size,
        frames=frames,
        lm_kv_width=kv_heads * head_dim,
        lm_mlp_matrices=3 if decoder_layout(lm.model_type).gated_mlp else 2,
        connector=cfg.connector,
        projector_layers=cfg.projector.layers,
        qformer_layers=cfg.qformer.layers,
        qformer_width=cfg.qformer.width,
        qformer_intermediate=cfg.qformer.intermediate,
        qformer_cross_every=cfg.qformer.cross_attention_every,
        queries=cfg.qformer.queries,
        lm_trains=cfg.lm.trainable == "full",
        new_tokens=new_tokens,
    )


def openflamingo_model(clip, lm, special, every: int = 1):
    """OpenFlamingo's own Flamingo (its package) around an open_clip model and an HF LM."""
    from open_flamingo.src.flamingo import Flamingo as OFFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    from flamingo.lm import decoder_layout

    clip.visual.output_tokens = True
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(decoder_layout(lm.config.model_type).layers)
    vis_dim = clip.visual.transformer.width
    return OFFlamingo(
        clip,
        lm,
        special.end_of_chunk_id,
        special.image_id,
        vis_dim=vis_dim,
        cross_attn_every_n_layers=every,
    )


def prepare_ours(name: str, args: argparse.Namespace):
    """Our model, its optimiser's parameter groups and AdamW, and its loss on the batch:
    ``(model, groups, make_optimizer, compute_loss, target tokens)``."""
    from flamingo import Flamingo, FlamingoProcessor
    from flamingo.losses import count_targets, make_labels
    from flamingo.training.engine import adamw, param_groups

    cfg = bench_config(name)
    processor = FlamingoProcessor.from_config(cfg)
    model = Flamingo.from_config(cfg, processor)  # the library's builder, as train.py
    special = processor.special_tokens
    ids, mask, pixels = batch_on_device(args, cfg.vision.image_size, special)
    labels = make_labels(ids, mask, special)
    targets = count_targets(labels)

    def compute_loss(model) -> torch.Tensor:  # as train.py: the head fused with the loss
        return model(ids, mask, pixel_values=pixels, labels=labels).nll_sum / targets

    def make_optimizer(groups):
        return adamw(groups, lr=1e-4)  # as train.py's LocalEngine

    return model, param_groups(model, 0.1), make_optimizer, compute_loss, int(targets)


def prepare_openflamingo(name: str, args: argparse.Namespace):
    """OpenFlamingo's model, trainable parameters, AdamW and loss, as :func:`prepare_ours`."""
    from flamingo.losses import count_targets, make_labels
    from flamingo.tokens import load_tokenizer

    cfg = bench_config(name)
    clip, lm, image_size = build_backbones(cfg)
    _, special = load_tokenizer(cfg.lm.tokenizer_source())  # special tokens in OpenFlamingo's order
    model = openflamingo_model(clip, lm, special, cfg.xattn.every_n_layers)
    # OpenFlamingo's own freeze policy (open_flamingo/src/factory.py)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    ids, mask, pixels = batch_on_device(args, image_size, special)
    labels = make_labels(ids, mask, special)

    def compute_loss(model) -> torch.Tensor:
        return model(vision_x=pixels, lang_x=ids, attention_mask=mask, labels=labels).loss

    def make_optimizer(groups):
        return torch.optim.AdamW(groups, lr=1e-4)  # its training script's

    params = [p for p in model.parameters() if p.requires_grad]
    return model, [{"params": params}], make_optimizer, compute_loss, int(count_targets(labels))


def batch_on_device(args: argparse.Namespace, image_size: int, special):
    ids, mask, pixels = make_batch(args.batch, args.seq_len, image_size, special, args.images)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return ids.to(args.device), mask.to(args.device), pixels.to(args.device, dtype)


def deepspeed_engine(model, groups, precision: str):
    """A one-process DeepSpeed engine with ``configs/deepspeed/zero2.json`` (bf16 or fp32),
    configured as train.py configures it (``DeepSpeedEngine.build_config``)."""
    import os
    import socket

    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import DeepSpeedEngine
    from flamingo.training.ops import import_deepspeed, load_ops, wanted

    deepspeed = import_deepspeed()

    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    ).items():
        os.environ.setdefault(key, value)
    load_ops(wanted(offload=False), announce=True)
    deepspeed.init_distributed()
    engine_cfg = EngineConfig(
        precision=precision, deepspeed=str(ROOT / "configs/deepspeed/zero2.json")
    )
    config = DeepSpeedEngine.build_config(
        engine_cfg, OptimConfig(lr=1e-4), micro_batches_per_step=1
    )
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine


def make_step(prepared, args: argparse.Namespace):
    """``(step, trained module)``: one optimiser step on the batch, with each framework's own
    AdamW (``--engine torch``) or both under the same DeepSpeed ZeRO-2 engine."""
    model, groups, make_optimizer, compute_loss, _ = prepared
    model = model.to(args.device).train()
    if args.engine == "zero2":
        engine = deepspeed_engine(model, groups, args.precision)

        def step():
            loss = compute_loss(engine)
            engine.backward(loss)
            engine.step()

        return step, engine.module
    optimizer = make_optimizer(groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step():
        compute_loss(model).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def top_ops(step, device: str, count: int) -> list[dict]:
    """One step under torch.profiler: the ``count`` ops with the most self time, by shape."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(
        prof.key_averages(group_by_input_shape=True), key=lambda e: getattr(e, key), reverse=True
    )
    total = sum(getattr(e, key) for e in events) or 1.0
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:120],
            "calls": e.count,
            "ms": getattr(e, key) / 1e3,
            "share": getattr(e, key) / total,
        }
        for e in events[:count]
    ]


ATTENTION_OP = re.compile(
    r"flash|efficient_attention|fmha|scaled_dot_product|multi_head_attention|softmax", re.I
)
"""Profiler op and kernel names that tell how attention was computed."""


def profiled_step(step, device: str) -> dict:
    """One step under the profiler: the attention ops and kernels that ran (with counts), and
    on CPU the peak memory of live tensors: what the allocator was asked for, free of how
    malloc keeps and fragments its heap (the CPU analogue of CUDA's max allocated): tensors
    alive before the step (weights, optimiser state, batch) plus the step's own, at most."""
    from torch.profiler import ProfilerActivity, profile

    from bench.memory import allocated_bytes, live_tensor_mib

    cpu = device == "cpu"
    before = live_tensor_mib() if cpu else 0.0
    activities = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])
    with profile(activities=activities, profile_memory=cpu) as prof:
        step()
        if not cpu:
            torch.cuda.synchronize()
    kernels = {e.key: e.count for e in prof.key_averages() if ATTENTION_OP.search(e.key)}
    out = {
        "attention_ops": dict(sorted(kernels.items())),
        "flash_attention": any("flash" in name.lower() for name in kernels),
    }
    if cpu:
        out["peak_live_mib"] = before + allocated_bytes(prof)[0] / 2**20
    return out


def timed(step, steps: int, batch: int, targets: int, model, device: str) -> dict:
    step()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = min(times)  # the machine at its least disturbed (shared CPUs are noisy)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "step_s": seconds,
        "step_s_all": times,
        "samples_per_s": batch / seconds,
        "tokens_per_s": targets / seconds,
        "peak_mib": peak,
        "trainable_params": trainable,
    }


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    prepare = prepare_ours if args.impl == "ours" else prepare_openflamingo
    prepared = prepare(args.config, args)
    step, model = make_step(prepared, args)
    result = timed(step, args.steps, args.batch, prepared[-1], model, args.device)
    shape = step_shape(bench_config(args.config), args.batch, args.seq_len, args.images)
    flops = train_step_flops(shape)
    result["flops_per_step"] = flops
    result["tflops_per_s"] = flops["total"] / result["step_s"] / 1e12
    result["mfu"] = result["tflops_per_s"] / args.peak_tflops if args.peak_tflops else None
    # the conventional 6 N tokens, labelled apart: it counts weight gradients frozen parts skip
    n_params = sum(p.numel() for p in model.parameters())
    result["flops_6nt"] = conventional_flops(n_params, args.batch * args.seq_len)
    result["mfu_6nt"] = (
        result["flops_6nt"] / result["step_s"] / 1e12 / args.peak_tflops
        if args.peak_tflops
        else None
    )
    # after the timing: the profiler slows the steps it watches
    result.update(profiled_step(step, args.device))
    if args.profile:
        result["top_ops"] = top_ops(step, args.device, args.profile)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default="tiny",
        help=f"a benchmark model of configs/bench/ ({', '.join(CONFIGS)}) or a model config YAML",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=NUM_IMAGES, help="images per sequence")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: the config's)"
    )
    parser.add_argument(
        "--engine",
        choices=["torch", "zero2"],
        default="torch",
        help="torch: each framework's own AdamW loop; zero2: both in a one-process DeepSpeed "
        "ZeRO-2 engine",
    )
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 needs --engine zero2"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak, for MFU (default: known GPUs' datasheet figure; on "
        "CPU, a measured fp32 matrix product)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="processes per implementation, run alternately; the fastest step counts",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile one extra step of each and list its N costliest ops (after the timing)",
    )
    parser.add_argument("--impl", choices=["ours", "openflamingo"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.precision == "bf16" and args.engine != "zero2":
        parser.error("--precision bf16 runs under DeepSpeed: add --engine zero2")
    if args.impl:
        return child(args)
    default_seq_len = args.seq_len is None
    args.seq_len = args.seq_len or SEQ_LEN.get(Path(args.config).stem, 256)
    machine = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.machine()} CPU, {args.threads} threads"
    )
    peak_source = "given" if args.peak_tflops else None
    if args.peak_tflops is None and args.device.startswith("cuda"):
        args.peak_tflops = peak_tflops(machine, args.precision)
        peak_source = "datasheet" if args.peak_tflops else None
    elif args.peak_tflops is None and (args.device, args.precision) == ("cpu", "fp32"):
        torch.set_num_threads(args.threads)
        args.peak_tflops = matmul_peak_tflops()
        peak_source = "measured fp32 matmul"
    runs: dict[str, list[dict]] = {"ours": [], "openflamingo": []}
    for _, impl in itertools.product(range(args.repeats), runs):  # alternate: drift hits both
        cmd = [sys.executable, "-m", "bench.train_step", "--impl", impl]
        for flag in ("config", "batch", "steps", "threads", "device", "images", "seq_len"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--engine", args.engine, "--precision", args.precision]
        cmd += ["--profile", str(args.profile)]
        cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{done.stderr[-3000:]}")
        runs[impl].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {}
    for impl, done_runs in runs.items():  # the fastest run, every step time kept
        results[impl] = min(done_runs, key=lambda r: r["step_s"])
        results[impl]["step_s_all"] = [t for r in done_runs for t in r["step_s_all"]]
        for key in ("peak_mib", "peak_live_mib"):
            if key in done_runs[0]:
                results[impl][key] = max(r[key] for r in done_runs)
    ours, of = results["ours"], results["openflamingo"]
    ratios = {
        "samples_per_s": ours["samples_per_s"] / of["samples_per_s"],
        "peak_memory": ours["peak_mib"] / of["peak_mib"],
    }
    if "peak_live_mib" in ours:
        ratios["peak_live_memory"] = ours["peak_live_mib"] / of["peak_live_mib"]
    record = {
        "config": args.config,
        "batch": args.batch,
        "repeats": args.repeats,
        "images_per_sequence": args.images,
        "seq_len": args.seq_len,
        "engine": args.engine,
        "precision": args.precision,
        "device": args.device,
        "machine": machine,
        "peak_tflops": args.peak_tflops,
        "peak_source": peak_source,
        "torch": torch.__version__,
        "results": results,
        "ratios": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"train_step-{Path(args.config).stem}"
    if (args.images, default_seq_len) != (NUM_IMAGES, True):
        name += f"-{args.images}img-{args.seq_len}tok"
    if (args.engine, args.precision) != ("torch", "fp32"):
        name += f"-{args.engine}-{args.precision}"
    path = args.out / f"{name}-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    title = f"train step ({args.config}, batch {args.batch}, {args.engine}, {args.precision}, {machine})"
    print(f"| {title} | ours | OpenFlamingo | ours / OpenFlamingo |\n| --- | --- | --- | --- |")
    for key, label in (
        ("samples_per_s", "samples/s"),
        ("tokens_per_s", "target tokens/s"),
        ("peak_mib", "peak memory (MiB)" if args.device != "cpu" else "peak RSS (MiB)"),
        ("peak_live_mib", "peak live tensors (MiB)"),
        ("trainable_params", "trainable parameters"),
        ("tflops_per_s", "model TFLOP/s"),
        ("mfu", "MFU (this step's FLOPs)"),
        ("mfu_6nt", "MFU (6 N tokens)"),
    ):
        if ours.get(key) is not None:
            print(f"| {label} | {ours[key]:.4g} | {of[key]:.4g} | {ours[key] / of[key]:.2f} |")
    flash = {True: "yes", False: "no"}
    print(f"| flash attention | {flash[ours['flash_attention']]} | ", end="")
    print(f"{flash[of['flash_attention']]} | |")
    for impl, result in results.items():
        if "top_ops" in result:
            print(f"\n{impl}: costliest ops of one profiled step (self time)\n")
            print("| op | input shapes | calls | ms | share |\n| --- | --- | --- | --- | --- |")
            for op in result["top_ops"]:
                print(
                    f"| {op['op']} | {op['shapes']} | {op['calls']} | {op['ms']:.0f} "
                    f"| {op['share']:.1%} |"
                )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
