"""The CPU backend's compiled bf16 backward (attn_kernels/cpu_native.py and
cpu_native/attention_backward_bf16.cpp): it runs where cpu.py says it does, its
gradients meet the suite's accuracy rule against the float64 reference (masks, empty
rows, GQA, causal with L != S, odd sizes and head dims, large scores, strided inputs
and an expanded dO), agree with torch's float32 backward to bf16 rounding, and
ATTN_KERNELS_CPU_NATIVE=0 turns it off.

On x86-64 the kernel must build (a C++ compiler is part of this project's machines);
elsewhere the tests skip with the reason cpu_native gives.
"""

import pytest
import torch
from accuracy import check_against_reference

from attn_kernels import available_backends, cpu, cpu_native, fused_attention

BF16 = torch.bfloat16


@pytest.fixture
def native(monkeypatch):
    """Counts the compiled kernel's calls (native.calls); skips where it is not built here."""
    reason = cpu_native._disabled()
    if reason is not None:
        pytest.skip(reason)
    assert cpu_native.ops() is not None, cpu_native.status()
    run = cpu_native.attention_backward_bf16

    class Native:
        calls = 0

    def spy(*args):
        Native.calls += 1
        return run(*args)

    monkeypatch.setattr(cpu_native, "attention_backward_bf16", spy)
    return Native


def attend(*args, **kwargs):
    return fused_attention(*args, backend="cpu", **kwargs)


def qkv(hq, hkv, L, S, E, magnitude=1.0, batch=2):
    q = (torch.randn(batch, hq, L, E) * magnitude).to(BF16)
    k = (torch.randn(batch, hkv, S, E) * magnitude).to(BF16)
    v = torch.randn(batch, hkv, S, E).to(BF16)
    return q, k, v


# (L, S, E, Hq, Hkv, causal): 1 / 17 / 100 / 129, L != S (top-left causal), odd head dims,
# GQA, more than one query block (L >= 192 and >= 768) and key block (S > 512)
CASES = [
    (1, 1, 64, 2, 2, False),
    (1, 17, 16, 2, 2, True),
    (17, 17, 24, 4, 2, True),
    (100, 129, 80, 2, 1, False),
    (129, 100, 40, 4, 1, True),
    (65, 90, 24, 2, 2, False),
    (300, 300, 7, 2, 2, True),
    (800, 600, 72, 2, 1, True),
    (200, 1100, 64, 2, 2, False),
    (1100, 700, 64, 4, 2, True),  # a group's rows (2 x 1100) overflow one dK / dV GEMM
]


@pytest.mark.parametrize("L,S,E,Hq,Hkv,causal", CASES)
def test_matches_reference(native, L, S, E, Hq, Hkv, causal):
    torch.manual_seed(L + S + E)
    q, k, v = qkv(Hq, Hkv, L, S, E)
    check_against_reference(attend, q, k, v, is_causal=causal, enable_gqa=Hq != Hkv)
    assert native.calls == 1


@pytest.mark.parametrize("kind", ["bool", "float-per-head", "float-row-broadcast", "float-transposed"])
def test_masks(native, kind):
    torch.manual_seed(3)
    L, S = 150, 140
    q, k, v = qkv(4, 2, L, S, 32)
    if kind == "bool":
        mask = torch.rand(L, S) > 0.4
        mask[5] = False
    elif kind == "float-per-head":
        mask = torch.randn(4, L, S)
        mask[:, 7, 1:] = float("-inf")  # one key left (a row of -inf only has no float64 gradient)
    elif kind == "float-row-broadcast":  # one bias per query row: the key dim broadcast
        mask = torch.randn(2, 1, L, 1)
    else:  # a (S, L) bias seen transposed: the key dim strided
        mask = torch.randn(S, L).t()
    check_against_reference(attend, q, k, v, attn_mask=mask, enable_gqa=True)
    assert native.calls == 1


def test_empty_rows_have_zero_gradients(native):
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 40, 30, 16))
    mask = torch.ones(40, 30, dtype=torch.bool)
    mask[3] = False
    attend(q, k, v, attn_mask=mask).sum().backward()  # dO is an expanded (stride-0) tensor
    assert native.calls == 1
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, 3] == 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_large_scores(native):
    torch.manual_seed(5)
    q, k, v = qkv(2, 2, 100, 100, 64, magnitude=12**0.5)  # variance 12, scale 1: scores in the hundreds
    check_against_reference(attend, q, k, v, scale=1.0, is_causal=True)
    assert native.calls == 1


def test_strided_inputs(native):
    torch.manual_seed(6)
    base = torch.randn(2, 130, 3, 4, 48).to(BF16)  # (B, L, 3, H, E): q / k / v interleaved, heads inside
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check_against_reference(attend, q, k, v, is_causal=True)
    assert native.calls == 1


def test_agrees_with_the_float32_backward(native, monkeypatch):
    """The same gradients as torch's float32 backward on the same values, up to the
    bf16 roundings of P, dS and the result (~2.7e-3 of the norm, measured; a lost or
    doubled block is >= 1e-2)."""
    torch.manual_seed(7)
    q, k, v = qkv(4, 2, 777, 640, 64)
    dout = torch.randn(2, 4, 777, 64).to(BF16)

    def grads():
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        attend(*ins, is_causal=True, enable_gqa=True).backward(dout)
        return [t.grad.float() for t in ins]

    native_grads = grads()
    monkeypatch.setenv(cpu_native.ENV, "0")
    float32_grads = grads()
    assert native.calls == 1
    for name, a, b in zip("qkv", native_grads, float32_grads):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 5e-3, f"d{name}: relative difference {rel:.2e} from the float32 backward"


def test_off_switch_and_status(native, monkeypatch):
    assert "compiled kernel with float32 accumulators" in available_backends()["cpu"].detail
    monkeypatch.setenv(cpu_native.ENV, "0")
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 20, 20, 16))
    attend(q, k, v).sum().backward()
    assert native.calls == 0
    assert "bf16 backward in float32 (ATTN_KERNELS_CPU_NATIVE=0)" in cpu.status()[1]


def test_float16_keeps_the_float32_backward(native):
    q, k, v = (t.to(torch.float16).requires_grad_() for t in qkv(2, 2, 20, 20, 16))
    attend(q, k, v).sum().backward()
    assert native.calls == 0 and q.grad.dtype == torch.float16


def test_one_key_head_splits_its_keys_across_threads(native):
    """Fewer key / value heads than threads (MQA, batch 1): the key blocks are split
    between threads, each with its own share of dQ."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(8)
        q, k, v = qkv(4, 1, 300, 1300, 32, batch=1)
        check_against_reference(attend, q, k, v, is_causal=True, enable_gqa=True)
    finally:
        torch.set_num_threads(threads)
    assert native.calls == 1
