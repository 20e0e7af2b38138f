"""Decoding against a KV cache (`fused_attention_with_kvcache`): split-KV and paged
caches against a float64 oracle that gathers the cache and builds its masks from first
principles (decode_oracle), the in-place append, ragged lengths, GQA, window / softcap
/ ALiBi, and clear errors on bad input."""

import pytest
import torch
import oracles
from accuracy import assert_within_rule, flash_style
from conftest import DEVICE
from test_attention_fwd import BF16, FP16, FP32

from attn_kernels import fused_attention_with_kvcache, reference

POISON = 1e4  # written past the valid rows: it must never be read nor overwritten


def make_cache(B, s_max, hkv, d, dtype, seqlens, block_size=None):
    """A contiguous cache, and (with block_size) the same contents paged in shuffled blocks."""
    k = torch.randn(B, s_max, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(B, s_max, hkv, d, device=DEVICE, dtype=dtype)
    for b, n in enumerate(seqlens):
        k[b, n:] = POISON
        v[b, n:] = POISON
    if block_size is None:
        return k, v, None
    blocks_per_row = s_max // block_size
    order = torch.randperm(B * blocks_per_row, device=DEVICE)
    table = order.reshape(B, blocks_per_row).to(torch.int32)
    paged_k = torch.empty(B * blocks_per_row, block_size, hkv, d, device=DEVICE, dtype=dtype)
    paged_v = torch.empty_like(paged_k)
    paged_k[order] = k.reshape(B * blocks_per_row, block_size, hkv, d)
    paged_v[order] = v.reshape(B * blocks_per_row, block_size, hkv, d)
    return paged_k, paged_v, table


def decode(q, k, v, seqlens, cache_seqlens=None, **kwargs):
    """The Triton kernel on clones of the caches -> (out, lse, k_cache, v_cache after the call)."""
    if cache_seqlens is None:
        cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    k, v = k.clone(), v.clone()
    out, lse = fused_attention_with_kvcache(q, k, v, cache_seqlens, return_lse=True, backend="triton", **kwargs)
    return out, lse, k, v


def decode_oracle(q, k_cache, v_cache, k_new=None, v_new=None, *, seqlens, block_table=None, is_causal=True,
                  window_size=(-1, -1), alibi_slopes=None, **rest):
    """Decoding from first principles, in q's dtype: batch row b attends to its first
    seqlens[b] cached keys (position p of a paged cache in block block_table[b, p // block_size],
    row p % block_size) followed by k_new[b]; causal bottom-right, window and ALiBi from
    oracles.py. -> out (B, Lq, Hq, Ev), lse (B, Hq, Lq)."""
    outs, lses = [], []
    Lq = q.shape[1]
    for b, n in enumerate(seqlens):
        pos = torch.arange(n, device=q.device)
        if block_table is None:
            kb, vb = k_cache[b, :n], v_cache[b, :n]
        else:
            blocks, rows = block_table[b, pos // k_cache.shape[1]].long(), pos % k_cache.shape[1]
            kb, vb = k_cache[blocks, rows], v_cache[blocks, rows]
        if k_new is not None:
            kb, vb = torch.cat([kb, k_new[b]]), torch.cat([vb, v_new[b]])
        S = kb.shape[0]
        mask = oracles.sliding_window(Lq, S, *window_size, device=q.device)
        if is_causal:
            mask &= oracles.causal_bottom_right(Lq, S, q.device)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            mask = torch.where(mask, oracles.alibi_bias(slopes, Lq, S).to(q.dtype), float("-inf"))
        out, lse = reference.attention(q[b].transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), mask,
                                       enable_gqa=True, return_lse=True, **rest)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def check_decode(q, k, v, seqlens, cache_seqlens=None, **kwargs):
    """The kernel against decode_oracle (on the caches as they were before the call) under
    the accuracy rule. Returns (out, k_cache, v_cache after the call)."""
    out, lse, k_after, v_after = decode(q, k, v, seqlens, cache_seqlens, **kwargs)
    new = [kwargs.pop(name) for name in ("k_new", "v_new") if kwargs.get(name) is not None]
    kwargs.pop("num_splits", None)
    oracle = lambda *xs: decode_oracle(*xs, seqlens=seqlens, **kwargs)  # noqa: E731
    ins = [q, k, v, *new]
    out_r, lse_r = oracle(*(t.double() for t in ins))
    out_f, lse_f, _ = flash_style(oracle, ins, q.dtype)
    assert_within_rule("out", out, out_r, [out_f])
    assert_within_rule("lse", lse, lse_r, [lse_f], torch.float32)
    return out, k_after, v_after


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_contiguous_cache_matches_reference(dtype):
    seqlens = [0, 37, 200, 120]
    k, v, _ = make_cache(4, 200, 2, 64, dtype, seqlens)
    q = torch.randn(4, 1, 8, 64, device=DEVICE, dtype=dtype)
    check_decode(q, k, v, seqlens)


@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_paged_cache_equals_contiguous(block_size):
    seqlens = [5, 256, 130]
    q = torch.randn(3, 1, 4, 32, device=DEVICE)
    k, v, _ = make_cache(3, 256, 2, 32, FP32, seqlens)
    contiguous, *_ = decode(q, k, v, seqlens)
    pk, pv, table = make_cache(3, 256, 2, 32, FP32, seqlens, block_size)
    # same contents: rebuild the paged cache from the contiguous one
    order = table.reshape(-1).long()
    pk[order] = k.reshape(-1, block_size, 2, 32)
    pv[order] = v.reshape(-1, block_size, 2, 32)
    paged, *_ = decode(q, pk, pv, seqlens, block_table=table)
    torch.testing.assert_close(paged, contiguous, atol=1e-6, rtol=0)
    check_decode(q, pk, pv, seqlens, block_table=table)


@pytest.mark.parametrize("paged", [False, True])
def test_append_writes_exactly_the_new_rows(paged):
    seqlens, n_new = [0, 30, 62], 2
    k, v, table = make_cache(3, 64, 2, 16, FP32, seqlens, 16 if paged else None)
    q = torch.randn(3, n_new, 4, 16, device=DEVICE)
    k_new = torch.randn(3, n_new, 2, 16, device=DEVICE)
    v_new = torch.randn(3, n_new, 2, 16, device=DEVICE)
    out, k_after, v_after = check_decode(q, k, v, seqlens, k_new=k_new, v_new=v_new, block_table=table)
    for before, after, new in ((k, k_after, k_new), (v, v_after, v_new)):
        expected = before.clone()
        for b, n in enumerate(seqlens):
            for i in range(n_new):
                pos = n + i
                if table is None:
                    expected[b, pos] = new[b, i]
                else:
                    expected[table[b, pos // 16], pos % 16] = new[b, i]
        assert torch.equal(after, expected)  # the new rows, and nothing else
    assert out.abs().max() < POISON / 10  # no poisoned row was read


@pytest.mark.parametrize("num_splits", [1, 2, 7, 0])
def test_splits_agree(num_splits):
    seqlens = [300, 1, 77]
    k, v, _ = make_cache(3, 300, 1, 32, FP32, seqlens)
    q = torch.randn(3, 1, 4, 32, device=DEVICE)
    out, *_ = decode(q, k, v, seqlens, num_splits=num_splits)
    one, *_ = decode(q, k, v, seqlens, num_splits=1)
    torch.testing.assert_close(out, one, atol=2e-6, rtol=0)
    check_decode(q, k, v, seqlens, num_splits=num_splits)


def test_gqa_32_to_8_with_several_query_tokens():
    seqlens = [150, 40]
    k, v, _ = make_cache(2, 160, 8, 32, FP16, seqlens)
    q = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=FP16)
    check_decode(q, k, v, seqlens)  # causal aligned bottom-right over 3 query rows


@pytest.mark.parametrize(
    "kwargs",
    [dict(window_size=(20, 0)), dict(softcap=2.0), dict(alibi_slopes="alibi"), dict(is_causal=False),
     dict(window_size=(8, 8), is_causal=False, softcap=5.0)],
    ids=["window", "softcap", "alibi", "non-causal", "window-softcap"],
)
def test_variants(kwargs):
    seqlens = [100, 9]
    if kwargs.get("alibi_slopes") == "alibi":
        kwargs["alibi_slopes"] = torch.rand(2, 4, device=DEVICE)
    k, v, _ = make_cache(2, 128, 2, 32, FP32, seqlens)
    q = torch.randn(2, 2, 4, 32, device=DEVICE)
    check_decode(q, k, v, seqlens, num_splits=3, **kwargs)


@pytest.mark.parametrize("window", [(20, 3), (3, 20), (0, 5)], ids=str)
def test_asymmetric_windows_over_several_queries(window):
    # 9 query rows: the right edge of the window matters for all but the last
    seqlens = [120, 40]
    k, v, _ = make_cache(2, 128, 2, 32, FP32, seqlens)
    q = torch.randn(2, 9, 4, 32, device=DEVICE)
    check_decode(q, k, v, seqlens, window_size=window, is_causal=False, num_splits=2)


def test_int_cache_seqlens_and_full_cache():
    # an int cache_seqlens means every row holds that many keys: here the whole cache
    k, v, _ = make_cache(2, 64, 1, 16, FP32, [64, 64])
    q = torch.randn(2, 1, 2, 16, device=DEVICE)
    check_decode(q, k, v, [64, 64], cache_seqlens=64)


def _bad_inputs():
    q = torch.randn(2, 1, 4, 16)
    k = torch.randn(2, 32, 2, 16)
    n = torch.tensor([10, 20], dtype=torch.int32)
    new = torch.randn(2, 1, 2, 16)
    return [
        (dict(q=q, k_cache=k, v_cache=k, cache_seqlens=torch.tensor([10, 32], dtype=torch.int32), k_new=new, v_new=new),
         ValueError, "too few"),
        (dict(q=q, k_cache=torch.randn(4, 16, 2, 16), v_cache=torch.randn(4, 16, 2, 16), cache_seqlens=n,
              block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)), ValueError, "outside"),
        (dict(q=q, k_cache=torch.randn(4, 8, 2, 16), v_cache=torch.randn(4, 8, 2, 16), cache_seqlens=n,
              block_table=torch.zeros(2, 4, dtype=torch.int32)), ValueError, "multiple of 16"),
        (dict(q=torch.randn(2, 1, 3, 16), k_cache=k, v_cache=k, cache_seqlens=n), ValueError, "multiple"),
        (dict(q=q.clone().requires_grad_(), k_cache=k, v_cache=k, cache_seqlens=n), RuntimeError, "forward only"),
        (dict(q=q, k_cache=k, v_cache=k, cache_seqlens=n.long()), TypeError, "int32"),
        (dict(q=q, k_cache=k, v_cache=k, cache_seqlens=n, k_new=new), ValueError, "together"),
        (dict(q=q, k_cache=k, v_cache=k, cache_seqlens=n, num_splits=-1), TypeError, "num_splits"),
    ]


@pytest.mark.parametrize("index", range(8))
def test_bad_input_raises_before_any_kernel(index):
    kwargs, exc, words = _bad_inputs()[index]
    with pytest.raises(exc, match=words):
        fused_attention_with_kvcache(**kwargs)


@pytest.mark.parametrize("paged", [False, True])
def test_generation_example_matches_full_recomputation(paged):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "kvcache_generation.py"
    spec = importlib.util.spec_from_file_location("kvcache_generation", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "6", "--backend", "triton"] + (["--paged"] if paged else []))
    assert result["identical"] and result["tokens"].shape == (3, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_long_cache_bf16_gpu(paged):
    seqlens = [16384, 3000]
    k, v, table = make_cache(2, 16384, 8, 128, BF16, seqlens, 256 if paged else None)
    q = torch.randn(2, 1, 32, 128, device=DEVICE, dtype=BF16)
    check_decode(q, k, v, seqlens, block_table=table)
