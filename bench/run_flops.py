"""Training FLOPs of a ``train.py`` run, counted on its own steps.

The run is built as ``train.py`` builds it (``train.setup``: its model, engine, data and step
function, BLIP-2's stage 1 included); its first ``count`` steps run under :class:`MatmulFlops`,
which counts every matrix product they perform (the frozen tower's forward, the forward and
backward of everything gradients reach), 2 FLOPs per multiply-add, as ``bench/flops.py``
derives them; the run's FLOPs are their mean times its ``steps``. Elementwise work, norms and
the optimiser are not counted (a few percent). A step's FLOPs depend on its batch's shapes
only, not on the weights, so a run is counted from its config before or after it trains.

    python -m bench.run_flops --config configs/demo/train.yaml [key=value ...] [--count 3]
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MatmulFlops(TorchDispatchMode):
    """A count of the matrix-product FLOPs an op sequence performs, from the operands' shapes
    (2 per multiply-add): ``bench/flops.py``'s convention, which the tests check its formulas
    against. PyTorch's ``FlopCounterMode`` counts only the ops each release registers (2.14 has
    no formula for the CPU flash-attention kernel SDPA dispatches to), so its totals depend on
    the installed torch.

    An attention kernel counts its two products (``q k^T``, ``p v``), its backward twice that,
    whichever kernel ran: a decomposed ("math") attention shows up as its ``bmm`` ops and is
    counted the same."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        flops = self.flops(name, args, out)
        if flops:
            self.total += flops
            self.ops[name] = self.ops.get(name, 0) + flops
        return out

    @staticmethod
    def flops(name: str, args: tuple, out) -> int:
        if name in ("mm", "bmm"):
            a, b = args[0].shape, args[1].shape
            return 2 * math.prod(a) * b[-1]
        if name in ("addmm", "baddbmm"):
            a, b = args[1].shape, args[2].shape
            return 2 * math.prod(a) * b[-1]
        if name == "convolution":
            weight = args[1].shape  # (out, in / groups, *kernel)
            return 2 * out.numel() * math.prod(weight[1:])
        if "attention" in name and "backward" in name:  # (grad_out, query, key, value, ...)
            return 2 * MatmulFlops.attention(*args[1:4])
        if "scaled_dot_product" in name or name.endswith("attention_forward"):
            return MatmulFlops.attention(*args[:3])
        return 0

    @staticmethod
    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
        """query (..., L, E), key (..., S, E), value (..., S, Ev)."""
        batch, length, keys = math.prod(query.shape[:-2]), query.shape[-2], key.shape[-2]
        return 2 * batch * length * keys * (query.shape[-1] + value.shape[-1])


def run_flops(cfg: Any, count: int = 3) -> dict[str, float]:
    """``{"step": mean counted FLOPs of the first count steps, "steps": cfg.steps, "total":
    their product}`` for the ``TrainConfig`` ``cfg`` (its output directory is not written)."""
    import train

    if count < 1:
        raise ValueError(f"count={count}: count at least one step")
    run = train.setup(cfg)
    run.engine.module.train()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused inference op hides its products
    counted = []
    try:
        for step in range(min(count, cfg.steps)):
            batch = run.batches.for_step(step, run.engine.all_reduce_sum, run.engine.device)
            if batch.stopped_by:
                raise ValueError(f"dataset(s) {batch.stopped_by} gave no batch: check their shards")
            with MatmulFlops() as counter:
                run.step_fn(run.engine, batch, cfg, cfg.optim.lr_at(step, cfg.steps))
            counted.append(counter.total)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        run.engine.close()
    per_step = sum(counted) / len(counted)
    return {"step": per_step, "steps": cfg.steps, "total": per_step * cfg.steps}


def main(argv: list[str] | None = None) -> None:
    from flamingo.training.config import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m bench.run_flops", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--count", type=int, default=3, help="steps counted (their mean)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the config")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    print(json.dumps(run_flops(cfg, args.count)))


if __name__ == "__main__":
    main()
