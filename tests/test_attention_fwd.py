"""Triton forward against the float64 reference: outputs and LSE, odd sizes, GQA,
causal, head dims that are not powers of two, strides, layouts and edge cases."""

import random

import pytest
import torch
from accuracy import check_against_reference
from conftest import DEVICE

from attn_kernels import fused_attention, reference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def fused(*args, **kwargs):
    return fused_attention(*args, backend="triton", **kwargs)


def make_qkv(batch, hq, hkv, L, S, E, Ev, dtype, device=DEVICE, magnitude=1.0):
    q = torch.randn(*batch, hq, L, E, device=device, dtype=dtype) * magnitude
    k = torch.randn(*batch, hkv, S, E, device=device, dtype=dtype) * magnitude
    v = torch.randn(*batch, hkv, S, Ev, device=device, dtype=dtype)
    return q, k, v


# (L, S, E, Ev, Hq, Hkv, causal, dtype): the sizes, L != S, both alignments
CASES = [
    (1, 17, 16, 16, 2, 2, False, FP32),
    (17, 1, 40, 24, 2, 2, True, FP16),
    (17, 64, 64, 64, 4, 2, True, FP32),
    (64, 100, 80, 80, 2, 1, False, FP16),
    (100, 129, 128, 96, 4, 4, True, FP16),
    (129, 100, 40, 40, 4, 1, True, FP32),
    (129, 17, 16, 48, 2, 2, False, BF16),
    (100, 64, 128, 128, 2, 2, False, FP32),
    (64, 129, 80, 40, 4, 2, True, BF16),
    (1, 1, 64, 64, 1, 1, True, FP16),
    (129, 129, 7, 5, 2, 2, True, FP32),
    (33, 70, 256, 256, 1, 1, True, FP16),
    (70, 33, 200, 136, 2, 1, False, FP32),
]


@pytest.mark.parametrize("L,S,E,Ev,Hq,Hkv,causal,dtype", CASES)
def test_forward_matches_reference(L, S, E, Ev, Hq, Hkv, causal, dtype):
    q, k, v = make_qkv((2,), Hq, Hkv, L, S, E, Ev, dtype)
    check_against_reference(fused, q, k, v, grad=False, is_causal=causal, enable_gqa=Hq != Hkv, return_lse=True)


@pytest.mark.parametrize("draw", range(6))
def test_forward_random_shapes(draw):
    rng = random.Random(1000 + draw)
    hkv = rng.choice([1, 2])
    shape = dict(
        batch=(rng.randint(1, 2),), hq=hkv * rng.choice([1, 2, 4]), hkv=hkv,
        L=rng.randint(1, 160), S=rng.randint(1, 160), E=rng.randint(1, 160), Ev=rng.randint(1, 160),
        dtype=rng.choice([FP16, FP32]),
    )
    q, k, v = make_qkv(**shape)
    causal = rng.random() < 0.5
    check_against_reference(fused, q, k, v, grad=False, is_causal=causal, enable_gqa=True, return_lse=True)


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_custom_scale(scale):
    q, k, v = make_qkv((1,), 2, 2, 40, 50, 32, 32, FP32)
    check_against_reference(fused, q, k, v, grad=False, scale=scale, return_lse=True)


@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_large_magnitude_scores(dtype):
    # scores of several hundred: the online softmax must rescale without overflow
    q, k, v = make_qkv((1,), 2, 2, 100, 129, 64, 64, dtype, magnitude=12.0)
    check_against_reference(fused, q, k, v, grad=False, is_causal=True, return_lse=True)


def test_non_contiguous_inputs():
    # the (B, S, H, D) layout of most models, transposed to (B, H, S, D) without a copy,
    # and a value whose last dim is strided too
    B, H, L, S, E = 2, 3, 65, 47, 40
    q = torch.randn(B, L, H, E, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, S, H, E, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, S, H, 2 * E, device=DEVICE).transpose(1, 2)[..., ::2]
    assert not q.is_contiguous() and v.stride(-1) == 2
    check_against_reference(fused, q, k, v, grad=False, is_causal=True, return_lse=True)


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)], ids=["3d", "4d", "5d"])
def test_leading_dims(batch):
    q, k, v = make_qkv(batch, 2, 2, 17, 33, 16, 16, FP32)
    check_against_reference(fused, q, k, v, grad=False, return_lse=True)


def test_2d_inputs():
    q, k, v = make_qkv((), 1, 1, 17, 33, 16, 8, FP32)
    q, k, v = q[0], k[0], v[0]
    out, lse = fused(q, k, v, return_lse=True)
    assert out.shape == (17, 8) and lse.shape == (17,)
    check_against_reference(fused, q, k, v, grad=False, is_causal=True, return_lse=True)


def test_empty_query_and_empty_keys():
    q, k, v = make_qkv((2,), 2, 2, 0, 5, 16, 16, FP32)
    out, lse = fused(q, k, v, return_lse=True)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)
    q, k, v = make_qkv((2,), 2, 2, 5, 0, 16, 8, FP32)
    out, lse = fused(q, k, v, return_lse=True)
    # no keys: nothing to attend to -> output 0 and lse -inf, as the reference
    assert out.shape == (2, 2, 5, 8) and torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True)
    assert torch.equal(ref_out, out) and torch.equal(ref_lse, lse)


def test_gqa_does_not_copy_and_matches_repeated_heads():
    q, k, v = make_qkv((2,), 8, 2, 30, 40, 32, 32, FP32)
    grouped = fused(q, k, v, enable_gqa=True)
    repeated = fused(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
    torch.testing.assert_close(grouped, repeated, atol=1e-6, rtol=0)


def test_matches_sdpa():
    q, k, v = make_qkv((2,), 4, 2, 100, 129, 64, 64, FP32)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    out = fused(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.double(), sdpa, atol=2e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("L,S,E", [(1024, 1024, 64), (4096, 4096, 128), (2048, 8192, 128), (8192, 2048, 96), (1000, 3000, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_long_sequences_gpu(dtype, L, S, E, causal):
    q, k, v = make_qkv((2,), 8, 2, L, S, E, E, dtype)
    check_against_reference(fused, q, k, v, grad=False, is_causal=causal, enable_gqa=True, return_lse=True)


@pytest.mark.gpu
def test_tf32_flag_is_honoured_gpu():
    q, k, v = make_qkv((2,), 4, 4, 512, 512, 64, 64, FP32)
    ieee = fused(q, k, v)
    ref = reference.attention(q.double(), k.double(), v.double())
    assert (ieee.double() - ref).abs().max().item() < 1e-5
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = fused(q, k, v)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert not torch.equal(tf32, ieee), "allow_tf32 had no effect"
    assert (tf32.double() - ref).abs().max().item() < 5e-3
