"""attn_kernels/triton_ops.py: the Triton backend as torch custom ops. opcheck checks
each op's schema, fake (shape-only) implementation and autograd registration against
the real kernels (the interpreter without a GPU), and torch.compile(fullgraph=True)
traces a call to backend="triton" with no graph break."""

import pytest
import torch
from conftest import DEVICE
from test_attention_fwd import FP32, make_qkv

from attn_kernels import fused_attention, triton_ops  # noqa: F401  (registers the ops)


def _fwd_args(mask=None, causal=False):
    q, k, v = make_qkv((2,), 4, 2, 17, 33, 16, 24, FP32)
    band_hi = 0 if causal else None
    return (q, k, v, mask, None, None, None, None, 0, 0, 16 ** -0.5, 0.0, 0.0, None, band_hi, False)


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_forward(causal):
    torch.library.opcheck(torch.ops.attn_kernels.triton_fwd.default, _fwd_args(causal=causal))


def test_opcheck_forward_with_a_float_mask_gradient():
    mask = torch.randn(2, 1, 17, 33, device=DEVICE, requires_grad=True).expand(2, 4, 17, 33)
    torch.library.opcheck(torch.ops.attn_kernels.triton_fwd.default, _fwd_args(mask=mask))


def test_opcheck_forward_with_alibi_and_dropout():
    """Tensors besides q, k, v (ALiBi slopes, the dropout seed) reach the backward."""
    args = list(_fwd_args(causal=True))
    args[4] = torch.rand(2, 4, device=DEVICE)  # alibi (Z, Hq)
    args[5] = torch.tensor([1234], device=DEVICE, dtype=torch.int64)  # seed
    args[11] = 0.25  # dropout_p
    torch.library.opcheck(torch.ops.attn_kernels.triton_fwd.default, tuple(args))


@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_forward_under_the_onepass_variant(deterministic, monkeypatch):
    """`deterministic` travels through the schemas to the backward (kernel variant
    "onepass", dQ by atomics, runs only without it)."""
    from attn_kernels.triton import variants

    monkeypatch.setenv(variants.ENV, "onepass")
    args = _fwd_args(causal=True)[:-1] + (deterministic,)
    args = tuple(t.requires_grad_() for t in args[:3]) + args[3:]  # so that opcheck runs the backward
    torch.library.opcheck(torch.ops.attn_kernels.triton_fwd.default, args)
    assert variants.last_choices()["bwd"].name == ("baseline" if deterministic else "onepass")


def test_opcheck_weights():
    q, k, _ = make_qkv((2,), 4, 2, 17, 33, 16, 16, FP32)
    torch.library.opcheck(torch.ops.attn_kernels.triton_weights.default, (q, k, None, None, 0.25, 0.0, None, 0))


def test_compiled_triton_backend_has_no_graph_break():
    """aot_eager: dynamo and AOTAutograd trace the graph (forward and backward) around
    the opaque ops, which then run the kernels as in eager."""
    torch._dynamo.reset()
    q, k, v = make_qkv((2,), 4, 2, 40, 40, 16, 16, FP32)

    def attend(q, k, v):
        return fused_attention(q.sin(), k, v, is_causal=True, enable_gqa=True, backend="triton") * 2

    results = []
    for fn in (attend, torch.compile(attend, backend="aot_eager", fullgraph=True)):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        out.sum().backward()
        results.append((out, *(t.grad for t in ins)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
