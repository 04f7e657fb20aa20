"""Activations rebuilt in the backward instead of kept: the same values and gradients bit for
bit, and the tensors really not kept after the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from bench.memory import allocated_bytes
from flamingo.layers import ExecutionPolicy, FeedForward, rebuilt_in_backward, set_policy
from flamingo.resampler import PerceiverAttention
from flamingo.xattn import MaskedCrossAttention

DIM, DIM_MEDIA = 16, 12


def feed_forward():
    ff = FeedForward(DIM, mult=4)
    # the inputs of the Linears: the LayerNorm output, the GELU output
    return ff, [(ff[1], True), (ff[3], False)], (torch.randn(2, 5, DIM),)


def cross_attention():
    attn = MaskedCrossAttention(DIM, DIM_MEDIA, heads=2, dim_head=8)
    media_index = torch.tensor([[-1, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    inputs = (torch.randn(2, 5, DIM), torch.randn(2, 2, 3, DIM_MEDIA), media_index)
    return attn, [(attn.to_q, True)], inputs


def perceiver_attention():
    attn = PerceiverAttention(DIM, heads=2, dim_head=8)
    watched = [(attn.to_q, True), (attn.to_kv, True)]
    return attn, watched, (torch.randn(3, 7, DIM), torch.randn(3, 4, DIM))


def run(make, recompute: bool, zero3: bool = False):
    """Forward + backward; returns the output, every gradient, the bytes the forward left
    allocated (output and saved tensors), and the bytes of each watched Linear's input
    (``make`` returns the module, its watched Linears with whether their input is a LayerNorm
    output, and the inputs)."""
    torch.manual_seed(0)
    module, watched, inputs = make()
    with torch.no_grad():  # non-trivial LayerNorm affines
        for norm in (m for m in module.modules() if isinstance(m, nn.LayerNorm)):
            norm.weight.normal_()
            norm.bias.normal_()
    # the policy a ZeRO-3 engine sets: parameters are released between their uses
    policy = ExecutionPolicy(
        rebuild_activations=recompute, parameters_readable_in_backward=not zero3
    )
    set_policy(module, policy)
    sizes = []
    for sub, _ in watched:
        sub.register_forward_pre_hook(
            lambda m, args: sizes.append(args[0].untyped_storage().nbytes())
        )
    inputs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = module(*inputs)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    grads = [t.grad for t in inputs if t.is_floating_point()] + [
        p.grad for p in module.parameters()
    ]
    return y.detach(), grads, allocated_bytes(prof)[1], sizes


MODULES = [feed_forward, cross_attention, perceiver_attention]


@pytest.mark.parametrize("make", MODULES, ids=lambda f: f.__name__)
def test_rebuilt_activations_give_the_same_values_and_gradients_and_are_not_kept(make):
    y_plain, grads_plain, kept_plain, sizes = run(make, recompute=False)
    y_rebuilt, grads_rebuilt, kept_rebuilt, _ = run(make, recompute=True)
    assert torch.equal(y_plain, y_rebuilt)
    for a, b in zip(grads_plain, grads_rebuilt, strict=True):
        assert torch.equal(a, b)
    assert kept_plain - kept_rebuilt == sum(sizes)  # exactly the watched tensors were dropped


@pytest.mark.parametrize("make", MODULES, ids=lambda f: f.__name__)
def test_layer_norm_outputs_are_kept_under_zero3(make):
    # a LayerNorm's parameters released between its uses (ZeRO-3) cannot be read by a
    # recomputation in another module's backward
    _, grads_plain, kept_plain, sizes = run(make, recompute=False)
    _, grads, kept, _ = run(make, recompute=True, zero3=True)
    for a, b in zip(grads_plain, grads, strict=True):
        assert torch.equal(a, b)
    _, watched, _ = make()
    not_normed = [size for size, (_, normed) in zip(sizes, watched, strict=True) if not normed]
    assert kept_plain - kept == sum(not_normed)


def test_a_rebuilt_tensor_can_be_saved_as_a_view_at_an_offset():
    torch.manual_seed(0)
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    grads = []
    for enabled in (False, True):
        x.grad = w.grad = None
        t = x.tanh()
        # mm saves transposed views at a storage offset
        y = rebuilt_in_backward(
            lambda t: t[2:].t() @ t[2:] @ w, t, lambda: x.detach().tanh(), enabled
        )
        y.sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_the_engine_policy_reaches_every_module_and_checkpointed_blocks_rebuild_nothing():
    from tests.helpers import build

    model = build()
    policies = lambda part: {m.policy for m in part.modules() if hasattr(m, "policy")}  # noqa: E731
    assert policies(model) == {ExecutionPolicy()}
    zero3 = ExecutionPolicy(parameters_readable_in_backward=False)
    model.set_execution_policy(zero3)
    assert policies(model) == {zero3}
    model.set_execution_policy(ExecutionPolicy(checkpoint_layers=True))
    assert policies(model.resampler) == {ExecutionPolicy(checkpoint_layers=True)}
    blocks = ExecutionPolicy(checkpoint_layers=True, rebuild_activations=False)
    assert policies(model.lm.gated_blocks) == {blocks}
    assert model.lm.policy.checkpoint_layers
