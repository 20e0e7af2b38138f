"""Eager PyTorch attention: the test oracle (backend="reference").

    scores = (query @ key^T) * scale                         (..., Hq, L, S)
    scores = softcap * tanh(scores / softcap)                 if softcap > 0
    scores = scores - slope_h * |i + S - L - j|               with alibi_slopes (FlashAttention's ALiBi)
    scores = scores + attn_mask  (float)  /  -inf where attn_mask is False (bool)
    scores = -inf outside the causal / sliding-window band   (AttentionSpec.band)
    lse    = logsumexp(scores, -1)                            (..., Hq, L)
    probs  = exp(scores - lse)                                rows with no allowed key are 0
    out    = dropout(probs) @ value                           (..., Hq, L, Ev)

Same signature and semantics as `attn_kernels.fused_attention` (SDPA's, plus the
keyword extras). float64 and float32 inputs are computed in their dtype (float64 is
the test oracle); float16 / bfloat16 ones, as SDPA's CPU kernels do, with the scores
and softmax in float32 (q.k of 16-bit inputs of magnitude 256 passes float16's
65504) and the probabilities rounded to the input dtype for the product with value.
It materialises the L x S matrix: use it for checking; CPU tensors run on the `cpu`
backend (cpu.py), GPU tensors on the Triton kernels.
"""

from __future__ import annotations

import warnings

import torch

from ._checks import AttentionSpec, check_attention, expand_to_spec

SCORES_IN_FP32 = (torch.float16, torch.bfloat16)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1, *t.shape) if t.dim() == 2 else t


class _RoundGrad(torch.autograd.Function):
    """Identity; the gradient is rounded to `dtype` and back (a fused kernel's dS)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def _scores(query, key, attn_mask, alibi_slopes, spec: AttentionSpec, grad_dtype=None) -> torch.Tensor:
    """Scores with every modifier applied, -inf where masked (see the module docstring).
    grad_dtype: the gradient of q.k^T is rounded to it (reference.attention's probs_dtype)."""
    if spec.heads_q != spec.heads_kv:
        # GQA: query head h reads key/value head h // (Hq / Hkv)
        key = key.repeat_interleave(spec.heads_q // spec.heads_kv, dim=-3)
    if query.dtype in SCORES_IN_FP32:
        query, key = query.float(), key.float()
    scores = torch.matmul(query, key.transpose(-2, -1))
    if grad_dtype is not None:
        scores = _RoundGrad.apply(scores, grad_dtype)
    scores = scores * spec.scale
    if spec.softcap > 0:
        scores = spec.softcap * torch.tanh(scores / spec.softcap)
    rows = torch.arange(spec.len_q, device=scores.device)[:, None]
    cols = torch.arange(spec.len_k, device=scores.device)[None, :]
    if alibi_slopes is not None:
        distance = (rows + spec.len_k - spec.len_q - cols).abs().to(scores.dtype)
        scores = scores - alibi_slopes.to(scores.dtype)[..., None, None] * distance
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    lo, hi = spec.band()
    if lo is not None:
        scores = scores.masked_fill(cols - rows < lo, float("-inf"))
    if hi is not None:
        scores = scores.masked_fill(cols - rows > hi, float("-inf"))
    return scores


def _softmax_with_lse(scores: torch.Tensor):
    """Softmax that gives 0 (not NaN) on rows where every score is -inf; and the lse."""
    if scores.dtype == torch.float64 or scores.shape[-1] == 0:  # the oracle: its formula and its bits
        shift, lse = 0.0, torch.logsumexp(scores, dim=-1, keepdim=True)
    else:
        # around the row max: exp(s - lse) at a large |s| would carry the rounding of
        # lse (an ulp of |s|: 0.06 at 5e5 in fp32) into every weight. Summed by hand,
        # not by logsumexp, whose checks stop torch.export on a data-dependent batch.
        shift = scores.detach().amax(-1, keepdim=True)
        shift = shift.masked_fill(~torch.isfinite(shift), 0.0)
        total = torch.exp(scores - shift).sum(-1, keepdim=True)
        lse = torch.log(total.masked_fill(total == 0, 1.0)).masked_fill(total == 0, float("-inf"))
    empty_row = torch.isneginf(lse)
    probs = torch.exp(scores - shift - lse.masked_fill(empty_row, 0.0))
    return probs.masked_fill(empty_row, 0.0), (lse + shift).squeeze(-1)


def attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    return_lse=False,
    dropout_mask=None,
    probs_dtype=None,
):
    """softmax(scores) @ value, eagerly; arguments and shapes as `fused_attention`.

    `dropout_mask` (bool, broadcastable to (..., Hq, L, S), True = keep) replaces the
    random draw, so that a test can replay a kernel's dropout exactly (see
    `attn_kernels.dropout_keep_mask`); kept probabilities are scaled by 1 / (1 - p).
    `probs_dtype` rounds to that dtype (and back) what fused kernels round for their
    tensor-core products: the probabilities before the product with value, and in the
    backward the scores' gradient dS before the products dS K and dS^T Q. It is the
    tests' model of a FlashAttention-style computation (tests/accuracy.py).
    Returns out, or (out, lse) when return_lse is True; lse is float32 (float64 for
    float64 inputs, so that the oracle keeps its precision).
    """
    spec = check_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap, alibi_slopes
    )
    q, k, v = (_as_4d(t) for t in expand_to_spec(spec, query, key, value))
    if spec.heads_q != spec.heads_kv:
        v = v.repeat_interleave(spec.heads_q // spec.heads_kv, dim=-3)
    mask = attn_mask if spec.has_mask else None
    probs, lse = _softmax_with_lse(_scores(q, k, mask, alibi_slopes, spec, grad_dtype=probs_dtype))
    if spec.dropout_p == 1.0:  # every weight dropped (SDPA's zeros; 1 / (1 - p) would make them NaN)
        probs = probs * 0.0
    elif spec.dropout_p > 0.0:
        # drawn in the input dtype, as dropout_keep_mask(backend="reference") replays it
        keep = dropout_mask if dropout_mask is not None else torch.rand(
            probs.shape, dtype=spec.dtype, device=probs.device) >= spec.dropout_p
        probs = probs.masked_fill(~keep, 0.0) / (1.0 - spec.dropout_p)
    if probs_dtype is not None:
        probs = probs.to(probs_dtype).to(probs.dtype)
    out = torch.matmul(probs.to(v.dtype), v).reshape(spec.out_shape)
    if return_lse:
        lse_dtype = torch.float64 if lse.dtype == torch.float64 else torch.float32
        return out, lse.reshape(spec.lse_shape).to(lse_dtype)
    return out


def attention_weights(
    query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
):
    """softmax(scores): (..., Hq, L, S) in the input dtype (no dropout)."""
    spec = check_attention(
        query, key, None, attn_mask, 0.0, is_causal, scale, enable_gqa, window_size, softcap, alibi_slopes
    )
    mask = attn_mask if spec.has_mask else None
    q, k = (_as_4d(t) for t in expand_to_spec(spec, query, key))
    probs, _ = _softmax_with_lse(_scores(q, k, mask, alibi_slopes, spec))
    return probs.to(spec.dtype).reshape(spec.weights_shape)


def attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
    dropout_p=0.0, is_causal=False, scale=None, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, return_lse=False, dropout_mask=None,
):
    """Packed sequences, one `attention` call per sequence (causal aligned bottom-right,
    as flash_attn_varlen_func). q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k,
    Hkv, Ev); alibi_slopes (Hq,) or (num_seqs, Hq); dropout_mask, if given, a list
    of per-sequence (Hq, L_i, S_i) keep-masks. Returns out (total_q, Hq, Ev) [, lse
    (Hq, total_q)]."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        qi = q[bounds_q[i]: bounds_q[i + 1]].transpose(0, 1)
        ki = k[bounds_k[i]: bounds_k[i + 1]].transpose(0, 1)
        vi = v[bounds_k[i]: bounds_k[i + 1]].transpose(0, 1)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[i]
        mask = None
        if is_causal:
            with warnings.catch_warnings():  # it warns of NaN rows when L > S; ours are zeros
                warnings.simplefilter("ignore")
                mask = CausalBias(CausalVariant.LOWER_RIGHT, qi.shape[1], ki.shape[1])
        out, lse = attention(
            qi, ki, vi, mask, dropout_p, False, scale, qi.shape[0] != ki.shape[0],
            window_size=window_size, softcap=softcap, alibi_slopes=slopes, return_lse=True,
            dropout_mask=None if dropout_mask is None else dropout_mask[i],
        )
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    out = torch.cat(outs) if outs else v.new_zeros(0, q.shape[1], v.shape[-1])
    if return_lse:
        return out, torch.cat(lses, dim=-1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32)
    return out


def gather_cache(cache: torch.Tensor, b: int, n: int, block_table=None) -> torch.Tensor:
    """The first n cached rows of batch row b: (n, Hkv, D), from a contiguous
    (B, S_max, Hkv, D) cache or a paged (num_blocks, block_size, Hkv, D) one."""
    if block_table is None:
        return cache[b, :n]
    positions = torch.arange(n, device=cache.device)
    block_size = cache.shape[1]
    return cache[block_table[b, positions // block_size].long(), positions % block_size]


def attention_with_kvcache(
    q, k_cache, v_cache, seqlens, *, block_table=None, scale=None, is_causal=True, window_size=(-1, -1),
    softcap=0.0, alibi_slopes=None, return_lse=False,
):
    """Decoding attention over the cache as it stands (new keys already appended):
    q (B, Lq, Hq, E) against the first seqlens[b] keys of each batch row, causal
    aligned bottom-right, GQA implied. Returns out (B, Lq, Hq, Ev) [, lse (B, Hq, Lq)]."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    outs, lses = [], []
    for b, n in enumerate(seqlens.tolist()):
        qb = q[b].transpose(0, 1)
        kb = gather_cache(k_cache, b, n, block_table).transpose(0, 1)
        vb = gather_cache(v_cache, b, n, block_table).transpose(0, 1)
        mask = None
        if is_causal:
            with warnings.catch_warnings():  # it warns of NaN rows when L > S; ours are zeros
                warnings.simplefilter("ignore")
                mask = CausalBias(CausalVariant.LOWER_RIGHT, qb.shape[1], n)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        out, lse = attention(qb, kb, vb, mask, 0.0, False, scale, qb.shape[0] != kb.shape[0],
                             window_size=window_size, softcap=softcap, alibi_slopes=slopes, return_lse=True)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_lse else out
