"""Building blocks shared by the resampler and the gated cross-attention.

Both follow the paper's pre-norm transformer conventions: a LayerNorm before each attention and
feed-forward, bias-free projections, GELU. Imported checkpoints bring variants, each a config
field: an RMSNorm instead of the LayerNorm, a ReLU instead of the GELU, a SwiGLU feed-forward
(:class:`GatedFeedForward`) shaped like a Llama MLP.

**Cheap activations are rebuilt, not kept.** A trainable Linear keeps its input for its weight
gradient. Where that input is a cheap function of tensors autograd keeps anyway (a LayerNorm's
output: its input is kept for the LayerNorm's own backward; a GELU's output: its input is
kept), the modules here let autograd drop it and rebuild it in the backward
(:func:`recompute_in_backward`): the same values and gradients bit for bit, for one elementwise
op per tensor.

**The engine decides, the modules obey.** What is recomputed, and whether parameters can be
read during the backward, depends on the engine (activation checkpointing manages saved tensors
itself; ZeRO-3 releases parameters after each use). An engine states it once, as an
:class:`ExecutionPolicy` passed to ``Flamingo.set_execution_policy``; the modules here read
their ``policy`` attribute and never inspect the engine's own attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class _Rebuild(NamedTuple):
    """What autograd stores instead of a view of the recomputed tensor."""

    size: torch.Size
    stride: tuple[int, ...]
    offset: int


@contextlib.contextmanager
def recompute_in_backward(
    tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]
) -> Iterator[None]:
    """Autograd does not keep ``tensor`` (or views of it) for the ops run inside the block.

    Their backward calls ``recompute()`` (under no_grad) to rebuild it; it must return the same
    values, contiguous, from tensors that stay alive anyway. Without grad mode, or when
    ``tensor`` is not contiguous, the block runs unchanged. The modules switch it through
    :func:`rebuilt_in_backward`.
    """
    if not (torch.is_grad_enabled() and tensor.is_contiguous()):
        yield
        return
    storage, dtype, base = (
        tensor.untyped_storage().data_ptr(),
        tensor.dtype,
        tensor.storage_offset(),
    )

    def pack(saved: torch.Tensor):
        if saved.dtype == dtype and saved.untyped_storage().data_ptr() == storage:
            return _Rebuild(saved.shape, saved.stride(), saved.storage_offset() - base)
        return saved

    def unpack(saved):
        if not isinstance(saved, _Rebuild):
            return saved
        with torch.no_grad():
            full = recompute()
        return full.as_strided(saved.size, saved.stride, full.storage_offset() + saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@dataclass(frozen=True)
class ExecutionPolicy:
    """How the trainable modules run, as the engine that trains them needs: set once through
    ``Flamingo.set_execution_policy`` (every module carrying a ``policy`` gets it)."""

    checkpoint_layers: bool = False
    """Activation checkpointing: decoder layers and gated blocks are recomputed whole in the
    backward (the checkpointed modules then rebuild nothing themselves)."""
    checkpoint_gated_blocks: bool = False
    """Recompute the gated blocks alone in the backward, the frozen LM's layers keeping their
    activations: the larger share of the activation memory per token (docs/training.md, "When to
    checkpoint activations") for a recompute of the trainable blocks only."""
    rebuild_activations: bool = True
    """Rebuild cheap activations (LayerNorm and GELU outputs) in the backward instead of keeping
    them (module docstring)."""
    parameters_readable_in_backward: bool = True
    """A module's parameters can be read during any part of the backward. Not under ZeRO-3: it
    releases a module's parameters after each use (even those below the persistence threshold,
    during the first, trace-recording step), so a rebuild that reads them (a LayerNorm's
    output) in another module's backward would find them empty; those outputs are kept."""
    every_parameter_takes_part: bool = True
    """Every forward touches every trainable parameter, unused ones times zero (the same values),
    so each gets a gradient, zero where unused, rather than none. DeepSpeed ZeRO-3 needs it: it
    copies (not adds) a parameter's first gradient of a step into its buffer only on the step's
    first micro-batch, so a parameter the first micro-batch left out adds to the buffer's old
    contents, and one a step never uses re-applies its last gradient
    (https://github.com/deepspeedai/DeepSpeed/issues/1266). On for every engine, so that they
    all take the same steps."""

    sync_free: bool = False
    """Never make the host wait for the device in a training step: checks that read tensor
    values become device-side asserts, and the fused loss runs every row through the head in
    fixed-shape chunks (targetless rows masked) instead of first gathering the rows with a
    target, whose count the host would have to read. Engines set it on accelerators; on the
    CPU a value read costs nothing, and the checks keep their full error messages."""

    cross_attention: Literal["sdpa", "flex"] = "sdpa"
    """The gated blocks' attention kernel (:mod:`flamingo.xattn`): ``sdpa`` with a float mask
    over all N*R keys, or ``flex`` (flex_attention with a block mask: skips the key blocks a
    token may not see; torch >= 2.5, trains on GPUs only)."""

    def __post_init__(self) -> None:
        if self.cross_attention not in ("sdpa", "flex"):
            raise ValueError(
                f"cross_attention must be 'sdpa' or 'flex', got {self.cross_attention!r}"
            )

    def checkpoints_gated_blocks(self) -> bool:
        return self.checkpoint_layers or self.checkpoint_gated_blocks

    def rebuilds_reading_parameters(self) -> bool:
        """Whether a rebuild may read parameters (a LayerNorm output from its input)."""
        return self.rebuild_activations and self.parameters_readable_in_backward


DEFAULT_POLICY = ExecutionPolicy()


@dataclass(frozen=True)
class PartitionedWeights:
    """What an engine that partitions weights as the model is built (ZeRO-3's ``zero.Init``)
    tells the constructors, which must read a few of them (the new-token rows start at the
    mean of the LM's rows): which parameters hold no data here, and how to read them whole."""

    holds_no_data: Callable[[torch.Tensor], bool]
    gathered: Callable[[list[torch.Tensor]], contextlib.AbstractContextManager]
    """A context in which the given partitioned parameters are whole (read-only)."""
    written: Callable[[list[torch.Tensor]], contextlib.AbstractContextManager] | None = None
    """A context in which they are whole and what is written into them is kept (partitioned
    again on the way out): how a checkpoint's tensors reach a model built partitioned."""
    whole_shape: Callable[[torch.Tensor], torch.Size] | None = None
    """A partitioned parameter's shape, whole."""


_building_partitioned: list[PartitionedWeights] = []


@contextlib.contextmanager
def building_partitioned(weights: PartitionedWeights) -> Iterator[None]:
    """The engine's context around construction when it partitions weights as they are made."""
    _building_partitioned.append(weights)
    try:
        yield
    finally:
        _building_partitioned.pop()


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether the engine building the model partitioned ``param`` (it then holds no data)."""
    return bool(_building_partitioned) and _building_partitioned[-1].holds_no_data(param)


def building_partitioned_now() -> bool:
    """Whether the model is being built by an engine that partitions weights as they are made."""
    return bool(_building_partitioned)


def shape_whole(param: torch.Tensor) -> torch.Size:
    """``param``'s shape, the whole one for a parameter the engine partitioned as it built it."""
    if is_partitioned(param) and _building_partitioned[-1].whole_shape is not None:
        return _building_partitioned[-1].whole_shape(param)
    return param.shape


def write_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``param``, into its partitions when the engine partitioned it as it
    built it (gathered, written, partitioned again); in place either way."""
    with torch.no_grad():
        if not is_partitioned(param):
            param.copy_(value)
            return
        written = _building_partitioned[-1].written
        if written is None:
            raise RuntimeError("this engine partitions weights but cannot write into them")
        with written([param]):
            param.data.copy_(value.to(param.dtype))


@contextlib.contextmanager
def whole(*params: torch.Tensor) -> Iterator[None]:
    """``params`` with their whole values inside the block, also those the engine partitioned
    as it built them (gathered, released after); others as they are."""
    partitioned = [p for p in {id(p): p for p in params}.values() if is_partitioned(p)]
    if not partitioned:
        yield
        return
    with _building_partitioned[-1].gathered(partitioned):
        yield


def rebuilt_in_backward(
    op: Callable[[torch.Tensor], torch.Tensor],
    tensor: torch.Tensor,
    recompute: Callable[[], torch.Tensor],
    enabled: bool,
) -> torch.Tensor:
    """``op(tensor)``, with ``tensor`` rebuilt in the backward instead of kept when ``enabled``
    (:func:`recompute_in_backward`); disabled, no hook is installed at all, so the call
    compiles (``torch.compile`` before 2.5 cannot trace the context manager even when it does
    nothing)."""
    if not enabled:
        return op(tensor)
    with recompute_in_backward(tensor, recompute):
        return op(tensor)


Norm = nn.LayerNorm | nn.RMSNorm


def make_norm(kind: Literal["layernorm", "rmsnorm"], dim: int, eps: float = 1e-5) -> Norm:
    """A pre-norm over ``dim``: ``layernorm`` (weight and bias) or ``rmsnorm`` (weight only)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)


def layer_norm(norm: Norm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` without a module call (no hooks: safe to run inside a backward)."""
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def linear_of_norm(
    linear: nn.Linear, norm: Norm, x: torch.Tensor, policy: ExecutionPolicy
) -> torch.Tensor:
    """``linear(norm(x))``; the norm's output is rebuilt in the backward for the Linear's
    weight gradient instead of kept, where the policy allows it."""
    normed = norm(x)
    rebuild = policy.rebuilds_reading_parameters()
    return rebuilt_in_backward(linear, normed, lambda: layer_norm(norm, x), rebuild)


class FeedForward(nn.Sequential):
    """Pre-norm MLP: norm -> Linear(dim, hidden) -> GELU (or ReLU) -> Linear(hidden, dim), with
    ``hidden = mult * dim`` (or ``hidden``).

    Under the default policy neither the norm's output nor the activation's output, which the
    Linears would keep for their weight gradients, is stored: the backward rebuilds them from
    the norm's and the activation's inputs (module docstring).

    Load-bearing layout: a ``Sequential`` whose children are named ``0``-``3`` gives the
    state-dict keys OpenFlamingo's checkpoints use (``ff.0.weight`` ... ``ff.3.weight``), which
    the OpenFlamingo import maps one to one (``flamingo/convert/openflamingo.py``); renaming or
    reordering the children breaks it.
    """

    def __init__(
        self,
        dim: int,
        mult: int = 4,
        activation: Literal["gelu", "relu"] = "gelu",
        norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        norm_eps: float = 1e-5,
        hidden: int | None = None,
    ) -> None:
        inner = hidden or dim * mult
        super().__init__(
            make_norm(norm, dim, norm_eps),
            nn.Linear(dim, inner, bias=False),
            nn.GELU() if activation == "gelu" else nn.ReLU(),
            nn.Linear(inner, dim, bias=False),
        )
        self.policy = DEFAULT_POLICY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, up, act, down = self
        hidden = linear_of_norm(up, norm, x, self.policy)
        activated = act(hidden)
        if isinstance(act, nn.GELU):
            rebuild = lambda: F.gelu(hidden, approximate=act.approximate)  # noqa: E731
        else:
            rebuild = lambda: F.relu(hidden)  # noqa: E731
        # the activation's input stays alive and the rebuild reads no parameter: allowed
        # under ZeRO-3
        return rebuilt_in_backward(down, activated, rebuild, self.policy.rebuild_activations)


class GatedFeedForward(nn.Module):
    """Pre-norm SwiGLU MLP, a Llama MLP behind a norm:
    ``down(silu(gate(norm(x))) * up(norm(x)))`` (IDEFICS's gated blocks). The norm's output
    is rebuilt in the backward where the policy allows it; the product, which ``down`` keeps,
    is stored."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        norm: Literal["layernorm", "rmsnorm"] = "rmsnorm",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, dim, norm_eps)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.policy = DEFAULT_POLICY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = linear_of_norm(self.gate_proj, self.norm, x, self.policy)
        up = linear_of_norm(self.up_proj, self.norm, x, self.policy)
        return self.down_proj(F.silu(gate) * up)


def compile_each(module: nn.Module, classes: tuple[type[nn.Module], ...], **options: Any) -> int:
    """``torch.compile(**options)`` the ``forward`` of every submodule of ``module`` that is
    one of ``classes``, each on its own (regional compilation: the instances of a class share
    one graph); returns how many."""
    blocks = [m for m in module.modules() if isinstance(m, classes)]
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    return len(blocks)


def set_policy(module: nn.Module, policy: ExecutionPolicy) -> None:
    """Give ``policy`` to every submodule of ``module`` that carries one."""
    for sub in module.modules():
        if isinstance(getattr(sub, "policy", None), ExecutionPolicy):
            sub.policy = policy


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a config names (``frozen_dtype``, eval's ``dtype``), by name: the one table."""


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A config's dtype name (or a dtype, or None) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]
