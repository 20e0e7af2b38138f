"""The public API of attn_kernels: SDPA-compatible fused attention.

    fused_attention(query, key, value, ...)   drop-in for F.scaled_dot_product_attention
    attention_weights(query, key, ...)        the softmax probabilities, for inspection
    available_backends()                      what can run here, and why not

Backends: "triton" (fused kernels, CUDA tensors; CPU tensors only under
TRITON_INTERPRET=1) and "reference" (eager PyTorch, any device). "auto" picks
triton for CUDA tensors and the reference for CPU tensors. An explicit backend
never falls back: what it cannot do raises.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import NamedTuple, Optional

import torch

from . import ops, reference
from ._checks import AttentionSpec, check_attention, check_backend

TRITON_MAX_HEAD_DIM = 256
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendStatus(NamedTuple):
    available: bool
    detail: str  # what it runs on, or why it cannot run here


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton)")
    if torch.cuda.is_available():
        return BackendStatus(True, f"CUDA tensors on {torch.cuda.get_device_name()}")
    if _triton_interpreting():
        if importlib.util.find_spec("numpy") is None:
            return BackendStatus(False, "the Triton interpreter (TRITON_INTERPRET=1) needs numpy (pip install numpy)")
        return BackendStatus(True, "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1; slow, for testing)")
    return BackendStatus(False, "no CUDA GPU, and TRITON_INTERPRET=1 is not set for the CPU interpreter")


def available_backends() -> dict:
    """{backend name: BackendStatus(available, detail)} for this machine."""
    return {
        "triton": _triton_status(),
        "reference": BackendStatus(True, "eager PyTorch on any device (materialises the L x S scores)"),
    }


def _triton_refusal(spec: AttentionSpec) -> Optional[Exception]:
    """Why the triton backend cannot take this call, as the exception to raise; None if it can."""
    device = spec.device.type
    if device not in ("cuda", "cpu"):
        return ValueError(f"backend='triton' takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}")
    status = _triton_status()
    if not status.available:
        return RuntimeError(f"backend='triton' is unavailable: {status.detail}")
    if device == "cpu" and not _triton_interpreting():
        return RuntimeError(
            "backend='triton' got CPU tensors: move them to a CUDA device, set TRITON_INTERPRET=1 "
            "before triton is imported, or use backend='reference'"
        )
    if device == "cuda" and _triton_interpreting():
        return RuntimeError("backend='triton' got CUDA tensors but TRITON_INTERPRET=1 is set; unset it to run on the GPU")
    if spec.dtype not in TRITON_DTYPES:
        return NotImplementedError(f"backend='triton' supports float16, bfloat16 and float32 inputs, not {spec.dtype}")
    if max(spec.dim_qk, spec.dim_v) > TRITON_MAX_HEAD_DIM:
        return NotImplementedError(
            f"backend='triton' supports head dims up to {TRITON_MAX_HEAD_DIM}; got E={spec.dim_qk}, Ev={spec.dim_v}"
        )
    if spec.has_mask:
        return NotImplementedError("attn_mask is not supported by backend='triton' yet; use backend='reference'")
    if spec.dropout_p > 0.0:
        return NotImplementedError("dropout_p > 0 is not supported by backend='triton' yet; use backend='reference'")
    return None


def _pick_backend(backend: str, spec: AttentionSpec) -> str:
    backend = check_backend(backend)
    if backend == "reference":
        return "reference"
    refusal = _triton_refusal(spec)
    if backend == "triton":
        if refusal is not None:
            raise refusal
        return "triton"
    # auto: fused kernels for CUDA tensors, eager reference for everything else
    if spec.device.type != "cuda":
        return "reference"
    if refusal is not None:
        warnings.warn(f"attn_kernels: backend='auto' runs this call on the eager reference: {refusal}", stacklevel=3)
        return "reference"
    return "triton"


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
    return_lse: bool = False,
):
    """softmax(query @ key^T * scale + attn_mask) @ value, fused (FlashAttention-2).

    A drop-in for `torch.nn.functional.scaled_dot_product_attention`: same arguments,
    shapes and semantics, differentiable in query, key and value.

    Args:
        query: (..., Hq, L, E), or (L, E).
        key: (..., Hkv, S, E), or (S, E); same leading dims as query.
        value: (..., Hkv, S, Ev), or (S, Ev).
        attn_mask: None, or bool (True = may attend) / additive float in the query dtype,
            broadcastable to (..., Hq, L, S). Reference backend only for now.
        dropout_p: probability of dropping an attention weight, in [0, 1). Reference only for now.
        is_causal: query i attends to keys 0..i (top-left aligned, as SDPA).
        scale: multiplier of q.k; default 1 / sqrt(E). 1.0 is plain dot-product attention.
        enable_gqa: allow Hq to be a multiple of Hkv; query head h uses key/value head
            h // (Hq / Hkv), without copying key or value.
        backend: "auto" | "triton" | "reference" (see `available_backends()`).
        return_lse: also return the log-sum-exp of the scores.

    Returns:
        out (..., Hq, L, Ev) in the input dtype; with return_lse, (out, lse) where lse is
        float32 (..., Hq, L), the natural log of the softmax denominator (-inf for a row
        with no allowed key, whose output is 0).
    """
    spec = check_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if _pick_backend(backend, spec) == "reference":
        return reference.attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse=return_lse
        )
    out, lse = ops.fused_attention(query, key, value, spec)
    return (out, lse) if return_lse else out


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The attention probabilities softmax(query @ key^T * scale + attn_mask).

    Shapes as `fused_attention`: query (..., Hq, L, E), key (..., Hkv, S, E) ->
    (..., Hq, L, S) in the input dtype (rows with no allowed key are 0). The triton
    backend computes them from the fused forward's LSE, tile by tile. The result holds
    L x S values per head: it is for inspecting what a model attends to.
    """
    spec = check_attention(query, key, None, attn_mask, 0.0, is_causal, scale, enable_gqa)
    if _pick_backend(backend, spec) == "reference":
        return reference.attention_weights(query, key, attn_mask, is_causal, scale, enable_gqa)
    return ops.attention_weights(query, key, spec)
