"""fused_attention as a drop-in for F.scaled_dot_product_attention, at SDPA's edges
(issue #14): for each behaviour, every backend that takes the call gives what SDPA
gives on the same inputs: the same shape and dtype, values and input gradients
within the project's rule (error from SDPA in float64 <= 2 x SDPA's own error at the
input dtype + a small floor), and, for bad input, an exception of SDPA's class.

Where attn_kernels deliberately differs (README, "Differences from SDPA"), the test
pins attn_kernels' documented behaviour instead and says so.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch.nn.attention.bias import causal_lower_right

from attn_kernels import attention_weights, dropout_keep_mask, fused_attention

BACKENDS = ["reference", "triton", "auto"]
F32, F16 = torch.float32, torch.float16


def rand(*shape, dtype=F32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def max_err(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    diff = torch.where(x == ref, torch.zeros_like(x), (x - ref).abs())
    return diff.max().item() if diff.numel() else 0.0


def assert_as_sdpa(name, ours, theirs, oracle):
    """ours and theirs (SDPA) at the input dtype, oracle SDPA in float64 on the same inputs."""
    assert (ours is None) == (theirs is None), f"{name}: a gradient on one side only"
    if ours is None:
        return
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != SDPA's {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != SDPA's {theirs.dtype}"
    assert not ours.isnan().any(), f"{name}: NaN"
    rel = 1e-5 if ours.dtype == F32 else 2 * torch.finfo(ours.dtype).eps
    floor = rel * max(1.0, oracle.abs().max().item() if oracle.numel() else 1.0)
    err, err_sdpa = max_err(ours, oracle), max_err(theirs, oracle)
    assert err <= 2 * err_sdpa + floor, f"{name}: error {err:.3g} > 2 x SDPA's {err_sdpa:.3g} + {floor:.3g}"


def check_as_sdpa(backend, inputs, grad=True, oracle_kwargs=None, **kwargs):
    """fused_attention(*inputs, **kwargs) against SDPA; the float64 oracle is SDPA
    with oracle_kwargs when given (for a call SDPA takes only on its fused path)."""
    results = []
    dout = None
    for label in ("ours", "sdpa", "oracle"):
        dtype = torch.float64 if label == "oracle" else None
        ins = [t.detach().to(dtype=dtype or t.dtype).requires_grad_(grad) for t in inputs]
        kw = dict(oracle_kwargs if label == "oracle" and oracle_kwargs is not None else kwargs)
        mask = kw.get("attn_mask")
        if dtype is not None and type(mask) is torch.Tensor and mask.is_floating_point():
            kw["attn_mask"] = mask.to(dtype)
        if label == "ours":
            out = fused_attention(*ins, backend=backend, **kw)
        else:
            out = F.scaled_dot_product_attention(*ins, **kw)
        grads = ()
        if grad:
            if dout is None:
                dout = torch.randn(out.shape, device=out.device)
            grads = torch.autograd.grad((out * dout.to(out.dtype)).sum(), ins, allow_unused=True)
        results.append((out.detach(), grads))
    (out, grads), (out_s, grads_s), (out_o, grads_o) = results
    assert_as_sdpa("out", out, out_s, out_o)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, grads_s, grads_o):
        assert_as_sdpa(name, a, b, c)
    return out


# ----------------------------------------------------------------- accepted inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("float_mask", [False, True])
def test_mask_and_is_causal_both_apply(backend, float_mask):
    # SDPA's fused CPU / GPU kernels take both (its math backend refuses); the
    # oracle is SDPA with the two combined into one mask. Row 0 is fully masked: 0.
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 7, 8), rand(2, 3, 7, 8)
    keep = torch.rand(5, 7, device=DEVICE) > 0.3
    keep[0] = False
    causal = torch.ones(5, 7, dtype=torch.bool, device=DEVICE).tril()
    if float_mask:
        mask = torch.randn(2, 1, 5, 7, device=DEVICE).masked_fill(~keep, float("-inf"))
        combined = mask.masked_fill(~causal, float("-inf"))
    else:
        mask, combined = keep, keep & causal
    out = check_as_sdpa(backend, (q, k, v), attn_mask=mask, is_causal=True, oracle_kwargs=dict(attn_mask=combined))
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))


BROADCASTS = {
    # name: (query shape, key shape, value shape, enable_gqa); S = 6, E = 8 (Ev = 5)
    "query_batch_1": ((1, 4, 3, 8), (2, 4, 6, 8), (2, 4, 6, 5), False),
    "key_value_batch_1": ((2, 4, 3, 8), (1, 4, 6, 8), (1, 4, 6, 5), False),
    "key_value_one_head": ((2, 4, 3, 8), (2, 1, 6, 8), (2, 1, 6, 5), False),
    "query_one_head": ((2, 1, 3, 8), (2, 4, 6, 8), (2, 4, 6, 5), False),
    "key_one_head_value_four": ((2, 4, 3, 8), (2, 1, 6, 8), (2, 4, 6, 5), False),
    "gqa_key_2_value_1_heads": ((2, 4, 3, 8), (2, 2, 6, 8), (2, 1, 6, 5), True),
    "gqa_key_2_value_4_heads": ((2, 4, 3, 8), (2, 2, 6, 8), (2, 4, 6, 5), True),
    "query_3d_key_value_4d": ((4, 3, 8), (2, 4, 6, 8), (2, 4, 6, 5), False),
    "query_2d_key_value_4d": ((3, 8), (2, 4, 6, 8), (2, 4, 6, 5), False),
    # 5-D batch dims that no view flattens: the fused path runs one call per leading index
    "5d_crossed_batch": ((2, 1, 3, 3, 8), (1, 2, 3, 6, 8), (1, 2, 3, 6, 5), False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BROADCASTS))
def test_batch_and_head_dims_broadcast(backend, case):
    shape_q, shape_k, shape_v, gqa = BROADCASTS[case]
    check_as_sdpa(backend, (rand(*shape_q), rand(*shape_k), rand(*shape_v)), enable_gqa=gqa)


def test_broadcast_key_value_are_views_not_copies(monkeypatch):
    # what reaches the Triton op: K / V of the broadcast batch as stride-0 views of the caller's memory
    from attn_kernels import triton_ops

    seen = {}
    real = triton_ops.fused_attention

    def spy(q, k, v, *rest):
        seen.update(k=k, v=v)
        return real(q, k, v, *rest)

    monkeypatch.setattr(triton_ops, "fused_attention", spy)
    q, k, v = rand(3, 4, 5, 8), rand(1, 1, 6, 8), rand(1, 1, 6, 8)
    fused_attention(q, k, v, backend="triton")
    assert seen["k"].data_ptr() == k.data_ptr() and seen["v"].data_ptr() == v.data_ptr()
    assert seen["k"].shape[0] == 3 and seen["k"].stride(0) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_mask_with_float16_inputs(backend):
    q, k, v = rand(2, 2, 5, 16, dtype=F16), rand(2, 2, 9, 16, dtype=F16), rand(2, 2, 9, 16, dtype=F16)
    mask = torch.randn(2, 1, 5, 9, device=DEVICE)  # float32, as SDPA allows for any query dtype
    check_as_sdpa(backend, (q, k, v), attn_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_head_dims(backend, is_causal):
    # E = 0: every score is 0, the mean of the allowed values; Ev = 0: an empty output
    q, k, v = rand(2, 3, 4, 8), rand(2, 3, 6, 8), rand(2, 3, 6, 5)
    out = check_as_sdpa(backend, (q[..., :0], k[..., :0], v), is_causal=is_causal)
    if not is_causal:
        torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand_as(out))
    assert check_as_sdpa(backend, (q, k, v[..., :0]), is_causal=is_causal).shape == (2, 3, 4, 0)
    check_as_sdpa(backend, (q[..., :0], k[..., :0], v[..., :0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_gives_zeros(backend):
    q, k, v = (rand(2, 3, 4, 8, dtype=F32).requires_grad_() for _ in range(3))
    out = fused_attention(q, k, v, dropout_p=1.0, backend=backend)
    theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert out.shape == theirs.shape and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))
    keep = dropout_keep_mask(q, k, 1.0, backend=backend)
    assert keep.shape == (2, 3, 4, 4) and not keep.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_of_magnitude_256_stays_finite(backend):
    # scores 256 * 256 * 80 / sqrt(80) pass float16's 65504: SDPA keeps them in fp32
    x = torch.full((1, 4, 23, 80), 256.0, dtype=F16, device=DEVICE)
    out = fused_attention(x, x, x, backend=backend)
    assert torch.equal(out, F.scaled_dot_product_attention(x, x, x))


# ------------------------------------------------------------------ nested tensors

def jagged(lengths, heads, dim, offsets=None):
    """A (B, H, j, D) jagged nested tensor (SDPA's layout), and its (total, H, D) values."""
    values = torch.randn(sum(lengths), heads, dim, device=DEVICE)
    if offsets is None:
        offsets = torch.tensor([0, *lengths], device=DEVICE).cumsum(0)
    return torch.nested.nested_tensor_from_jagged(values, offsets=offsets).transpose(1, 2)


def nested_call(fn, q, k, v, **kwargs):
    """fn on copies that require grad -> (out values, grads of the values of q, k, v)."""
    leaves = [t.transpose(1, 2).values().detach().clone().requires_grad_() for t in (q, k, v)]
    ins = [torch.nested.nested_tensor_from_jagged(x, offsets=t.offsets()) for x, t in zip(leaves, (q, k, v))]
    out = fn(*(t.transpose(1, 2) for t in ins), **kwargs)
    assert out.is_nested and out.layout == torch.jagged
    values = out.transpose(1, 2).values()
    values.backward(torch.ones_like(values))
    return out, values.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_jagged_inputs(backend):
    # queries of lengths 3, 5, 1 against keys of 4, 1, 6: the packed varlen path, with autograd
    q = jagged([3, 5, 1], 2, 8)
    k_values, v_values = torch.randn(11, 2, 8, device=DEVICE), torch.randn(11, 2, 6, device=DEVICE)
    offsets_k = torch.tensor([0, 4, 5, 11], device=DEVICE)
    k = torch.nested.nested_tensor_from_jagged(k_values, offsets=offsets_k).transpose(1, 2)
    v = torch.nested.nested_tensor_from_jagged(v_values, offsets=offsets_k).transpose(1, 2)
    out, values, grads = nested_call(lambda *a: fused_attention(*a, backend=backend, scale=0.4), q, k, v)
    out_s, values_s, grads_s = nested_call(lambda *a: F.scaled_dot_product_attention(*a, scale=0.4), q, k, v)
    assert out.shape == out_s.shape and out.dtype == out_s.dtype  # (3, 2, j, 6), the query's ragged size
    torch.testing.assert_close(values, values_s, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_s):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nested_untransposed_attends_over_heads(backend):
    # (B, j, H, D), ragged at dim 1: SDPA attends over H for each token (dense on the values)
    q, k, v = (jagged([2, 3], 4, 8).transpose(1, 2) for _ in range(3))
    k = torch.nested.nested_tensor_from_jagged(k.values(), offsets=q.offsets())
    v = torch.nested.nested_tensor_from_jagged(v.values(), offsets=q.offsets())
    out = fused_attention(q, k, v, backend=backend)
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == theirs.shape
    torch.testing.assert_close(out.values(), theirs.values(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nested_causal_is_bottom_right_per_sequence(backend):
    # a documented difference: SDPA's CPU path refuses is_causal for nested inputs;
    # attn_kernels aligns it bottom-right per sequence (FlashAttention, SDPA's CUDA flash path)
    q, k, v = jagged([3, 2], 2, 8), jagged([5, 2], 2, 8), None
    v = torch.nested.nested_tensor_from_jagged(torch.randn(7, 2, 8, device=DEVICE), offsets=k.offsets())
    v = v.transpose(1, 2)
    out = fused_attention(q, k, v, is_causal=True, backend=backend)
    for qi, ki, vi, oi in zip(q.unbind(), k.unbind(), v.unbind(), out.unbind()):
        mask = causal_lower_right(qi.shape[-2], ki.shape[-2])
        torch.testing.assert_close(oi, F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_nested_limits_raise_not_implemented():
    q = jagged([2, 3], 2, 8)
    holes = torch.nested.narrow(torch.randn(2, 4, 2, 8, device=DEVICE), 1, torch.tensor([0, 1], device=DEVICE),
                                torch.tensor([2, 3], device=DEVICE), layout=torch.jagged).transpose(1, 2)
    with pytest.raises(NotImplementedError, match="holes"):
        fused_attention(holes, holes, holes)
    with pytest.raises(NotImplementedError, match="nested"):
        attention_weights(q, q)


# ---------------------------------------------------------------------- bad input

def _qkv():
    return rand(2, 4, 3, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 8)


BAD = {
    "1d_query": lambda q, k, v: ((q[0, 0, 0], k, v), {}),
    "mixed_dtypes": lambda q, k, v: ((q, k.half(), v), {}),
    "integer_inputs": lambda q, k, v: ((q.long(), k.long(), v.long()), {}),
    "float16_mask_float32_query": lambda q, k, v: ((q, k, v), dict(attn_mask=torch.zeros(3, 6).half().to(DEVICE))),
    "dropout_above_1": lambda q, k, v: ((q, k, v), dict(dropout_p=1.5)),
    "mask_of_wrong_shape": lambda q, k, v: ((q, k, v), dict(attn_mask=torch.ones(4, 6, dtype=torch.bool, device=DEVICE))),
    "heads_that_do_not_broadcast": lambda q, k, v: ((q, k[:, :2], v[:, :2]), {}),
    "gqa_heads_not_dividing": lambda q, k, v: ((q[:, :3], k[:, :2], v[:, :2]), dict(enable_gqa=True)),
    "batch_that_does_not_broadcast": lambda q, k, v: ((q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]])), {}),
    # Ev != E: SDPA's fused CPU kernel (E = Ev) does not check value's length at all
    "key_value_lengths_differ": lambda q, k, v: ((q, k, v[:, :, :5, :6]), {}),
    "head_dims_differ": lambda q, k, v: ((q, k[..., :5], v), {}),
    "causal_bias_wrong_lengths": lambda q, k, v: ((q, k, v), dict(attn_mask=causal_lower_right(4, 6))),
    "causal_bias_and_is_causal": lambda q, k, v: ((q, k, v), dict(attn_mask=causal_lower_right(3, 6), is_causal=True)),
    "scale_not_a_number_type": lambda q, k, v: ((q, k, v), dict(scale="big")),
    "is_causal_not_bool": lambda q, k, v: ((q, k, v), dict(is_causal=1)),
    "nested_with_dense": lambda q, k, v: ((jagged([2, 3], 4, 8), k, v), {}),
    "nested_with_mask": lambda q, k, v: ((*(jagged([2, 3], 4, 8) for _ in range(3)),),
                                         dict(attn_mask=torch.ones(3, 3, dtype=torch.bool, device=DEVICE))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_sdpas_class(backend, case):
    args, kwargs = BAD[case](*_qkv())
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        fused_attention(*args, backend=backend, **kwargs)
    assert isinstance(ours.value, type(theirs.value)), f"{type(ours.value).__name__}: {ours.value}"
    if case == "causal_bias_and_is_causal":  # PyTorch's own tests pin these words
        assert str(ours.value) == str(theirs.value)


# ------------------------------------------------------------------- torch.export

@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_export_with_a_data_dependent_batch(backend):
    # the batch is the number of selected rows, known only at run time (an unbacked size)
    class Select(torch.nn.Module):
        def forward(self, x, chosen):
            rows = x[chosen.nonzero().squeeze(-1)]
            return fused_attention(rows, rows, rows, is_causal=True, backend=backend)

    x, chosen = torch.randn(5, 2, 6, 8), torch.tensor([1, 0, 1, 1, 0])
    program = torch.export.export(Select(), (x, chosen))
    rows = x[chosen.bool()]
    torch.testing.assert_close(program.module()(x, chosen), F.scaled_dot_product_attention(rows, rows, rows, is_causal=True))
