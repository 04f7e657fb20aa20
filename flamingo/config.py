"""Typed configuration tree for the Flamingo model.

Each component receives only its own sub-config (``VisionConfig`` for the vision tower,
``ResamplerConfig`` for the Perceiver Resampler, ...). Configs are plain dataclasses with an
attribute docstring under every field; they load from YAML with dotted overrides::

    cfg = FlamingoConfig.from_yaml("configs/model/tiny.yaml", overrides=["resampler.depth=2"])

Unknown keys and badly typed values raise ``ValueError`` naming the dotted key. The loader is
generic (:func:`from_dict`), so other config trees (training, evaluation) reuse it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Generic loading: dict -> dataclass tree, with type checks and dotted error messages
# --------------------------------------------------------------------------------------------


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation; returns the (possibly converted) value."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}"
        )
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if (
            origin is tuple
            and len(args) > 1
            and args[1] is not Ellipsis
            and len(value) != len(args)
        ):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
        item = args[0] if args else Any
        items = [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {k: _check_value(v, item, f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")  # a bug in a config class


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and bad types."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ValueError(f"unknown config key(s) {names}; valid keys here: {sorted(fields)}")
    kwargs = {name: _check_value(v, hints[name], prefix + name) for name, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(
            f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)
        ) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict`: a plain nested dict, YAML/JSON serialisable."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like 'section.key=value'")
        dotted, raw = item.split("=", 1)
        keys: list[Any] = dotted.strip().split(".")
        node: Any = data
        for i, k in enumerate(keys):
            if isinstance(node, list):  # datasets.0.batch_size=4
                if not k.isdigit() or int(k) >= len(node):
                    raise ValueError(
                        f"override {item!r}: {k!r} is not an index of a {len(node)}-item list"
                    )
                keys[i] = k = int(k)
            elif not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {keys[i - 1]!r} is not a section")
            if i < len(keys) - 1:
                node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level of a config must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load config class ``cls`` from YAML plus ``section.key=value`` overrides; errors name
    the file and the dotted key."""
    data = apply_overrides(load_yaml(path), list(overrides or []))
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


# --------------------------------------------------------------------------------------------
# The model config tree
# --------------------------------------------------------------------------------------------

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """The frozen open_clip vision tower (DESIGN: vision.py)."""

    model_name: str = "ViT-L-14"
    """open_clip architecture name (``open_clip.list_models()``), or a label when
    ``architecture`` is given inline."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag (e.g. ``openai``, ``laion2b_s32b_b82k``) or a local checkpoint
    path; ``None`` keeps random weights (tests)."""
    architecture: dict | None = None
    """Inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for a custom
    architecture; built without the open_clip registry, so it works offline."""
    ln_post_on_tokens: bool = True
    """Apply the tower's final LayerNorm (``ln_post``) to the patch tokens. open_clip >= 2.24
    does by default; the open_clip releases OpenFlamingo was trained with applied it to the
    pooled output only (tokens un-normalised), so OpenFlamingo configs set this to false."""
    image_size: int = 224
    """Input resolution; must equal the tower's own."""
    resize: Literal["pad", "crop"] = "pad"
    """How images become squares, in training and inference alike: ``pad`` keeps the aspect
    ratio and pads with the mean colour (paper); ``crop`` resizes the short side and center
    crops (open_clip's and OpenFlamingo's preprocessing)."""
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    """Per-channel normalisation mean of the tower's training."""
    image_std: tuple[float, float, float] = OPENAI_STD
    """Per-channel normalisation std of the tower's training."""

    def __post_init__(self) -> None:
        _positive("image_size", self.image_size)
        if self.architecture is not None:
            missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(self.architecture)
            if missing:
                raise ValueError(f"architecture is missing {sorted(missing)}")
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)


@dataclass
class ResamplerConfig:
    """Perceiver Resampler (paper Sec. 2.1, Fig. 5)."""

    depth: int = 6
    """Number of (attention, feed-forward) layers."""
    heads: int = 8
    """Attention heads."""
    dim_head: int = 64
    """Width of each attention head."""
    num_latents: int = 64
    """Latents per media item (R in the tensor glossary)."""
    ff_mult: int = 4
    """Feed-forward hidden width as a multiple of the vision width."""
    max_num_frames: int = 0
    """Learned time embeddings for video frames, up to this many frames; 0 disables them (and
    video input)."""
    spatial_embeddings: bool = False
    """Add a learned embedding per vision-token position (per patch) before resampling. The
    paper and OpenFlamingo add none: their deep encoders carry position in the token features.
    A shallow encoder's tokens may not (the toy world's 2-layer CLIP: attention pooling reads
    an object's position at 29% without them, 83% with), and the resampler's attention pooling
    has no other way to tell where a token came from."""

    def __post_init__(self) -> None:
        for key in ("depth", "heads", "dim_head", "num_latents", "ff_mult"):
            _positive(key, getattr(self, key))
        if self.max_num_frames < 0:
            raise ValueError(f"max_num_frames must be >= 0, got {self.max_num_frames}")


@dataclass
class CrossAttentionConfig:
    """GATED XATTN-DENSE blocks inserted into the frozen LM (paper Sec. 2.2, Fig. 4)."""

    every_n_layers: int = 1
    """A gated block runs before every n-th decoder layer."""
    first_layer: int = 0
    """Index of the first decoder layer with a gated block before it: 0 in the paper,
    ``every_n_layers - 1`` in OpenFlamingo."""
    heads: int = 8
    """Cross-attention heads."""
    dim_head: int = 64
    """Width of each cross-attention head."""
    ff_mult: int = 4
    """Gated feed-forward hidden width as a multiple of the LM width."""
    attend: Literal["last", "all_previous"] = "last"
    """Which images a token sees: the last ``<image>`` at or before it (paper's phi), or all
    images before it."""
    gate: Literal["scalar", "vector"] = "scalar"
    """``tanh`` gates per block: one scalar each (paper) or one value per channel."""
    gating: Literal["tanh", "none"] = "tanh"
    """``tanh``: each residual branch is scaled by ``tanh(alpha)``, alpha initialised to 0
    (paper). ``none``: the paper's "w/o tanh gating" ablation (Table 3): the branches are added
    unscaled, so a fresh model is *not* the LM. An ablation switch, not for real runs."""
    ff_on_imageless_tokens: bool = True
    """Run the gated feed-forward on tokens with no image before them too (OpenFlamingo does;
    the paper is silent). Their cross-attention output is always exactly zero."""

    def __post_init__(self) -> None:
        for key in ("every_n_layers", "heads", "dim_head", "ff_mult"):
            _positive(key, getattr(self, key))
        if not 0 <= self.first_layer < self.every_n_layers:
            raise ValueError(
                f"first_layer must be in [0, every_n_layers) = [0, {self.every_n_layers}), "
                f"got {self.first_layer}"
            )

    def layer_indices(self, num_layers: int) -> list[int]:
        """Decoder layers that get a gated block before them."""
        return list(range(self.first_layer, num_layers, self.every_n_layers))


@dataclass
class LanguageConfig:
    """The frozen Hugging Face causal LM and its tokenizer (DESIGN: lm.py, tokens.py)."""

    name_or_path: str | None = "facebook/opt-1.3b"
    """Hugging Face model id or local directory with weights; ignored when ``architecture`` is
    given."""
    architecture: dict | None = None
    """Inline Hugging Face config (``model_type`` plus fields) for a randomly initialised LM."""
    tokenizer: str | None = None
    """Tokenizer id or directory; ``None`` uses ``name_or_path``; ``tiny`` is the tokenizer
    shipped inside the package."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model and tokenizer."""
    trust_remote_code: bool = False
    """Allow model code from the hub (needed by some MPT checkpoints)."""
    attn_implementation: str = "sdpa"
    """Hugging Face attention implementation (``sdpa``, ``eager``, ``flash_attention_2``)."""
    disable_dropout: bool = True
    """Zero the frozen LM's dropout probabilities so its output does not depend on train/eval
    mode (Chinchilla, the paper's LM, has none)."""
    save_input_embeddings: bool = False
    """Checkpoints carry the LM's whole input embedding matrix, not only the new rows: set by
    the OpenFlamingo import, whose training updated every row."""

    def __post_init__(self) -> None:
        if self.architecture is None and not self.name_or_path:
            raise ValueError("set name_or_path or an inline architecture")
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ValueError("architecture must name its model_type (e.g. llama)")
        if self.name_or_path is None and self.tokenizer is None:
            raise ValueError("tokenizer must be set when the LM has no name_or_path")

    def tokenizer_source(self) -> str:
        return self.tokenizer or self.name_or_path


@dataclass
class FlamingoConfig:
    """The whole model: frozen vision tower + resampler + gated blocks in a frozen LM."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision tower."""
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    """Perceiver Resampler."""
    xattn: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    """Gated cross-attention blocks."""
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    """Language model and tokenizer."""
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the frozen vision tower and LM; trainable parameters stay float32 (paper)."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers and gated blocks in the backward pass to save memory."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlamingoConfig:
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> FlamingoConfig:
        """Load a model config from YAML, then apply ``section.key=value`` overrides."""
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def library_version() -> str:
    try:
        return importlib.metadata.version("flamingo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    """One training dataset: a set of webdataset shards of one kind (DESIGN: flamingo/data)."""

    name: str
    """Name used in logs, counters and per-dataset losses."""
    kind: Literal["pairs", "interleaved", "video"]
    """Shard schema (flamingo/data/schema.py)."""
    shards: str
    """Shard paths: brace expansion (``data/pairs-{00000..00099}.tar``) and ``::`` lists."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 32
    """Tokens per sequence (paper/OpenFlamingo: 32 for pairs and video, 256 for interleaved)."""
    max_images: int = 5
    """Images per interleaved sequence (paper: 5); pairs and video always have one."""
    num_frames: int = 8
    """Frames per video clip, sampled evenly from the stored ones."""
    loss_weight: float = 1.0
    """lambda_m of this dataset in the weighted loss (paper: interleaved 1.0, pairs 0.2, video
    0.03)."""
    resampled: bool = True
    """Draw shards with replacement forever (training); false: one pass per epoch."""
    at_epoch_end: Literal["next_epoch", "stop"] = "next_epoch"
    """Epoch mode (``resampled: false``): once every shard is read, start the next epoch
    (logged), or stop the run (a checkpoint at the last full step, then the export), naming
    this dataset."""
    shuffle_buffer: int = 256
    """Samples shuffled together within a shard (0: stored order)."""
    p_next_image: float = 0.5
    """Interleaved: probability that a document's text is tied to the next image instead of
    the previous one (paper, M3W)."""
    p_leading_space: float = 0.5
    """Pairs and video: probability of a leading space before the caption."""
    p_flip: float = 0.5
    """Per-sample horizontal flip probability (set 0 when text refers to left/right)."""
    max_text_chars: int = 100_000
    """Longer texts are skipped as malformed (counted)."""
    max_image_pixels: int = 89_478_485
    """Larger images are skipped as decompression bombs (counted); PIL's default."""
    max_skip_rate: float = 0.5
    """Abort when more than this fraction of samples is skipped (after ``min_samples_for_skip_rate``)."""
    min_samples_for_skip_rate: int = 200
    """Samples a stream must have seen before the skip rate is enforced."""

    def __post_init__(self) -> None:
        for key in (
            "batch_size",
            "seq_len",
            "max_images",
            "num_frames",
            "max_text_chars",
            "max_image_pixels",
        ):
            _positive(key, getattr(self, key))
        for key in ("p_next_image", "p_leading_space", "p_flip", "max_skip_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {self.loss_weight}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.resampled and self.at_epoch_end == "stop":
            raise ValueError(
                f"dataset {self.name}: at_epoch_end: stop needs resampled: false (a resampled "
                "dataset draws shards forever and never runs out)"
            )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
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
        _positive("lr", self.lr)
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


@dataclass
class TrainConfig:
    """A pretraining run: model, datasets, optimisation, engine, checkpoints, logging."""

    model: str
    """Path of the model config YAML (e.g. configs/model/tiny.yaml)."""
    datasets: list[DatasetConfig]
    """Datasets trained on together; each step accumulates gradients over all of them."""
    model_overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to the model config."""
    output_dir: str = "runs/train"
    """Checkpoints, logs, plots and the exported model go here."""
    steps: int = 1000
    """Optimiser steps."""
    accumulation: int = 1
    """Micro-batches of each dataset per optimiser step."""
    mixing: Literal["all", "round_robin"] = "all"
    """``all``: every step accumulates over every dataset (paper); ``round_robin``: one
    dataset per step (the paper's ablation)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: frozen weights and activations in bf16, trainable weights and optimiser state
    fp32."""
    seed: int = 0
    """Seeds model initialisation, data order and augmentation."""
    num_workers: int = 2
    """Data-loader worker processes per dataset and rank."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    deepspeed: str | None = None
    """DeepSpeed JSON with ZeRO/offload settings only (configs/deepspeed/); None trains in one
    process with plain PyTorch."""
    checkpoint_every: int = 1000
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept (older ones are deleted)."""
    log_every: int = 10
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    eval_config: str | None = None
    """An eval config (configs/eval/) run every ``eval_every`` steps on rank 0, e.g. with
    ``eval_overrides: [max_items=64, trials=1, "shots=[0,4]"]``."""
    eval_every: int = 0
    """Evaluate every this many steps (0: never)."""
    eval_overrides: list[str] = field(default_factory=list)
    """Dotted overrides for the eval config (a small task subset, few items)."""

    def __post_init__(self) -> None:
        for key in ("steps", "accumulation", "checkpoint_every", "keep_checkpoints", "log_every"):
            _positive(key, getattr(self, key))
        if not self.datasets:
            raise ValueError("datasets: give at least one")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: names must be unique, got {names}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.eval_every < 0 or (self.eval_every and not self.eval_config):
            raise ValueError("eval_every needs an eval_config (and must be >= 0)")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
