"""The attention variants as masks built from first principles, for the test oracle.

Query i in 0..L-1 and key j in 0..S-1. FlashAttention's convention puts query i at
key position i + S - L (bottom-right alignment) for sliding windows, ALiBi and
`causal_lower_right`; `is_causal` and `causal_upper_left` put it at position i.
Nothing here reads `attn_kernels` (no `AttentionSpec.band`), so a wrong band, window
or distance in the package cannot be wrong on both sides of a test.
"""

from __future__ import annotations

import torch


def positions(L: int, S: int, device="cpu") -> tuple:
    """i (L, 1) and j (1, S): the query's and the key's index."""
    return torch.arange(L, device=device)[:, None], torch.arange(S, device=device)[None, :]


def causal_top_left(L: int, S: int, device="cpu") -> torch.Tensor:
    """bool (L, S): query i sees keys 0..i (SDPA's is_causal)."""
    i, j = positions(L, S, device)
    return j <= i


def causal_bottom_right(L: int, S: int, device="cpu") -> torch.Tensor:
    """bool (L, S): query i sees keys 0..i + S - L (the last query sees every key)."""
    i, j = positions(L, S, device)
    return j <= i + (S - L)


def sliding_window(L: int, S: int, left: int, right: int, device="cpu") -> torch.Tensor:
    """bool (L, S): keys i + S - L - left .. i + S - L + right; -1 = unbounded on that side."""
    i, j = positions(L, S, device)
    seen = torch.ones(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        seen &= j >= i + (S - L) - left
    if right >= 0:
        seen &= j <= i + (S - L) + right
    return seen


def alibi_bias(slopes: torch.Tensor, L: int, S: int) -> torch.Tensor:
    """float64 (*slopes.shape, L, S): -slope * |i + S - L - j|."""
    i, j = positions(L, S, slopes.device)
    distance = (i + (S - L) - j).abs().double()
    return -slopes.double()[..., None, None] * distance


def causal_bias_mask(bias, device="cpu") -> torch.Tensor:
    """The bool (L, S) mask of a torch.nn.attention.bias.CausalBias, from its variant and sizes."""
    from torch.nn.attention.bias import CausalVariant

    L, S = bias.seq_len_q, bias.seq_len_kv
    if bias.variant == CausalVariant.LOWER_RIGHT:
        return causal_bottom_right(L, S, device)
    return causal_top_left(L, S, device)


class Oracle:
    """The modifiers of one call, rewritten as what they mean: `allowed` (bool,
    broadcastable to the scores, or None) and `bias` (float64 additive, or None), plus
    the keyword arguments that stay as they are (scale, enable_gqa, softcap, dropout_p).
    A float attn_mask of the call is not part of it: each run adds its own copy (see
    `mask`), so that its gradient can be taken in every run."""

    PASSED = ("scale", "enable_gqa", "softcap", "dropout_p")

    def __init__(self, kwargs: dict, query: torch.Tensor, key: torch.Tensor):
        from torch.nn.attention.bias import CausalBias

        L, S, dev = query.shape[-2], key.shape[-2], query.device
        self.rest = {name: kwargs[name] for name in self.PASSED if name in kwargs}
        self.allowed, self.bias, self.has_user_mask = None, None, False
        mask = kwargs.get("attn_mask")
        if isinstance(mask, CausalBias):
            self._allow(causal_bias_mask(mask, dev))
        elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            self._allow(mask)
        elif isinstance(mask, torch.Tensor):
            self.has_user_mask = True
        if kwargs.get("is_causal", False):
            self._allow(causal_top_left(L, S, dev))
        left, right = kwargs.get("window_size", (-1, -1))
        if left >= 0 or right >= 0:
            self._allow(sliding_window(L, S, left, right, dev))
        slopes = kwargs.get("alibi_slopes")
        if slopes is not None:
            bias = alibi_bias(slopes, L, S)
            while bias.dim() > query.dim():  # 2-D inputs: slopes (1,)
                bias = bias[0]
            self.bias = bias

    def _allow(self, seen: torch.Tensor) -> None:
        self.allowed = seen if self.allowed is None else self.allowed & seen

    @property
    def sdpa_expressible(self) -> bool:
        """SDPA takes the call as it stands: no softcap, no dropout, and no float bias of
        ours that the input dtype would round (ALiBi distances)."""
        return self.bias is None and not self.rest.get("softcap") and not self.rest.get("dropout_p")

    def mask(self, dtype: torch.dtype, user=None):
        """attn_mask for a run in `dtype`: bool when it can stay bool, else one additive
        mask, -inf where not allowed. `user`: that run's copy of the call's float mask
        (a leaf that may require grad), added to the rest."""
        if user is None and self.bias is None:
            return self.allowed
        device = (self.bias if self.bias is not None else user).device
        total = self.bias if self.bias is not None else torch.zeros((), dtype=torch.float64, device=device)
        if self.allowed is not None:
            total = torch.where(self.allowed, total, float("-inf"))
        total = total.to(dtype)
        return total if user is None else user + total
