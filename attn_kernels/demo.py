"""python -m attn_kernels.demo: a two-minute tour that runs anywhere.

1. The attention tutorial's worked examples, with their true values.
2. fused_attention against the float64 reference on every available backend
   (forward and gradients). Without a GPU, the Triton kernels run on the CPU in the
   Triton interpreter, which this demo switches on for itself.
3. A short timing table next to torch's SDPA. On a GPU: CUDA-event medians
   (triton.testing.do_bench). Without one: CPU wall-clock (median of 5) of the CPU
   backend (what "auto" runs on CPU tensors) next to SDPA and the eager reference,
   plus a sliding-window row that SDPA cannot run; CPU timings say nothing of GPU kernels.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import attn_kernels  # noqa: E402
from attn_kernels import attention_weights, available_backends, fused_attention, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rounded(row: torch.Tensor) -> list:
    return [round(x, 4) for x in row[0].tolist()]


def seed_examples() -> None:
    print("1. The tutorial's worked examples (scale 1/sqrt(E))")
    q = torch.tensor([[1.0, 0.8]])
    k = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.9]])
    v = torch.tensor([[1.0, 0.1], [0.9, 0.2], [0.8, 0.3]])
    print(f"   weights {_rounded(attention_weights(q, k))}  (true: [0.2984, 0.2942, 0.4073])")
    print(f"   output  {_rounded(fused_attention(q, k, v))}  (true: [0.8891, 0.2109])")
    q2 = torch.tensor([[2.0, 3.0, 1.0]])
    k2 = torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    print(f"   weights {_rounded(attention_weights(q2, k2))}  (true: [0.7604, 0.2396])\n")


def _max_errors(backend: str, dtype: torch.dtype) -> tuple:
    shape = dict(device=DEVICE, dtype=dtype)
    q = torch.randn(2, 4, 100, 64, **shape)
    k = torch.randn(2, 2, 129, 64, **shape)
    v = torch.randn(2, 2, 129, 64, **shape)
    dout = torch.randn(2, 4, 100, 64, **shape)
    results = []
    for run_dtype, run_backend in ((dtype, backend), (torch.float64, "reference")):
        ins = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        out = fused_attention(*ins, is_causal=True, enable_gqa=True, backend=run_backend)
        results.append((out, *torch.autograd.grad(out, ins, dout.to(run_dtype))))
    return tuple((a.double() - b).abs().max().item() for a, b in zip(*results))


def backend_check() -> None:
    print("2. fused_attention vs the float64 reference (GQA 4/2, causal, L=100, S=129, E=Ev=64)")
    dtypes = (torch.float32, torch.float16) if DEVICE == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    print(f"   {'backend':<10} {'dtype':<9} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
    for name, status in available_backends().items():
        if not status.available:
            print(f"   {name:<10} unavailable: {status.detail}")
            continue
        for dtype in dtypes:
            try:
                errs = _max_errors(name, dtype)
            except NotImplementedError as exc:  # e.g. the cuda backend: fp16/bf16 and E == Ev only
                print(f"   {name:<10} {str(dtype)[6:]:<9} not supported: {exc}")
                continue
            print(f"   {name:<10} {str(dtype)[6:]:<9} " + " ".join(f"{e:9.2e}" for e in errs))
    print()


def _median_ms(fn, reps: int = 5) -> float:
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timing_table() -> None:
    window = {}
    if DEVICE == "cuda":
        dtype, sizes = torch.bfloat16, ((4, 16, 2048, 128), (2, 16, 4096, 128))
        impls = {"attn_kernels (triton)": "triton", "torch SDPA": None}
        if available_backends()["cuda"].available:
            impls = {"attn_kernels (cuda)": "cuda", **impls}
        print(f"3. Forward time on {torch.cuda.get_device_name()}, bf16, non-causal (CUDA events, median)")
    else:
        dtype, sizes = torch.float32, ((1, 4, 256, 64), (1, 4, 512, 64), (1, 8, 1024, 64), (1, 8, 1024, 64))
        window = {3: (128, 0)}  # the last row: a sliding window, which SDPA does not have
        impls = {"attn_kernels (cpu)": "cpu", "torch SDPA (CPU)": None, "reference (eager)": "reference"}
        print(f"3. CPU wall-clock, fp32 forward, median of 5 ({torch.get_num_threads()} threads; CPU timings of CPU "
              "code, not of GPU kernels)")
    print(f"   {'B x H x L x D':<28}" + "".join(f"{name:>24}" for name in impls))
    for row, (B, H, L, D) in enumerate(sizes):
        q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=dtype) for _ in range(3))
        extra = {"window_size": window[row]} if row in window else {}
        cells = []
        for backend in impls.values():
            if backend is None:
                if extra:
                    cells.append(f"{'-':>24}")
                    continue
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
            else:
                fn = lambda b=backend: fused_attention(q, k, v, backend=b, **extra)  # noqa: E731
            cells.append(f"{_median_ms(fn):21.3f} ms")
        label = f"{B}x{H}x{L}x{D}" + (f" window {extra['window_size']}" if extra else "")
        print(f"   {label:<28}" + "".join(cells))
    print(f"\n   torch {torch.__version__}, attn_kernels {attn_kernels.__version__}")


def main() -> None:
    torch.manual_seed(0)
    seed_examples()
    backend_check()
    timing_table()


if __name__ == "__main__":
    main()
