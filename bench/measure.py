"""Measuring one implementation: the correctness guard, then time and peak memory.

Every failure becomes an Outcome, never an exception: out of memory -> "oom", a
config the implementation refuses -> "skipped", any other error -> "error", output
too far from the fp32 reference -> "wrong" (and then it is not timed at all).
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from typing import NamedTuple, Optional

import torch

from attn_kernels import reference

OOM_ERRORS = (torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))

# max |out - fp32 reference| / max(1, max |reference|) allowed at each dtype: a few
# roundings of the inputs, far below what a wrong mask, scale or tile gives (~0.1 to 1).
# Scaled by the magnitude because causal rows near the top average only a few values
# (|out| up to ~4); gradients get twice the output's tolerance.
OUT_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-3}
GRAD_TOLERANCE_FACTOR = 2.0
# fp32 scores of the reference; on CPU a few heads, which the Triton interpreter can take
CHECK_BUDGET_BYTES = {"cuda": 2 << 30, "cpu": 256 << 10}


class Outcome(NamedTuple):
    status: str  # ok | skipped | oom | wrong | error
    note: str = ""
    ms: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    check_err: Optional[float] = None


def draw_inputs(shape, dtype, device, requires_grad=True):
    """q, k, v, dout: fresh standard normal draws (never zeros, which hide wrong kernels)."""
    q, k, v, dout = (torch.randn(shape, dtype=dtype, device=device) for _ in range(4))
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), v.requires_grad_(requires_grad), dout


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, OOM_ERRORS) or "out of memory" in str(exc).lower()


def _first_line(text) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def failure(impl, exc: BaseException, where: str, warned=()) -> Outcome:
    """The Outcome of an exception raised by `impl` (`warned`: warnings it gave first)."""
    if is_oom(exc):
        return Outcome("oom", f"out of memory {where}")
    message = f"{type(exc).__name__}: {_first_line(exc)}"
    # SDPA says why a backend refused only in its warnings
    reasons = [_first_line(w.message) for w in warned if _first_line(w.message)]
    note = "; ".join([message, *reasons])[:400]
    return Outcome("skipped" if isinstance(exc, impl.refusals) else "error", f"{note} ({where})")


def check_shape(batch: int, heads: int, seqlen: int, budget_bytes: int) -> tuple:
    """(batch, heads, seqlen) of the correctness check: the benchmark's first shape, with
    batch and then heads halved while the reference's fp32 scores would pass the budget."""
    while batch > 1 and batch * heads * seqlen * seqlen * 4 > budget_bytes:
        batch //= 2
    while heads > 1 and batch * heads * seqlen * seqlen * 4 > budget_bytes:
        heads //= 2
    return batch, heads, seqlen


def scaled_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max(1, max |ref|); NaN or inf in x counts as infinitely wrong."""
    err = (x.detach().float() - ref).abs().nan_to_num(nan=float("inf")).max().item()
    return err / max(1.0, ref.abs().max().item())


class Reference(NamedTuple):
    inputs: tuple  # q, k, v, dout in the benchmark dtype
    out: torch.Tensor  # fp32
    grads: Optional[tuple]  # fp32 dq, dk, dv, or None when no backward pass is benchmarked


def make_reference(shape, dtype, device, causal: bool, with_grads: bool) -> Reference:
    """The fp32 math reference (attn_kernels.reference on fp32 copies) on fresh inputs."""
    inputs = draw_inputs(shape, dtype, device, requires_grad=False)
    q, k, v = (t.float().requires_grad_(with_grads) for t in inputs[:3])
    out = reference.attention(q, k, v, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), inputs[3].float()) if with_grads else None
    return Reference(inputs, out.detach(), grads)


def check(impl, ref: Reference, causal: bool) -> tuple:
    """(forward Outcome, gradient Outcome or None) of `impl` against the reference.
    An ok Outcome carries the scaled error; a wrong forward makes the gradients wrong too."""
    q0, k0, v0, dout = ref.inputs
    tol = OUT_TOLERANCE[q0.dtype]
    where = f"in the correctness check at {tuple(q0.shape)}"
    q, k, v = (t.detach().clone().requires_grad_(ref.grads is not None) for t in (q0, k0, v0))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            out = impl.prepare(q, k, causal)(q, k, v)
        except Exception as exc:  # noqa: BLE001 (every failure is a result here)
            bad = failure(impl, exc, where, warned)
            return bad, bad
    err = scaled_err(out, ref.out)
    if err > tol:
        bad = Outcome("wrong", f"max |out - fp32 ref| = {err:.2e} of the output's scale > {tol:.0e} ({where})")
        return bad, bad
    fwd = Outcome("ok", check_err=err)
    if ref.grads is None:
        return fwd, None
    try:
        grads = torch.autograd.grad(out, (q, k, v), dout)
    except Exception as exc:  # noqa: BLE001
        return fwd, failure(impl, exc, where + " (backward)")
    grad_err = max(scaled_err(g, r) for g, r in zip(grads, ref.grads))
    if grad_err > GRAD_TOLERANCE_FACTOR * tol:
        limit = GRAD_TOLERANCE_FACTOR * tol
        return fwd, Outcome("wrong", f"max |grad - fp32 ref| = {grad_err:.2e} of its scale > {limit:.0e} ({where})")
    return fwd, Outcome("ok", check_err=grad_err)


def pass_callable(pass_: str, run, q, k, v, dout):
    """The call that one timing repetition makes. fwd is the training forward (inputs
    require grad); bwd is the backward alone, replayed on one graph (retain_graph,
    and torch.autograd.grad, so no .grad accumulates between repetitions)."""
    if pass_ == "fwd":
        return lambda: run(q, k, v)
    if pass_ == "bwd":
        out = run(q, k, v)
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    if pass_ == "fwd_bwd":
        return lambda: torch.autograd.grad(run(q, k, v), (q, k, v), dout)
    raise ValueError(f"unknown pass {pass_!r}")


def peak_memory(fn, device: str) -> Optional[int]:
    """Bytes allocated at the peak of one call, above what was allocated before it."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - before


def cuda_timer(warmup_ms: float, rep_ms: float):
    def timer(fn) -> float:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    return timer


def cpu_timer(rep_ms: float, max_reps: int = 50):
    """Median wall clock of repetitions filling about rep_ms (one, if a call is slower)."""

    def timer(fn) -> float:
        times = []
        while len(times) < max_reps and sum(times) < rep_ms:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return timer


def time_cell(impl, pass_: str, shape, dtype, causal: bool, device: str, timer) -> Outcome:
    """Time one (impl, pass, shape) on fresh inputs: a warm-up call (compilation,
    autotuning), one call for peak memory, then the timer's repetitions."""
    try:
        outcome = _time_cell(impl, pass_, shape, dtype, causal, device, timer)
    except Exception as exc:  # noqa: BLE001
        outcome = failure(impl, exc, f"at {tuple(shape)}")
    if device == "cuda" or outcome.status != "ok":
        free_memory()  # after the except block, which held the failed call's tensors
    return outcome


def _time_cell(impl, pass_, shape, dtype, causal, device, timer) -> Outcome:
    q, k, v, dout = draw_inputs(shape, dtype, device)
    fn = pass_callable(pass_, impl.prepare(q, k, causal), q, k, v, dout)
    fn()
    peak = peak_memory(fn, device)
    return Outcome("ok", ms=timer(fn), peak_mem_bytes=peak)
