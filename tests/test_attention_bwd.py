"""Triton backward against the float64 reference: dq, dk, dv (and the gradient that
reaches a returned lse), with GQA reduction, causal skipping, odd sizes and strides."""

import random

import pytest
import torch
from accuracy import check_against_reference
from conftest import DEVICE
from test_attention_fwd import BF16, CASES, FP16, FP32, fused, make_qkv

# every ordered pair of the lengths with L != S, cycling through head dims
# (Ev != E included), GQA ratios, masking and dtypes
LENGTHS = (1, 17, 64, 100, 129)
HEAD_DIMS = ((16, 16), (40, 24), (64, 64), (80, 48), (128, 128))
PAIRS = [(L, S) for L in LENGTHS for S in LENGTHS if L != S]
GRID = [
    (L, S, *HEAD_DIMS[i % 5], (1, 2, 4)[i % 3] * 2, 2, i % 2 == 0, (FP32, FP16, BF16)[(i // 3) % 3])
    for i, (L, S) in enumerate(PAIRS)
]


@pytest.mark.parametrize("L,S,E,Ev,Hq,Hkv,causal,dtype", CASES + GRID)
def test_backward_matches_reference(L, S, E, Ev, Hq, Hkv, causal, dtype):
    q, k, v = make_qkv((2,), Hq, Hkv, L, S, E, Ev, dtype)
    check_against_reference(fused, q, k, v, is_causal=causal, enable_gqa=Hq != Hkv, return_lse=True)


@pytest.mark.parametrize("draw", range(4))
def test_backward_random_shapes(draw):
    rng = random.Random(2000 + draw)
    hkv = rng.choice([1, 2])
    q, k, v = make_qkv(
        (1,), hkv * rng.choice([1, 2, 4]), hkv, rng.randint(1, 150), rng.randint(1, 150),
        rng.randint(1, 130), rng.randint(1, 130), rng.choice([FP16, FP32]),
    )
    check_against_reference(fused, q, k, v, is_causal=rng.random() < 0.5, enable_gqa=True, return_lse=True)


def test_lse_gradient():
    # a loss that uses the returned lse: its gradient enters through delta
    q, k, v = make_qkv((1,), 2, 2, 50, 70, 32, 32, FP32)
    check_against_reference(fused, q, k, v, is_causal=True, return_lse=True)


def test_large_magnitude_scores():
    q, k, v = make_qkv((1,), 2, 1, 100, 129, 64, 64, FP16, magnitude=12.0)
    check_against_reference(fused, q, k, v, enable_gqa=True)


def test_non_contiguous_inputs_and_grad():
    B, H, L, S, E = 2, 2, 65, 47, 40
    q = torch.randn(B, L, H, E, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, S, H, E, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, S, H, E, device=DEVICE).transpose(1, 2)
    check_against_reference(fused, q, k, v, is_causal=True)


def test_expanded_output_gradient():
    # out.sum() hands the backward a stride-0 (expanded) gradient
    q, k, v = (t.requires_grad_() for t in make_qkv((1,), 2, 2, 20, 30, 16, 16, FP32))
    fused(q, k, v).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    from attn_kernels import reference

    reference.attention(qd, kd, vd).sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=0)


def test_backward_kernels_use_no_atomics():
    # bit-reproducible by construction: each dK/dV (dQ) tile is owned by one program.
    # The interpreter runs programs one at a time, so only this check can fail on CPU.
    import inspect

    from attn_kernels.triton import attention_bwd, tiling

    source = inspect.getsource(attention_bwd) + inspect.getsource(tiling)
    assert "tl.atomic" not in source


@pytest.mark.gpu  # the interpreter runs programs one at a time: only a GPU can show a race
def test_backward_is_deterministic():
    q, k, v = (t.requires_grad_() for t in make_qkv((1,), 4, 1, 70, 90, 32, 32, FP16))
    dout = torch.randn(1, 4, 70, 32, device=DEVICE, dtype=FP16)
    first = torch.autograd.grad(fused(q, k, v, enable_gqa=True), (q, k, v), dout)
    second = torch.autograd.grad(fused(q, k, v, enable_gqa=True), (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("L,S,E", [(1024, 1024, 64), (4096, 4096, 128), (2048, 3000, 96), (1000, 1000, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_long_sequences_gpu(dtype, L, S, E, causal):
    q, k, v = make_qkv((1,), 8, 2, L, S, E, E, dtype)
    check_against_reference(fused, q, k, v, is_causal=causal, enable_gqa=True)
