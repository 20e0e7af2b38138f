"""`attention_weights`: the Triton kernel that writes softmax probabilities from the
forward's LSE, against the float64 reference, and its gradient."""

import pytest
import torch
from accuracy import assert_within_rule
from conftest import DEVICE
from test_attention_fwd import BF16, FP16, FP32, make_qkv

from attn_kernels import attention_weights, reference


@pytest.mark.parametrize(
    "L,S,E,Hq,Hkv,causal,dtype",
    [
        (1, 17, 16, 2, 2, False, FP32),
        (17, 100, 40, 4, 2, True, FP16),
        (129, 64, 80, 2, 1, True, FP32),
        (100, 129, 128, 2, 2, False, BF16),
        (65, 65, 7, 1, 1, True, FP32),
    ],
)
def test_weights_match_reference(L, S, E, Hq, Hkv, causal, dtype):
    q, k, _ = make_qkv((2,), Hq, Hkv, L, S, E, E, dtype)
    kwargs = dict(is_causal=causal, enable_gqa=Hq != Hkv)
    probs = attention_weights(q, k, backend="triton", **kwargs)
    lowp = reference.attention_weights(q, k, **kwargs)
    ref = reference.attention_weights(q.double(), k.double(), **kwargs)
    assert_within_rule("weights", probs, lowp, ref)
    # each row is a distribution
    torch.testing.assert_close(probs.double().sum(-1), torch.ones(2, Hq, L, dtype=torch.float64), atol=1e-2, rtol=0)


def test_weights_2d_and_empty_keys():
    q, k = torch.randn(5, 16, device=DEVICE), torch.randn(7, 16, device=DEVICE)
    probs = attention_weights(q, k, backend="triton")
    torch.testing.assert_close(probs, reference.attention_weights(q, k), atol=1e-6, rtol=0)
    assert attention_weights(q, k[:0], backend="triton").shape == (5, 0)


def test_weights_gradient():
    q, k, _ = make_qkv((1,), 4, 2, 20, 30, 16, 16, FP32)
    q.requires_grad_()
    k.requires_grad_()
    w = torch.randn(1, 4, 20, 30, device=DEVICE)
    grads = torch.autograd.grad((attention_weights(q, k, is_causal=True, enable_gqa=True, backend="triton") * w).sum(), (q, k))
    qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = torch.autograd.grad((reference.attention_weights(qd, kd, is_causal=True, enable_gqa=True) * w.double()).sum(), (qd, kd))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)
