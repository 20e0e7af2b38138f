"""In-kernel Philox dropout: reproducible from torch's generator, the documented
keep-mask replays a call exactly, the drop rate is p, gradients are right."""

import pytest
import torch
from accuracy import check_against_reference
from conftest import DEVICE
from test_attention_fwd import FP16, FP32, fused, make_qkv

from attn_kernels import dropout_keep_mask, reference


def _run(q, k, v, seed, p, **kwargs):
    torch.manual_seed(seed)
    return fused(q, k, v, dropout_p=p, **kwargs)


def test_p_zero_draws_nothing_and_is_attention():
    # p = 0 is no dropout: the call leaves the generator where it was and meets the rule
    q, k, v = make_qkv((2,), 4, 2, 50, 70, 32, 32, FP32)
    state = torch.get_rng_state()
    fused(q, k, v, dropout_p=0.0, enable_gqa=True)
    assert torch.equal(torch.get_rng_state(), state)
    check_against_reference(fused, q, k, v, dropout_p=0.0, enable_gqa=True, return_lse=True)


def test_same_seed_same_result_other_seed_differs():
    q, k, v = make_qkv((2,), 4, 4, 50, 70, 32, 32, FP32)
    a, b, c = _run(q, k, v, 1, 0.3), _run(q, k, v, 1, 0.3), _run(q, k, v, 2, 0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_drop_fraction_is_p():
    q, k, _ = make_qkv((2,), 4, 4, 128, 128, 16, 16, FP32)
    for p in (0.1, 0.5):
        keep = dropout_keep_mask(q, k, p, backend="triton")
        assert keep.shape == (2, 4, 128, 128) and keep.dtype == torch.bool
        assert abs((1 - keep.float().mean().item()) - p) < 0.01


@pytest.mark.parametrize("causal,gqa", [(False, False), (True, True)])
def test_keep_mask_replays_forward_and_backward(causal, gqa):
    q, k, v = make_qkv((2,), 4, 2 if gqa else 4, 65, 90, 32, 24, FP32)
    dout = torch.randn(2, 4, 65, 24, device=DEVICE)
    p = 0.2
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _run(*ins, 7, p, is_causal=causal, enable_gqa=gqa)
    grads = torch.autograd.grad(out, ins, dout)

    torch.manual_seed(7)
    keep = dropout_keep_mask(q, k, p, enable_gqa=gqa, backend="triton")
    ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ref_ins, dropout_p=p, is_causal=causal, enable_gqa=gqa, dropout_mask=keep)
    ref_grads = torch.autograd.grad(ref, ref_ins, dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=0)


def test_reference_backend_keep_mask_replays_reference():
    q, k, v = make_qkv((2,), 2, 2, 10, 12, 8, 8, FP32, device="cpu")
    torch.manual_seed(3)
    out = reference.attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    keep = dropout_keep_mask(q, k, 0.4, backend="reference")
    torch.testing.assert_close(out, reference.attention(q, k, v, dropout_p=0.4, dropout_mask=keep))


def test_directional_derivative_matches_finite_difference():
    # the backward regenerates the forward's mask: d/dt f(x + t u) == grad . u
    q, k, v = make_qkv((1,), 2, 2, 30, 40, 16, 16, FP32)
    w = torch.randn(1, 2, 30, 16, device=DEVICE)
    directions = [torch.randn_like(t) for t in (q, k, v)]
    loss = lambda *xs: (_run(*xs, 11, 0.3) * w).sum()  # noqa: E731
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(loss(*ins), ins)
    analytic = sum((g * u).sum() for g, u in zip(grads, directions)).item()
    eps = 1e-2
    plus = loss(*(t + eps * u for t, u in zip((q, k, v), directions))).item()
    minus = loss(*(t - eps * u for t, u in zip((q, k, v), directions))).item()
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic))


def test_dropout_in_half_precision_keeps_scale():
    # the expectation of the dropped output is the undropped output
    q, k, v = make_qkv((1,), 1, 1, 8, 16, 16, 16, FP16)
    mean = torch.stack([_run(q, k, v, s, 0.5).float() for s in range(200)]).mean(0)
    torch.testing.assert_close(mean, fused(q, k, v).float(), atol=0.1, rtol=0)
