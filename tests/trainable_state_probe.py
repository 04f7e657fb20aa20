"""The whole trainable state through ``DeepSpeedEngine`` in a one-rank group: taken from one
engine after two steps, given to a fresh engine (other trainable weights), taken back.

    python -m tests.trainable_state_probe CONFIG.json PRECISION

Run by tests/test_cluster.py in a subprocess (DeepSpeed's process group stays out of the test
process). Prints one JSON line: the keys and optimiser steps of both states, the largest
difference between them, and between the two engines' weights after one more identical step.
"""

from __future__ import annotations

import json
import os
import socket
import sys


def main() -> None:
    config, precision = sys.argv[1:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = port
    import torch

    from flamingo import Flamingo, FlamingoProcessor
    from flamingo.losses import make_labels
    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import DeepSpeedEngine
    from tests.helpers import noise_image, tiny_config

    engine_cfg = EngineConfig(precision=precision, deepspeed=config)
    cfg = tiny_config().replace(engine_cfg.model_changes())
    processor = FlamingoProcessor.from_config(cfg)
    optim = OptimConfig(warmup_steps=1, lr=1e-2)
    enc = processor(
        ["<image>a red circle<|endofchunk|>", "<image>a blue square<|endofchunk|>"],
        images=[[noise_image(1)], [noise_image(2)]],
        padding_side="right",
    )
    labels = make_labels(enc["input_ids"], enc["attention_mask"], processor.special_tokens)

    def engine(shift: float) -> DeepSpeedEngine:
        torch.manual_seed(0)  # the same random frozen tower and LM
        model = Flamingo.from_config(cfg, processor)
        with torch.no_grad():  # trainable weights the state must overwrite
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(shift)
        return DeepSpeedEngine(model, engine_cfg, optim, 1)

    def step(e: DeepSpeedEngine) -> None:
        e.begin_step(1e-2)
        out = e.forward(
            enc["input_ids"],
            enc["attention_mask"],
            pixel_values=enc["pixel_values"],
            media_slots=enc["media_slots"],
            labels=labels,
        )
        e.micro_step(out.nll_sum / 20)
        e.finish_step()

    a = engine(0.0)
    step(a), step(a)
    state, steps = a.trainable_state()
    b = engine(0.5)
    b.load_trainable_state(state.get, steps)
    again, steps_again = b.trainable_state()
    step(a), step(b)
    after_a, _ = a.trainable_state()
    after_b, _ = b.trainable_state()
    report = {
        "keys": len(state),
        "moments": sum(k.startswith("exp_avg") for k in state),
        "steps": [steps, steps_again],
        "same_keys": sorted(state) == sorted(again),
        "loaded": max((state[k] - again[k]).abs().max().item() for k in state),
        "after_step": max((after_a[k] - after_b[k]).abs().max().item() for k in after_a),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
