"""The attention implementations the benchmark compares, by record name.

Each one is prepared once per shape (masks and compiled code are made outside the
timed call) and then called as run(q, k, v) -> out on (batch, heads, seqlen, headdim)
tensors. `unavailable(device)` says why it cannot run on this machine at all; an
exception of a type in `refusals` means it does not take this config (SDPA's flash
kernel and fp32, say), which the benchmark records as skipped with the message.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import attn_kernels


@dataclass(frozen=True)
class Impl:
    name: str
    prepare: Callable  # (q, k, causal) -> run(q, k, v)
    unavailable: Callable[[str], Optional[str]] = lambda device: None
    refusals: tuple = (Exception,)  # third-party code: any error means "does not take this"
    interpreted: Callable[[str], bool] = lambda device: False  # its CPU times say nothing of speed


def _naive(q, k, causal):
    # as a user writes it: materialise the scores, softmax in the input dtype, matmul
    scale = 1.0 / math.sqrt(q.shape[-1])
    future = None
    if causal:  # made once, as a model keeps its mask in a buffer
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)

    def run(q, k, v):
        scores = (q @ k.transpose(-2, -1)) * scale
        if future is not None:
            scores = scores.masked_fill(future, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    return run


def _sdpa(backend_name: str) -> Impl:
    def unavailable(device):
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, backend_name):
            return f"torch {torch.__version__} has no SDPBackend.{backend_name}"
        return None

    def prepare(q, k, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def run(q, k, v):
            with sdpa_kernel(backend):  # forced: a backend that cannot take the call raises
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    short = {"MATH": "math", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn"}
    return Impl(f"sdpa.{short[backend_name]}", prepare, unavailable)


def _raise_recompile_limits() -> None:
    # every benchmark shape is a new static graph; past dynamo's limit it would run eagerly
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    _raise_recompile_limits()
    return torch.compile(flex_attention, dynamic=False)


def _causal_mask_mod(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex(q, k, causal):
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _compiled_flex()
    block_mask = None
    if causal:  # the block mask lets flex skip the tiles above the diagonal
        block_mask = create_block_mask(_causal_mask_mod, None, None, q.shape[-2], k.shape[-2], device=q.device)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def _flex_unavailable(device):
    if device != "cuda":
        return "FlexAttention is timed on CUDA only (on CPU torch.compile builds C++ kernels, not what this measures)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no FlexAttention: {exc}"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _attn_kernels(backend: str) -> Impl:
    def unavailable(device):
        status = attn_kernels.available_backends().get(backend)
        if status is None:
            return f"attn_kernels {attn_kernels.__version__} has no {backend!r} backend (not in available_backends())"
        if not status.available:
            return status.detail
        if device == "cpu" and backend == "triton" and not _interpreting():
            return "CPU tensors run the triton backend only in the Triton interpreter (set TRITON_INTERPRET=1)"
        if device == "cpu" and backend not in ("triton", "reference"):
            return f"the {backend} backend takes CUDA tensors"
        return None

    def prepare(q, k, causal):
        return lambda q, k, v: attn_kernels.fused_attention(q, k, v, is_causal=causal, backend=backend)

    return Impl(
        f"attn_kernels.{backend}",
        prepare,
        unavailable,
        refusals=(NotImplementedError,),  # our own code: any other error is a bug, recorded as "error"
        interpreted=lambda device: backend == "triton" and device == "cpu",
    )


IMPLS = {
    impl.name: impl
    for impl in (
        Impl("naive", _naive),
        _sdpa("MATH"),
        _sdpa("FLASH_ATTENTION"),
        _sdpa("EFFICIENT_ATTENTION"),
        _sdpa("CUDNN_ATTENTION"),
        Impl("flex", _flex, _flex_unavailable),
        _attn_kernels("triton"),
        _attn_kernels("cuda"),
        _attn_kernels("reference"),
    )
}

GPU_DEFAULT = [name for name in IMPLS if name != "attn_kernels.reference"]


def default_impls(device: str) -> list:
    if device == "cuda":
        return list(GPU_DEFAULT)
    # CPU: the eager paths and torch's CPU SDPA kernels; the triton kernels only when
    # the interpreter is on, and then as a check that they run, not a timing
    names = ["naive", "attn_kernels.reference", "sdpa.math", "sdpa.flash"]
    return names + (["attn_kernels.triton"] if _interpreting() else [])
