"""The CPU backend (backend="cpu"; what backend="auto" runs for CPU tensors).

Every call runs on one of two implementations, chosen here from the call alone, with
the same semantics (SDPA's, plus this package's: a row with no allowed key gives
output 0, lse -inf and zero gradients):

- torch's fused CPU kernel, `aten::_scaled_dot_product_flash_attention_for_cpu` (the
  kernel behind F.scaled_dot_product_attention on CPU: blocked online softmax, O(N)
  memory, GQA without copies; its backward is torch's), when it computes exactly this
  call (`torch_kernel_covers`): no dropout, window, softcap or ALiBi; causal top-left
  (or bottom-right with L == S); E == Ev; no empty dim; a bool mask or a float one of
  the query dtype that needs no gradient; an lse that needs none (and no lse at all
  for float16 / bfloat16 inputs, where the kernel's is less accurate than the rule).
  For float16 / bfloat16 the backward is not torch's (see _LowPrecisionBackward).
- the blocked path (cpu_blocked.py, cpu_tiles.py) for everything else: forward and
  backward with online softmax over key blocks, never an L x S buffer.

What the fused kernel needs is arranged here: 4-D inputs with unit last-dim stride
(it reads other layouts wrongly), a bool mask turned into an additive one of the
mask's own size (as SDPA does), and the lse of rows the mask empties set to -inf (the
kernel gives 0 there). Varlen, KV-cache decoding and attention_weights run on the
blocked path (cpu_varlen.py, cpu_weights.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import cpu_dropout, cpu_native, cpu_varlen
from ._checks import AttentionArgumentError, AttentionSpec
from ._kernel_inputs import as_4d
from .cpu_blocked import BlockedAttention, mask_layout
from .cpu_tiles import Problem, acc_dtype
from .cpu_weights import BlockedWeights

DETAIL = (
    "CPU tensors, every feature and float64: torch's fused CPU flash kernel where it covers the call "
    "(no dropout/window/softcap/ALiBi, top-left causal, E == Ev, no mask gradient, no lse gradient), "
    "else a blocked online-softmax path (O(N) memory, forward and backward)"
)


def status() -> tuple:
    return True, f"{DETAIL}; {cpu_native.status()}"


def refusal(spec) -> Optional[Exception]:
    """Why backend='cpu' cannot take this call, as the exception to raise; None if it can."""
    if spec.device.type != "cpu":
        return AttentionArgumentError(f"backend='cpu' takes CPU tensors, got {spec.device.type} tensors")
    return None


def _grad_wanted(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def torch_kernel_covers(spec: AttentionSpec, attn_mask, return_lse: bool, *tensors) -> bool:
    """True when torch's fused CPU kernel computes exactly this call (see the module docstring)."""
    if spec.dropout_p > 0.0 or spec.window != (-1, -1) or spec.softcap > 0.0 or spec.has_alibi:
        return False
    if spec.is_causal and spec.causal_bottom_right and spec.len_q != spec.len_k:
        return False
    if spec.dim_qk != spec.dim_v or min(spec.len_q, spec.len_k, spec.dim_qk, spec.heads_q) == 0:
        return False  # it dies (SIGFPE) on empty lengths or heads; an empty batch is fine
    mask = attn_mask if spec.has_mask else None
    if mask is not None and mask.is_floating_point() and (mask.dtype != spec.dtype or _grad_wanted(mask)):
        return False  # the kernel adds masks of the query dtype only, and has no mask gradient
    if return_lse and spec.dtype in (torch.float16, torch.bfloat16):
        return False  # its 16-bit lse is ~5e-5 off (measured): 20-100x what the float32 lse's rule allows
    return not (return_lse and _grad_wanted(*tensors, mask))  # nor an lse gradient


def _mask_4d(mask: torch.Tensor, spec) -> torch.Tensor:
    """A mask broadcastable to the scores -> 4-D, broadcastable to (Z, Hq, L, S)."""
    nb = len(spec.batch)
    padded = mask.reshape((1,) * (nb + 3 - mask.dim()) + tuple(mask.shape))
    rest = padded.shape[nb:]
    if all(d == 1 for d in padded.shape[:nb]):
        return padded.reshape(1, *rest)
    return padded.expand(*spec.batch, *rest).reshape(math.prod(spec.batch), *rest)


def _empty_rows(mask: torch.Tensor, spec) -> torch.Tensor:
    """bool, broadcastable to (Z, Hq, L): rows where the mask allows no key."""
    if mask.dtype == torch.bool:
        empty = ~mask.any(dim=-1, keepdim=True)
    else:
        empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
    return _mask_4d(empty, spec).squeeze(-1)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _gemm_ready(t: torch.Tensor) -> torch.Tensor:
    """t with unit last stride and rows at least a row apart (what a GEMM can read)."""
    return t if t.stride(-1) == 1 and t.stride(-2) >= t.shape[-1] else t.contiguous()


class _LowPrecisionBackward(torch.autograd.Function):
    """torch's kernel at the 16-bit input dtype forward; a backward that meets the
    suite's accuracy rule, which torch's own float16 / bfloat16 backward misses (it adds
    each block's product into the 16-bit gradient: dK / dV errors 1.3-2.7x the budget,
    e.g. dV 4.3e-3 against 2.1e-3 in fp16 at L=65, S=90, E=24):
    - bfloat16: cpu_native's compiled kernel, torch's blocked route with float32 sums
      (measured as fast as torch's bf16 backward, bench/bench_cpu.py);
    - float16, or where that kernel is not available: torch's float32 backward on the
      same values (1.3-1.5x slower than torch's bf16 one on a CPU with bf16 dot products;
      float16 GEMMs without AVX512-FP16 are slower still)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float):
        out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _):
        q, k, v, mask, out, lse = ctx.saved_tensors
        mask = None if mask is None else mask.float()
        if q.dtype == torch.bfloat16 and cpu_native.ops() is not None:
            if mask is not None and mask.shape[-1] > 1 and mask.stride(-1) > 1:
                mask = mask.contiguous()  # the kernel reads a mask row with unit (or zero) stride
            dq, dk, dv = cpu_native.attention_backward_bf16(
                dout.contiguous(), *(_gemm_ready(t) for t in (q, k, v, out)), lse, mask, ctx.is_causal, ctx.scale
            )
            return dq, dk, dv, None, None, None
        up = [t.float().contiguous() for t in (dout, q, k, v, out)]
        dq, dk, dv = _FLASH_CPU_BACKWARD(*up, lse, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _torch_kernel(query, key, value, attn_mask, spec: AttentionSpec):
    """torch's fused CPU kernel -> (out, lse) in (Z, Hq, L, *) layout."""
    q, k, v = (as_4d(t, spec) for t in (query, key, value))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None
    if spec.has_mask:
        mask = attn_mask
        if mask.dtype == torch.bool:  # additive, the size of the mask as given (as SDPA does)
            mask = torch.zeros(mask.shape, dtype=spec.dtype).masked_fill_(~mask, float("-inf"))
        mask = _mask_4d(mask, spec)
    if spec.dtype in (torch.float16, torch.bfloat16) and _grad_wanted(q, k, v):
        out, lse = _LowPrecisionBackward.apply(q, k, v, mask, spec.is_causal, spec.scale)
    else:  # torch's own autograd formula
        out, lse = _FLASH_CPU(q, k, v, 0.0, spec.is_causal, attn_mask=mask, scale=spec.scale)
    if spec.has_mask:
        lse = lse.masked_fill(_empty_rows(attn_mask, spec), float("-inf"))
    return out, lse


def neg_slopes(alibi_slopes, spec_heads_q: int, heads_kv: int, z: int, dtype) -> Optional[torch.Tensor]:
    """(Hq,) or (*batch, Hq) ALiBi slopes -> -slopes as (Z or 1, Hkv, G, 1, 1)."""
    if alibi_slopes is None:
        return None
    slopes = alibi_slopes.detach().to(dtype).reshape(-1, spec_heads_q)
    rows = slopes.shape[0] if slopes.shape[0] == z else 1
    return -slopes.reshape(rows, heads_kv, spec_heads_q // heads_kv, 1, 1)


def _problem_factory(spec: AttentionSpec, alibi_slopes, seed: int = 0):
    """make(q5, k4, v4 or None, mask) -> the blocked Problem of this call."""
    z, hq, hkv = math.prod(spec.batch), spec.heads_q, spec.heads_kv
    slopes = neg_slopes(alibi_slopes, hq, hkv, z, acc_dtype(spec.dtype))
    band = spec.band()

    def make(q, k, v, mask):
        return Problem(
            q, k, v, spec.scale, band=band, softcap=spec.softcap, neg_slopes=slopes,
            alibi_diag=spec.len_k - spec.len_q, mask=mask_layout(mask, spec.batch, hq, hkv),
            dropout_p=spec.dropout_p, seed=seed,
        )

    return make


def _grouped(query, key, spec: AttentionSpec):
    """query as (Z, Hkv, G, L, E) and key as (Z, Hkv, S, E), views whenever strides allow."""
    z, hq, hkv = math.prod(spec.batch), spec.heads_q, spec.heads_kv
    return as_4d(query, spec).view(z, hkv, hq // hkv, spec.len_q, spec.dim_qk), as_4d(key, spec)


def _blocked(query, key, value, attn_mask, alibi_slopes, spec: AttentionSpec):
    """The blocked path -> (out, lse) in the caller's shapes (lse float32, float64 for float64)."""
    seed = cpu_dropout.draw_seed() if spec.dropout_p > 0.0 else 0
    q5, k4 = _grouped(query, key, spec)
    mask = attn_mask if spec.has_mask else None
    out, lse = BlockedAttention.apply(q5, k4, as_4d(value, spec), mask, _problem_factory(spec, alibi_slopes, seed))
    return out.reshape(spec.out_shape), lse.reshape(spec.lse_shape)


def fused_attention(query, key, value, attn_mask, alibi_slopes, spec: AttentionSpec, return_lse: bool):
    """(out, lse) in the caller's shapes; lse is float32 (float64 for float64 inputs)."""
    if torch_kernel_covers(spec, attn_mask, return_lse, query, key, value):
        out, lse = _torch_kernel(query, key, value, attn_mask, spec)
        return out.reshape(spec.out_shape), lse.reshape(spec.lse_shape)
    return _blocked(query, key, value, attn_mask, alibi_slopes, spec)


def dropout_keep_mask(spec: AttentionSpec) -> torch.Tensor:
    """The keep-mask (bool, (..., Hq, L, S)) a blocked call with these shapes and
    spec.dropout_p draws when made now (the same single draw from the generator)."""
    seed = cpu_dropout.draw_seed()
    keep = cpu_dropout.keep_mask(seed, spec.dropout_p, math.prod(spec.batch), spec.heads_q, spec.len_q, spec.len_k)
    return keep.reshape(spec.weights_shape)


def attention_weights(query, key, attn_mask, alibi_slopes, spec: AttentionSpec) -> torch.Tensor:
    """softmax(scores) (..., Hq, L, S) in the input dtype, differentiable (cpu_weights.py)."""
    q5, k4 = _grouped(query, key, spec)
    mask = attn_mask if spec.has_mask else None
    probs = BlockedWeights.apply(q5, k4, mask, _problem_factory(spec, alibi_slopes))
    return probs.reshape(spec.weights_shape)


def fused_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, spec: AttentionSpec):
    """Packed q (total_q, Hq, E), k / v (total_k, Hkv, *) -> (out (total_q, Hq, Ev), lse (Hq, total_q))."""
    seed = cpu_dropout.draw_seed() if spec.dropout_p > 0.0 else 0
    return cpu_varlen.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, spec, seed)


def attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, spec):
    """Decoding over the caches as they stand: out (B, Lq, Hq, Ev), lse (B, Hq, Lq)."""
    return cpu_varlen.kvcache(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, spec)
