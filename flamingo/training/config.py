"""The training configuration: a run (:class:`TrainConfig`) with its datasets, optimiser and
engine sub-configs. ``train.py`` loads it from ``configs/train/*.yaml``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from flamingo.data.config import DatasetConfig
from flamingo.typed_config import YamlConfig, positive


@dataclass(frozen=True)
class OptimConfig(YamlConfig):
    """AdamW and the learning-rate schedule (paper App. B.1.2)."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Applied to the gated blocks' weight matrices only (none on the resampler, gates, norms,
    biases or token rows)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping, once per optimiser step (0 disables it)."""
    warmup_steps: int = 5000
    """Linear warm-up, in optimiser steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant (paper) or cosine decay to ``min_lr_ratio * lr``."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""

    def __post_init__(self) -> None:
        positive("lr", self.lr)
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay, grad_clip and warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass(frozen=True)
class EngineConfig(YamlConfig):
    """How the engine runs the model: precision, recomputation, distribution. The engine owns
    them: the model config it trains is changed to match (:meth:`model_changes`) whichever
    engine runs, and the engine sets the model's recompute policy."""

    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: frozen weights stored in bf16, every matrix product in bf16, trainable weights
    and optimiser state fp32 (plain PyTorch: fp32 weights under ``torch.autocast``; DeepSpeed:
    bf16 working copies beside fp32 masters)."""
    tf32: bool = True
    """On CUDA, let the float32 matrix products that remain use TF32 tensor cores (PyTorch's
    ``allow_tf32`` switches; fp32 range, 10-bit mantissa, several times the fp32 rate on
    Ampere and later); false keeps them in full fp32."""
    activation_checkpointing: bool | Literal["gated_blocks"] = False
    """Recompute activations in the backward pass to save memory: ``true`` the decoder layers
    and gated blocks (the frozen LM's forward runs twice), ``gated_blocks`` the gated blocks
    only (most of the memory per token for a fraction of the recompute); docs/training.md, "When to
    checkpoint activations"."""
    compile: bool = False
    """Compile the repeated blocks (decoder layers, gated blocks, perceiver layers, the tower's
    blocks) with ``torch.compile``, each on its own (``Flamingo.compile_blocks``); activation
    rebuilding is then left to the compiler. Not with ZeRO-3."""
    cross_attention: Literal["sdpa", "flex"] = "sdpa"
    """The gated blocks' attention kernel: ``sdpa`` (a float mask over every media key) or
    ``flex`` (PyTorch's flex_attention with a block mask, compiled: skips the keys a token may
    not see; torch >= 2.5 and a GPU, since flex_attention has no CPU backward). Both compute
    the same attention (``flamingo/xattn.py``)."""
    frozen_weights: Literal["replicated", "partitioned"] = "replicated"
    """Under ZeRO-3: ``replicated`` keeps the frozen tower and LM whole on every rank, outside
    ZeRO's partitioning (only the trainable modules are partitioned, so the frozen weights are
    never gathered again in every forward and backward); ``partitioned`` partitions them too,
    for a frozen LM too big for one device. Other stages partition no weights."""
    deepspeed: str | None = None
    """DeepSpeed JSON with ZeRO/offload settings only (configs/deepspeed/); None trains in one
    process with plain PyTorch."""
    timeout_minutes: float = 60.0
    """How long a rank waits in a collective before the job fails (DeepSpeed's default is 10
    minutes): longer than the slowest rank's lead at a barrier, e.g. a checkpoint written to a
    slow shared filesystem. Evaluation during training runs on every rank, so it need not
    cover an evaluation."""

    def __post_init__(self) -> None:
        if self.timeout_minutes <= 0:
            raise ValueError(f"engine.timeout_minutes must be > 0, got {self.timeout_minutes}")

    def model_changes(self) -> dict[str, Any]:
        """What this engine sets in the model config it trains (``FlamingoConfig.replace``):
        bf16 stores the frozen weights in bf16; fp32 leaves the model config's ``frozen_dtype``
        as it is (a model stored in bf16 stays so)."""
        return {"frozen_dtype": "bfloat16"} if self.precision == "bf16" else {}


TRAINING_FIELDS = ("lm.trainable", "lm.lora.")
"""Model config fields (and prefixes) that say what trains, not what the model is: a
checkpoint's may change (``model_overrides`` with ``init_from``), e.g. LLaVA's stage 2 from
stage 1's checkpoint with ``lm.trainable=lora lm.lora.rank=64``."""


@dataclass(frozen=True)
class TrainConfig(YamlConfig):
    """A pretraining run: model, datasets, optimisation, engine, checkpoints, logging."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "precision": "engine.precision",
        "deepspeed": "engine.deepspeed",
    }
    """Keys of earlier versions and where they went (named in the unknown-key error)."""

    datasets: list[DatasetConfig]
    """Datasets trained on together; each step accumulates gradients over all of them."""
    model: str | None = None
    """Path of the model config YAML (e.g. configs/model/tiny.yaml): a model trained from its
    initialisation. Give this or ``init_from``."""
    init_from: str | None = None
    """Fine-tune a checkpoint instead: its directory or Hub id (ours, an OpenFlamingo release,
    an IDEFICS checkpoint; ``Flamingo.from_pretrained``). Its config is the model's, its
    trained weights the start; ``model`` and ``model_overrides`` are then not given."""
    objective: Literal["nll", "qformer_stage1"] = "nll"
    """``nll``: the LM's next-token NLL of each dataset, weighted (every connector);
    ``qformer_stage1``: BLIP-2's stage 1, the Q-Former's contrastive, matching and
    text-generation losses on pairs datasets, no LM (``connector: qformer``;
    ``flamingo/training/stage1.py``). Its export starts stage 2 through ``init_qformer``."""
    init_qformer: str | None = None
    """BLIP-2's stage 2 from stage 1: the export (``OUTPUT/model``) of an ``objective:
    qformer_stage1`` run, whose Q-Former (not its text side) starts this ``connector: qformer``
    model's."""
    model_overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to the model config. With ``init_from``, only those of
    :data:`TRAINING_FIELDS` (``lm.trainable=full``: LLaVA's stage 2 from stage 1's
    checkpoint)."""
    output_dir: str = "runs/train"
    """Checkpoints, logs, plots and the exported model go here."""
    steps: int = 1000
    """Optimiser steps."""
    accumulation: int = 1
    """Micro-batches of each dataset per optimiser step."""
    mixing: Literal["all", "round_robin"] = "all"
    """``all``: every step accumulates over every dataset (paper); ``round_robin``: one
    dataset per step (the paper's ablation)."""
    seed: int = 0
    """Seeds model initialisation, data order and augmentation."""
    num_workers: int = 2
    """Data-loader worker processes per dataset and rank."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Precision, activation recomputation and the distributed engine."""
    checkpoint_every: int = 1000
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept (older ones are deleted)."""
    elastic_checkpoints: bool = True
    """Each checkpoint also holds the trainable weights and AdamW's moments whole
    (``trainable_state.safetensors``, 12 bytes per trainable parameter), so that the run can
    resume on another number of processes (a lost node): the data positions are carried over
    too (``flamingo/data/reshard.py``). Off: such a resume is refused."""
    log_every: int = 10
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    eval_config: str | None = None
    """An eval config (configs/eval/) run every ``eval_every`` steps, each rank evaluating its
    share of the items (not with ZeRO-3, which partitions the weights), e.g. with
    ``eval_overrides: [max_items=64, trials=1, "shots=[0,4]"]``."""
    eval_every: int = 0
    """Evaluate every this many steps (0: never)."""
    eval_overrides: list[str] = field(default_factory=list)
    """Dotted overrides for the eval config (a small task subset, few items)."""

    def __post_init__(self) -> None:
        for key in ("steps", "accumulation", "checkpoint_every", "keep_checkpoints", "log_every"):
            positive(key, getattr(self, key))
        if not self.datasets:
            raise ValueError("datasets: give at least one")
        if (self.model is None) == (self.init_from is None):
            raise ValueError(
                "give model (a model config YAML: train from initialisation) or init_from (a "
                "checkpoint to fine-tune), exactly one"
            )
        fixed = [
            o for o in self.model_overrides if not o.split("=", 1)[0].startswith(TRAINING_FIELDS)
        ]
        if self.init_from is not None and fixed:
            raise ValueError(
                f"model_overrides {fixed} cannot change a checkpoint's model (init_from): its "
                f"weights fix the architecture; only {list(TRAINING_FIELDS)} (what trains) may "
                "change"
            )
        if self.objective == "qformer_stage1":
            given = [k for k in ("init_from", "init_qformer") if getattr(self, k) is not None]
            if given or self.eval_every:
                raise ValueError(
                    f"objective: qformer_stage1 trains a new Q-Former with no LM: "
                    f"{given + ['eval_every'] * bool(self.eval_every)} cannot apply (the "
                    "few-shot evaluation needs the LM: evaluate stage 2)"
                )
        if self.init_qformer is not None and self.init_from is not None:
            raise ValueError("init_qformer starts a new model's Q-Former: not with init_from")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: names must be unique, got {names}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.eval_every < 0 or (self.eval_every and not self.eval_config):
            raise ValueError("eval_every needs an eval_config (and must be >= 0)")
