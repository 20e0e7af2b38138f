"""Autograd glue between the public API and the Triton backend.

`api.py` validates and picks the backend; this module turns an `AttentionSpec`
into kernel inputs (no copies: (Z, H, N, D) views, broadcast masks as stride-0
views), runs the kernels through `triton/launch.py`, and defines the backward.
The Triton modules are imported on first use, so that `import attn_kernels` needs
no Triton and `TRITON_INTERPRET=1` set before the first call still counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import AttentionSpec

SEED_HIGH = 2**62


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

    def mods(self, dummy: torch.Tensor, mask: Optional[torch.Tensor], dropout: bool = True):
        from .triton import launch

        spec = self.spec
        if mask is not None:
            z = math.prod(spec.batch)
            mask = mask.expand(self.scores_shape()).reshape(z, spec.heads_q, spec.len_q, spec.len_k)
        return launch.score_mods(
            dummy, spec.scale, mask=mask, alibi=self.alibi, seed=self.seed,
            dropout_p=spec.dropout_p if dropout else 0.0, softcap=spec.softcap,
            band=spec.band(packed=self.packed is not None), packed=self.packed,
        )


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, config: _KernelConfig):
        from .triton import launch

        out, lse = launch.forward(q, k, v, config.mods(q, mask), config.packed)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.config = config
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from .triton import launch

        q, k, v, out, lse, mask = ctx.saved_tensors
        config = ctx.config
        if dout is None:  # only the lse was used downstream
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        need_ds = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, ds = launch.backward(
            dout, q, k, v, out, lse, dlse, config.mods(q, mask), config.packed, need_ds=need_ds
        )
        dmask = None
        if need_ds:
            # a broadcast mask gets the sum over the dims it was broadcast along
            dmask = ds.reshape(config.scores_shape()).sum_to_size(mask.shape).to(mask.dtype)
        return dq, dk, dv, dmask, None


def fused_attention(query, key, value, attn_mask, alibi_slopes, spec: AttentionSpec):
    """Triton forward (+ backward through autograd). Returns (out, lse) in the caller's shapes."""
    q, k, v = (_as_4d(t, spec) for t in (query, key, value))
    config = _KernelConfig.build(spec, alibi_slopes)
    out, lse = _FusedAttention.apply(q, k, v, attn_mask if spec.has_mask else None, config)
    return out.reshape(spec.out_shape), lse.reshape(spec.lse_shape)


def cuda_attention(query, key, value, spec: AttentionSpec, deterministic: bool):
    """The CUDA C++ backend (attn_kernels/cuda.py) on (Z, H, N, D) views; (out, lse) in the caller's shapes."""
    from . import cuda

    q, k, v = (_as_4d(t, spec) for t in (query, key, value))
    out, lse = cuda.fused_attention(q, k, v, spec.is_causal, spec.scale, deterministic)
    return out.reshape(spec.out_shape), lse.reshape(spec.lse_shape)


def fused_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, spec: AttentionSpec):
    """Packed q (total_q, Hq, E), k/v (total_k, Hkv, *) -> (out (total_q, Hq, Ev), lse (Hq, total_q))."""
    from .triton.launch import Packed

    packed = Packed(cu_seqlens_q, cu_seqlens_k, spec.len_q, spec.len_k)
    config = _KernelConfig.build(spec, alibi_slopes, packed)
    return _FusedAttention.apply(q, k, v, None, config)


class _AttentionWeights(torch.autograd.Function):
    """P = softmax(scores): Triton forward; the backward is plain PyTorch, since P
    itself already holds L x S values."""

    @staticmethod
    def forward(ctx, q, k, mask, config: _KernelConfig):
        from .triton import launch

        probs = launch.weights(q, k, config.mods(q, mask, dropout=False))
        ctx.save_for_backward(q, k, probs)
        ctx.config = config
        ctx.mask_shape, ctx.mask_dtype = (mask.shape, mask.dtype) if mask is not None else (None, None)
        return probs

    @staticmethod
    def backward(ctx, dprobs):
        q, k, probs = ctx.saved_tensors
        spec = ctx.config.spec
        p, dp = probs.float(), dprobs.float()
        # softmax backward: dS = P * (dP - rowsum(dP * P)); also the gradient of a float mask
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dmask = None
        if ctx.needs_input_grad[2]:
            dmask = ds.reshape(ctx.config.scores_shape()).sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
        group = q.shape[1] // k.shape[1]
        k_rep = k.float().repeat_interleave(group, dim=1)
        if spec.softcap > 0:  # through softcap * tanh(s / softcap)
            raw = torch.matmul(q.float(), k_rep.transpose(-2, -1)) * spec.scale
            ds = ds * (1 - torch.tanh(raw / spec.softcap) ** 2)
        ds = ds * spec.scale
        dq = torch.matmul(ds, k_rep)
        dk = torch.matmul(ds.transpose(-2, -1), q.float())
        dk = dk.reshape(k.shape[0], k.shape[1], group, *dk.shape[2:]).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dmask, None


def attention_weights(query, key, attn_mask, alibi_slopes, spec: AttentionSpec):
    q, k = _as_4d(query, spec), _as_4d(key, spec)
    config = _KernelConfig.build(spec, alibi_slopes)
    return _AttentionWeights.apply(q, k, attn_mask if spec.has_mask else None, config).reshape(spec.weights_shape)


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
