"""The attention variants in the Triton kernels, against the float64 reference:
masks (bool / float, every broadcast, with the float mask's gradient), causal
alignment objects, sliding windows, softcap, ALiBi, fully masked rows, and the
combinations users make. Dropout and varlen have their own files."""

import pytest
import torch
from accuracy import check_against_reference, check_weights
from conftest import DEVICE
from test_attention_fwd import BF16, FP16, FP32, fused, make_qkv
from test_attention_weights import weights
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from attn_kernels import fused_attention

B, HQ, HKV = 2, 4, 2


def mask_of(shape, kind, requires_grad=False, dtype=FP32):
    if kind == "bool":
        mask = torch.rand(shape, device=DEVICE) > 0.3
        return mask
    return torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize(
    "shape",
    [(70, 90), (1, 1, 70, 90), (B, 1, 1, 90), (B, HQ, 70, 90), (HQ, 1, 90)],
    ids=["LxS", "11LS", "key-padding", "full", "per-head"],
)
def test_mask_broadcasts(kind, shape):
    q, k, v = make_qkv((B,), HQ, HKV, 70, 90, 40, 24, FP32)
    mask = mask_of(shape, kind, requires_grad=True)
    check_against_reference(fused, q, k, v, attn_mask=mask, enable_gqa=True, return_lse=True)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_float_mask_low_precision_with_bias_gradient(dtype):
    q, k, v = make_qkv((B,), HQ, HQ, 65, 100, 64, 64, dtype)
    bias = mask_of((1, HQ, 65, 100), "float", requires_grad=True, dtype=dtype)
    check_against_reference(fused, q, k, v, attn_mask=bias)


def test_mask_is_not_expanded_or_copied():
    # a key-padding mask broadcast over heads and queries reaches the kernel with stride 0
    from attn_kernels._checks import check_attention
    from attn_kernels.triton_ops import _KernelConfig

    q, k, v = make_qkv((B,), HQ, HQ, 33, 47, 16, 16, FP32)
    mask = torch.rand(B, 1, 1, 47, device=DEVICE) > 0.5
    spec = check_attention(q, k, v, mask)
    mask_arg = _KernelConfig.build(spec, None).kernel_mask(mask)
    assert mask_arg.data_ptr() == mask.data_ptr()
    assert mask_arg.stride(1) == 0 and mask_arg.stride(2) == 0


@pytest.mark.parametrize("L,S", [(40, 100), (100, 40), (64, 64)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_objects(L, S, variant):
    # lower_right with L > S leaves the first L - S rows with no key: output 0, no NaN
    q, k, v = make_qkv((B,), HQ, HKV, L, S, 32, 32, FP32)
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(L, S)
    check_against_reference(fused, q, k, v, attn_mask=bias, enable_gqa=True, return_lse=True)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_upper_left_bias_low_precision(dtype):
    # against the oracle's top-left mask (j <= i), built without the package
    q, k, v = make_qkv((B,), HQ, HQ, 80, 50, 32, 32, dtype)
    check_against_reference(fused, q, k, v, attn_mask=causal_upper_left(80, 50), return_lse=True)


@pytest.mark.parametrize(
    "L,S,window,causal",
    [(100, 100, (16, 0), False), (100, 129, (20, 5), False), (129, 100, (30, -1), True),
     (64, 64, (0, 0), False), (90, 70, (-1, 10), False), (17, 129, (3, 40), True),
     (300, 280, (10, 10), False)],  # many tiles skipped on both sides of the band
)
def test_sliding_window(L, S, window, causal):
    q, k, v = make_qkv((1,) if L > 200 else (B,), HQ, HKV, L, S, 32, 48, FP32 if L > 200 else FP16)
    check_against_reference(fused, q, k, v, window_size=window, is_causal=causal, enable_gqa=True, return_lse=True)


@pytest.mark.parametrize("softcap", [0.5, 5.0])
def test_softcap(softcap):
    q, k, v = make_qkv((B,), HQ, HQ, 70, 90, 64, 64, FP32, magnitude=3.0)
    check_against_reference(fused, q, k, v, softcap=softcap, return_lse=True)


@pytest.mark.parametrize("slopes_shape", [(HQ,), (B, HQ)])
def test_alibi(slopes_shape):
    q, k, v = make_qkv((B,), HQ, HKV, 70, 90, 32, 32, FP32)
    slopes = torch.rand(slopes_shape, device=DEVICE)
    check_against_reference(fused, q, k, v, alibi_slopes=slopes, enable_gqa=True, return_lse=True)


def test_softcap_with_alibi_and_causal():
    q, k, v = make_qkv((B,), HQ, HKV, 100, 129, 40, 40, FP16, magnitude=2.0)
    slopes = torch.rand(HQ, device=DEVICE) * 0.3
    check_against_reference(fused, q, k, v, softcap=3.0, alibi_slopes=slopes, is_causal=True, enable_gqa=True)


def test_mask_with_gqa_window_and_alibi():
    q, k, v = make_qkv((B,), HQ, HKV, 70, 90, 32, 32, FP32)
    mask = mask_of((B, 1, 1, 90), "float", requires_grad=True)
    slopes = torch.rand(HQ, device=DEVICE)
    check_against_reference(fused, q, k, v, attn_mask=mask, window_size=(25, 25), alibi_slopes=slopes,
                            enable_gqa=True, return_lse=True)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v = (t.requires_grad_() for t in make_qkv((B,), HQ, HQ, 20, 30, 16, 16, FP32))
    mask = torch.ones(20, 30, dtype=torch.bool, device=DEVICE)
    mask[5] = False
    out, lse = fused(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    assert torch.isneginf(lse[:, :, 5]).all() and torch.isfinite(lse[:, :, :5]).all()
    (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    assert torch.equal(q.grad[:, :, 5], torch.zeros_like(q.grad[:, :, 5]))
    check_against_reference(fused, q, k, v, attn_mask=mask, return_lse=True)


@pytest.mark.gpu  # the interpreter runs programs one at a time: only a GPU can show a race
def test_deterministic_backward_with_mask_gradient():
    q, k, v = (t.requires_grad_() for t in make_qkv((B,), HQ, HKV, 70, 90, 32, 32, FP16))
    bias = mask_of((1, 1, 70, 90), "float", requires_grad=True, dtype=FP16)
    dout = torch.randn(B, HQ, 70, 32, device=DEVICE, dtype=FP16)

    def grads():
        out = fused(q, k, v, attn_mask=bias, enable_gqa=True, deterministic=True)
        return torch.autograd.grad(out, (q, k, v, bias), dout)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [dict(window_size=(10, 3)), dict(softcap=2.0), dict(alibi_slopes="alibi"), dict(attn_mask="bool"),
     dict(attn_mask=causal_lower_right(60, 40))],
    ids=["window", "softcap", "alibi", "mask", "lower-right"],
)
def test_attention_weights_with_variants(kwargs):
    q, k, _ = make_qkv((B,), HQ, HKV, 60, 40, 32, 32, FP32)
    if kwargs.get("alibi_slopes") == "alibi":
        kwargs["alibi_slopes"] = torch.rand(HQ, device=DEVICE)
    if isinstance(kwargs.get("attn_mask"), str):
        kwargs["attn_mask"] = torch.rand(B, 1, 60, 40, device=DEVICE) > 0.4
    check_weights(weights, q, k, enable_gqa=True, **kwargs)


def test_attention_weights_float_mask_gradient():
    q, k, _ = make_qkv((1,), 2, 2, 20, 30, 16, 16, FP32)
    bias = torch.randn(1, 2, 20, 30, device=DEVICE, requires_grad=True)
    check_weights(weights, q, k, grad=True, attn_mask=bias)


BAD_VARIANTS = [
    (dict(window_size=(3,)), TypeError, "window_size"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.int32)), TypeError, "alibi_slopes"),
    (dict(attn_mask=causal_lower_right(5, 5)), ValueError, "causal bias"),
    (dict(attn_mask=causal_lower_right(8, 6), is_causal=True), ValueError, "causal"),
    (dict(deterministic="yes"), TypeError, "deterministic"),
]


@pytest.mark.parametrize("kwargs,exc,words", BAD_VARIANTS, ids=[w for _, _, w in BAD_VARIANTS])
def test_bad_variant_arguments(kwargs, exc, words):
    q, k, v = (torch.randn(2, 4, n, 8) for n in (8, 6, 6))
    with pytest.raises(exc, match=words):
        fused_attention(q, k, v, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_key_padding_mask_and_window_long_gpu(dtype):
    q, k, v = make_qkv((2,), 8, 2, 2048, 2048, 128, 128, dtype)
    pad = torch.rand(2, 1, 1, 2048, device=DEVICE) > 0.1
    check_against_reference(fused, q, k, v, attn_mask=pad, enable_gqa=True)
    check_against_reference(fused, q, k, v, window_size=(256, 0), softcap=30.0, enable_gqa=True)


@pytest.mark.gpu
def test_bias_gradient_long_gpu():
    q, k, v = make_qkv((1,), 4, 4, 1024, 1500, 64, 64, BF16)
    bias = torch.randn(1, 4, 1024, 1500, device=DEVICE, dtype=BF16, requires_grad=True)
    check_against_reference(fused, q, k, v, attn_mask=bias)
