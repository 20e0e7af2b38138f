"""torch.compile(fullgraph=True) traces models built on fused_attention with no graph
break, and the compiled model gives the eager forward and backward: on CPU through
inductor (the eager reference path, C++ kernels), on CUDA through the Triton kernels.

Inductor compiles C++ (CPU) or Triton (GPU) code on first use, so the models are
tiny and each test compiles one graph (forward + backward) only."""

import pytest
import torch

from attn_kernels import fused_attention
from attn_kernels.nn import SelfAttentionBlock

DIM, HEADS = 16, 2


class TinyEncoder(torch.nn.Module):
    """Two identical causal blocks: inductor compiles each kernel once for both."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            SelfAttentionBlock(DIM, HEADS, mlp_ratio=2.0, causal=True) for _ in range(2)
        )

    def forward(self, x, key_padding_mask=None):
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return x


def eager_and_compiled(model, *inputs):
    """Outputs and gradients (inputs and parameters) of model and of its compiled twin."""
    results = []
    for run in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        leaf = inputs[0].detach().clone().requires_grad_()
        out = run(leaf, *inputs[1:])
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        results.append((out.detach(), leaf.grad, [p.grad.clone() for p in model.parameters()]))
    return results


def assert_same(eager, compiled, **tol):
    (out_e, dx_e, dp_e), (out_c, dx_c, dp_c) = eager, compiled
    torch.testing.assert_close(out_c, out_e, **tol)
    torch.testing.assert_close(dx_c, dx_e, **tol)
    assert len(dp_c) == len(dp_e) > 0
    for a, b in zip(dp_c, dp_e):
        torch.testing.assert_close(a, b, **tol)


def test_compiled_blocks_match_eager_on_cpu():
    torch._dynamo.reset()
    model = TinyEncoder()
    x = torch.randn(2, 8, DIM)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 6:] = True  # causal and padding masks merged inside the graph
    eager, compiled = eager_and_compiled(model, x, padding)
    assert_same(eager, compiled, atol=1e-5, rtol=1e-5)


def test_compiled_blocks_on_triton_match_eager(monkeypatch):
    """The same encoder with attention forced onto the Triton kernels (torch custom ops;
    the interpreter on CPU): one graph through inductor, the kernels' ops inside it."""
    import functools

    import attn_kernels.nn as ak_nn
    from attn_kernels import api

    monkeypatch.setattr(ak_nn, "fused_attention", functools.partial(api.fused_attention, backend="triton"))
    torch._dynamo.reset()
    targets = []

    def inductor_recording(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    model = TinyEncoder()
    x = torch.randn(2, 8, DIM)
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend=inductor_recording)):
        model.zero_grad()
        leaf = x.detach().clone().requires_grad_()
        out = run(leaf)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), leaf.grad, [p.grad.clone() for p in model.parameters()]))
    assert any("triton_fwd" in t for t in targets), "the compiled graph does not call the Triton op"
    assert_same(*results, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_compiled_blocks_match_eager_on_cuda():
    torch._dynamo.reset()
    model = TinyEncoder().cuda()
    x = torch.randn(2, 64, DIM, device="cuda")
    # no mask: "auto" sends causal attention to the Triton kernels
    eager, compiled = eager_and_compiled(model, x)
    assert_same(eager, compiled, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compiled_triton_attention_matches_eager(dtype):
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 96, 32, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))

    def attend(q, k, v):
        return fused_attention(q, k, v, is_causal=True, backend="triton")

    compiled = torch.compile(attend, fullgraph=True)
    dout = torch.randn_like(q)
    results = []
    for fn in (attend, compiled):
        out = fn(q, k, v)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-4, "rtol": 1e-4}
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **tol)
