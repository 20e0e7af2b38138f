"""What the suite did not cover (issue #13), on the Triton kernels against the
float64 oracle: dropout combined with every other feature (replayed exactly through
its keep-mask), packed batches with dropout's backward, the lse gradient and empty
key sequences, and the backward of edge shapes (L = 0, S = 0, 2-D / 3-D / 5-D
inputs, custom scales)."""

import pytest
import torch
from accuracy import check_against_reference
from conftest import DEVICE
from test_attention_fwd import BF16, FP16, FP32, fused, make_qkv
from test_attention_varlen import check_varlen, packed_inputs

from attn_kernels import dropout_keep_mask

B, HQ, HKV = 2, 4, 2


def check_with_dropout(q, k, v, p, seed, enable_gqa=False, **kwargs):
    """The kernel with dropout against the oracle given the keep-mask the call draws
    (dropout_keep_mask from the same generator state)."""
    torch.manual_seed(seed)
    keep = dropout_keep_mask(q, k, p, enable_gqa=enable_gqa, backend="triton")
    torch.manual_seed(seed)
    check_against_reference(fused, q, k, v, dropout_p=p, dropout_mask=keep, enable_gqa=enable_gqa, **kwargs)


# ------------------------------------------------------------------ dropout with everything else


def test_dropout_with_bool_mask():
    q, k, v = make_qkv((B,), HQ, HKV, 45, 70, 16, 24, FP32)
    mask = (torch.rand(B, 1, 70, 45, device=DEVICE) > 0.3).transpose(-1, -2)
    check_with_dropout(q, k, v, 0.3, 1, enable_gqa=True, attn_mask=mask, return_lse=True)


def test_dropout_with_float_mask_gradient():
    q, k, v = make_qkv((B,), HQ, HQ, 40, 50, 16, 16, FP32)
    bias = torch.randn(1, HQ, 40, 50, device=DEVICE, requires_grad=True)
    check_with_dropout(q, k, v, 0.2, 2, attn_mask=bias)


@pytest.mark.parametrize("window,causal", [((20, 5), False), ((7, -1), True)], ids=str)
def test_dropout_with_window(window, causal):
    q, k, v = make_qkv((1,), 2, 2, 70, 90, 32, 32, FP32)
    check_with_dropout(q, k, v, 0.25, 3, window_size=window, is_causal=causal, return_lse=True)


def test_dropout_with_softcap_and_alibi():
    q, k, v = make_qkv((B,), HQ, HKV, 50, 64, 16, 16, FP32, magnitude=2.0)
    slopes = torch.rand(HQ, device=DEVICE)
    check_with_dropout(q, k, v, 0.3, 4, enable_gqa=True, softcap=4.0, alibi_slopes=slopes)


def test_dropout_with_lse_gradient():
    q, k, v = make_qkv((1,), 2, 2, 33, 47, 16, 16, FP32)
    check_with_dropout(q, k, v, 0.4, 5, is_causal=True, return_lse=True)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_dropout_backward_low_precision(dtype):
    q, k, v = make_qkv((1,), 4, 2, 100, 129, 64, 64, dtype)
    check_with_dropout(q, k, v, 0.1, 6, enable_gqa=True, is_causal=True, return_lse=True)


# ------------------------------------------------------------------ packed sequences


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_dropout_backward(causal):
    lengths_q, lengths_k = [20, 7, 33], [25, 7, 12]
    inputs = packed_inputs(lengths_q, lengths_k, 4, 2, 16, 16, FP32)
    q, k, v, cu_q, cu_k, max_q, max_k = inputs
    # the packed kernels draw per (sequence, head, i, j) as a padded (B, Hq, max_q, max_k) call
    torch.manual_seed(7)
    keep = dropout_keep_mask(torch.empty(3, 4, max_q, 16, device=DEVICE), torch.empty(3, 2, max_k, 16, device=DEVICE),
                             0.25, enable_gqa=True, backend="triton")
    masks = [keep[i, :, :lq, :lk] for i, (lq, lk) in enumerate(zip(lengths_q, lengths_k))]
    torch.manual_seed(7)
    check_varlen(*inputs, dropout_p=0.25, dropout_mask=masks, is_causal=causal)


def test_varlen_lse_gradient_with_window_and_gqa():
    inputs = packed_inputs([30, 1, 64], [40, 9, 50], 4, 1, 32, 16, FP16)
    check_varlen(*inputs, lse_grad=True, window_size=(10, 3))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_empty_key_sequence(causal):
    # sequence 1 has queries but no keys: output 0, lse -inf, zero gradients
    inputs = packed_inputs([5, 7, 3], [9, 0, 4], 2, 2, 16, 16, FP32)
    check_varlen(*inputs, is_causal=causal)


# ------------------------------------------------------------------ backward of edge shapes


@pytest.mark.parametrize("L,S", [(0, 5), (5, 0), (0, 0)])
def test_backward_empty_sequences(L, S):
    q, k, v = make_qkv((2,), 2, 2, L, S, 16, 8, FP32)
    check_against_reference(fused, q, k, v, return_lse=True)


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)], ids=["3d", "4d", "5d"])
def test_backward_leading_dims(batch):
    q, k, v = make_qkv(batch, 2, 2, 17, 33, 16, 16, FP32)
    check_against_reference(fused, q, k, v, is_causal=True, return_lse=True)


def test_backward_2d_inputs():
    q, k, v = (t[0] for t in make_qkv((), 1, 1, 17, 33, 16, 8, FP16))
    check_against_reference(fused, q, k, v, is_causal=True, return_lse=True)


@pytest.mark.parametrize("scale,dtype", [(1.0, FP32), (0.05, FP32), (0.3, FP16)])
def test_backward_custom_scale(scale, dtype):
    q, k, v = make_qkv((1,), 2, 1, 40, 50, 32, 32, dtype)
    check_against_reference(fused, q, k, v, scale=scale, enable_gqa=True, return_lse=True)
