"""bf16 under the Triton interpreter rounds like a GPU.

The interpreter converts fp32 to bf16 by truncation (round toward zero); a GPU's
`x.to(tl.bfloat16)` rounds to nearest even. The kernels therefore round through
`tiling.to_lowp` (bit arithmetic, ties to even) wherever a GPU would convert: P and
dS before their tensor-core products, and every bf16 store. This checks that helper
bit for bit against torch's conversion, and one end-to-end consequence.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from attn_kernels import fused_attention
from attn_kernels.triton.tiling import to_lowp

from conftest import DEVICE


@triton.jit
def _round_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(Y + offs, to_lowp(x, tl.bfloat16, True), mask=offs < N)


def _interesting_fp32() -> torch.Tensor:
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), dtype=torch.int64).to(torch.int32)
    random_bits = bits.view(torch.float32)  # every exponent and NaNs
    ties = (bits & ~0xFFFF | 0x8000).view(torch.float32)  # exactly halfway between two bf16
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4028235e38, -3.4028235e38,
                            1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, 1.0 + 3 * 2**-9])
    x = torch.cat([torch.randn(4096) * 10, random_bits, ties, special])
    # subnormals (|x| < 2^-126) excluded: the interpreter's own store mangles them, and
    # attention never produces them where they matter
    return x[~((x != 0) & (x.abs() < torch.finfo(torch.float32).tiny))]


def test_to_lowp_matches_torch_bit_for_bit():
    x = _interesting_fp32().to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_output_is_the_rounded_fp32_result(causal):
    """With P in bf16 as on a GPU, the bf16 kernel's output is the fp32 kernel run on the
    same inputs with P rounded, then rounded to nearest: it differs from torch's rounding
    of that value by at most one bf16 ulp (summation order), never by truncation's bias."""
    q, k, v = (torch.randn(1, 2, 37, 48, device=DEVICE).to(torch.bfloat16) for _ in range(3))
    out = fused_attention(q, k, v, is_causal=causal, backend="triton")
    exact = fused_attention(q.double(), k.double(), v.double(), is_causal=causal, backend="reference")
    err = (out.double() - exact)
    # truncation biases every output toward zero; rounding to nearest does not
    bias = (err * exact.sign()).mean().item()
    assert abs(bias) < 0.25 * err.abs().mean().item(), f"mean signed error {bias:.3g} vs mean |error|"
