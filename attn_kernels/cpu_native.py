"""The CPU backend's compiled piece: a bfloat16 attention backward with float32
accumulators (cpu_native/attention_backward_bf16.cpp), built at first use.

torch's bf16 CPU backward rounds each gradient once per block it adds (it misses the
suite's accuracy rule); running it in float32 instead meets the rule but costs 1.3-1.5x
on CPUs with bf16 dot products. This kernel is torch's blocked route with float32 sums.
It is compiled by torch.utils.cpp_extension (a C++ compiler and torch's headers, ~40 s
once per torch version and vector ISA, kept in torch's extension cache) the first time
cpu.py's backward needs it. Where it cannot be built, or with ATTN_KERNELS_CPU_NATIVE=0,
the backward runs in float32: the same results within the accuracy rule, slower.
`status()` says which, and why.
"""

from __future__ import annotations

import os
import platform
import re
import threading
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("cpu_native") / "attention_backward_bf16.cpp"
ENV = "ATTN_KERNELS_CPU_NATIVE"

# the vector ISA torch dispatches to on this CPU -> compiler flags and at::vec's capability
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

_lock = threading.Lock()
_state = {"ops": None, "error": None}


def _disabled() -> Optional[str]:
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"built for x86-64 only (this is {platform.machine()})"
    return None


def _build():
    from torch.utils.cpp_extension import load

    isa = torch.backends.cpu.get_cpu_capability()
    flags = _ISA_FLAGS.get(isa, [])
    capability = isa if flags else "DEFAULT"
    tag = re.sub(r"\W", "_", f"{torch.__version__}_{capability}").lower()
    load(
        name=f"attn_kernels_cpu_{tag}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp", "-std=c++17", f"-DCPU_CAPABILITY={capability}",
                      f"-DCPU_CAPABILITY_{capability}", *flags],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )

    @torch.library.register_fake("attn_kernels_cpu::attention_backward_bf16")
    def _(dout, q, k, v, out, lse, mask, is_causal, scale):  # shapes for torch.compile / FakeTensor
        return torch.empty_like(q, memory_format=torch.contiguous_format), \
            torch.empty_like(k, memory_format=torch.contiguous_format), \
            torch.empty_like(v, memory_format=torch.contiguous_format)

    return torch.ops.attn_kernels_cpu


def ops():
    """torch.ops.attn_kernels_cpu, building it on the first call; None where it cannot be
    (status() says why). A failed build is not retried in this process."""
    if _disabled() is not None:
        return None
    with _lock:
        if _state["ops"] is None and _state["error"] is None:
            try:
                _state["ops"] = _build()
            except Exception as exc:  # no compiler, no headers, a failed build: float32 instead
                _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
        return _state["ops"]


def status() -> str:
    """Which bf16 backward the CPU backend runs, without building anything."""
    reason = _disabled() or _state["error"]
    if reason is not None:
        return f"bf16 backward in float32 ({reason})"
    if _state["ops"] is not None:
        return "bf16 backward: compiled kernel with float32 accumulators"
    return "bf16 backward: compiled kernel with float32 accumulators (built at first use)"


def attention_backward_bf16(dout, q, k, v, out, lse, mask, is_causal: bool, scale: float):
    """dout, q, out (Z, Hq, L, E); k, v (Z, Hkv, S, E), bfloat16, unit last stride; lse
    float32 (Z, Hq, L); mask float32 broadcastable to (Z, Hq, L, S) or None; top-left
    causal -> (dq, dk, dv) bfloat16 shaped like q, k, v. Call after ops() said it is built."""
    return _state["ops"].attention_backward_bf16(dout, q, k, v, out, lse, mask, is_causal, scale)
