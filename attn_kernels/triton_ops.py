"""The Triton backend's entry from api.py, and its kernels as torch custom ops.

One call's route: api.py -> here (caller shapes -> kernel inputs, then the custom op
attn_kernels::triton_fwd / ::triton_bwd / ::triton_weights) -> triton/launch.py
(layouts, allocation) -> the kernel's launcher triton/attention_{fwd,bwd,weights}.py,
which asks triton/variants.py which variant runs and why (`variants.last_choices()`)
and triton/tuning.py for its tiles. Decoding over a KV cache needs no autograd: api.py
calls triton/attention_decode.py directly.

Why custom ops and not plain Python: torch.compile then sees each launch as one opaque
node of known output shapes, whatever the launcher does inside (tile choice reads
files and may search), so `fullgraph=True` traces models that use the Triton kernels,
and the CPU tests check that through the interpreter. The Triton modules are imported
inside the functions, on first use, so that `import attn_kernels` needs no Triton and
`TRITON_INTERPRET=1` set before the first call still counts.

Tensor layouts are launch.py's: padded q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev),
or packed (total, H, D) with cu_seqlens. Score modifiers travel as plain arguments:
mask a (Z, Hq, L, S) view (stride 0 where broadcast), alibi (Z, Hq) float32, seed an
int64 (1,) device tensor (dropout), band (lo, hi) bounds of j - i (None = unbounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import AttentionSpec
from ._kernel_inputs import as_4d

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SEED_HIGH = 2**62


# ---- entry points (api.py): caller shapes -> kernel inputs -> the custom ops below ----

def natural_lse(lse2: Tensor) -> Tensor:
    """The kernels' base-2 LSE as users see it: natural log (differentiable)."""
    return lse2 * LN2


def _draw_seed(spec: AttentionSpec) -> Optional[Tensor]:
    """Dropout seed from torch's generator for the device (torch.manual_seed replays
    it); it stays on the device, so no host sync."""
    if spec.dropout_p == 0.0:
        return None
    return torch.randint(0, SEED_HIGH, (1,), device=spec.device, dtype=torch.int64)


@dataclass(frozen=True)
class _KernelConfig:
    """Everything the kernels need besides q, k, v and the mask (which autograd tracks)."""

    spec: AttentionSpec
    alibi: Optional[Tensor]  # (Z, Hq) float32 view
    seed: Optional[Tensor]
    packed: Optional[tuple] = None  # launch.Packed for varlen calls

    @staticmethod
    def build(spec: AttentionSpec, alibi_slopes, packed=None) -> "_KernelConfig":
        alibi = None
        if alibi_slopes is not None:
            # (Hq,) or (*batch, Hq) -> (Z, Hq), stride 0 over batch when shared
            z = math.prod(spec.batch)
            alibi = alibi_slopes.detach().float().reshape(-1, spec.heads_q).expand(z, spec.heads_q)
        return _KernelConfig(spec, alibi, _draw_seed(spec), packed)

    def kernel_mask(self, mask: Optional[Tensor]) -> Optional[Tensor]:
        """The mask as a (Z, Hq, L, S) view (stride 0 where broadcast): autograd sums
        the kernel's dS back to the caller's shape through this view."""
        if mask is None:
            return None
        spec = self.spec
        z = math.prod(spec.batch)
        return mask.expand(spec.weights_shape).reshape(z, spec.heads_q, spec.len_q, spec.len_k)

    def op_args(self, deterministic: bool = False) -> tuple:
        """triton_fwd's arguments after q, k, v and the mask."""
        spec, packed = self.spec, self.packed
        lo, hi = spec.band(packed=packed is not None)
        cu = (packed.cu_seqlens_q, packed.cu_seqlens_k, packed.max_seqlen_q, packed.max_seqlen_k) if packed else \
            (None, None, 0, 0)
        return (self.alibi, self.seed, *cu, float(spec.scale), float(spec.dropout_p), float(spec.softcap), lo, hi,
                bool(deterministic))


def fused_attention(query, key, value, attn_mask, alibi_slopes, spec: AttentionSpec, deterministic: bool = False):
    """Forward (+ backward through autograd) on (*batch, H, N, D) inputs; (out, lse) in
    the caller's shapes. deterministic: a bit-reproducible backward (no dQ atomics)."""
    q, k, v = (as_4d(t, spec) for t in (query, key, value))
    config = _KernelConfig.build(spec, alibi_slopes)
    mask = config.kernel_mask(attn_mask if spec.has_mask else None)
    out, lse2 = triton_fwd(q, k, v, mask, *config.op_args(deterministic))
    return out.reshape(spec.out_shape), natural_lse(lse2).reshape(spec.lse_shape)


def fused_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, spec: AttentionSpec,
                           deterministic: bool = False):
    """Packed q (total_q, Hq, E), k/v (total_k, Hkv, *) -> (out (total_q, Hq, Ev), lse (Hq, total_q))."""
    from .triton.launch import Packed

    packed = Packed(cu_seqlens_q, cu_seqlens_k, spec.len_q, spec.len_k)
    config = _KernelConfig.build(spec, alibi_slopes, packed)
    out, lse2 = triton_fwd(q, k, v, None, *config.op_args(deterministic))
    return out, natural_lse(lse2)


def attention_weights(query, key, attn_mask, alibi_slopes, spec: AttentionSpec):
    """Probabilities (*batch, Hq, L, S) in the input dtype."""
    q, k = as_4d(query, spec), as_4d(key, spec)
    config = _KernelConfig.build(spec, alibi_slopes)
    lo, hi = spec.band()
    mask = config.kernel_mask(attn_mask if spec.has_mask else None)
    probs = triton_weights(q, k, mask, config.alibi, float(spec.scale), float(spec.softcap), lo, hi)
    return probs.reshape(spec.weights_shape)


def dropout_keep_mask(query, key, spec: AttentionSpec) -> Tensor:
    """The keep-mask (bool, (..., Hq, L, S)) that the kernels draw for a call made now
    with these shapes and spec.dropout_p (same generator use as the call)."""
    from .triton.dropout_mask import dropout_mask

    seed = _draw_seed(spec)
    keep = dropout_mask(seed, math.prod(spec.batch), spec.heads_q, spec.len_q, spec.len_k, spec.dropout_p,
                        query.device)
    return keep.reshape(spec.weights_shape)


# ---- the custom ops ----

def _mods(q, mask, alibi, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, softcap,
          band_lo, band_hi):
    from .triton import launch

    packed = None
    if cu_seqlens_q is not None:
        packed = launch.Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    mods = launch.score_mods(q, scale, mask=mask, alibi=alibi, seed=seed, dropout_p=dropout_p, softcap=softcap,
                             band=(band_lo, band_hi), packed=packed)
    return launch, mods, packed


@torch.library.custom_op("attn_kernels::triton_fwd", mutates_args=())
def triton_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    mask: Optional[Tensor], alibi: Optional[Tensor], seed: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    scale: float, dropout_p: float, softcap: float, band_lo: Optional[int], band_hi: Optional[int],
    deterministic: bool,
) -> Tuple[Tensor, Tensor]:
    """(out like q with v's head dim, lse2 float32: (Z, Hq, L) padded, (Hq, total_q) packed).
    deterministic is for the backward (it travels there with the other scalars).

    lse2 is in base 2 (logsumexp / ln 2), as the kernels keep it: the backward recomputes
    P from it with no change of base. Callers convert it for users (natural_lse)."""
    launch, mods, packed = _mods(q, mask, alibi, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale, dropout_p, softcap, band_lo, band_hi)
    return launch.forward(q, k, v, mods, packed)


@triton_fwd.register_fake
def _triton_fwd_fake(q, k, v, mask, alibi, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                     dropout_p, softcap, band_lo, band_hi, deterministic):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cu_seqlens_q is None:
        return out, q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("attn_kernels::triton_bwd", mutates_args=())
def triton_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    mask: Optional[Tensor], alibi: Optional[Tensor], seed: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    scale: float, dropout_p: float, softcap: float, band_lo: Optional[int], band_hi: Optional[int],
    deterministic: bool, need_ds: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv like q, k, v; dS float32 (Z, Hq, L, S) when need_ds, else an empty tensor).
    deterministic: bit-reproducible, so never variant "onepass" (dQ by atomics)."""
    launch, mods, packed = _mods(q, mask, alibi, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale, dropout_p, softcap, band_lo, band_hi)
    dq, dk, dv, ds = launch.backward(dout, q, k, v, out, lse, dlse, mods, packed, need_ds=need_ds,
                                     deterministic=deterministic)
    return dq, dk, dv, ds if ds is not None else q.new_empty((0,), dtype=torch.float32)


@triton_bwd.register_fake
def _triton_bwd_fake(dout, q, k, v, out, lse, dlse, mask, alibi, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, scale, dropout_p, softcap, band_lo, band_hi, deterministic, need_ds):
    ds_shape = (*q.shape[:-1], k.shape[-2]) if need_ds else (0,)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(ds_shape, dtype=torch.float32)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, mask, alibi, seed, cu_seqlens_q, cu_seqlens_k, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, alibi, seed, cu_seqlens_q, cu_seqlens_k)
    ctx.scalars = scalars
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, *tensors = ctx.saved_tensors
    if dout is None:  # only the lse was used downstream
        dout = torch.zeros_like(out)
    if dlse is not None:  # d/d(lse2) -> d/d(natural lse), which the kernels take
        dlse = (dlse.float() * LOG2E).contiguous()
    need_ds = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, ds = torch.ops.attn_kernels.triton_bwd(dout, q, k, v, out, lse, dlse, mask, *tensors, *ctx.scalars,
                                                       need_ds)
    # the mask input is a broadcast view: autograd sums dS back to the caller's shape
    dmask = ds.to(mask.dtype) if need_ds else None
    # no gradient for alibi, seed, cu_seqlens and the 8 scalars (forwarded unchanged to triton_bwd)
    return (dq, dk, dv, dmask) + (None,) * (4 + len(ctx.scalars))


triton_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("attn_kernels::triton_weights", mutates_args=())
def triton_weights(
    q: Tensor, k: Tensor, mask: Optional[Tensor], alibi: Optional[Tensor],
    scale: float, softcap: float, band_lo: Optional[int], band_hi: Optional[int],
) -> Tensor:
    """P = softmax(scores), (Z, Hq, L, S) in q.dtype, for padded q (Z, Hq, L, E), k (Z, Hkv, S, E)."""
    launch, mods, _ = _mods(q, mask, alibi, None, None, None, 0, 0, scale, 0.0, softcap, band_lo, band_hi)
    return launch.weights(q, k, mods)


@triton_weights.register_fake
def _triton_weights_fake(q, k, mask, alibi, scale, softcap, band_lo, band_hi):
    return q.new_empty((*q.shape[:-1], k.shape[-2]))


def _weights_setup_context(ctx, inputs, output):
    q, k, mask, alibi, scale, softcap, _, _ = inputs
    ctx.save_for_backward(q, k, output)
    ctx.scale, ctx.softcap = scale, softcap
    ctx.mask_dtype = mask.dtype if mask is not None else None


def _weights_backward(ctx, dprobs):
    """Plain PyTorch: P itself already holds L x S values, so dS may too."""
    q, k, probs = ctx.saved_tensors
    p, dp = probs.float(), dprobs.float()
    # softmax backward: dS = P * (dP - rowsum(dP * P)); also the gradient of a float mask
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dmask = ds.to(ctx.mask_dtype) if ctx.needs_input_grad[2] else None
    group = q.shape[1] // k.shape[1]
    k_rep = k.float().repeat_interleave(group, dim=1)
    if ctx.softcap > 0:  # through softcap * tanh(s / softcap)
        raw = torch.matmul(q.float(), k_rep.transpose(-2, -1)) * ctx.scale
        ds = ds * (1 - torch.tanh(raw / ctx.softcap) ** 2)
    ds = ds * ctx.scale
    dq = torch.matmul(ds, k_rep)
    dk = torch.matmul(ds.transpose(-2, -1), q.float())
    dk = dk.reshape(k.shape[0], k.shape[1], group, *dk.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dmask, None, None, None, None, None


triton_weights.register_autograd(_weights_backward, setup_context=_weights_setup_context)
