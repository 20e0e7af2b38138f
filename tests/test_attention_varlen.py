"""Packed variable-length batches (`fused_attention_varlen`, pack / unpack): against
the float64 reference per sequence and against per-sequence `fused_attention`."""

import pytest
import torch
import oracles
from accuracy import assert_within_rule, flash_style, loss_of, typical
from conftest import DEVICE
from test_attention_fwd import BF16, FP16, FP32

from attn_kernels import dropout_keep_mask, fused_attention, fused_attention_varlen, pack, reference, unpack
from attn_kernels.triton_ops import _draw_seed  # noqa: F401  (the generator use dropout replays)


def packed_inputs(lengths_q, lengths_k, hq, hkv, e, ev, dtype):
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q = torch.randn(total_q, hq, e, device=DEVICE, dtype=dtype)
    k = torch.randn(total_k, hkv, e, device=DEVICE, dtype=dtype)
    v = torch.randn(total_k, hkv, ev, device=DEVICE, dtype=dtype)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k)


def varlen_oracle(q, k, v, cu_q, cu_k, *, is_causal=False, window_size=(-1, -1), alibi_slopes=None,
                  dropout_mask=None, **rest):
    """Packed attention from first principles: one reference.attention call per sequence,
    its causal (bottom-right) / window / ALiBi masks built by oracles.py. dropout_mask:
    a list of per-sequence (Hq, L_i, S_i) keep-masks. -> out (total_q, Hq, Ev), lse (Hq, total_q)."""
    outs, lses = [], []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        qi, ki, vi = (t[a:b].transpose(0, 1) for t, a, b in ((q, bq[i], bq[i + 1]), (k, bk[i], bk[i + 1]),
                                                             (v, bk[i], bk[i + 1])))
        L, S = qi.shape[1], ki.shape[1]
        mask = oracles.sliding_window(L, S, *window_size, device=q.device)
        if is_causal:
            mask &= oracles.causal_bottom_right(L, S, q.device)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[i]
            mask = torch.where(mask, oracles.alibi_bias(slopes, L, S).to(q.dtype), float("-inf"))
        keep = None if dropout_mask is None else dropout_mask[i]
        out, lse = reference.attention(qi, ki, vi, mask, enable_gqa=True, return_lse=True, dropout_mask=keep, **rest)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=-1)


def check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, lse_grad=True, dropout_mask=None, **kwargs):
    """fused_attention_varlen against varlen_oracle under the accuracy rule: out, lse and
    dq, dk, dv of <out, dO> (+ 0.5 * sum(lse) with lse_grad). The kernel runs first, so a
    dropout test seeds the generator right before this call."""
    lowp = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fused_attention_varlen(*lowp, cu_q, cu_k, max_q, max_k, return_lse=True, backend="triton", **kwargs)
    dout = torch.randn(out.shape, device=DEVICE).to(q.dtype)
    dlse = torch.full(lse.shape, 0.5, device=DEVICE) if lse_grad else None
    grads = torch.autograd.grad(loss_of(out, lse, dout, dlse), lowp)
    oracle = lambda *xs: varlen_oracle(*xs, cu_q, cu_k, dropout_mask=dropout_mask, **kwargs)  # noqa: E731
    ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_r, lse_r = oracle(*ref_ins)
    grads_r = torch.autograd.grad(loss_of(out_r, lse_r, dout, dlse), ref_ins)
    out_f, lse_f, grads_f = flash_style(oracle, lowp, q.dtype, dout, dlse, rowsum=lambda x: x.sum(-1).transpose(0, 1))
    assert_within_rule("out", out.detach(), out_r.detach(), [out_f])
    assert_within_rule("lse", lse.detach(), lse_r.detach(), [lse_f], torch.float32)
    for name, a, r, f in zip(("dq", "dk", "dv"), grads, grads_r, grads_f):
        assert_within_rule(name, a, r, [f], magnitude=typical(out_r))


@pytest.mark.parametrize(
    "lengths_q,lengths_k,hq,hkv,causal,dtype",
    [
        ([5, 17, 1, 64], [9, 17, 30, 64], 4, 2, True, FP32),
        ([100, 3, 0, 40], [50, 3, 7, 129], 2, 2, False, FP16),
        ([33, 70], [33, 20], 4, 1, True, BF16),  # L > S: bottom-right causal leaves rows empty
    ],
)
def test_varlen_matches_reference(lengths_q, lengths_k, hq, hkv, causal, dtype):
    check_varlen(*packed_inputs(lengths_q, lengths_k, hq, hkv, 32, 24, dtype), is_causal=causal)


def test_varlen_with_window_softcap_alibi():
    inputs = packed_inputs([20, 64, 7], [30, 64, 40], 4, 2, 16, 16, FP32)
    check_varlen(*inputs, is_causal=True, window_size=(12, 0), softcap=4.0, alibi_slopes=torch.rand(3, 4, device=DEVICE))


def test_varlen_equals_per_sequence_calls():
    lengths_q, lengths_k = [12, 40, 1], [12, 55, 9]
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs(lengths_q, lengths_k, 4, 2, 32, 32, FP32)
    out = fused_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True, backend="triton")
    for i in range(3):
        sl_q, sl_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        from torch.nn.attention.bias import causal_lower_right

        one = fused_attention(q[sl_q].transpose(0, 1), k[sl_k].transpose(0, 1), v[sl_k].transpose(0, 1),
                              attn_mask=causal_lower_right(lengths_q[i], lengths_k[i]), enable_gqa=True,
                              backend="triton")
        torch.testing.assert_close(out[sl_q], one.transpose(0, 1), atol=1e-6, rtol=0)


def test_varlen_dropout_replays_with_the_padded_keep_mask():
    lengths = [20, 7, 33]
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs(lengths, lengths, 2, 2, 16, 16, FP32)
    torch.manual_seed(5)
    out = fused_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.25, backend="triton")
    # the packed kernels draw per (sequence, head, i, j) as a padded (B, H, max_q, max_k) call would
    torch.manual_seed(5)
    keep = dropout_keep_mask(torch.empty(3, 2, max_q, 16, device=DEVICE), torch.empty(3, 2, max_k, 16, device=DEVICE),
                             0.25, backend="triton")
    masks = [keep[i, :, :n, :n] for i, n in enumerate(lengths)]
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.25, dropout_mask=masks)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_pack_unpack_round_trip():
    x = torch.randn(3, 10, 2, 4)
    packed, cu, max_len = pack(x, [4, 0, 10])
    assert packed.shape == (14, 2, 4) and cu.tolist() == [0, 4, 4, 14] and max_len == 10
    back = unpack(packed, cu, 10)
    assert torch.equal(back[0, :4], x[0, :4]) and torch.equal(back[2], x[2])
    assert torch.equal(back[1], torch.zeros_like(back[1])) and torch.equal(back[0, 4:], torch.zeros_like(back[0, 4:]))


def test_padded_batch_through_pack_equals_key_padding_mask():
    B, L, H, D = 3, 20, 2, 16
    lengths = torch.tensor([20, 5, 13])
    x = torch.randn(B, L, H, D, device=DEVICE)
    packed, cu, max_len = pack(x, lengths)
    out = unpack(fused_attention_varlen(packed, packed, packed, cu, cu, max_len, max_len, backend="triton"), cu, L)
    pad = torch.arange(L)[None, :] < lengths[:, None]
    masked = fused_attention(*(x.transpose(1, 2),) * 3, attn_mask=pad[:, None, None, :].to(DEVICE), backend="triton")
    valid = pad.to(DEVICE)
    torch.testing.assert_close(out[valid], masked.transpose(1, 2)[valid], atol=1e-6, rtol=0)


BAD = [
    (lambda q, k, v, cu: (q[0], k, v, cu, cu, 8, 8), ValueError, "packed"),
    (lambda q, k, v, cu: (q, k, v, cu.long(), cu, 8, 8), TypeError, "int32"),
    (lambda q, k, v, cu: (q, k, v, cu + 1, cu, 8, 8), ValueError, "start at 0"),
    (lambda q, k, v, cu: (q, k, v, cu, cu, 3, 8), ValueError, "max_seqlen"),
    (lambda q, k, v, cu: (q, k, v, cu, cu[:2], 8, 8), ValueError, "cu_seqlens_k"),
    (lambda q, k, v, cu: (q, k.repeat(1, 2, 1)[:, :3], v.repeat(1, 2, 1)[:, :3], cu, cu, 8, 8), ValueError, "multiple"),
]


@pytest.mark.parametrize("make,exc,words", BAD, ids=[w for _, _, w in BAD])
def test_bad_varlen_input(make, exc, words):
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    with pytest.raises(exc, match=words):
        fused_attention_varlen(*make(q, k, v, cu))


@pytest.mark.gpu
def test_varlen_long_sequences_gpu():
    check_varlen(*packed_inputs([1000, 3000, 17, 2048], [1000, 3000, 40, 4096], 16, 4, 128, 128, BF16), is_causal=True)
