"""The feed-forward's recomputed GELU: same values and gradients, its output not kept."""

from __future__ import annotations

import weakref

import pytest
import torch

from flamingo.layers import FeedForward


def run(recompute: bool, x: torch.Tensor):
    torch.manual_seed(0)
    ff = FeedForward(16, mult=4)
    ff.recompute_activation = recompute
    outputs = []
    ff[2].register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    x = x.clone().requires_grad_(True)
    y = ff(x)
    kept = outputs[0]() is not None  # is the GELU output still referenced after the forward?
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in ff.parameters()], kept


@pytest.mark.parametrize("shape", [(3, 16), (2, 5, 16)])
def test_recomputed_activation_gives_the_same_values_and_gradients_and_is_not_kept(shape):
    x = torch.randn(shape)
    y_plain, grads_plain, kept_plain = run(False, x)
    y_recomputed, grads_recomputed, kept_recomputed = run(True, x)
    assert torch.equal(y_plain, y_recomputed)
    for a, b in zip(grads_plain, grads_recomputed, strict=True):
        assert torch.equal(a, b)
    assert kept_plain and not kept_recomputed
