"""Rows that see exactly one key get P == 1 exactly, at any score magnitude.

The kernels keep the LSE in base 2 between the forward and everything that
recomputes probabilities (backward, attention_weights, the decode merge), so
P = exp2(s2 - lse2) = exp2(0) for a row whose only key has s2 = lse2. A natural-log
LSE converted back and forth loses ~|s| x 1e-7 in the exponent: at scores in the
hundreds that was P = 1 +- 1e-4 and a dV error 100x the fp32 summation error.
Cases: S = 1 (every row), the first row of a causal sequence, and a window of
width 0 (P is the identity), with inputs ~ N(0, 12) at scale 0.7 (at scale 1.0 the
old round trip happened to be exact: lse == q.k, which maps back to s2 exactly).
"""

from __future__ import annotations

import pytest
import torch

from attn_kernels import attention_weights, fused_attention, fused_attention_with_kvcache

from conftest import DEVICE

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE = 0.7


def _big(*shape, dtype=torch.float32):
    # scores in the hundreds
    return (torch.randn(*shape, device=DEVICE) * 12**0.5).to(dtype)


def _grads(q, k, v, dout, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fused_attention(q, k, v, scale=SCALE, backend="triton", **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def test_one_key_gqa_fp32():
    """S = 1: out == v, dv == sum of dO (fp32 summation accuracy), dq and dk only the
    fp32 summation residue of dP - delta (they are exactly 0 in exact arithmetic)."""
    B, Hq, Hkv, L, E = 2, 4, 1, 64, 96
    q, k, v = _big(B, Hq, L, E), _big(B, Hkv, 1, E), _big(B, Hkv, 1, E)
    dout = torch.randn(B, Hq, L, E, device=DEVICE)
    out, dq, dk, dv = _grads(q, k, v, dout, is_causal=True, enable_gqa=True)
    assert torch.equal(out, v.expand(B, Hq, L, E))
    # dv: one sum of Hq * L terms per element, to a few fp32 roundings of the sum of |terms|
    exact = dout.double().sum((1, 2), keepdim=True)
    budget = 4 * EPS32 * dout.abs().double().sum((1, 2), keepdim=True)
    assert ((dv.double() - exact).abs() <= budget).all(), (dv.double() - exact).abs().max().item()
    # dq, dk: dS = dP - delta = dO.v - dO.o with o == v, i.e. only rounding residue
    resid = 2 * E * EPS32 * (dout.abs() @ v.abs().transpose(-2, -1))  # (B, Hq, L, 1)
    assert (dq.abs() <= SCALE * resid * k.abs()).all()
    dk_bound = SCALE * (resid * q.abs()).sum((1, 2), keepdim=True)
    assert (dk.abs() <= dk_bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_width_window_is_the_identity(dtype):
    """window (0, 0), L = S: every row sees its own key only. P is exactly the identity,
    out == v and dv == dO exactly (one term each), in every dtype."""
    B, H, L, E = 1, 2, 33, 40
    q, k, v = _big(B, H, L, E, dtype=dtype), _big(B, H, L, E, dtype=dtype), _big(B, H, L, E, dtype=dtype)
    probs = attention_weights(q, k, scale=SCALE, window_size=(0, 0), backend="triton")
    assert torch.equal(probs, torch.eye(L, device=DEVICE, dtype=dtype).expand_as(probs))
    dout = torch.randn(B, H, L, E, device=DEVICE).to(dtype)
    out, _, _, dv = _grads(q, k, v, dout, window_size=(0, 0))
    assert torch.equal(out, v)
    assert torch.equal(dv, dout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_causal_row(dtype):
    """The first query of a causal sequence sees key 0 only: P[0, 0] == 1, O[0] == V[0]."""
    B, H, L, E = 2, 3, 17, 64
    q, k, v = _big(B, H, L, E, dtype=dtype), _big(B, H, L, E, dtype=dtype), _big(B, H, L, E, dtype=dtype)
    probs = attention_weights(q, k, scale=SCALE, is_causal=True, backend="triton")
    assert (probs[..., 0, 0] == 1).all()
    assert (probs[..., 0, 1:] == 0).all()
    out = fused_attention(q, k, v, scale=SCALE, is_causal=True, backend="triton")
    assert torch.equal(out[..., 0, :], v[..., 0, :])


def test_decode_one_key_merge_is_exact():
    """Split-KV decoding: with one cached key every split but one is empty; the merge
    of base-2 LSEs gives out == v and lse == the score exactly (fp32)."""
    B, Hq, Hkv, E = 2, 4, 2, 64
    q = _big(B, 1, Hq, E)
    cache_k, cache_v = _big(B, 64, Hkv, E), _big(B, 64, Hkv, E)
    seqlens = torch.ones(B, dtype=torch.int32, device=DEVICE)
    out, lse = fused_attention_with_kvcache(q, cache_k, cache_v, seqlens, scale=SCALE, num_splits=3,
                                            return_lse=True, backend="triton")
    expected = cache_v[:, :1].repeat_interleave(Hq // Hkv, dim=2)
    assert torch.equal(out, expected)
    terms = SCALE * q[:, 0].double() * cache_k[:, 0].double().repeat_interleave(Hq // Hkv, dim=1)
    score = terms.sum(-1)
    # the fp32 dot product's rounding, then one rounding in the conversion to natural log
    budget = 2 * E * EPS32 * terms.abs().sum(-1) + 2 * EPS32 * score.abs()
    assert ((lse[..., 0].double() - score).abs() <= budget).all()
