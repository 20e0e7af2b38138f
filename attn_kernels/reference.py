"""Eager PyTorch attention: the CPU path and the test oracle.

    scores = (query @ key^T) * scale + mask          (..., Hq, L, S)
    lse    = logsumexp(scores, -1)                    (..., Hq, L)
    probs  = exp(scores - lse)                        rows with no allowed key are 0
    out    = dropout(probs) @ value                   (..., Hq, L, Ev)

Same signature and semantics as `torch.nn.functional.scaled_dot_product_attention`,
computed in the input dtype (float64 gives the oracle; float16 gives "PyTorch's own
error" at that precision). It materialises the L x S matrix: use it for checking and
for CPU tensors, not for long sequences on a GPU.
"""

from __future__ import annotations

import torch

from ._checks import AttentionSpec, check_attention


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1, *t.shape) if t.dim() == 2 else t


def _masked_scores(query, key, attn_mask, spec: AttentionSpec) -> torch.Tensor:
    """scale * q k^T with causal / boolean / additive masking applied (-inf = masked)."""
    if spec.heads_q != spec.heads_kv:
        # GQA: query head h reads key/value head h // (Hq / Hkv)
        key = key.repeat_interleave(spec.heads_q // spec.heads_kv, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * spec.scale
    if spec.is_causal:
        # top-left alignment, as SDPA: query i sees keys 0..i
        allowed = torch.ones(spec.len_q, spec.len_k, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def _softmax_with_lse(scores: torch.Tensor):
    """Softmax that gives 0 (not NaN) on rows where every score is -inf."""
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    empty_row = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty_row, 0.0))
    return probs.masked_fill(empty_row, 0.0), lse.squeeze(-1)


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
    return_lse=False,
    dropout_mask=None,
):
    """softmax(query @ key^T * scale + mask) @ value, eagerly.

    Shapes as `attn_kernels.fused_attention`. `dropout_mask` (bool, broadcastable to
    (..., Hq, L, S), True = keep) replaces the random draw so that a test can replay a
    kernel's dropout exactly; kept probabilities are scaled by 1 / (1 - dropout_p).
    Returns out, or (out, lse) when return_lse is True; lse is float32 (float64 for
    float64 inputs, so that the oracle keeps its precision).
    """
    spec = check_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    q, k, v = _as_4d(query), _as_4d(key), _as_4d(value)
    if spec.heads_q != spec.heads_kv:
        v = v.repeat_interleave(spec.heads_q // spec.heads_kv, dim=-3)
    probs, lse = _softmax_with_lse(_masked_scores(q, k, attn_mask, spec))
    if spec.dropout_p > 0.0:
        keep = dropout_mask if dropout_mask is not None else torch.rand_like(probs) >= spec.dropout_p
        probs = probs.masked_fill(~keep, 0.0) / (1.0 - spec.dropout_p)
    out = torch.matmul(probs, v).reshape(spec.out_shape)
    if return_lse:
        lse_dtype = torch.float64 if lse.dtype == torch.float64 else torch.float32
        return out, lse.reshape(spec.lse_shape).to(lse_dtype)
    return out


def attention_weights(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """softmax(query @ key^T * scale + mask): (..., Hq, L, S) in the input dtype."""
    spec = check_attention(query, key, None, attn_mask, 0.0, is_causal, scale, enable_gqa)
    probs, _ = _softmax_with_lse(_masked_scores(_as_4d(query), _as_4d(key), attn_mask, spec))
    return probs.reshape(spec.weights_shape)
