"""Bad input that has a `raise` in attn_kernels/_checks.py and no test elsewhere:
each must raise the documented exception class, naming the argument, before any
kernel runs (the calls ask for backend="triton")."""

import pytest
import torch

from attn_kernels import dropout_keep_mask, fused_attention, fused_attention_varlen, fused_attention_with_kvcache

META = torch.device("meta")


def _qkv():
    return torch.randn(2, 4, 8, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 8)


FUSED = [
    ("dropout_p str", dict(dropout_p="0.1"), TypeError, "dropout_p"),
    ("dropout_p bool", dict(dropout_p=True), TypeError, "dropout_p"),
    ("softcap str", dict(softcap="big"), TypeError, "softcap"),
    ("softcap inf", dict(softcap=float("inf")), ValueError, "softcap"),
    ("alibi list", dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes"),
    ("alibi device", dict(alibi_slopes=torch.ones(4, device=META)), ValueError, "alibi_slopes is on meta"),
    ("alibi batch shape", dict(alibi_slopes=torch.ones(3, 4)), ValueError, "alibi_slopes must have shape"),
    ("mask list", dict(attn_mask=[[True] * 6] * 8), TypeError, "attn_mask"),
    ("mask device", dict(attn_mask=torch.ones(8, 6, dtype=torch.bool, device=META)), ValueError, "attn_mask is on meta"),
    ("mask dtype", dict(attn_mask=torch.zeros(8, 6, dtype=torch.float64)), TypeError, "attn_mask.dtype"),
    ("window float", dict(window_size=(1.5, 2)), TypeError, "window_size"),
    ("scale bool", dict(scale=True), TypeError, "scale"),
    ("enable_gqa str", dict(enable_gqa="yes"), TypeError, "enable_gqa"),
]


@pytest.mark.parametrize("kwargs,exc,words", [c[1:] for c in FUSED], ids=[c[0] for c in FUSED])
def test_fused_attention_bad_arguments(kwargs, exc, words):
    q, k, v = _qkv()
    kwargs = dict(dict(enable_gqa=True), **kwargs)
    with pytest.raises(exc, match=words):
        fused_attention(q, k, v, backend="triton", **kwargs)


def test_value_on_another_device():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="value is on meta"):
        fused_attention(q, k, v.to(META), enable_gqa=True, backend="triton")


def test_dropout_keep_mask_needs_p():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match="dropout_p must be > 0"):
        dropout_keep_mask(q, k, 0.0, enable_gqa=True, backend="triton")


def _packed():
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    return q, k, v, torch.tensor([0, 4, 12], dtype=torch.int32)


VARLEN = [
    ("max_seqlen float", lambda q, k, v, cu: (q, k, v, cu, cu, 8.0, 8), {}, TypeError, "max_seqlen"),
    ("max_seqlen negative", lambda q, k, v, cu: (q, k, v, cu, cu, 8, -1), {}, TypeError, "max_seqlen"),
    ("count mismatch", lambda q, k, v, cu: (q, k, v, torch.tensor([0, 4, 8, 12], dtype=torch.int32), cu, 8, 8), {},
     ValueError, "same number of sequences"),
    ("cu device", lambda q, k, v, cu: (q, k, v, cu.to(META), cu, 8, 8), {}, ValueError, "cu_seqlens_q is on meta"),
    ("k v heads", lambda q, k, v, cu: (q, k, v[:, :1], cu, cu, 8, 8), {}, ValueError, "same number of heads"),
    ("alibi per sequence", lambda q, k, v, cu: (q, k, v, cu, cu, 8, 8), dict(alibi_slopes=torch.ones(3, 4)),
     ValueError, "alibi_slopes"),
    ("dropout_p str", lambda q, k, v, cu: (q, k, v, cu, cu, 8, 8), dict(dropout_p="0.1"), TypeError, "dropout_p"),
]


@pytest.mark.parametrize("make,kwargs,exc,words", [c[1:] for c in VARLEN], ids=[c[0] for c in VARLEN])
def test_varlen_bad_arguments(make, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        fused_attention_varlen(*make(*_packed()), backend="triton", **kwargs)


def _cache_call(**changes):
    call = dict(q=torch.randn(2, 1, 4, 16), k_cache=torch.randn(2, 32, 2, 16), v_cache=torch.randn(2, 32, 2, 8),
                cache_seqlens=torch.tensor([10, 20], dtype=torch.int32))
    call.update(changes)
    return call


NEW = torch.randn(2, 1, 2, 16)
KVCACHE = [
    ("k_cache 3-D", dict(k_cache=torch.randn(2, 32, 16)), ValueError, "k_cache must be 4-D"),
    ("k_cache dtype", dict(k_cache=torch.randn(2, 32, 2, 16, dtype=torch.float16)), TypeError, "k_cache must have q's dtype"),
    ("v_cache shape", dict(v_cache=torch.randn(2, 31, 2, 8)), ValueError, "v_cache must have shape"),
    ("k_cache head dim", dict(k_cache=torch.randn(2, 32, 2, 12)), ValueError, "k_cache head dim"),
    ("k_cache batch", dict(k_cache=torch.randn(3, 32, 2, 16), v_cache=torch.randn(3, 32, 2, 8)), ValueError,
     "k_cache batch"),
    ("block_table dtype", dict(k_cache=torch.randn(4, 16, 2, 16), v_cache=torch.randn(4, 16, 2, 8),
                               block_table=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "block_table"),
    ("block_table rows", dict(k_cache=torch.randn(4, 16, 2, 16), v_cache=torch.randn(4, 16, 2, 8),
                              block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "block_table must have 2 rows"),
    ("cache_seqlens shape", dict(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError,
     "cache_seqlens must have shape"),
    ("cache_seqlens negative", dict(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32)), ValueError, "too few"),
    ("k_new shape", dict(k_new=torch.randn(2, 1, 3, 16), v_new=torch.randn(2, 1, 3, 8)), ValueError, "k_new must have shape"),
    ("k_new dtype", dict(k_new=NEW.half(), v_new=torch.randn(2, 1, 2, 8).half()), TypeError, "k_new"),
    ("new token counts", dict(k_new=NEW, v_new=torch.randn(2, 2, 2, 8)), ValueError, "same number of new tokens"),
    ("alibi batch", dict(alibi_slopes=torch.ones(3, 4)), ValueError, "alibi_slopes"),
    ("softcap negative", dict(softcap=-1.0), ValueError, "softcap"),
]


@pytest.mark.parametrize("changes,exc,words", [c[1:] for c in KVCACHE], ids=[c[0] for c in KVCACHE])
def test_kvcache_bad_arguments(changes, exc, words):
    call = _cache_call(**changes)
    before = call["k_cache"].clone()
    with pytest.raises(exc, match=words):
        fused_attention_with_kvcache(**call, backend="triton")
    assert torch.equal(call["k_cache"], before)  # refused before the append
