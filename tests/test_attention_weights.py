"""`attention_weights`: the Triton kernel that writes softmax probabilities from the
forward's LSE, against the float64 reference, and its gradient."""

import pytest
import torch
from accuracy import check_weights
from conftest import DEVICE
from test_attention_fwd import BF16, FP16, FP32, make_qkv

from attn_kernels import attention_weights


def weights(*args, **kwargs):
    return attention_weights(*args, backend="triton", **kwargs)


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
    check_weights(weights, q, k, **kwargs)
    # each row is a distribution
    probs = weights(q, k, **kwargs)
    torch.testing.assert_close(probs.double().sum(-1), torch.ones(2, Hq, L, dtype=torch.float64), atol=1e-2, rtol=0)


def test_weights_2d_and_empty_keys():
    q, k = torch.randn(5, 16, device=DEVICE), torch.randn(7, 16, device=DEVICE)
    check_weights(weights, q, k)
    assert attention_weights(q, k[:0], backend="triton").shape == (5, 0)


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_weights_gradient(dtype):
    q, k, _ = make_qkv((1,), 4, 2, 20, 30, 16, 16, dtype)
    check_weights(weights, q, k, grad=True, is_causal=True, enable_gqa=True)
