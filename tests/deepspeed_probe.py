"""One training step of the tiny model through ``DeepSpeedEngine`` in a one-rank group, watched.

    python -m tests.deepspeed_probe CONFIG.json PRECISION [LM_DIR] [key=value ...] [init_from=DIR]

Run by the tests in a subprocess (DeepSpeed's process group and its patches stay out of the
test process). Three micro-batches make the step; every collective is recorded with the
micro-batch it ran in ("micro0".."micro2", "finish": the optimiser step), its dtype and its
size. The model is built as ``train.py`` builds it (``model_construction``), with the LM saved
in LM_DIR (``save_pretrained``) when given. Prints one JSON line: the optimiser class, the
collectives, which parameters ZeRO partitioned (those carrying a ``ds_id``), frozen and
trainable apart, and how many LM weights were partitioned, holding no data, as construction
ended. With ``init_from=DIR`` the model is that checkpoint, built as ``train.py`` fine-tunes one
(``train.fine_tuned_model``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter

import yaml


def main() -> None:
    config, precision, *options = sys.argv[1:]
    lm_dir = options.pop(0) if options and "=" not in options[0] else None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = port
    import torch
    import torch.distributed as dist

    from flamingo import Flamingo, FlamingoProcessor
    from flamingo.losses import make_labels
    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import DeepSpeedEngine, model_construction
    from tests.helpers import noise_image, tiny_config

    init_from = next((o.split("=", 1)[1] for o in options if o.startswith("init_from=")), None)
    options = [o for o in options if not o.startswith("init_from=")]
    engine_cfg = EngineConfig.from_dict(
        {
            "precision": precision,
            "deepspeed": config,
            **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in options)},
        }
    )
    cfg = tiny_config().replace(engine_cfg.model_changes())
    if lm_dir:
        cfg = cfg.replace({"lm.architecture": None, "lm.name_or_path": lm_dir})
    processor = FlamingoProcessor.from_config(cfg)
    torch.manual_seed(0)
    optim = OptimConfig(warmup_steps=1)
    if init_from:  # as train.py fine-tunes a checkpoint
        import train
        from flamingo.training.config import TrainConfig

        engine = {"engine.precision": precision, "engine.deepspeed": config}
        engine.update((f"engine.{k}", v) for k, v in (o.split("=", 1) for o in options))
        run = TrainConfig.from_yaml(
            "configs/train/tiny.yaml",
            ["model=null", f"init_from={init_from}", *(f"{k}={v}" for k, v in engine.items())],
        )
        model = train.fine_tuned_model(run, 3)
        processor = FlamingoProcessor.from_pretrained(init_from)
    else:
        with model_construction(engine_cfg, optim, 3):
            model = Flamingo.from_config(cfg, processor)
    lm_weights = list(model.lm.hf.parameters())
    built_partitioned = sum(hasattr(p, "ds_id") and p.numel() == 0 for p in lm_weights)
    new_rows = model.lm.new_tokens.input_rows.detach().double().sum().item()  # their mean init
    enc = processor(
        ["<image>a red circle<|endofchunk|>", "<image>a blue square<|endofchunk|>"],
        images=[[noise_image(1)], [noise_image(2)]],
        padding_side="right",
    )
    labels = make_labels(enc["input_ids"], enc["attention_mask"], processor.special_tokens)
    engine = DeepSpeedEngine(model, engine_cfg, optim, 3)

    phase, calls = ["init"], Counter()
    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast"):
        original = getattr(dist, name)

        def recorded(*args, _original=original, _name=name, **kwargs):
            tensor = args[0] if args else next(iter(kwargs.values()))
            calls[f"{phase[0]} {_name} {str(tensor.dtype).removeprefix('torch.')}"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, recorded)
    engine.begin_step(1e-4)
    for i in range(3):
        phase[0] = f"micro{i}"
        out = engine.forward(
            enc["input_ids"],
            enc["attention_mask"],
            pixel_values=enc["pixel_values"],
            media_slots=enc["media_slots"],
            labels=labels,
        )
        engine.micro_step(out.nll_sum / 20)
    phase[0] = "finish"
    info = engine.finish_step()
    params = list(engine.engine.module.named_parameters())
    frozen_outside = [n for n, p in model.named_parameters() if not p.requires_grad]
    partitioned = {
        kind: sum(hasattr(p, "ds_id") for p in group)
        for kind, group in (
            ("trainable", [p for _, p in params if p.requires_grad]),
            ("frozen", [p for p in model.parameters() if not p.requires_grad]),
        )
    }
    report = {
        "optimizer": type(engine.engine.optimizer).__name__,
        "collectives": dict(sorted(calls.items())),
        "partitioned": partitioned,
        "frozen_parameters": len(frozen_outside),
        "lm_weights": len(lm_weights),
        "built_partitioned": built_partitioned,
        "new_rows": new_rows,
        "applied": bool(info.applied),
        "grad_norm": float(info.grad_norm),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
