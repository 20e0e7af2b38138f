"""Autograd glue between the public API and the Triton launchers.

`api.py` validates and picks the backend; this module reshapes inputs to
(Z, H, N, D) views (no copies), runs the kernels, and defines the backward.
The Triton modules are imported on first use so that `import attn_kernels`
needs no Triton and `TRITON_INTERPRET=1` set before the first call still counts.
"""

from __future__ import annotations

import math

import torch

from ._checks import AttentionSpec


def _as_4d(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """(*batch, H, N, D) or (N, D) -> (Z, H, N, D); a view whenever strides allow."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    return t.reshape(math.prod(spec.batch), *t.shape[-3:])


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, is_causal: bool, scale: float):
        from .triton.attention_fwd import attention_fwd

        out, lse = attention_fwd(q, k, v, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from .triton.attention_bwd import attention_bwd

        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # only the lse was used downstream
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, dlse, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None


def fused_attention(query, key, value, spec: AttentionSpec):
    """Triton forward (+ backward through autograd). Returns (out, lse) in the caller's shapes."""
    q, k, v = (_as_4d(t, spec) for t in (query, key, value))
    out, lse = _FusedAttention.apply(q, k, v, spec.is_causal, spec.scale)
    return out.reshape(spec.out_shape), lse.reshape(spec.lse_shape)


class _AttentionWeights(torch.autograd.Function):
    """P = softmax(scale * q k^T): Triton forward; the backward is plain PyTorch,
    since P itself already holds L x S values."""

    @staticmethod
    def forward(ctx, q, k, is_causal: bool, scale: float):
        from .triton.attention_weights import attention_weights

        probs = attention_weights(q, k, is_causal, scale)
        ctx.save_for_backward(q, k, probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, dprobs):
        q, k, probs = ctx.saved_tensors
        p, dp = probs.float(), dprobs.float()
        # softmax backward: dS = P * (dP - rowsum(dP * P))
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * ctx.scale
        group = q.shape[1] // k.shape[1]
        k_rep = k.float().repeat_interleave(group, dim=1)
        dq = torch.matmul(ds, k_rep)
        dk = torch.matmul(ds.transpose(-2, -1), q.float())
        dk = dk.reshape(k.shape[0], k.shape[1], group, *dk.shape[2:]).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), None, None


def attention_weights(query, key, spec: AttentionSpec):
    q, k = _as_4d(query, spec), _as_4d(key, spec)
    return _AttentionWeights.apply(q, k, spec.is_causal, spec.scale).reshape(spec.weights_shape)
