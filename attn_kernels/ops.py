"""Glue between the public API and the backends' kernels.

`api.py` validates and picks the backend; this module turns an `AttentionSpec`
into kernel inputs (no copies: (Z, H, N, D) views, broadcast masks as stride-0
views) and calls the Triton backend's custom ops (`triton_ops.py`, where the
backward is registered; they launch through `triton/launch.py`), the CUDA backend
(`cuda.py`) or the decode kernels. The Triton modules are imported on first use, so
that `import attn_kernels` needs no Triton and `TRITON_INTERPRET=1` set before the
first call still counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import AttentionSpec

SEED_HIGH = 2**62
LN2 = 0.6931471805599453


def natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' base-2 LSE as users see it: natural log (differentiable)."""
    return lse2 * LN2


def _as_4d(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """(*batch, H, N, D) or (N, D) -> (Z, H, N, D); a view whenever strides allow."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    return t.reshape(math.prod(spec.batch), *t.shape[-3:])


def _draw_seed(spec: AttentionSpec) -> Optional[torch.Tensor]:
    """Dropout seed from torch's generator for the device (torch.manual_seed replays
    it); it stays on the device, so no host sync."""
    if spec.dropout_p == 0.0:
        return None
    return torch.randint(0, SEED_HIGH, (1,), device=spec.device, dtype=torch.int64)


@dataclass(frozen=True)
class _KernelConfig:
    """Everything the kernels need besides q, k, v and the mask (which autograd tracks)."""

    spec: AttentionSpec
    alibi: Optional[torch.Tensor]  # (Z, Hq) float32 view
    seed: Optional[torch.Tensor]
    packed: Optional[tuple] = None  # launch.Packed for varlen calls

    @staticmethod
    def build(spec: AttentionSpec, alibi_slopes, packed=None) -> "_KernelConfig":
        alibi = None
        if alibi_slopes is not None:
            # (Hq,) or (*batch, Hq) -> (Z, Hq), stride 0 over batch when shared
            z = math.prod(spec.batch)
            alibi = alibi_slopes.detach().float().reshape(-1, spec.heads_q).expand(z, spec.heads_q)
        return _KernelConfig(spec, alibi, _draw_seed(spec), packed)

    def scores_shape(self) -> tuple:
        return self.spec.weights_shape

    def kernel_mask(self, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The mask as a (Z, Hq, L, S) view (stride 0 where broadcast): autograd sums
        the kernel's dS back to the caller's shape through this view."""
        if mask is None:
            return None
        spec = self.spec
        z = math.prod(spec.batch)
        return mask.expand(self.scores_shape()).reshape(z, spec.heads_q, spec.len_q, spec.len_k)

    def op_args(self, deterministic: bool = False) -> tuple:
        """triton_ops.triton_fwd's arguments after q, k, v and the mask."""
        spec, packed = self.spec, self.packed
        lo, hi = spec.band(packed=packed is not None)
        cu = (packed.cu_seqlens_q, packed.cu_seqlens_k, packed.max_seqlen_q, packed.max_seqlen_k) if packed else \
            (None, None, 0, 0)
        return (self.alibi, self.seed, *cu, float(spec.scale), float(spec.dropout_p), float(spec.softcap), lo, hi,
                bool(deterministic))


def _triton_ops():
    """torch.ops.attn_kernels, with the Triton backend's ops registered (on first use)."""
    from . import triton_ops  # noqa: F401

    return torch.ops.attn_kernels


def fused_attention(query, key, value, attn_mask, alibi_slopes, spec: AttentionSpec, deterministic: bool = False):
    """Triton forward (+ backward through autograd). Returns (out, lse) in the caller's shapes.
    deterministic: a bit-reproducible backward (no dQ atomics)."""
    q, k, v = (_as_4d(t, spec) for t in (query, key, value))
    config = _KernelConfig.build(spec, alibi_slopes)
    mask = config.kernel_mask(attn_mask if spec.has_mask else None)
    out, lse2 = _triton_ops().triton_fwd(q, k, v, mask, *config.op_args(deterministic))
    return out.reshape(spec.out_shape), natural_lse(lse2).reshape(spec.lse_shape)


def cuda_attention(query, key, value, spec: AttentionSpec, deterministic: bool):
    """The CUDA C++ backend (attn_kernels/cuda.py) on (Z, H, N, D) views; (out, lse) in the caller's shapes."""
    from . import cuda

    q, k, v = (_as_4d(t, spec) for t in (query, key, value))
    out, lse = cuda.fused_attention(q, k, v, spec.is_causal, spec.scale, deterministic)
    return out.reshape(spec.out_shape), lse.reshape(spec.lse_shape)


def fused_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, spec: AttentionSpec,
                           deterministic: bool = False):
    """Packed q (total_q, Hq, E), k/v (total_k, Hkv, *) -> (out (total_q, Hq, Ev), lse (Hq, total_q))."""
    from .triton.launch import Packed

    packed = Packed(cu_seqlens_q, cu_seqlens_k, spec.len_q, spec.len_k)
    config = _KernelConfig.build(spec, alibi_slopes, packed)
    out, lse2 = _triton_ops().triton_fwd(q, k, v, None, *config.op_args(deterministic))
    return out, natural_lse(lse2)


def attention_weights(query, key, attn_mask, alibi_slopes, spec: AttentionSpec):
    q, k = _as_4d(query, spec), _as_4d(key, spec)
    config = _KernelConfig.build(spec, alibi_slopes)
    lo, hi = spec.band()
    mask = config.kernel_mask(attn_mask if spec.has_mask else None)
    probs = _triton_ops().triton_weights(q, k, mask, config.alibi, float(spec.scale), float(spec.softcap), lo, hi)
    return probs.reshape(spec.weights_shape)


def dropout_keep_mask(query, key, spec: AttentionSpec) -> torch.Tensor:
    """The keep-mask (bool, (..., Hq, L, S)) that the Triton kernels draw for a call
    made now with these shapes and spec.dropout_p (same generator use as the call)."""
    from .triton.dropout_mask import dropout_mask

    seed = _draw_seed(spec)
    z = math.prod(spec.batch)
    keep = dropout_mask(seed, z, spec.heads_q, spec.len_q, spec.len_k, spec.dropout_p, query.device)
    return keep.reshape(spec.weights_shape)


def _auto_splits(spec, programs: int, max_keys: int) -> int:
    """Enough splits to give the GPU ~2 programs per SM, none shorter than 256 keys."""
    if spec.device.type == "cuda":
        sms = torch.cuda.get_device_properties(spec.device).multi_processor_count
    else:
        sms = 4  # the interpreter: a few splits, so the merge is exercised
    wanted = -(-2 * sms // max(programs, 1))
    return max(1, min(wanted, -(-max_keys // 256), 128))


def attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, spec):
    """Split-KV decoding on the Triton backend; out (B, Lq, Hq, Ev), lse (B, Hq, Lq)."""
    from .triton.attention_decode import attention_decode, decode_blocks

    B, Lq, Hq = spec.batch, spec.len_q, spec.heads_q
    out = torch.zeros((B, Lq, Hq, spec.dim_v), device=q.device, dtype=q.dtype)
    lse = torch.full((B, Hq, Lq), float("-inf"), device=q.device, dtype=torch.float32)
    max_keys = spec.max_keys
    if out.numel() == 0 or max_keys == 0:
        return out, lse
    group_rows = Hq // spec.heads_kv * Lq
    block_m, block_n, _ = decode_blocks(group_rows, max(spec.dim_qk, spec.dim_v), q.dtype)
    num_splits = spec.num_splits or _auto_splits(spec, B * spec.heads_kv * -(-group_rows // block_m), max_keys)
    num_splits = min(num_splits, -(-max_keys // block_n))  # no split without a tile of keys
    split_len = -(-max_keys // (num_splits * block_n)) * block_n
    alibi = None
    if alibi_slopes is not None:
        alibi = alibi_slopes.float().reshape(-1, Hq).expand(B, Hq)
    attention_decode(
        q, k_cache, v_cache, seqlens, block_table, alibi, out, lse, num_splits=num_splits, split_len=split_len,
        scale=spec.scale, is_causal=spec.is_causal, window=spec.window, softcap=spec.softcap,
    )
    return out, lse
