"""The public API: clear errors on bad input (before any kernel runs), backend
selection with no silent fallback, available_backends, SDPA's argument order."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA

import attn_kernels
from torch.nn.attention.bias import causal_lower_right

from attn_kernels import attention_weights, available_backends, fused_attention


def qkv(*shape_q, S=6, Ev=None, hkv=None, dtype=torch.float32):
    *batch, H, L, E = shape_q
    q = torch.randn(*batch, H, L, E, dtype=dtype)
    k = torch.randn(*batch, hkv or H, S, E, dtype=dtype)
    v = torch.randn(*batch, hkv or H, S, Ev or E, dtype=dtype)
    return q, k, v


def test_signature_is_sdpa_plus_keywords():
    ours = list(inspect.signature(fused_attention).parameters)
    sdpa = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    assert ours[: len(sdpa)] == sdpa
    assert {"backend", "return_lse"} <= set(ours)
    assert attn_kernels.__version__


BAD_INPUTS = [
    (lambda q, k, v: fused_attention(q[0, 0, 0], k, v), ValueError, "at least 2 dims"),
    (lambda q, k, v: fused_attention(q.numpy(), k, v), TypeError, "query must be a torch.Tensor"),
    (lambda q, k, v: fused_attention(q, k[..., :3], v), ValueError, "head dim"),
    (lambda q, k, v: fused_attention(q, k, v[:, :, :5]), ValueError, "sequence length"),
    (lambda q, k, v: fused_attention(q, k[:, :2], v[:, :2]), ValueError, "enable_gqa"),
    (lambda q, k, v: fused_attention(q[:, :3], k[:, :2], v[:, :2], enable_gqa=True), ValueError, "multiple"),
    (lambda q, k, v: fused_attention(q, k[:, :2], v), ValueError, "head counts must be equal or 1"),
    (lambda q, k, v: fused_attention(q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]])), ValueError, "batch dims"),
    (lambda q, k, v: fused_attention(q.long(), k, v), TypeError, "query.dtype"),
    (lambda q, k, v: fused_attention(q, k.half(), v), TypeError, "key.dtype"),
    (lambda q, k, v: fused_attention(q, k.to("meta"), v), ValueError, "key is on meta"),
    (lambda q, k, v: fused_attention(q, k, v, dropout_p=1.5), ValueError, "dropout_p"),
    (lambda q, k, v: fused_attention(q, k, v, dropout_p=-0.1), ValueError, "dropout_p"),
    (lambda q, k, v: fused_attention(q, k, v, scale="big"), TypeError, "scale"),
    (lambda q, k, v: fused_attention(q, k, v, scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v: fused_attention(q, k, v, is_causal=1), TypeError, "is_causal"),
    (lambda q, k, v: fused_attention(q, k, v, backend="flash"), ValueError, "backend"),
    (lambda q, k, v: fused_attention(q, k, v, return_lse="yes"), TypeError, "return_lse"),
    (lambda q, k, v: fused_attention(q, k, v, attn_mask=torch.ones(3, 6, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda q, k, v: fused_attention(q, k, v, attn_mask=torch.ones(4, 6, dtype=torch.int32)), TypeError, "attn_mask"),
    (lambda q, k, v: fused_attention(q, k, v, attn_mask=torch.ones(4, 6).half()), TypeError, "attn_mask.dtype"),
    (lambda q, k, v: fused_attention(q, k, v, attn_mask=causal_lower_right(4, 6), is_causal=True), ValueError,
     "CausalBias should not be used with causal=True"),
    (lambda q, k, v: attention_weights(q, k[:, :3]), ValueError, "enable_gqa"),
]


@pytest.mark.parametrize("call,exc,words", BAD_INPUTS, ids=[w for _, _, w in BAD_INPUTS])
def test_bad_input_raises_clearly(call, exc, words):
    q, k, v = qkv(2, 4, 4, 8)
    with pytest.raises(exc, match=words) as caught:
        call(q, k, v)
    # also the class SDPA raises, so `except RuntimeError` written for SDPA catches it
    assert isinstance(caught.value, RuntimeError)


def test_inputs_broadcast_as_sdpa():
    # fewer dims, size-1 batch and head dims: SDPA's broadcasting (formerly refused)
    q, k, v = qkv(2, 4, 4, 8)
    for args in ((q, k[0], v[0]), (q[:1], k, v), (q, k[:, :1], v[:, :1]), (q[0, 0], k, v)):
        torch.testing.assert_close(fused_attention(*args), F.scaled_dot_product_attention(*args))


def test_mask_and_is_causal_both_apply():
    q, k, v = qkv(2, 4, 4, 8)
    mask = torch.rand(4, 6) > 0.5
    causal = torch.ones(4, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(fused_attention(q, k, v, attn_mask=mask, is_causal=True),
                               fused_attention(q, k, v, attn_mask=mask & causal))


def test_triton_limits_raise_not_implemented():
    q, k, v = qkv(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="head dims up to 256"):
        fused_attention(*qkv(1, 1, 4, 257), backend="triton")
    with pytest.raises(NotImplementedError, match="float64"):
        fused_attention(q.double(), k.double(), v.double(), backend="triton")


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    q, k, v = qkv(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_attention(q, k, v, backend="triton")
    status = available_backends()["triton"]
    assert not status.available and "TRITON_INTERPRET" in status.detail


def test_available_backends_reports_each_backend():
    backends = available_backends()
    assert set(backends) == {"triton", "cuda", "cpu", "reference"}
    assert backends["reference"].available
    assert backends["triton"].available  # the suite runs on a GPU or in the interpreter


def test_cuda_backend_without_a_gpu_says_why():
    q, k, v = qkv(1, 2, 4, 64)
    status = available_backends()["cuda"]
    if not status.available:
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            fused_attention(q.half(), k.half(), v.half(), backend="cuda")
    # what the CUDA kernels lack is refused the same way on every machine
    with pytest.raises(NotImplementedError, match="backend='cuda'"):
        fused_attention(q.half(), k.half(), v.half(), softcap=2.0, backend="cuda")
    with pytest.raises(NotImplementedError, match="fused_attention only"):
        attention_weights(q.half(), k.half(), backend="cuda")


def test_auto_on_cpu_uses_reference_with_every_feature():
    q, k, v = qkv(2, 4, 5, 8, S=7)
    mask = torch.rand(5, 7) > 0.5
    mask[:, 0] = True
    out = fused_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_edge_lengths(backend):
    for L, S in ((0, 4), (4, 0), (1, 1)):
        q, k, v = (t.to(DEVICE) for t in qkv(1, 2, L, 16, S=S))
        out, lse = fused_attention(q, k, v, backend=backend, return_lse=True)
        assert out.shape == (1, 2, L, 16) and lse.shape == (1, 2, L)
        assert not out.isnan().any()


def test_zero_batch():
    q, k, v = (t.to(DEVICE) for t in qkv(0, 2, 4, 16))
    assert fused_attention(q, k, v, backend="triton").shape == (0, 2, 4, 16)


@pytest.mark.gpu
def test_auto_on_cuda_picks_triton_and_warns_on_reference_route():
    q, k, v = (t.cuda().half() for t in qkv(1, 2, 64, 64, S=64))
    out = fused_attention(q, k, v)
    torch.testing.assert_close(out, fused_attention(q, k, v, backend="triton"), atol=0, rtol=0)
    # what triton cannot take runs on the reference, with a warning that says why
    big = torch.randn(1, 1, 8, 300, device="cuda", dtype=torch.half)
    with pytest.warns(UserWarning, match="head dims up to 256"):
        fused_attention(big, big, big)
