"""The public API of attn_kernels: SDPA-compatible fused attention.

    fused_attention(query, key, value, ...)   drop-in for F.scaled_dot_product_attention
    attention_weights(query, key, ...)        the softmax probabilities, for inspection
    available_backends()                      what can run here, and why not

Backends: "triton" (fused kernels, CUDA tensors; CPU tensors only under
TRITON_INTERPRET=1), "cuda" (the hand-written CUDA C++ kernels of csrc/, for
`fused_attention` only), "cpu" (CPU tensors: torch's fused CPU kernel where it
covers the call, else a blocked online-softmax path; cpu.py) and "reference" (eager
PyTorch, any device; the test oracle). "auto" picks triton for CUDA tensors and cpu
for CPU tensors ("cuda" only when asked for, until a committed benchmark shows where
it is faster). An explicit backend never falls back: what it cannot do raises.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import NamedTuple, Optional

import torch

from . import _kernel_inputs, _nested, cpu, reference, triton_ops
from ._checks import (
    AttentionArgumentError, AttentionSpec, _check_flag, check_attention, check_backend, check_kvcache, check_varlen,
)

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


def _cuda():
    """The CUDA backend's module (registers the attn_kernels::cuda_* ops; needs no _C to import)."""
    from . import cuda

    return cuda


def _cuda_status() -> BackendStatus:
    return BackendStatus(*_cuda().status())


def available_backends() -> dict:
    """{backend name: BackendStatus(available, detail)} for this machine."""
    return {
        "triton": _triton_status(),
        "cuda": _cuda_status(),
        "cpu": BackendStatus(*cpu.status()),
        "reference": BackendStatus(True, "eager PyTorch on any device (materialises the L x S scores; the test oracle)"),
    }


def _triton_refusal(spec: AttentionSpec) -> Optional[Exception]:
    """Why the triton backend cannot take this call, as the exception to raise; None if it can."""
    device = spec.device.type
    if device not in ("cuda", "cpu"):
        return AttentionArgumentError(
            f"backend='triton' takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
        )
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
    return None


def _pick_backend(backend: str, spec, op: str = "fused_attention") -> str:
    backend = check_backend(backend)
    if backend == "reference":
        return "reference"
    if backend == "cuda":
        if op != "fused_attention":
            raise NotImplementedError(f"backend='cuda' provides fused_attention only, not {op}; use backend='triton'")
        from . import cuda

        refusal = cuda.refusal(spec)
        if refusal is not None:
            raise refusal
        return "cuda"
    if backend == "cpu" or (backend == "auto" and spec.device.type == "cpu"):
        refusal = cpu.refusal(spec)
        if refusal is not None:
            raise refusal
        return "cpu"
    refusal = _triton_refusal(spec)
    if backend == "triton":
        if refusal is not None:
            raise refusal
        return "triton"
    # auto: fused kernels for CUDA tensors (CPU tensors went to "cpu" above), eager reference for the rest
    if spec.device.type != "cuda":
        return "reference"
    if refusal is not None:
        warnings.warn(f"attn_kernels: backend='auto' runs this call on the eager reference: {refusal}", stacklevel=3)
        return "reference"
    return "triton"


def _check_return_lse(return_lse) -> bool:
    return _check_flag("return_lse", return_lse)


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
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    backend: str = "auto",
    return_lse: bool = False,
):
    """softmax(query @ key^T * scale + attn_mask) @ value, fused (FlashAttention-2).

    A drop-in for `torch.nn.functional.scaled_dot_product_attention`: same arguments,
    shapes and semantics, differentiable in query, key, value and a float attn_mask.

    Args:
        query: (..., Hq, L, E), or (L, E); or a nested jagged tensor (B, Hq, j, E), with
            key and value nested too: run on the packed varlen kernels (see _nested.py).
        key: (..., Hkv, S, E), or (S, E).
        value: (..., Hkv, S, Ev), or (S, Ev). Batch and head dims broadcast against the
            query's as in SDPA (fewer dims, or size 1: stride-0 views, never copied).
            E = 0 gives uniform weights, Ev = 0 an empty output.
        attn_mask: None; bool (True = may attend) or additive float (float32 or the query
            dtype), broadcastable to (..., Hq, L, S) (read through its strides, never
            expanded; a float mask that requires grad gets its gradient); or
            `torch.nn.attention.bias.causal_upper_left(L, S)` / `causal_lower_right(L, S)`.
        dropout_p: probability of dropping an attention weight, in [0, 1] (1: zeros).
            The kernels draw a Philox mask seeded from torch's generator for the device,
            so `torch.manual_seed` replays a call (see `dropout_keep_mask`); the pattern
            is attn_kernels' own, not SDPA's (README, "Differences from SDPA").
        is_causal: query i attends to keys 0..i (top-left aligned, as SDPA); together
            with a tensor attn_mask, both apply.
        scale: multiplier of q.k; default 1 / sqrt(E). 1.0 is plain dot-product attention.
        enable_gqa: allow Hq to be a multiple of Hkv; query head h uses key/value head
            h // (Hq / Hkv), without copying key or value.
        window_size: (left, right): query i sees keys i + S - L - left .. i + S - L + right
            (FlashAttention's sliding window, bottom-right aligned); -1 = unbounded.
        softcap: if > 0, scores become softcap * tanh(scores / softcap) (before masks).
        alibi_slopes: (Hq,) or (..., Hq) float: adds -slope * |i + S - L - j| to the
            scores (FlashAttention's ALiBi); no gradient.
        deterministic: ask for a bit-reproducible backward. The Triton backward's only
            float atomics are in kernel variant "onepass" (dQ summed by atomic adds;
            attn_kernels/triton/variants.py), which deterministic=True never runs, even
            when forced; the default 3-kernel backward is bit-reproducible either way.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference" (see `available_backends()`).
        return_lse: also return the log-sum-exp of the scores.

    Returns:
        out (..., Hq, L, Ev) in the input dtype; with return_lse, (out, lse) where lse is
        float32 (..., Hq, L), the natural log of the softmax denominator. A row with no
        allowed key (masked, windowed, or bottom-right causal with L > S) gets output 0,
        lse -inf and zero gradients, never NaN.

    Raises:
        ValueError / TypeError (each also a RuntimeError, as SDPA's errors) or
        NotImplementedError, naming the argument, before any kernel runs.
    """
    if _nested.any_nested(query, key, value):
        return _fused_attention_nested(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size=window_size,
            softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic, backend=backend,
            return_lse=return_lse,
        )
    spec = check_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap, alibi_slopes
    )
    _check_flag("deterministic", deterministic)
    return_lse = _check_return_lse(return_lse)
    name = _pick_backend(backend, spec)
    if name == "reference":
        return reference.attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse,
        )
    # broadcast dims, E = 0, Ev = 0 and dropout_p = 1 in the kernels' form (_kernel_inputs.py)
    mask = attn_mask if spec.has_mask else None
    if name == "cuda":
        run = lambda q, k, v, m, a, s: _cuda().attention(q, k, v, s, deterministic)  # noqa: E731
    elif name == "cpu":
        run = lambda q, k, v, m, a, s: cpu.fused_attention(q, k, v, m, a, s, return_lse)  # noqa: E731
    else:
        run = lambda q, k, v, m, a, s: triton_ops.fused_attention(q, k, v, m, a, s, deterministic)  # noqa: E731
    out, lse = _kernel_inputs.attention(run, query, key, value, mask, alibi_slopes, spec)
    return (out, lse) if return_lse else out


def _fused_attention_nested(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *, return_lse,
                            **extras):
    """fused_attention on nested (jagged) tensors: the varlen kernels on their packed
    values (see _nested.py); the result is nested like the query."""
    call = _nested.unpack(query, key, value, attn_mask, _check_flag("enable_gqa", enable_gqa))
    return_lse = _check_return_lse(return_lse)
    if call.ragged_dim == 1:
        res = fused_attention(call.q, call.k, call.v, None, dropout_p, is_causal, scale, enable_gqa,
                              return_lse=return_lse, **extras)
    else:
        res = fused_attention_varlen(
            call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q, call.max_seqlen_k,
            dropout_p=dropout_p, is_causal=is_causal, scale=scale, return_lse=return_lse, **extras,
        )
    if return_lse:
        return call.wrap(res[0]), call.wrap_lse(res[1])
    return call.wrap(res)


def fused_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over packed variable-length sequences, with no padding
    (the semantics of FlashAttention's `flash_attn_varlen_func`).

    Args:
        q: (total_q, Hq, E), the sequences' queries one after the other.
        k: (total_k, Hkv, E); v: (total_k, Hkv, Ev). Hq a multiple of Hkv (GQA implied).
        cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,) prefix sums of the lengths,
            starting at 0 (see `attn_kernels.pack`). Read once on the host to validate.
        max_seqlen_q, max_seqlen_k: the longest lengths (ints).
        is_causal: aligned bottom-right per sequence (the last query sees every key).
        dropout_p, scale, window_size, softcap, alibi_slopes ((Hq,) or (num_seqs, Hq)),
            deterministic, backend: as `fused_attention`.

    Returns:
        out (total_q, Hq, Ev) in the input dtype; with return_lse, also lse float32 (Hq, total_q).
    """
    spec = check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, is_causal, scale, window_size, softcap, alibi_slopes,
    )
    _check_flag("deterministic", deterministic)
    return_lse = _check_return_lse(return_lse)
    name = _pick_backend(backend, spec, "fused_attention_varlen")
    if name == "reference":
        return reference.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, return_lse=return_lse,
        )
    run = lambda q_, k_, v_, s: triton_ops.fused_attention_varlen(  # noqa: E731
        q_, k_, v_, cu_seqlens_q, cu_seqlens_k, alibi_slopes, s, deterministic)
    if name == "cpu":
        run = lambda q_, k_, v_, s: cpu.fused_attention_varlen(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, alibi_slopes, s)  # noqa: E731
    out, lse = _kernel_inputs.varlen(run, q, k, v, spec)
    return (out, lse) if return_lse else out


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The attention probabilities softmax(scores), before dropout.

    Arguments as `fused_attention`: query (..., Hq, L, E), key (..., Hkv, S, E) ->
    (..., Hq, L, S) in the input dtype (rows with no allowed key are 0). The triton
    backend computes them from the fused forward's LSE, tile by tile. The result holds
    L x S values per head: it is for inspecting what a model attends to.
    """
    spec = check_attention(
        query, key, None, attn_mask, 0.0, is_causal, scale, enable_gqa, window_size, softcap, alibi_slopes
    )
    name = _pick_backend(backend, spec, "attention_weights")
    if name == "reference":
        return reference.attention_weights(
            query, key, attn_mask, is_causal, scale, enable_gqa,
            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        )
    mask = attn_mask if spec.has_mask else None
    run = cpu.attention_weights if name == "cpu" else triton_ops.attention_weights
    return _kernel_inputs.weights(run, query, key, mask, alibi_slopes, spec)


def _append_to_cache(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table) -> None:
    """Write k_new / v_new (B, Lq_new, Hkv, *) into the caches at rows cache_seqlens[b]..,
    in place, on the device (no host sync); a paged cache through its block table."""
    B, n = k_new.shape[:2]
    positions = cache_seqlens.long()[:, None] + torch.arange(n, device=k_new.device)[None, :]
    if block_table is None:
        index = (torch.arange(B, device=k_new.device)[:, None].expand(B, n), positions)
    else:
        block_size = k_cache.shape[1]
        blocks = torch.gather(block_table.long(), 1, positions // block_size)
        index = (blocks, positions % block_size)
    k_cache[index] = k_new
    v_cache[index] = v_new


def fused_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens,
    *,
    k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    is_causal: bool = True,
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Decoding attention against a KV cache, with split-KV (flash-decoding) and paged
    caches; the layouts and semantics of FlashAttention's `flash_attn_with_kvcache`.

    Args:
        q: (B, Lq, Hq, E): the new tokens' queries (Lq = 1 for plain decoding).
        k_cache, v_cache: (B, S_max, Hkv, E) / (B, S_max, Hkv, Ev), or paged
            (num_blocks, block_size, Hkv, *) with block_table; block_size a multiple of 16.
        cache_seqlens: int32 (B,) (or an int): tokens already in the cache per batch row.
        k_new, v_new: optional (B, Lq_new, Hkv, *): written into the caches in place at
            rows cache_seqlens[b].. before attending; the caller then advances cache_seqlens.
        block_table: int32 (B, max_blocks): the cache blocks of each batch row, in order.
        is_causal: query i sees keys up to i + S_b - Lq (aligned bottom-right), where S_b
            = cache_seqlens[b] + Lq_new. window_size, softcap, alibi_slopes ((Hq,) or
            (B, Hq)): as `fused_attention`.
        num_splits: split each key range into this many chunks merged by their LSE;
            0 chooses from B, Hkv, S and the GPU's SM count.

    Returns:
        out (B, Lq, Hq, Ev) in q's dtype; with return_lse, also lse float32 (B, Hq, Lq).
    Forward only: tensors that require grad are refused. Validation reads cache_seqlens
    and block_table on the host once.
    """
    spec, cache_seqlens = check_kvcache(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, is_causal, window_size, softcap,
        alibi_slopes, num_splits,
    )
    return_lse = _check_return_lse(return_lse)
    name = _pick_backend(backend, spec, "fused_attention_with_kvcache")
    if k_new is not None:
        _append_to_cache(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    seqlens = cache_seqlens + spec.len_new
    if name == "reference":
        out, lse = reference.attention_with_kvcache(
            q, k_cache, v_cache, seqlens, block_table=block_table, scale=scale, is_causal=is_causal,
            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True,
        )
    elif name == "cpu":
        out, lse = cpu.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, spec)
    else:  # Triton split-KV decoding: no autograd, so no custom op in between
        from .triton.attention_decode import attention_with_kvcache

        out, lse = attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, spec)
    return (out, lse) if return_lse else out


def dropout_keep_mask(
    query: torch.Tensor, key: torch.Tensor, dropout_p: float, enable_gqa: bool = False, *, backend: str = "auto"
) -> torch.Tensor:
    """The dropout keep-mask (bool (..., Hq, L, S), True = kept) that `fused_attention`
    with this backend draws for these shapes, if called from the same generator state:

        torch.manual_seed(0); out = fused_attention(q, k, v, dropout_p=0.1)
        torch.manual_seed(0); keep = dropout_keep_mask(q, k, 0.1)
        reference.attention(q, k, v, dropout_p=0.1, dropout_mask=keep)   # == out
    """
    spec = check_attention(query, key, None, None, dropout_p, False, None, enable_gqa)
    if spec.dropout_p == 0.0:
        raise AttentionArgumentError("dropout_p must be > 0 for a dropout mask")
    if spec.dropout_p == 1.0:  # every weight dropped; no call draws for it
        return torch.zeros(spec.weights_shape, dtype=torch.bool, device=spec.device)
    name = _pick_backend(backend, spec, "dropout_keep_mask")
    if name == "cpu":
        return cpu.dropout_keep_mask(spec)
    if name == "reference":
        # the draw reference.attention makes: rand_like of its probabilities
        shape = spec.weights_shape if spec.rank > 2 else (1, 1, spec.len_q, spec.len_k)
        keep = torch.rand(shape, dtype=spec.dtype, device=spec.device) >= spec.dropout_p
        return keep.reshape(spec.weights_shape)
    return triton_ops.dropout_keep_mask(query, key, spec)
