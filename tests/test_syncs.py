"""A training step never makes the host wait for the device (sync-free execution).

Counted at the dispatcher, on the CPU, during ``train.train_step`` (every micro-batch's
forward and backward, the clipping and the optimiser step): every op that hands a tensor value
to the host (``_local_scalar_dense``: ``float()``, ``int()``, ``bool()``, ``.item()``), and every
op whose output shape depends on tensor values (``nonzero``, ``masked_select``, indexing with a
boolean mask). On an accelerator each of these stalls the host until the device has caught up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

import train
from bench.dispatch import SyncCounter
from flamingo.losses import count_targets, make_labels
from flamingo.training.batches import StepBatches
from flamingo.training.config import EngineConfig, OptimConfig, TrainConfig
from flamingo.training.engine import LocalEngine
from tests.helpers import ROOT, build, noise_image

ALLOWED = {
    "transformers/masking_utils.py": "transformers' causal-mask builder reads whether the padding "
    "mask is all ones, to call the attention kernel with is_causal and no mask (upstream code "
    "of the frozen LM; two reads per micro-batch)",
}


def counter() -> SyncCounter:
    return SyncCounter(skip=("test_syncs",))


def step_batches(processor, special) -> StepBatches:
    texts = [
        "<image>a red circle<|endofchunk|><image>and a blue square<|endofchunk|>",
        "<image>a green triangle<|endofchunk|>",
    ]
    images = [[noise_image(1), noise_image(2)], [noise_image(3)]]
    micro, targets = [], {}
    for name in ("interleaved", "pairs"):
        enc = processor(texts, images=images, padding_side="right")
        if name == "pairs":  # the packed path (one document a row here, then padding)
            enc["document_ids"] = 1 - enc["attention_mask"]
        ids, mask, documents = enc["input_ids"], enc["attention_mask"], enc.get("document_ids")
        batch = {**enc, "labels": make_labels(ids, mask, special, documents)}
        micro.append((name, batch))
        targets[name] = float(count_targets(batch["labels"]))
    return StepBatches(micro=micro, targets=targets)


def counted_step(sync_free: bool) -> Counter:
    from flamingo import FlamingoProcessor

    cfg = TrainConfig.from_yaml(ROOT / "configs/train/tiny.yaml")
    model = build().train()
    engine = LocalEngine(model, EngineConfig(), OptimConfig(lr=1e-3, warmup_steps=0))
    model.set_execution_policy(replace(engine.policy, sync_free=sync_free))
    step = step_batches(FlamingoProcessor.from_config(model.cfg), model.special_tokens)
    train.train_step(engine, step, cfg, 1e-3)  # warm-up: the optimiser state is created
    with counter() as found:
        _, _, info = train.train_step(engine, step, cfg, 1e-3)
    assert bool(info.applied)
    return found.found


def test_a_sync_free_training_step_never_reads_a_device_value():
    found = counted_step(sync_free=True)
    unexplained = {key: n for key, n in found.items() if not any(a in key[1] for a in ALLOWED)}
    assert not unexplained, f"host-device syncs in the step: {unexplained}"


@pytest.mark.parametrize("where", ["flamingo/fused_nll.py", "flamingo/model.py"])
def test_the_counter_finds_the_reads_the_cpu_path_makes(where):
    # on the CPU a read costs nothing: the checks keep their messages and the loss gathers its
    # rows, and the counter sees it (so an empty count above means something)
    found = counted_step(sync_free=False)
    assert any(key[1].startswith(where) for key in found), found


def test_a_skipped_step_changes_neither_the_weights_nor_the_optimiser_state():
    model = build().train()
    engine = LocalEngine(model, EngineConfig(), OptimConfig(lr=1e-2, warmup_steps=0))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(scale: float):
        engine.begin_step(1e-2)
        engine.micro_step(sum((p * p).sum() for p in params) * scale)
        return engine.finish_step()

    assert bool(step(1.0).applied)
    before = [p.detach().clone() for p in params]

    def optimiser_state():
        return {
            (i, k): v for i, p in enumerate(params) for k, v in engine.optimizer.state[p].items()
        }

    state = {key: v.clone() for key, v in optimiser_state().items()}
    info = step(float("nan"))
    assert not bool(info.applied) and torch.isnan(info.grad_norm)
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    after = optimiser_state()
    assert state.keys() == after.keys() and len(state) == 3 * len(params)
    assert all(torch.equal(state[k], after[k]) for k in state)  # step counts included
    assert bool(step(1.0).applied)
    assert not all(torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_the_sync_free_media_check_still_refuses_missing_media():
    from flamingo import FlamingoProcessor
    from flamingo.layers import ExecutionPolicy

    model = build()
    model.set_execution_policy(ExecutionPolicy(sync_free=True))
    processor = FlamingoProcessor.from_config(model.cfg)
    enc = processor(["<image>a<image>b"], images=[[noise_image(1), noise_image(2)]])
    ids, mask, pixels, slots = (
        enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "media_slots")
    )
    with pytest.raises(RuntimeError):  # the device's assert: no message, but no silent garbage
        model(ids, mask, pixel_values=pixels, media_slots=slots[:, :1])
    with pytest.raises(RuntimeError):  # a slot past the flat list
        model(ids, mask, pixel_values=pixels[:1], media_slots=slots)
    model(ids, mask, pixel_values=pixels, media_slots=slots)
