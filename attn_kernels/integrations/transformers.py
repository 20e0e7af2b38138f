"""Hugging Face transformers backend: attn_implementation="attn_kernels".

    import attn_kernels.integrations.transformers as ak_hf
    ak_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attn_kernels")

`register()` adds `attention_forward` to transformers' `AttentionInterface` and
SDPA's mask builder to its `AttentionMaskInterface` under the same name, so models
hand us what they hand SDPA: a bool mask (B, 1, L, S), True = attend, or None when
`is_causal` (or nothing) says it all. This module imports transformers only inside
`register()`; `import attn_kernels` never does.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..api import attention_weights, fused_attention

NAME = "attn_kernels"


def _position_bias_mask(position_bias, attention_mask, is_causal: bool, len_q: int, len_k: int, dtype):
    """An additive float mask holding a learned bias (T5-style) where attention is allowed."""
    bias = position_bias.to(dtype)
    if attention_mask is None and is_causal:
        attention_mask = torch.ones(len_q, len_k, dtype=torch.bool, device=bias.device).tril()
    if attention_mask is None:
        return bias
    if attention_mask.dtype == torch.bool:
        return bias.masked_fill(~attention_mask, float("-inf"))
    return bias + attention_mask.to(dtype)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """transformers' attention-function signature, run by `fused_attention`.

    query (B, Hq, L, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv), Hq a multiple of
    Hkv (grouped-query attention without repeating key/value). attention_mask: bool
    (True = attend) or additive float, broadcastable to (B, Hq, L, S), or None.
    Returns (attn_output (B, L, Hq, Dv), attn_weights (B, Hq, L, S) when the caller
    asks for output_attentions, else None).
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"attn_implementation='{NAME}' does not support attention sinks (`s_aux`); use 'eager'")
    softcap = float(kwargs.get("softcap") or 0.0)  # Gemma-2 style logit capping, in the kernel
    len_q, len_k = query.shape[2], key.shape[2]

    # as transformers' SDPA path: the module's own flag unless told, and never for one query token
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal) and attention_mask is None and len_q > 1

    if attention_mask is not None:
        attention_mask = attention_mask[..., :len_k]  # a mask built for a longer (static) cache
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
    elif is_causal and len_k > len_q:
        # prefill of an empty static cache: the keys past the queries are unused slots
        key, value, len_k = key[:, :, :len_q], value[:, :, :len_q], len_q
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        attention_mask = _position_bias_mask(
            position_bias[..., :len_k], attention_mask, is_causal, len_q, len_k, query.dtype
        )
        is_causal = False

    enable_gqa = query.shape[1] != key.shape[1]
    out = fused_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=float(dropout) if module.training else 0.0,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=enable_gqa,
        softcap=softcap,
    )
    weights = None
    if kwargs.get("output_attentions", False):
        weights = attention_weights(
            query, key, attn_mask=attention_mask, is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa,
            softcap=softcap,
        )
    return out.transpose(1, 2).contiguous(), weights


def register(name: str = NAME) -> str:
    """Make `attn_implementation=name` ("attn_kernels") available to every transformers
    model; idempotent. Returns the name."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        raise ImportError(
            "attn_kernels.integrations.transformers needs transformers >= 4.50: "
            "pip install 'attn_kernels[transformers]'"
        ) from err
    AttentionInterface.register(name, attention_forward)
    # without a mask function of its own, transformers would hand a custom backend no mask at all
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
