"""Oracles independent of the code under test.

First the oracle itself (tests/oracles.py): its causal, window and ALiBi masks against
hand-written cases and against torch's own CausalBias. Then the Triton kernels on what
the suite used to miss, every expected value from those masks (never from
`AttentionSpec.band`): masks laid out as users have them (transposed, with a column
stride != 1, sliced, broadcast over keys), asymmetric windows, both causal alignments
with L != S, ALiBi distances with L != S, and attention_weights on the same."""

import pytest
import torch
from accuracy import check_against_reference, check_weights
from conftest import DEVICE
from oracles import alibi_bias, causal_bottom_right, causal_top_left, sliding_window
from test_attention_fwd import BF16, FP16, FP32, fused, make_qkv
from test_attention_weights import weights
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

T, F = True, False
B, HQ, HKV = 2, 4, 2


# ------------------------------------------------------------------ the oracle itself


def test_causal_masks_by_hand():
    # L=2, S=4: top-left, query i sees keys 0..i; bottom-right, keys 0..i+2
    assert causal_top_left(2, 4).tolist() == [[T, F, F, F], [T, T, F, F]]
    assert causal_bottom_right(2, 4).tolist() == [[T, T, T, F], [T, T, T, T]]
    # L > S: bottom-right leaves the first L - S rows with no key
    assert causal_bottom_right(3, 1).tolist() == [[F], [F], [T]]
    assert causal_top_left(3, 1).tolist() == [[T], [T], [T]]


@pytest.mark.parametrize("L,S", [(3, 5), (5, 3), (4, 4), (1, 6)])
def test_causal_masks_match_torch_causal_bias(L, S):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower_right warns of NaN rows when L > S
        upper, lower = causal_upper_left(L, S), causal_lower_right(L, S)
    assert torch.equal(causal_top_left(L, S), upper._materialize())
    assert torch.equal(causal_bottom_right(L, S), lower._materialize())


def test_window_by_hand():
    # L=3, S=5: query i sits at key position i + 2
    assert sliding_window(3, 5, 1, 0).tolist() == [[F, T, T, F, F], [F, F, T, T, F], [F, F, F, T, T]]
    assert sliding_window(3, 5, 0, 1).tolist() == [[F, F, T, T, F], [F, F, F, T, T], [F, F, F, F, T]]
    assert sliding_window(3, 5, -1, 0).tolist() == causal_bottom_right(3, 5).tolist()
    assert sliding_window(3, 5, -1, -1).all()


def test_alibi_by_hand():
    # L=2, S=3: distances |i + 1 - j| are [1, 0, 1] and [2, 1, 0]
    bias = alibi_bias(torch.tensor([0.5, 2.0]), 2, 3)
    assert bias.shape == (2, 2, 3)
    assert bias[0].tolist() == [[-0.5, 0.0, -0.5], [-1.0, -0.5, 0.0]]
    assert bias[1].tolist() == [[-2.0, 0.0, -2.0], [-4.0, -2.0, 0.0]]


def test_flash_style_baseline_takes_delta_from_the_rounded_output():
    # accuracy.flash_style against the FlashAttention-2 backward written out: P in fp32,
    # O rounded to fp16, delta = rowsum(dO * O_rounded) - dlse, dS = P * (dP - delta)
    from accuracy import flash_style

    from attn_kernels import reference

    q, k, v = (torch.randn(2, 9, 8).half() for _ in range(3))
    dout, dlse = torch.randn(2, 9, 8).half(), torch.randn(2, 9)
    run = lambda *xs: reference.attention(*xs, return_lse=True)  # noqa: E731
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, (dq, dk, dv) = flash_style(run, ins, torch.float16, dout, dlse, round_grads=False)
    q32, k32, v32, do32 = q.float(), k.float(), v.float(), dout.float()
    scores = q32 @ k32.transpose(-1, -2) / 8 ** 0.5
    p = torch.softmax(scores, -1)
    o_rounded = (p @ v32).half().float()
    grads = {}
    for name, o in (("rounded", o_rounded), ("exact", p @ v32)):
        delta = (do32 * o).sum(-1, keepdim=True) - dlse[..., None]
        ds = p * (do32 @ v32.transpose(-1, -2) - delta)
        grads[name] = (ds @ k32 / 8 ** 0.5, ds.transpose(-1, -2) @ q32 / 8 ** 0.5)
    torch.testing.assert_close(out, o_rounded.half(), atol=0, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(dv, p.transpose(-1, -2) @ do32)
    for got, want, exact in zip((dq, dk), grads["rounded"], grads["exact"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (got - exact).abs().max() > 1e-4  # what taking delta from the rounded O changes


# ------------------------------------------------------------------ masks laid out as users have them


def _mask(layout, kind, L, S, dtype):
    """A (.., L, S) mask with the given memory layout; float masks require grad."""
    make = (lambda *shape: torch.rand(*shape, device=DEVICE) > 0.3) if kind == "bool" else \
        (lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype))
    if layout == "transposed":  # column stride L
        mask = make(B, HQ, S, L).transpose(-1, -2)
    elif layout == "sliced":  # column stride 3, row stride 3S, a view into a bigger tensor
        mask = make(HQ, 2 * L, 3 * S)[:, ::2, ::3]
    elif layout == "per-query":  # broadcast over keys: column stride 0 in the kernel
        mask = make(B, 1, L, 1)
    else:  # per-key padding broadcast over heads and queries
        mask = make(B, 1, 1, S)
    if kind == "float":
        mask.requires_grad_()
    return mask


@pytest.mark.parametrize("layout", ["transposed", "sliced", "per-query", "key-padding"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_layouts(layout, kind):
    L, S = 37, 70
    q, k, v = make_qkv((B,), HQ, HKV, L, S, 24, 16, FP32)
    mask = _mask(layout, kind, L, S, FP32)
    if layout == "transposed":
        assert mask.stride(-1) != 1
    check_against_reference(fused, q, k, v, attn_mask=mask, enable_gqa=True, return_lse=True)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_transposed_float_mask_low_precision(dtype):
    q, k, v = make_qkv((B,), HQ, HQ, 65, 40, 32, 32, dtype)
    mask = _mask("transposed", "float", 65, 40, dtype)
    check_against_reference(fused, q, k, v, attn_mask=mask, is_causal=False, return_lse=True)


@pytest.mark.parametrize("layout", ["transposed", "per-query"])
def test_weights_with_mask_layouts(layout):
    q, k, _ = make_qkv((B,), HQ, HKV, 33, 50, 16, 16, FP32)
    check_weights(weights, q, k, enable_gqa=True, attn_mask=_mask(layout, "bool", 33, 50, FP32))


# ------------------------------------------------------------------ windows and causal alignments


@pytest.mark.parametrize("L,S", [(64, 65), (65, 64), (100, 129), (129, 100), (17, 1)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_alignments_with_l_ne_s(L, S, variant):
    q, k, v = make_qkv((1,), 2, 2, L, S, 32, 32, FP32)
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(L, S)
    check_against_reference(fused, q, k, v, attn_mask=bias, return_lse=True)


@pytest.mark.parametrize(
    "L,S,window",
    [(64, 65, (-1, 1)), (65, 64, (1, -1)), (100, 129, (20, 5)), (100, 129, (5, 20)), (129, 100, (0, 9)),
     (129, 100, (9, 0)), (70, 70, (3, 30)), (40, 90, (-1, 0)), (90, 40, (0, -1)),
     # left = S - L + 1 (band_lo = -1): the last query a key tile sees starts a query tile of its own
     (70, 70, (1, 4)), (100, 129, (30, 2))],
    ids=str,
)
def test_asymmetric_windows(L, S, window):
    q, k, v = make_qkv((1,), 2, 1, L, S, 32, 16, FP32)
    check_against_reference(fused, q, k, v, window_size=window, enable_gqa=True, return_lse=True)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_asymmetric_window_with_causal_low_precision(dtype):
    q, k, v = make_qkv((1,), 2, 2, 90, 129, 64, 64, dtype)
    check_against_reference(fused, q, k, v, window_size=(30, 7), is_causal=True, return_lse=True)


def test_window_and_causal_bias_object():
    q, k, v = make_qkv((1,), 2, 2, 80, 50, 16, 16, FP32)
    check_against_reference(fused, q, k, v, attn_mask=causal_lower_right(80, 50), window_size=(6, -1),
                            return_lse=True)


@pytest.mark.parametrize("window", [(4, 11), (11, 4)], ids=str)
def test_weights_with_asymmetric_windows(window):
    q, k, _ = make_qkv((1,), 2, 2, 40, 70, 16, 16, FP32)
    check_weights(weights, q, k, window_size=window)


# ------------------------------------------------------------------ ALiBi distances


@pytest.mark.parametrize("L,S", [(40, 90), (90, 40), (1, 33)])
@pytest.mark.parametrize("slopes_shape", [(HQ,), (B, HQ)])
def test_alibi_distances_with_l_ne_s(L, S, slopes_shape):
    q, k, v = make_qkv((B,), HQ, HKV, L, S, 16, 16, FP32)
    slopes = torch.rand(slopes_shape, device=DEVICE)
    check_against_reference(fused, q, k, v, alibi_slopes=slopes, enable_gqa=True, return_lse=True)


def test_alibi_with_window_and_mask_fp16():
    q, k, v = make_qkv((B,), HQ, HKV, 70, 100, 32, 32, FP16)
    slopes = torch.rand(HQ, device=DEVICE) * 0.5
    mask = _mask("transposed", "float", 70, 100, FP16)
    check_against_reference(fused, q, k, v, alibi_slopes=slopes, window_size=(40, 10), attn_mask=mask,
                            enable_gqa=True, return_lse=True)
