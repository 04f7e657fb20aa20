"""Regional compilation (engine.compile): every repeated block compiles as one graph
(fullgraph), its instances share it, and the results equal eager execution.

The compiler backend here is ``aot_eager``: the capture (dynamo) and the forward/backward split
(AOT autograd) of a real compile, without inductor's code generation, which takes tens of
seconds on the CPU and is the compiler's own business."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from flamingo.config import CrossAttentionConfig, ResamplerConfig
from flamingo.layers import ExecutionPolicy, set_policy
from flamingo.resampler import PerceiverLayer
from flamingo.xattn import GatedCrossAttentionBlock, cross_attention_bias
from tests.helpers import build, noise_image, set_gates

NO_REBUILD = ExecutionPolicy(rebuild_activations=False)
needs_inlined_modules = pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5),
    reason="compile_blocks needs torch >= 2.5 (nn modules inlined)",
)


def eager_and_compiled(module: torch.nn.Module, *inputs: torch.Tensor, **extra):
    """(output, input and parameter gradients) eagerly and compiled with fullgraph=True;
    ``extra`` are keyword inputs that take no gradient."""
    results = []
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    for fn in (module, compiled):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        module.zero_grad(set_to_none=True)
        out = fn(*leaves, **extra)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [t.grad for t in leaves if t.is_floating_point()]
        results.append((out.detach(), grads + [p.grad.clone() for p in module.parameters()]))
    return results


def assert_same(results) -> None:
    (out, grads), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out)
    for got, want in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(got, want)


def test_a_gated_block_compiles_whole_and_computes_the_same():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(CrossAttentionConfig(heads=2, dim_head=8, ff_mult=2), 16, 12)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    set_policy(block, NO_REBUILD)
    media_index = torch.tensor([[-1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    bias = cross_attention_bias(media_index, 2, 3, "last", torch.float32)
    x, media = torch.randn(2, 6, 16), torch.randn(2, 2, 3, 12)
    torch._dynamo.reset()
    results = eager_and_compiled(block, x, media, media_index=media_index, attn_mask=bias)
    assert_same(results)


def test_a_perceiver_layer_compiles_whole_and_computes_the_same():
    torch.manual_seed(0)
    layer = PerceiverLayer(ResamplerConfig(heads=2, dim_head=8, ff_mult=2), 16)
    set_policy(layer, NO_REBUILD)
    torch._dynamo.reset()
    assert_same(eager_and_compiled(layer, torch.randn(3, 7, 16), torch.randn(3, 4, 16)))


def model_run(compiled: bool, processor):
    torch.manual_seed(0)
    model = build().train()
    set_gates(model, 0.5)
    model.set_execution_policy(NO_REBUILD)
    if compiled:
        assert model.compile_blocks(backend="aot_eager", fullgraph=True) == 8  # 2 of each kind
    enc = processor(
        ["<image>a red circle<|endofchunk|><image>a", "x <image>b"],
        images=[[noise_image(1), noise_image(2)], [noise_image(3)]],
    )
    logits = model(**enc).logits
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@needs_inlined_modules
def test_the_compiled_model_computes_what_the_eager_one_does_one_graph_per_block_class(
    processor,
):
    eager, eager_grads = model_run(False, processor)
    torch._dynamo.reset()
    counters.clear()
    compiled, grads = model_run(True, processor)
    assert counters["stats"]["unique_graphs"] == 4  # decoder layer, gated block, perceiver, ViT
    torch.testing.assert_close(compiled, eager)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


@needs_inlined_modules
def test_compiling_needs_the_rebuilds_off_and_the_engine_sets_them(monkeypatch):
    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import LocalEngine

    with pytest.raises(ValueError, match="rebuild_activations=False"):
        build().compile_blocks()
    model = build()
    options = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: options.append(kw) or fn)
    engine = LocalEngine(model, EngineConfig(compile=True), OptimConfig())
    assert not engine.policy.rebuild_activations and len(options) == 8
