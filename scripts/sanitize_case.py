"""Small odd-shaped attention calls for compute-sanitizer memcheck (scripts/gpu_check.sh).

Runs every fused backend that is available (triton, and cuda once attn_kernels has
it), forward and backward, on shapes that are not multiples of any tile: ragged
L and S, head dims that are not powers of two, Ev != E, GQA, strided inputs. Each
result is compared with the fp32 reference, so a bad read shows even where memcheck
cannot see it. Exits 1 on a mismatch, 2 when no fused backend can run here.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_case.py
"""

from __future__ import annotations

import os
import sys

# one cudaMalloc per tensor, so that memcheck sees a read past a tensor's end
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

import attn_kernels  # noqa: E402
from attn_kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under TRITON_INTERPRET=1 only
BACKENDS = ("triton", "cuda")
# (batch, heads_q, heads_kv, L, S, E, Ev, causal, dtype, transposed)
CASES = [
    (1, 3, 3, 67, 129, 72, 72, False, torch.float16, False),
    (2, 4, 2, 37, 91, 40, 24, True, torch.bfloat16, True),
    (1, 2, 1, 1, 17, 128, 128, True, torch.float16, False),
    (1, 1, 1, 130, 65, 256, 200, False, torch.float32, True),
]
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-3}


def make_inputs(batch, heads_q, heads_kv, L, S, E, Ev, dtype, transposed):
    def draw(heads, n, d):
        if transposed:  # (B, N, H, D) memory seen as (B, H, N, D): strides a kernel must honour
            return torch.randn(batch, n, heads, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, n, d, device=DEVICE, dtype=dtype)

    return draw(heads_q, L, E), draw(heads_kv, S, E), draw(heads_kv, S, Ev), draw(heads_q, L, Ev)


def run_case(backend, case) -> str | None:
    """None if the backend matches the reference (or refuses the case), else what differs."""
    *shape, causal, dtype, transposed = case
    q, k, v, dout = make_inputs(*shape, dtype, transposed)
    kwargs = dict(is_causal=causal, enable_gqa=shape[1] != shape[2])
    results = []
    for run_dtype, run_backend in ((dtype, backend), (torch.float32, "reference")):
        ins = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        if run_backend == "reference":
            out = reference.attention(*ins, **kwargs)
        else:
            try:
                out = attn_kernels.fused_attention(*ins, backend=run_backend, **kwargs)
            except NotImplementedError as exc:
                print(f"  {backend}: refuses {case}: {exc}")
                return None
        results.append((out, *torch.autograd.grad(out, ins, dout.to(run_dtype))))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
        err = (got.float() - want).abs().nan_to_num(nan=float("inf")).max().item()
        if err > TOLERANCE[dtype] * max(1.0, want.abs().max().item()):
            return f"{name}: max error {err:.3e}"
    return None


def main() -> int:
    statuses = attn_kernels.available_backends()
    backends = [b for b in BACKENDS if b in statuses and statuses[b].available]
    if not backends:
        print(f"no fused backend can run here: {statuses}")
        return 2
    torch.manual_seed(0)
    failures = 0
    for backend in backends:
        for case in CASES:
            problem = run_case(backend, case)
            failures += problem is not None
            print(f"  {backend:7} {'FAIL ' + problem if problem else 'ok'}  {case}")
    print(f"sanitize_case: {len(CASES)} cases x {backends} on {DEVICE}: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
