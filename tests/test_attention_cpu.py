"""The CPU backend (attn_kernels/cpu.py): both of its implementations against the
float64 reference, forward and gradients, with the suite's accuracy rule.

"kernel" runs calls as the backend chooses (torch's fused CPU kernel wherever it
covers the call, and the test checks that it did); "blocked" forces the blocked
online-softmax path, with tiles shrunk so that even small inputs span many of them
(band edges, skipped tiles, partial tiles). Plus: the choice itself, dropout replayed
from `dropout_keep_mask`, varlen, KV-cache decoding, attention_weights, empty rows and
sizes, float64, and the memory of the blocked path at L = S = 2048 (no L x S buffer).
"""

import math

import pytest
import torch
from accuracy import assert_within_rule, check_against_reference, check_weights, flash_style, loss_of
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from attn_kernels import (
    attention_weights, available_backends, cpu, cpu_tiles, dropout_keep_mask, fused_attention,
    fused_attention_varlen, fused_attention_with_kvcache, reference,
)

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SMALL_TILE = 24576  # scores per tile in the tests: L, S ~ 100 span a few tiles each way (8 heads: 48 x 64)


def attend(*args, **kwargs):
    return fused_attention(*args, backend="cpu", **kwargs)


@pytest.fixture(params=["kernel", "blocked"])
def path(request, monkeypatch):
    """Which implementation runs; records the backend's choices in path.used."""
    choose = cpu.torch_kernel_covers

    class Path:
        name = request.param
        used = []

    def spy(*args):
        chosen = choose(*args) and Path.name == "kernel"
        Path.used.append(chosen)
        return chosen

    monkeypatch.setattr(cpu, "torch_kernel_covers", spy)
    if Path.name == "blocked":
        monkeypatch.setattr(cpu_tiles, "TILE_ELEMS", SMALL_TILE)
    return Path


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(cpu_tiles, "TILE_ELEMS", SMALL_TILE)


def make_qkv(batch, hq, hkv, L, S, E, Ev, dtype, magnitude=1.0):
    q = torch.randn(*batch, hq, L, E, dtype=dtype) * magnitude
    k = torch.randn(*batch, hkv, S, E, dtype=dtype) * magnitude
    v = torch.randn(*batch, hkv, S, Ev, dtype=dtype)
    return q, k, v


# (L, S, E, Ev, Hq, Hkv, causal, dtype): sizes 1 / 17 / 100 / 129, L != S, odd head dims, GQA
CASES = [
    (1, 17, 16, 16, 2, 2, False, FP32),
    (17, 1, 40, 40, 2, 2, True, FP16),
    (17, 100, 24, 24, 4, 2, True, FP32),
    (100, 129, 80, 80, 2, 1, False, BF16),
    (129, 100, 40, 40, 4, 1, True, FP32),
    (129, 17, 48, 48, 2, 2, False, FP16),
    (100, 100, 7, 7, 2, 2, True, BF16),
    (64, 129, 80, 40, 4, 2, True, FP32),  # Ev != E: the blocked path in both
    (33, 70, 200, 136, 2, 1, False, BF16),
]


@pytest.mark.parametrize("L,S,E,Ev,Hq,Hkv,causal,dtype", CASES)
def test_matches_reference(path, L, S, E, Ev, Hq, Hkv, causal, dtype):
    q, k, v = make_qkv((2,), Hq, Hkv, L, S, E, Ev, dtype)
    kw = dict(is_causal=causal, enable_gqa=Hq != Hkv)
    check_against_reference(attend, q, k, v, grad=True, **kw)
    check_against_reference(attend, q, k, v, grad=False, return_lse=True, **kw)
    assert path.used[0] == (path.name == "kernel" and E == Ev)  # the first call, without the lse
    if path.name == "blocked":  # the lse's gradient too (always the blocked path)
        check_against_reference(attend, q, k, v, grad=True, return_lse=True, **kw)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_large_scores(path, dtype):
    # scale 1.0 and inputs of variance 12: scores in the hundreds
    q, k, v = make_qkv((2,), 2, 2, 100, 129, 16, 16, dtype, magnitude=math.sqrt(12.0))
    check_against_reference(attend, q, k, v, scale=1.0, is_causal=True)
    check_against_reference(attend, q, k, v, grad=False, scale=1.0, return_lse=True)


def _layouts(dtype):
    """(q, k, v) with the same values in other layouts: (B, L, H, D) transposed, strided
    rows, and a last dim that is not contiguous (which torch's kernel reads wrongly as is)."""
    base = make_qkv((2,), 4, 2, 65, 90, 24, 24, dtype)
    yield [t.transpose(1, 2).contiguous().transpose(1, 2) for t in base]
    yield [torch.repeat_interleave(t, 2, dim=-2)[..., ::2, :] for t in base]
    yield [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in base]


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_non_contiguous_inputs(path, dtype):
    for q, k, v in _layouts(dtype):
        assert not q.is_contiguous()
        check_against_reference(attend, q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("rank", [2, 3, 5])
def test_other_ranks(path, rank):
    batch = {2: (), 3: (), 5: (2, 3)}[rank]
    heads = 1 if rank == 2 else 2
    q, k, v = make_qkv(batch, heads, heads, 17, 33, 8, 8, FP32)
    if rank == 2:
        q, k, v = q[0], k[0], v[0]
    check_against_reference(attend, q, k, v, is_causal=True)


MASK_SHAPES = [(2, 1, 1, 129), (100, 129), (1, 4, 100, 129), (2, 4, 100, 1), (129,)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_bool_mask_with_empty_rows(path, shape):
    q, k, v = make_qkv((2,), 4, 2, 100, 129, 16, 16, FP32)
    mask = torch.rand(shape) > 0.3
    if len(shape) > 1 and shape[-2] == 100:
        mask[..., 7, :] = False  # a fully masked row
    check_against_reference(attend, q, k, v, attn_mask=mask, enable_gqa=True, return_lse=True, grad=False)
    check_against_reference(attend, q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_float_mask_and_its_gradient(path, shape):
    q, k, v = make_qkv((2,), 4, 2, 100, 129, 16, 16, FP32)
    bias = torch.randn(shape)
    check_against_reference(attend, q, k, v, attn_mask=bias, enable_gqa=True)  # no mask grad: the kernel
    check_against_reference(attend, q, k, v, attn_mask=bias.requires_grad_(), enable_gqa=True)  # blocked


def test_mask_with_causal(path):
    q, k, v = make_qkv((2,), 2, 2, 40, 40, 16, 16, BF16)
    mask = torch.rand(40, 40) > 0.2
    check_against_reference(attend, q, k, v, attn_mask=mask, is_causal=True)


def test_float_mask_rows_of_minus_inf(path):
    """A float mask that is -inf on a whole row: output 0, lse -inf, zero gradients
    (the float64 reference gives NaN gradients there, so this one is checked directly)."""
    q, k, v = (t.requires_grad_() for t in make_qkv((1,), 2, 2, 20, 30, 8, 8, FP32))
    bias = torch.randn(20, 30)
    bias[3] = float("-inf")
    out, lse = attend(q, k, v, attn_mask=bias, return_lse=True)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.isneginf(lse[:, :, 3]).all() and torch.isfinite(lse[:, :, :3]).all()
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and not dq[:, :, 3].any()


# the features torch's kernel lacks: always the blocked path
VARIANTS = [
    dict(window_size=(10, 3)),
    dict(window_size=(0, 0)),
    dict(window_size=(-1, 5), is_causal=True),
    dict(softcap=2.0),
    dict(softcap=30.0, is_causal=True, scale=1.0),
    dict(alibi_slopes="heads"),
    dict(alibi_slopes="batch", is_causal=True),
    dict(window_size=(20, 0), softcap=5.0, alibi_slopes="heads"),
    dict(attn_mask="lower_right"),
    dict(attn_mask="upper_left"),
]


def _variant(kw, B, Hq, L, S):
    kw = dict(kw)
    if kw.get("alibi_slopes") == "heads":
        kw["alibi_slopes"] = torch.rand(Hq)
    elif kw.get("alibi_slopes") == "batch":
        kw["alibi_slopes"] = torch.rand(B, Hq)
    if kw.get("attn_mask") == "lower_right":
        kw["attn_mask"] = causal_lower_right(L, S)
    elif kw.get("attn_mask") == "upper_left":
        kw["attn_mask"] = causal_upper_left(L, S)
    return kw


@pytest.mark.filterwarnings("ignore:Lower right causal bias")
@pytest.mark.parametrize("kw", VARIANTS, ids=str)
@pytest.mark.parametrize("L,S,dtype", [(100, 129, FP32), (129, 17, BF16), (17, 100, FP16)])
def test_variants(small_tiles, kw, L, S, dtype):
    q, k, v = make_qkv((2,), 4, 2, L, S, 24, 24, dtype)
    kw = _variant(kw, 2, 4, L, S)
    # rows left empty (L > S, bottom-right band) under ALiBi: the oracle's gradients are NaN there
    grad = not ("alibi_slopes" in kw and L > S and ("window_size" in kw or kw.get("is_causal")))
    check_against_reference(attend, q, k, v, grad=grad, enable_gqa=True, return_lse=True, **kw)
    if not grad:
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(attend(*ins, enable_gqa=True, **kw).sum(), ins))


def test_variant_with_float_mask_gradient(small_tiles):
    q, k, v = make_qkv((2,), 4, 2, 100, 129, 24, 24, FP32)
    bias = torch.randn(2, 1, 100, 129, requires_grad=True)
    check_against_reference(attend, q, k, v, attn_mask=bias, enable_gqa=True, window_size=(30, 30), softcap=3.0,
                            alibi_slopes=torch.rand(4), return_lse=True)


def test_variants_on_strided_inputs(small_tiles):
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv((2,), 4, 2, 100, 129, 24, 24, FP16))
    check_against_reference(attend, q, k, v, enable_gqa=True, window_size=(15, 15), alibi_slopes=torch.rand(4))


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(window_size=(7, 2), softcap=4.0)], ids=str)
def test_float64_is_exact(path, kw):
    """float64 runs in float64 end to end (lse float64 too): equal to the reference to ~1e-13."""
    q, k, v = (t.requires_grad_() for t in make_qkv((2,), 4, 2, 100, 129, 24, 24, FP64))
    dout = torch.randn(2, 4, 100, 24, dtype=FP64)
    results = []
    for run in (attend, reference.attention):
        out, lse = run(q, k, v, enable_gqa=True, return_lse=True, **kw)
        grads = torch.autograd.grad(loss_of(out, lse, dout, torch.full_like(lse, 0.5)), (q, k, v))
        results.append((out, lse, *grads))
    assert results[0][1].dtype == FP64
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("B,L,S", [(2, 0, 17), (2, 17, 0), (2, 0, 0), (0, 17, 17)])
def test_empty_sizes(path, B, L, S):
    q, k, v = (t.requires_grad_() for t in make_qkv((B,), 2, 2, L, S, 8, 8, FP32))
    out, lse = attend(q, k, v, return_lse=True)
    assert out.shape == (B, 2, L, 8) and not out.any() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


# ---- which implementation runs --------------------------------------------------------
def _spec_covered(**kw):
    from attn_kernels._checks import check_attention

    q, k, v = make_qkv((2,), 4, kw.pop("hkv", 4), kw.pop("L", 8), kw.pop("S", 8), 8, kw.pop("ev", 8), FP32)
    return_lse = kw.pop("return_lse", False)
    grad = kw.pop("grad", False)
    if grad:
        q.requires_grad_()
    mask = kw.get("attn_mask")
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "window_size", "softcap", "alibi_slopes")
    defaults = (None, 0.0, False, None, False, (-1, -1), 0.0, None)
    spec = check_attention(q, k, v, *(kw.get(n, d) for n, d in zip(names, defaults)))
    return cpu.torch_kernel_covers(spec, mask, return_lse, q, k, v)


COVERAGE = {  # call -> whether torch's kernel takes it; masks built lazily (stable test ids)
    "plain": (lambda: dict(), True),
    "causal-gqa": (lambda: dict(is_causal=True, hkv=2, enable_gqa=True), True),
    "bool-mask": (lambda: dict(attn_mask=torch.rand(8, 8) > 0.5), True),
    "float-mask": (lambda: dict(attn_mask=torch.randn(8, 8)), True),
    "lse": (lambda: dict(return_lse=True), True),
    "lse-gradient": (lambda: dict(return_lse=True, grad=True), False),
    "mask-gradient": (lambda: dict(attn_mask=torch.randn(8, 8, requires_grad=True)), False),
    "dropout": (lambda: dict(dropout_p=0.1), False),
    "window": (lambda: dict(window_size=(2, 2)), False),
    "softcap": (lambda: dict(softcap=1.0), False),
    "alibi": (lambda: dict(alibi_slopes=torch.rand(4)), False),
    "lower-right-square": (lambda: dict(attn_mask=causal_lower_right(8, 8)), True),  # = top-left when L == S
    "lower-right": (lambda: dict(attn_mask=causal_lower_right(6, 8), L=6), False),
    "ev-not-e": (lambda: dict(ev=5), False),
    "empty-keys": (lambda: dict(S=0), False),  # torch's kernel crashes (SIGFPE) on empty lengths
}


@pytest.mark.parametrize("name", COVERAGE)
def test_the_torch_kernel_runs_exactly_where_it_covers_the_call(name):
    make, covered = COVERAGE[name]
    assert _spec_covered(**make()) == covered


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "fused_attention", lambda *a: calls.append(1) or (a[0] * 0, None))
    q, k, v = make_qkv((1,), 2, 2, 4, 4, 8, 8, FP32)
    fused_attention(q, k, v)
    assert calls == [1]
    assert available_backends()["cpu"].available


def test_backend_cpu_refuses_other_devices():
    q = torch.empty(1, 2, 4, 8, device="meta")
    with pytest.raises(ValueError, match="backend='cpu' takes CPU tensors"):
        fused_attention(q, q, q, backend="cpu")


def test_reference_stays_the_materialising_oracle(monkeypatch):
    monkeypatch.setattr(cpu, "fused_attention", lambda *a: pytest.fail("backend='reference' ran the cpu backend"))
    q, k, v = make_qkv((1,), 2, 2, 4, 4, 8, 8, FP64)
    torch.testing.assert_close(fused_attention(q, k, v, backend="reference"), reference.attention(q, k, v))


def test_backward_is_bit_reproducible(small_tiles):
    q, k, v = (t.requires_grad_() for t in make_qkv((2,), 4, 2, 100, 129, 24, 24, FP32))
    bias = torch.randn(100, 129, requires_grad=True)
    runs = [torch.autograd.grad(attend(q, k, v, attn_mask=bias, softcap=3.0, enable_gqa=True).sum(), (q, k, v, bias))
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---- dropout --------------------------------------------------------------------------
@pytest.mark.parametrize("causal,gqa,dtype", [(False, False, FP32), (True, True, FP32), (True, True, BF16)])
def test_dropout_keep_mask_replays_forward_and_backward(small_tiles, causal, gqa, dtype):
    q, k, v = make_qkv((2,), 4, 2 if gqa else 4, 65, 90, 32, 24, dtype)
    torch.manual_seed(7)
    keep = dropout_keep_mask(q, k, 0.2, enable_gqa=gqa)  # backend "auto" = cpu
    torch.manual_seed(7)
    check_against_reference(attend, q, k, v, dropout_mask=keep, dropout_p=0.2, is_causal=causal, enable_gqa=gqa,
                            window_size=(40, 40), return_lse=True)


def test_dropout_draws_from_torch_generator():
    q, k, v = make_qkv((2,), 4, 4, 50, 70, 16, 16, FP32)

    def run(seed):
        torch.manual_seed(seed)
        return attend(q, k, v, dropout_p=0.3)

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_fraction_and_independence(p):
    q, k = torch.empty(2, 4, 128, 8), torch.empty(2, 4, 256, 8)
    keep = dropout_keep_mask(q, k, p, backend="cpu").float()
    assert keep.shape == (2, 4, 128, 256)
    assert abs((1 - keep.mean().item()) - p) < 0.01
    centred = keep - keep.mean()
    var = centred.square().mean()
    for a, b in ((centred[..., 1:, :], centred[..., :-1, :]), (centred[..., 1:], centred[..., :-1]),
                 (centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1])):
        assert abs((a * b).mean() / var) < 0.02  # neighbouring rows, keys, heads, batches uncorrelated


# ---- varlen, KV cache, attention_weights ------------------------------------------------
def _packed(lengths_q, lengths_k, hq, hkv, e, ev, dtype):
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    q = torch.randn(sum(lengths_q), hq, e, dtype=dtype)
    k, v = torch.randn(sum(lengths_k), hkv, e, dtype=dtype), torch.randn(sum(lengths_k), hkv, ev, dtype=dtype)
    return q, k, v, cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(), dict(is_causal=True, window_size=(12, 0), softcap=4.0,
                                                                     alibi_slopes="seqs")], ids=str)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_varlen_matches_reference(small_tiles, kw, dtype):
    q, k, v, cu_q, cu_k, max_q, max_k = _packed([20, 64, 1, 33], [30, 64, 9, 17], 4, 2, 16, 24, dtype)
    kw = dict(kw)
    if kw.get("alibi_slopes") == "seqs":
        kw["alibi_slopes"] = torch.rand(4, 4)
    ins = [t.requires_grad_() for t in (q, k, v)]
    out, lse = fused_attention_varlen(*ins, cu_q, cu_k, max_q, max_k, return_lse=True, backend="cpu", **kw)
    dout, dlse = torch.randn_like(out), torch.full_like(lse, 0.5)
    grads = torch.autograd.grad(loss_of(out, lse, dout, dlse), ins)

    def run(q_, k_, v_):
        return reference.attention_varlen(q_, k_, v_, cu_q, cu_k, max_q, max_k, return_lse=True, **kw)

    refs = [t.detach().double().requires_grad_() for t in ins]
    out_r, lse_r = run(*refs)
    grads_r = torch.autograd.grad(loss_of(out_r, lse_r, dout, dlse), refs)
    out_f, lse_f, grads_f = flash_style(run, ins, dtype, dout, dlse, rowsum=lambda e: e.sum(-1).transpose(0, 1))
    assert_within_rule("out", out, out_r, [out_f])
    assert_within_rule("lse", lse, lse_r, [lse_f], FP32)
    for name, a, r, f in zip("qkv", grads, grads_r, grads_f):
        assert_within_rule("d" + name, a, r, [f])


def test_varlen_dropout_replays_the_padded_keep_mask(small_tiles):
    lengths = [20, 7, 33]
    q, k, v, cu_q, cu_k, max_q, max_k = _packed(lengths, lengths, 2, 2, 16, 16, FP32)
    torch.manual_seed(5)
    out = fused_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.25, backend="cpu")
    torch.manual_seed(5)
    keep = dropout_keep_mask(torch.empty(3, 2, max_q, 16), torch.empty(3, 2, max_k, 16), 0.25, backend="cpu")
    masks = [keep[i, :, :n, :n] for i, n in enumerate(lengths)]
    ref = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, max_q, max_k, dropout_p=0.25,
                                     dropout_mask=masks)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("kw", [dict(), dict(window_size=(20, 0), softcap=3.0, alibi_slopes="rows")], ids=str)
def test_kvcache_matches_reference(small_tiles, paged, kw):
    B, s_max, hq, hkv, d, lq = 3, 96, 4, 2, 16, 2
    seqlens = torch.tensor([0, 37, 90], dtype=torch.int32)
    k_cache, v_cache = torch.randn(B, s_max, hkv, d), torch.randn(B, s_max, hkv, d)
    q, k_new, v_new = torch.randn(B, lq, hq, d), torch.randn(B, lq, hkv, d), torch.randn(B, lq, hkv, d)
    kw = dict(kw)
    if kw.get("alibi_slopes") == "rows":
        kw["alibi_slopes"] = torch.rand(B, hq)
    table = None
    if paged:  # the same contents in shuffled pages of 16 rows
        order = torch.randperm(B * s_max // 16)
        table = order.reshape(B, -1).to(torch.int32)
        paged_k, paged_v = torch.empty(B * s_max // 16, 16, hkv, d), torch.empty(B * s_max // 16, 16, hkv, d)
        paged_k[order], paged_v[order] = k_cache.reshape(-1, 16, hkv, d), v_cache.reshape(-1, 16, hkv, d)
    caches = (paged_k, paged_v) if paged else (k_cache.clone(), v_cache.clone())
    out, lse = fused_attention_with_kvcache(q, *caches, seqlens, k_new=k_new, v_new=v_new, block_table=table,
                                            return_lse=True, backend="cpu", **kw)
    k_full, v_full = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(seqlens.tolist()):
        k_full[b, n:n + lq], v_full[b, n:n + lq] = k_new[b], v_new[b]
    out_r, lse_r = reference.attention_with_kvcache(q.double(), k_full.double(), v_full.double(), seqlens + lq,
                                                    return_lse=True, **kw)
    torch.testing.assert_close(out.double(), out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(window_size=(10, 10), softcap=2.0, alibi_slopes="heads"),
                                dict(attn_mask="bias"), dict(attn_mask="lower_right")], ids=str)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_attention_weights_and_their_gradients(small_tiles, kw, dtype):
    q, k, _ = make_qkv((2,), 4, 2, 100, 129, 24, 24, dtype)
    kw = _variant(kw, 2, 4, 100, 129)
    if kw.get("attn_mask") == "bias":
        kw["attn_mask"] = torch.randn(2, 1, 100, 129, requires_grad=True)
    check_weights(lambda q_, k_, **kw_: attention_weights(q_, k_, backend="cpu", **kw_), q, k, grad=True,
                  enable_gqa=True, **kw)


# ---- memory -------------------------------------------------------------------------------
def _allocations(fn) -> tuple:
    """(peak bytes held, largest single allocation) by the CPU allocator while fn runs:
    the profiler's allocation / free records in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = largest = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        held += record.nbytes()
        peak, largest = max(peak, held), max(largest, record.nbytes())
    return peak, largest


def test_blocked_path_never_holds_an_l_by_s_buffer():
    """L = S = 2048, 2 heads, softcap (the blocked path), forward + backward: the
    largest allocation stays a tile, and the peak below one head's L x S matrix
    (the reference holds several of both heads')."""
    q, k, v = (t.requires_grad_() for t in make_qkv((1,), 2, 2, 2048, 2048, 32, 32, FP32))
    scores_bytes = 2048 * 2048 * 4  # one head's L x S in float32

    def step():
        out = attend(q, k, v, softcap=20.0, is_causal=True)
        torch.autograd.grad(out.sum(), (q, k, v))

    peak, largest = _allocations(step)
    assert largest < scores_bytes / 8, f"an allocation of {largest / 2**20:.1f} MiB"
    assert peak < scores_bytes * 0.75, f"peak {peak / 2**20:.1f} MiB"
