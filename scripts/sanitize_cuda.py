"""Small odd-shaped calls of the CUDA C++ backend, forward and backward, for
compute-sanitizer on a GPU:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_cuda.py
    compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 python scripts/sanitize_cuda.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python scripts/sanitize_cuda.py
    compute-sanitizer --tool initcheck --error-exitcode 1 python scripts/sanitize_cuda.py

Every compiled head dim, fp16 and bf16, causal or not, GQA, lengths that are not
multiples of any tile (1, 17, 65, 130), L != S, (B, S, H, D)-transposed inputs and a
tensor whose pointer is not 16-byte aligned. Each result is also compared with the
fp32 reference, so a bad read shows even where a tool cannot see it. The stream is
synchronised after each launch (ATTN_KERNELS_CUDA_SYNC=1), so a fault is reported
against its kernel. Exits 1 on a mismatch, 2 when backend "cuda" cannot run here.
"""

from __future__ import annotations

import os
import sys

# one cudaMalloc per tensor, so that memcheck sees a read past a tensor's end
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
os.environ.setdefault("ATTN_KERNELS_CUDA_SYNC", "1")

import torch  # noqa: E402

from attn_kernels import cuda as attn_cuda  # noqa: E402
from attn_kernels import reference  # noqa: E402

# (batch, heads_q, heads_kv, L, S, head dim, causal, dtype, layout)
CASES = [
    (1, 2, 1, 17, 65, 32, True, torch.float16, "transposed"),
    (2, 3, 3, 65, 17, 64, False, torch.bfloat16, "contiguous"),
    (1, 4, 2, 130, 65, 96, True, torch.float16, "misaligned"),
    (1, 2, 2, 1, 130, 128, True, torch.bfloat16, "transposed"),
    (1, 2, 1, 65, 130, 128, False, torch.float16, "contiguous"),
    (1, 1, 1, 130, 17, 256, True, torch.bfloat16, "contiguous"),
    (1, 2, 1, 17, 130, 256, False, torch.float16, "misaligned"),
]
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


def draw(batch, heads, n, dim, dtype, layout):
    if layout == "transposed":  # (B, N, H, D) memory seen as (B, H, N, D)
        return torch.randn(batch, n, heads, dim, device="cuda", dtype=dtype).transpose(1, 2)
    if layout == "misaligned":  # 2 bytes past an allocation's start: the backend copies it
        flat = torch.randn(batch * heads * n * dim + 1, device="cuda", dtype=dtype)
        return flat[1:].view(batch, heads, n, dim)
    return torch.randn(batch, heads, n, dim, device="cuda", dtype=dtype)


def run_case(case) -> str | None:
    """None if the backend matches the fp32 reference, else what differs."""
    batch, hq, hkv, L, S, dim, causal, dtype, layout = case
    q = draw(batch, hq, L, dim, dtype, layout)
    k = draw(batch, hkv, S, dim, dtype, layout)
    v = draw(batch, hkv, S, dim, dtype, layout)
    dout = torch.randn(batch, hq, L, dim, device="cuda", dtype=dtype)
    dlse = torch.randn(batch, hq, L, device="cuda")
    scale = dim**-0.5
    results = []
    for run_dtype in (dtype, torch.float32):
        ins = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        if run_dtype == dtype:
            out, lse = attn_cuda.fused_attention(*ins, causal, scale)
        else:
            out, lse = reference.attention(*ins, is_causal=causal, scale=scale, enable_gqa=hq != hkv, return_lse=True)
        grads = torch.autograd.grad((out, lse), ins, (dout.to(run_dtype), dlse))
        results.append((out, lse, *grads))
    torch.cuda.synchronize()
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), *results):
        err = (got.float() - want).abs().nan_to_num(nan=float("inf")).max().item()
        if err > TOLERANCE[dtype] * max(1.0, want.abs().max().item()):
            return f"{name}: max error {err:.3e}"
    return None


def main() -> int:
    ok, why = attn_cuda.status()
    if not ok:
        print(f"backend cuda cannot run here: {why}")
        return 2
    print(f"backend cuda: {why}")
    torch.manual_seed(0)
    failures = 0
    for case in CASES:
        problem = run_case(case)
        failures += problem is not None
        print(f"  {'FAIL ' + problem if problem else 'ok'}  {case}", flush=True)
    print(f"sanitize_cuda: {len(CASES)} cases, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
