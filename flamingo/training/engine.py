"""The training engine: plain PyTorch in one process, or DeepSpeed ZeRO 1/2/3 across many.

This is the only module that imports deepspeed. ``train.py`` sees one interface,
:class:`Engine`: ``begin_step(lr)``, ``micro_step(loss)`` for every micro-batch,
``finish_step()`` once per optimiser step, checkpoint save/load, and gathering of full weights for export and logging.

DeepSpeed's JSON (``configs/deepspeed/*.json``) holds only ZeRO/offload settings; batch size,
accumulation, precision, clipping and the optimiser come from the train config (precision and
recomputation from its ``engine:`` section), and a JSON that sets any of them is an error.
Each engine states how the model must run under it once, as an ``ExecutionPolicy``
(``Flamingo.set_execution_policy``): the model files never look at DeepSpeed's attributes.
Only trainable parameters reach the optimiser, so frozen weights never get fp32 master copies
or optimiser state.

Normalisation across ranks: the loss given to ``micro_step`` is this rank's share of the
step's global objective (token counts were summed over ranks). DeepSpeed averages gradients
over ranks, so the engine multiplies by the world size to keep the sum.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flamingo.layers import ExecutionPolicy, PartitionedWeights, building_partitioned
from flamingo.training.config import EngineConfig, OptimConfig
from flamingo.training.ops import (
    first_on_node,
    import_deepspeed,
    init_distributed,
    load_ops,
    wanted,
)
from flamingo.xattn import flex_attention

OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config keeps the optimiser on the CPU (DeepSpeed's CPU Adam)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def cfg_timeout(cfg: EngineConfig) -> datetime.timedelta:
    """How long a collective waits (``engine.timeout_minutes``)."""
    return datetime.timedelta(minutes=cfg.timeout_minutes)


TrainableState = dict[str, torch.Tensor]
"""The trainable weights and AdamW's moments, full and fp32, by ``weight.NAME``,
``exp_avg.NAME`` and ``exp_avg_sq.NAME``: a form no number of ranks shapes."""
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class StepInfo:
    """How an optimiser step went, as 0-d tensors on the engine's device: reading them makes
    the host wait for the step, so the loop reads them only when it logs."""

    applied: torch.Tensor
    """bool; False when the step was skipped (non-finite loss or gradient)."""
    grad_norm: torch.Tensor
    """float; the global gradient norm before clipping (nan when skipped)."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; weight decay on the matrices of the model's
    ``decayed_modules`` (the gated blocks: the paper has none on the resampler), never on
    gates, norms, biases or token rows. The parts come from the model, not from parameter
    names."""
    blocks = {id(p) for m in model.decayed_modules() for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and id(p) in blocks
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """PyTorch AdamW, fused into one kernel per parameter where PyTorch has one (CPU, CUDA):
    the same update up to rounding, without the for-loop version's per-tensor temporaries
    (about 4x faster on the CPU)."""
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def allow_tf32(cfg: EngineConfig) -> None:
    """PyTorch's process-wide TF32 switches for CUDA matrix products and convolutions."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def execution_policy(cfg: EngineConfig, device_type: str, zero3: bool = False) -> ExecutionPolicy:
    """How the model runs under an engine of ``cfg`` on ``device_type`` (ZeRO-3: parameters are
    released between uses, so no backward rebuild may read them)."""
    return ExecutionPolicy(
        checkpoint_layers=cfg.activation_checkpointing is True,
        checkpoint_gated_blocks=cfg.activation_checkpointing == "gated_blocks",
        rebuild_activations=not cfg.compile,
        parameters_readable_in_backward=not zero3,
        every_parameter_takes_part=True,
        sync_free=device_type != "cpu",
        cross_attention=cross_attention_kernel(cfg, device_type),
    )


def cross_attention_kernel(cfg: EngineConfig, device_type: str) -> str:
    """``engine.cross_attention``, checked against what this process can train with."""
    if cfg.cross_attention == "flex":
        if flex_attention is None:
            raise ValueError(
                f"engine.cross_attention: flex needs torch >= 2.5 (flex_attention); this is "
                f"torch {torch.__version__}: use cross_attention: sdpa"
            )
        if device_type == "cpu":
            raise ValueError(
                "engine.cross_attention: flex trains on GPUs only (PyTorch's flex_attention has "
                "no CPU backward): use cross_attention: sdpa on the CPU"
            )
    return cfg.cross_attention


def zero_stage_of(cfg: EngineConfig) -> int:
    """The ZeRO stage ``engine.deepspeed`` names (0 without DeepSpeed)."""
    if not cfg.deepspeed or not Path(cfg.deepspeed).is_file():
        return 0
    return json.loads(Path(cfg.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)


def construction_device() -> torch.device:
    """Where ``train.py`` builds the model: on this process's GPU when there is one (random
    weights made there, pretrained ones loaded there; no whole copy in CPU memory per rank)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def model_construction(
    cfg: EngineConfig, optim: OptimConfig, micro_batches_per_step: int
) -> Iterator[None]:
    """The context in which ``train.py`` builds the model it gives :func:`build_engine` (same
    arguments): on :func:`construction_device`; and when ZeRO-3 partitions the frozen weights
    too (``frozen_weights: partitioned``, a frozen LM too big for one device), the LM is built
    already partitioned: transformers creates (or loads) it under DeepSpeed's ``zero.Init``
    while an ``HfDeepSpeedConfig`` is alive, so no rank ever holds it whole. The tower and the
    trainable modules are built whole and partitioned as the engine starts."""
    with torch.device(construction_device()):
        if zero_stage_of(cfg) != 3 or cfg.frozen_weights != "partitioned":
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

        deepspeed = import_deepspeed()
        ds_config = DeepSpeedEngine.build_config(cfg, optim, micro_batches_per_step)
        load_ops(wanted(offloads_optimizer(ds_config)), announce=first_on_node())
        init_distributed(deepspeed, cfg_timeout(cfg))  # zero.Init partitions over it
        switch = HfDeepSpeedConfig(ds_config)
        weights = PartitionedWeights(
            holds_no_data=lambda p: hasattr(p, "ds_id"),
            gathered=lambda params: deepspeed.zero.GatheredParameters(params),
            written=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0),
            whole_shape=lambda p: p.ds_shape,
        )
        try:
            with building_partitioned(weights):
                yield
        finally:  # later transformers calls (generation, saving) must not see ZeRO-3
            unset_hf_deepspeed_config()
            del switch


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class TrainableParts(nn.Module):
    """The trainable modules of a model, under their own dotted paths, for an engine that must
    not see the frozen weights (ZeRO-3 with ``frozen_weights: replicated``): its parameters and
    their names are exactly the model's trainable ones, and its forward runs the whole model,
    which it holds without registering it, so the frozen weights stay ordinary tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        paths = {id(m): name for name, m in model.named_modules()}
        for module in model.trainable_modules().values():
            *parents, leaf = paths[id(module)].split(".")
            owner: nn.Module = self
            for part in parents:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.add_module(leaf, module)
        object.__setattr__(self, "model", model)  # not a submodule: its frozen weights stay out
        ours = {id(p) for p in self.parameters()}
        left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ours]
        if left or any(not p.requires_grad for p in self.parameters()):
            raise ValueError(
                f"Flamingo.trainable_modules() must hold exactly the trainable parameters; "
                f"outside them: {left[:5]}"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class Engine:
    """What the training loop needs from an engine."""

    module: nn.Module
    policy: ExecutionPolicy
    """How the model runs under this engine (set on it at construction)."""
    rank: int = 0
    zero_stage: int = 0
    """The ZeRO stage that shards this engine's state (0: none)."""
    world_size: int = 1
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model through the engine (DeepSpeed counts micro-steps in its forward)."""
        return self.module(*args, **kwargs)

    def begin_step(self, lr: float) -> None:
        """Set the learning rate of the coming optimiser step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_step(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def finish_step(self) -> StepInfo:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def full_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full fp32 copies of the named parameters, on rank 0 only (empty elsewhere): gathered
        tensor by tensor, so no other rank holds more than one at a time (collective: every
        rank must call)."""
        raise NotImplementedError

    def trainable_state(self) -> tuple[TrainableState, int]:
        """This run's :data:`TrainableState` on rank 0 (empty elsewhere; gathered tensor by
        tensor, a collective) and the optimiser steps taken: what a resume on another number
        of ranks starts from."""
        raise NotImplementedError

    def load_trainable_state(self, read: Callable[[str], torch.Tensor | None], steps: int) -> None:
        """Set the weights and the optimiser's moments from a :data:`TrainableState`
        (``read(key)``, None for a key it lacks: no moments before the first step)."""
        raise NotImplementedError

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a collective)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def synchronize(self) -> None:
        """Wait until the device has run everything queued (steps are timed against it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group cleanly (a live communicator at interpreter exit can abort
        the process: "terminate called without an active exception")."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class LocalEngine(Engine):
    """One process, PyTorch's fused AdamW; skips a step whose loss or gradient is non-finite.

    The step never waits for the device (``ExecutionPolicy.sync_free`` on accelerators): the
    finiteness of the losses and of the gradient norm stays a device tensor, and the fused
    AdamW skips the update itself when told through ``found_inf`` (the flag PyTorch's
    GradScaler uses: no update, step counts unchanged). ``precision: bf16`` runs the forward
    under ``torch.autocast`` (bf16 matrix products; fp32 weights, gradients and optimiser
    state; no loss scaling, bf16 having fp32's range)."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = cfg.precision == "bf16"
        allow_tf32(cfg)
        self.policy = execution_policy(cfg, self.device.type)
        model.set_execution_policy(self.policy)
        if cfg.compile:
            model.compile_blocks()
        self.module = model.to(self.device)
        self.grad_clip = optim.grad_clip
        self.optimizer = adamw(
            param_groups(self.module, optim.weight_decay),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._fused = bool(self.optimizer.defaults.get("fused"))
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(*args, **kwargs)

    def micro_step(self, loss: torch.Tensor) -> None:
        # a non-finite loss still goes backward (its gradients are dropped with the step)
        self._finite = self._finite & torch.isfinite(loss.detach())
        loss.backward()

    def finish_step(self) -> StepInfo:
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        applied = self._finite & torch.isfinite(norm)
        if self._fused:
            self.optimizer.found_inf = (~applied).float()
            self.optimizer.step()
        elif applied:  # an optimiser without found_inf: the host must know (one sync)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        return StepInfo(applied, torch.where(applied, norm.detach(), math.nan))

    def save(self, directory: Path) -> None:
        trainable = {
            n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad
        }
        torch.save(
            {"trainable": trainable, "optimizer": self.optimizer.state_dict()},
            directory / "engine.pt",
        )

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=True)
        expected = {n for n, p in self.module.named_parameters() if p.requires_grad}
        if set(state["trainable"]) != expected:
            raise ValueError(
                f"{directory}: trainable weights do not match the model: missing "
                f"{sorted(expected - set(state['trainable']))}, unexpected "
                f"{sorted(set(state['trainable']) - expected)}"
            )
        # frozen weights are not in the checkpoint: they were rebuilt from their sources
        self.module.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])

    def full_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().float().cpu() for n in names}

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def trainable_state(self) -> tuple[TrainableState, int]:
        out, steps = {}, 0
        for name, p in self._trainable().items():  # copies: never views of what trains on
            out[f"weight.{name}"] = p.detach().to("cpu", torch.float32, copy=True)
            state = self.optimizer.state.get(p, {})
            if "exp_avg" in state:
                out.update(
                    {f"{k}.{name}": state[k].to("cpu", torch.float32, copy=True) for k in MOMENTS}
                )
                steps = int(state["step"])
        return out, steps

    def load_trainable_state(self, read: Callable[[str], torch.Tensor | None], steps: int) -> None:
        for name, p in self._trainable().items():
            with torch.no_grad():
                p.copy_(read(f"weight.{name}").to(p.device, p.dtype))
            moments = {k: read(f"{k}.{name}") for k in MOMENTS}
            if all(m is not None for m in moments.values()):
                # torch's AdamW keeps the step as a float32 tensor: on the device when fused
                where = p.device if self._fused else torch.device("cpu")
                step = torch.tensor(float(steps), dtype=torch.float32, device=where)
                self.optimizer.state[p] = {
                    "step": step,
                    **{k: m.to(p.device, torch.float32, copy=True) for k, m in moments.items()},
                }


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage and offload from the JSON), launched by the ``deepspeed`` CLI."""

    def __init__(
        self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, micro_batches_per_step: int
    ) -> None:
        deepspeed = import_deepspeed()
        self._ds = deepspeed
        allow_tf32(cfg)
        ds_config = self.build_config(cfg, optim, micro_batches_per_step)
        # built before DeepSpeed asks, and said (it would compile them in silence)
        load_ops(wanted(offloads_optimizer(ds_config)), announce=first_on_node())
        init_distributed(deepspeed, cfg_timeout(cfg))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        groups = param_groups(model, optim.weight_decay)
        zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        # ZeRO-3 releases a module's parameters after each use, so backward rebuilds must not
        # read them; every parameter takes part in every micro-batch (the policy's reasons).
        if zero3 and cfg.compile:
            raise ValueError(
                "engine.compile is not supported with ZeRO-3 (its parameter hooks run inside "
                "the compiled blocks); use ZeRO-1/2, or compile: false"
            )
        self.policy = execution_policy(cfg, deepspeed.get_accelerator().device_name(), zero3)
        model.set_execution_policy(self.policy)
        if cfg.compile:
            model.compile_blocks()
        replicated = zero3 and cfg.frozen_weights == "replicated"
        # ZeRO-3 partitions every parameter of the module it is given: with the frozen weights
        # replicated it is given the trainable modules only, the frozen ones going to the
        # device whole, once
        device = deepspeed.get_accelerator().current_device_name()
        wrapped = TrainableParts(model.to(device)) if replicated else model
        if zero3:
            # Parameters used outside their own module's forward must be announced to ZeRO-3,
            # on a module whose forward encloses their use: the wrapper's encloses everything.
            # A replicated frozen weight is no ZeRO parameter.
            for module, params in model.external_parameters():
                for p in params:
                    if p.requires_grad or not replicated:
                        deepspeed.zero.register_external_parameter(
                            wrapped if replicated else module, p
                        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=wrapped, model_parameters=groups, config=ds_config
        )
        self.module = model
        self.device = self.engine.device
        self.zero_stage = self.engine.zero_optimization_stage()
        self.named = dict(self.module.named_parameters())

    @staticmethod
    def build_config(
        cfg: EngineConfig, optim: OptimConfig, micro_batches_per_step: int
    ) -> dict[str, Any]:
        """DeepSpeed's config: the JSON's ZeRO/offload settings plus what the train config
        owns (batching, precision, clipping, the optimiser)."""
        path = Path(cfg.deepspeed)
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed config not found: {path}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        conflicts = sorted(set(ds) & set(OWNED_KEYS))
        if conflicts:
            raise ValueError(
                f"{path} sets {conflicts}: batch size, accumulation, precision, clipping and the "
                "optimiser come from the train config (optim.*, datasets.*.batch_size, "
                "accumulation, engine.precision); remove them from the DeepSpeed JSON"
            )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        offload = offloads_optimizer(ds)
        adam = {
            "lr": optim.lr,
            "betas": list(optim.betas),
            "eps": optim.eps,
            "weight_decay": optim.weight_decay,
        }
        if not offload:
            # torch.optim.AdamW (no FusedAdam build), fused into one kernel per partition;
            # offload needs DeepSpeed's CPUAdam
            adam.update(torch_adam=True, fused=True)
        return {
            **ds,
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: we feed our own batches
            "gradient_accumulation_steps": micro_batches_per_step,
            "train_batch_size": micro_batches_per_step * world,
            "gradient_clipping": optim.grad_clip,
            "bf16": {"enabled": cfg.precision == "bf16"},
            "optimizer": {"type": "AdamW", "params": adam},
            "zero_allow_untested_optimizer": True,
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Through the engine, never engine.module: ZeRO-3 advances its micro-step counter
        # there, and without it every backward overwrites the accumulated gradients.
        return self.engine(*args, **kwargs)

    def micro_step(self, loss: torch.Tensor) -> None:
        # A non-finite loss still goes backward: its NaN gradients make DeepSpeed's overflow
        # check skip the whole step on every rank and clear the accumulated gradients.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()  # applies the update only at the accumulation boundary

    def finish_step(self) -> StepInfo:
        # DeepSpeed decides on the host (its overflow check reads the gradients' finiteness)
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None and applied else math.nan
        return StepInfo(
            torch.tensor(applied, device=self.device), torch.tensor(norm, device=self.device)
        )

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(
            str(directory.parent),
            tag=directory.name,
            save_latest=False,
            exclude_frozen_parameters=True,
        )

    def load(self, directory: Path) -> None:
        # Frozen weights are not in the checkpoint: they were rebuilt from their sources.
        path, _ = self.engine.load_checkpoint(
            str(directory.parent), tag=directory.name, load_module_strict=False
        )
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {directory}")

    def full_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name in names:
            p = self.named[name]
            if p.requires_grad:  # a collective: every rank assembles it, rank 0 keeps it
                full = safe_get_full_fp32_param(p)
                if self.is_main:
                    out[name] = full.float().cpu()
                del full
            elif hasattr(p, "ds_id"):  # partitioned by ZeRO-3
                with self._ds.zero.GatheredParameters([p]):
                    if self.is_main:
                        out[name] = p.detach().float().cpu()
            elif self.is_main:  # whole on every rank: nothing to gather
                out[name] = p.detach().float().cpu()
        return out

    def _zero_states(self, steps: int | None = None) -> bool:
        """Whether the ZeRO optimiser holds AdamW's moments (made at its first step); with
        ``steps``, make them (zeros) where it does not, at that step count, and link them to
        the parameters, so that they can be set."""
        zero = self.engine.optimizer
        inner = getattr(zero, "optimizer", zero)
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(
            zero, "single_partition_of_fp32_groups", None
        )
        if flats is None:
            raise ValueError(
                f"{type(zero).__name__}: this DeepSpeed optimiser's state cannot be carried to "
                "another number of ranks; resume with the number that wrote the checkpoint"
            )
        if steps is None:
            made = all("exp_avg" in inner.state.get(f, {}) for f in flats)
            if made:
                self._link_states(zero)
            return made
        on_device = isinstance(inner, torch.optim.Optimizer) and (
            inner.defaults.get("fused") or inner.defaults.get("capturable")
        )
        for flat in flats:
            state = inner.state.setdefault(flat, {})
            if isinstance(inner, torch.optim.AdamW):  # torch's: a float32 tensor
                where = flat.device if on_device else torch.device("cpu")
                state["step"] = torch.tensor(float(steps), dtype=torch.float32, device=where)
            else:  # DeepSpeed's CPU Adam (offload) counts in an int
                state["step"] = steps
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(flat))
        self._link_states(zero)
        return True

    @staticmethod
    def _link_states(zero: Any) -> None:
        """Point each parameter's view into the optimiser's state at the state as it is now.
        ZeRO-1/2 link them once, at the first step, before torch's AdamW made its moments
        (DeepSpeed 0.19), leaving views of nothing: relink (ZeRO-3 reads the state directly)."""
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def trainable_state(self) -> tuple[TrainableState, int]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        moments = self._zero_states()
        out: TrainableState = {}
        for name, p in self.named.items():
            if not p.requires_grad:
                continue
            parts = [("weight", lambda p=p: safe_get_full_fp32_param(p))]
            if moments:
                parts += [
                    (k, lambda p=p, k=k: safe_get_full_optimizer_state(p, k)) for k in MOMENTS
                ]
            for key, gather in parts:
                full = gather()  # a collective
                if self.is_main:
                    out[f"{key}.{name}"] = full.float().cpu()
                del full
        steps = 0
        if moments:
            zero = self.engine.optimizer
            state = next(iter(getattr(zero, "optimizer", zero).state.values()))
            steps = int(state["step"])
        return out, steps

    def load_trainable_state(self, read: Callable[[str], torch.Tensor | None], steps: int) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        trainable = {n: p for n, p in self.named.items() if p.requires_grad}
        moments = all(read(f"exp_avg.{n}") is not None for n in trainable)
        if moments:
            self._zero_states(steps)
        for name, p in trainable.items():
            weight = read(f"weight.{name}").to(self.device)
            safe_set_full_fp32_param(p, weight)  # the fp32 master
            if hasattr(p, "ds_id"):  # and the working copy, partitioned under ZeRO-3
                with self._ds.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(weight.to(p.dtype))
            else:
                p.data.copy_(weight.to(p.dtype))
            if moments:
                for key in MOMENTS:
                    safe_set_full_optimizer_state(p, read(f"{key}.{name}").to(self.device), key)


def build_engine(
    model: nn.Module, cfg: EngineConfig, optim: OptimConfig, micro_batches_per_step: int
) -> Engine:
    """DeepSpeed when the config names a DeepSpeed JSON, plain PyTorch otherwise."""
    if cfg.deepspeed:
        return DeepSpeedEngine(model, cfg, optim, micro_batches_per_step)
    if launched_distributed():
        raise ValueError(
            "launched on several processes but the train config has no `engine.deepspeed:` "
            "JSON; set engine.deepspeed=configs/deepspeed/zero2.json (or run one process)"
        )
    return LocalEngine(model, cfg, optim)
