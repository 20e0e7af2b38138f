"""attn_kernels.nn: MultiheadAttention matches torch.nn.MultiheadAttention loaded from
the same state dict (outputs, weights, input and parameter gradients, in float64),
and the building blocks honour their masks and train."""

import copy
import warnings

import pytest
import torch
from conftest import HAS_CUDA

from attn_kernels.nn import AttentionPooling, CrossAttentionBlock, MultiheadAttention, SelfAttentionBlock

E, H, N, L, S = 16, 4, 3, 5, 7
F64 = torch.float64


def make_pair(dtype=F64, device="cpu", **kwargs):
    """torch's MHA with random (non-zero) parameters, and ours loaded from its state dict."""
    theirs = torch.nn.MultiheadAttention(E, H, dtype=dtype, device=device, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    ours = MultiheadAttention(E, H, dtype=dtype, device=device, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def tokens(length, width=E, batch=N, batch_first=False, dtype=F64, device="cpu"):
    shape = (batch, length, width) if batch_first else (length, batch, width)
    return torch.randn(shape, dtype=dtype, device=device)


def run(module, inputs, kwargs, cotangents):
    """Forward, then backward of <out, dout> + <weights, dweights>; returns
    (out, weights, input grads, {param name: grad})."""
    leaves = {id(t): t.detach().clone().requires_grad_() for t in inputs}
    args = [leaves[id(t)] for t in inputs]  # the same tensor passed twice stays one leaf
    module.zero_grad()
    out, weights = module(*args, **kwargs)
    loss = (out * cotangents[0]).sum()
    if weights is not None:
        loss = loss + (weights * cotangents[1]).sum()
    loss.backward()
    grads = [leaf.grad for leaf in leaves.values()]
    return out, weights, grads, {n: p.grad for n, p in module.named_parameters()}


def assert_matches_torch(theirs, ours, inputs, atol=1e-10, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about mixed bool/float masks
        ref_out, ref_w = theirs(*inputs, **kwargs)
        cot = (torch.randn_like(ref_out), None if ref_w is None else torch.randn_like(ref_w))
        expected = run(theirs, inputs, kwargs, cot)
        got = run(ours, inputs, kwargs, cot)
    (out_t, w_t, gin_t, gp_t), (out_o, w_o, gin_o, gp_o) = expected, got
    torch.testing.assert_close(out_o, out_t, atol=atol, rtol=0)
    if w_t is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_t, atol=atol, rtol=0)
    for a, b in zip(gin_o, gin_t):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert gp_o.keys() == gp_t.keys()
    for name in gp_t:
        torch.testing.assert_close(gp_o[name], gp_t[name], atol=atol, rtol=0, msg=name)


def bool_mask(*shape, p=0.3):
    """Random bool mask, True = NOT allowed (torch-MHA convention), every row keeps a key."""
    mask = torch.rand(*shape) < p
    mask[..., 0] = False
    return mask


# ---------------------------------------------------------------- state dict / API


def test_state_dict_names_shapes_and_order_match_torch():
    for kwargs in ({}, {"kdim": 8, "vdim": 12}, {"bias": False, "add_bias_kv": True}):
        theirs = torch.nn.MultiheadAttention(E, H, **kwargs)
        ours = MultiheadAttention(E, H, **kwargs)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [
            (n, p.shape) for n, p in theirs.named_parameters()
        ]
        theirs.load_state_dict(ours.state_dict())  # and back: both ways
        ours.load_state_dict(theirs.state_dict())
        assert isinstance(ours.out_proj, torch.nn.Linear)


# ---------------------------------------------------------------- matches torch


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross", "distinct"])
def test_attention_kinds(batch_first, kind):
    theirs, ours = make_pair(batch_first=batch_first)
    q = tokens(L, batch_first=batch_first)
    if kind == "self":
        inputs = (q, q, q)
    elif kind == "cross":
        mem = tokens(S, batch_first=batch_first)
        inputs = (q, mem, mem)
    else:
        inputs = (q, tokens(S, batch_first=batch_first), tokens(S, batch_first=batch_first))
    assert_matches_torch(theirs, ours, inputs)


MASK_CASES = {
    "bool 2d": lambda: {"attn_mask": bool_mask(L, S)},
    "float 2d": lambda: {"attn_mask": torch.randn(L, S, dtype=F64)},
    "bool 3d": lambda: {"attn_mask": bool_mask(N * H, L, S)},
    "float 3d": lambda: {"attn_mask": torch.randn(N * H, L, S, dtype=F64)},
    "padding": lambda: {"key_padding_mask": bool_mask(N, S, p=0.4)},
    "float padding": lambda: {"key_padding_mask": torch.randn(N, S, dtype=F64)},
    "padding + bool mask": lambda: {"key_padding_mask": bool_mask(N, S), "attn_mask": bool_mask(L, S)},
    "padding + float 3d mask": lambda: {
        "key_padding_mask": bool_mask(N, S),
        "attn_mask": torch.randn(N * H, L, S, dtype=F64),
    },
}


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("need_weights", [True, False])
def test_masks(case, need_weights):
    theirs, ours = make_pair(batch_first=True)
    q, mem = tokens(L, batch_first=True), tokens(S, batch_first=True)
    assert_matches_torch(theirs, ours, (q, mem, mem), need_weights=need_weights, **MASK_CASES[case]())


@pytest.mark.parametrize(
    "options",
    [
        {"kdim": 8, "vdim": 12},
        {"bias": False},
        {"add_bias_kv": True},
        {"add_zero_attn": True},
        {"add_bias_kv": True, "add_zero_attn": True, "kdim": 8, "vdim": 12},
    ],
    ids=str,
)
@pytest.mark.parametrize("masked", [False, True])
def test_module_options(options, masked):
    theirs, ours = make_pair(**options)
    q = tokens(L)
    k, v = tokens(S, options.get("kdim", E)), tokens(S, options.get("vdim", E))
    masks = {"key_padding_mask": bool_mask(N, S), "attn_mask": bool_mask(N * H, L, S)} if masked else {}
    assert_matches_torch(theirs, ours, (q, k, v), **masks)


@pytest.mark.parametrize("average", [True, False])
def test_average_attn_weights(average):
    theirs, ours = make_pair()
    x = tokens(L)
    assert_matches_torch(theirs, ours, (x, x, x), average_attn_weights=average)
    _, weights = ours(x, x, x, average_attn_weights=average)
    assert weights.shape == ((N, L, L) if average else (N, H, L, L))


@pytest.mark.parametrize("masks", ["none", "padding", "3d mask"])
def test_unbatched(masks):
    theirs, ours = make_pair(batch_first=True)  # batch_first is ignored for 2-D input
    q, mem = torch.randn(L, E, dtype=F64), torch.randn(S, E, dtype=F64)
    kwargs = {
        "none": {},
        "padding": {"key_padding_mask": bool_mask(S)},
        "3d mask": {"attn_mask": bool_mask(H, L, S), "average_attn_weights": False},
    }[masks]
    assert_matches_torch(theirs, ours, (q, mem, mem), **kwargs)
    out, weights = ours(q, mem, mem, **kwargs)
    assert out.shape == (L, E)
    assert weights.shape == ((H, L, S) if masks == "3d mask" else (L, S))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.bool, F64])
def test_is_causal_hint(need_weights, padding, mask_dtype):
    theirs, ours = make_pair(batch_first=True)
    x = tokens(L, batch_first=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    mask = causal.isinf() if mask_dtype == torch.bool else causal
    kwargs = {"attn_mask": mask, "is_causal": True, "need_weights": need_weights}
    if padding:
        kwargs["key_padding_mask"] = bool_mask(N, L)
    assert_matches_torch(theirs, ours, (x, x, x), **kwargs)


def test_float32_tolerance_1e5():
    theirs, ours = make_pair(dtype=torch.float32, batch_first=True)
    q, mem = tokens(L, batch_first=True, dtype=torch.float32), tokens(S, batch_first=True, dtype=torch.float32)
    assert_matches_torch(theirs, ours, (q, mem, mem), atol=1e-5, key_padding_mask=bool_mask(N, S))


def test_eval_matches_torch_fast_path():
    # eval + no grad + batch_first self-attention: torch takes its native fused path
    theirs, ours = make_pair(dtype=torch.float32, batch_first=True)
    theirs.eval(), ours.eval()
    x = tokens(L, batch_first=True, dtype=torch.float32)
    kpm = bool_mask(N, L)
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": kpm}, {"need_weights": False}):
            out_t, w_t = theirs(x, x, x, **kwargs)
            out_o, w_o = ours(x, x, x, **kwargs)
            torch.testing.assert_close(out_o, out_t, atol=1e-5, rtol=0)
            if w_t is not None:
                torch.testing.assert_close(w_o, w_t, atol=1e-5, rtol=0)


def test_swaps_into_torch_transformer_encoder_layer():
    # TransformerEncoderLayer calls self_attn with float masks and the is_causal hint
    layer = torch.nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, dtype=F64)
    x = tokens(6, batch_first=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    padding = torch.zeros(N, 6)
    padding[1, 4:] = float("-inf")
    expected = layer(x, src_mask=causal, src_key_padding_mask=padding.double(), is_causal=True)
    ours = MultiheadAttention(E, H, batch_first=True, dtype=F64)
    ours.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = ours
    got = layer(x, src_mask=causal, src_key_padding_mask=padding.double(), is_causal=True)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- dropout, edge cases, errors


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_only_in_training(need_weights):
    theirs, ours = make_pair(dropout=0.5)
    x = tokens(L)
    ours.train()
    a, _ = ours(x, x, x, need_weights=need_weights)
    b, _ = ours(x, x, x, need_weights=need_weights)
    assert not torch.allclose(a, b)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x, x, x)[0], theirs(x, x, x)[0], atol=1e-10, rtol=0)


def test_dropout_weights_are_the_ones_used():
    # as torch: with need_weights in training, the returned weights are after dropout
    _, ours = make_pair(dropout=0.5, bias=False)
    x = tokens(L)
    out, weights = ours(x, x, x, average_attn_weights=False)
    assert (weights == 0).any() and weights.max() > 1.0
    v = torch.nn.functional.linear(x.transpose(0, 1), ours.in_proj_weight[2 * E :]).view(N, L, H, E // H)
    expected = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(N, L, E) @ ours.out_proj.weight.T
    torch.testing.assert_close(out.transpose(0, 1), expected, atol=1e-10, rtol=0)


def test_fully_masked_row_gives_zero_attention_not_nan():
    # torch gives NaN for a query with no allowed key; the fused kernels give 0
    _, ours = make_pair(batch_first=True)
    x = tokens(L, batch_first=True)
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[2] = True
    out, weights = ours(x, x, x, attn_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2], ours.out_proj.bias.expand(N, E))
    assert (weights[:, 2] == 0).all()


BAD_CALLS = [
    (lambda m, x: m(x[0, 0], x[0, 0], x[0, 0]), ValueError, "query"),
    (lambda m, x: m(x.numpy(), x, x), TypeError, "query"),
    (lambda m, x: m(x, x[..., :8], x), ValueError, "key"),
    (lambda m, x: m(x, x, x[:2]), ValueError, "key"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(L, N, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(N, L, L, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.long)), TypeError, "attn_mask"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.float32)), TypeError, "attn_mask"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.int32)), TypeError, "key_padding_mask"),
    (lambda m, x: m(x, x, x, is_causal=True), ValueError, "is_causal"),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_input_raises(call, error, match):
    _, ours = make_pair()
    with pytest.raises(error, match=match):
        call(ours, tokens(L))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_heads": 3}, "divisible"),
        ({"num_heads": 0}, "num_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"kdim": 0}, "kdim"),
    ],
)
def test_bad_constructor_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiheadAttention(**{"embed_dim": E, "num_heads": H, **kwargs})


# ---------------------------------------------------------------- building blocks


def assert_all_params_get_grads(module):
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_self_attention_block_shapes_padding_and_grads():
    block = SelfAttentionBlock(E, H, mlp_ratio=2.0).double()
    x = torch.randn(2, 6, E, dtype=F64, requires_grad=True)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    out = block(x, key_padding_mask=pad)
    assert out.shape == x.shape
    # a padded token may change freely: nothing else sees it
    x2 = x.detach().clone()
    x2[0, 4:] = torch.randn(2, E, dtype=F64) * 10
    out2 = block(x2, key_padding_mask=pad)
    torch.testing.assert_close(out2[0, :4], out[0, :4].detach())
    torch.testing.assert_close(out2[1], out[1].detach())
    assert not torch.allclose(block(x2)[0, :4], out[0, :4])  # unmasked it does matter
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert_all_params_get_grads(block)


def test_self_attention_block_matches_sdpa():
    block = SelfAttentionBlock(E, H).double()
    x = torch.randn(2, 6, E, dtype=F64)
    pad = bool_mask(2, 6)
    q, k, v = (t.view(2, 6, H, E // H).transpose(1, 2) for t in block.qkv(block.norm1(x)).chunk(3, -1))
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
    y = x + block.proj(attn.transpose(1, 2).reshape(2, 6, E))
    expected = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(block(x, key_padding_mask=pad), expected)


@pytest.mark.parametrize("padding", [False, True])
def test_causal_self_attention_block_ignores_the_future(padding):
    block = SelfAttentionBlock(E, H, causal=True).double()
    x = torch.randn(2, 6, E, dtype=F64)
    pad = torch.zeros(2, 6, dtype=torch.bool) if padding else None
    if padding:
        pad[1, 0] = True
    out = block(x, key_padding_mask=pad)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(2, 3, E, dtype=F64)
    torch.testing.assert_close(block(x2, key_padding_mask=pad)[:, :3], out[:, :3])
    if padding:  # and the padded first key is ignored too
        x3 = x.clone()
        x3[1, 0] = 5.0
        torch.testing.assert_close(block(x3, key_padding_mask=pad)[1, 1:], out[1, 1:])


def test_cross_attention_block():
    block = CrossAttentionBlock(E, H, kv_dim=10).double()
    x = torch.randn(2, 5, E, dtype=F64, requires_grad=True)
    memory = torch.randn(2, 7, 10, dtype=F64, requires_grad=True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    out = block(x, memory, memory_padding_mask=pad)
    assert out.shape == (2, 5, E)
    memory2 = memory.detach().clone()
    memory2[1, 5:] = 7.0
    torch.testing.assert_close(block(x, memory2, memory_padding_mask=pad), out.detach())
    out.sum().backward()
    assert memory.grad[1, 5:].abs().max() == 0 and memory.grad[0].abs().max() > 0
    assert_all_params_get_grads(block)


def test_attention_pooling():
    pool = AttentionPooling(E, num_heads=2, num_queries=3).double()
    x = torch.randn(2, 6, E, dtype=F64, requires_grad=True)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 3:] = True
    pooled, weights = pool(x, key_padding_mask=pad, return_weights=True)
    assert pooled.shape == (2, 3, E) and weights.shape == (2, 2, 3, 6)
    assert pool.last_weights is not None and pool.last_weights.shape == (2, 2, 3, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 3, dtype=F64))
    assert (weights[0, ..., 3:] == 0).all()
    x2 = x.detach().clone()
    x2[0, 3:] = -3.0
    torch.testing.assert_close(pool(x2, key_padding_mask=pad), pooled.detach())
    assert pool.last_weights is None  # only kept when asked for
    (pooled.sum() + weights.square().sum()).backward()
    assert_all_params_get_grads(pool)


def test_blocks_train_with_dropout():
    x = torch.randn(2, 5, E)
    for block in (SelfAttentionBlock(E, H, dropout=0.3), CrossAttentionBlock(E, H, dropout=0.3)):
        args = (x,) if isinstance(block, SelfAttentionBlock) else (x, x)
        block.train()
        assert not torch.allclose(block(*args), block(*args))
        block.eval()
        torch.testing.assert_close(block(*args), block(*args))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SelfAttentionBlock(E, 3), "divisible"),
        (lambda: SelfAttentionBlock(E, H, dropout=-0.1), "dropout"),
        (lambda: CrossAttentionBlock(E, H, kv_dim=0), "kv_dim"),
        (lambda: AttentionPooling(E, num_queries=0), "num_queries"),
    ],
)
def test_block_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_block_forward_errors():
    block = SelfAttentionBlock(E, H)
    with pytest.raises(ValueError, match="x"):
        block(torch.randn(2, 5, E + 1))
    with pytest.raises(ValueError, match="key_padding_mask"):
        block(torch.randn(2, 5, E), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        block(torch.randn(2, 5, E), key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="memory"):
        CrossAttentionBlock(E, H)(torch.randn(2, 5, E), torch.randn(3, 5, E))


# ---------------------------------------------------------------- on the Triton kernels
# The same drop-ins with backend="triton" forced (the interpreter on CPU), in float32:
# the error against torch's module in float64 must be within 2x that of torch's own
# module in float32 (tests/accuracy.py).


@pytest.fixture
def on_triton(monkeypatch):
    """attn_kernels.nn calls with backend="triton"; returns the list of calls that reached the kernels."""
    import functools

    import attn_kernels.nn as ak_nn
    from attn_kernels import api, triton_ops

    reached = []
    for name in ("fused_attention", "attention_weights"):
        monkeypatch.setattr(ak_nn, name, functools.partial(getattr(api, name), backend="triton"))
        real = getattr(triton_ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            reached.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(triton_ops, name, spy)
    return reached


def _fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def assert_triton_within_rule(theirs, ours, inputs, **kwargs):
    """theirs: torch's module in float64 (the oracle); ours: float32 on the Triton kernels,
    loaded from its state dict; torch's own float32 module sets the budget."""
    from accuracy import assert_within_rule, typical

    theirs32 = copy.deepcopy(theirs).float()
    ours.load_state_dict(theirs32.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about mixed bool/float masks
        ref_out, ref_w = theirs(*inputs, **kwargs)
        cot = (torch.randn_like(ref_out), None if ref_w is None else torch.randn_like(ref_w))
        ref = run(theirs, inputs, kwargs, cot)
        inputs32, kwargs32 = [_fp32(t) for t in inputs], {n: _fp32(t) for n, t in kwargs.items()}
        cot32 = tuple(_fp32(c) for c in cot)
        pytorch = run(theirs32, inputs32, kwargs32, cot32)
        got = run(ours, inputs32, kwargs32, cot32)
    magnitude = typical(ref[0])
    assert_within_rule("out", got[0], ref[0], [pytorch[0]])
    if ref[1] is None:
        assert got[1] is None
    else:
        assert_within_rule("weights", got[1], ref[1], [pytorch[1]])
    for a, r, p in zip(got[2], ref[2], pytorch[2]):
        assert_within_rule("input grad", a, r, [p], magnitude=magnitude)
    for name in ref[3]:
        assert_within_rule(name, got[3][name], ref[3][name], [pytorch[3][name]], magnitude=magnitude)


TRITON_CASES = ["bool 2d", "float 3d", "padding", "padding + float 3d mask"]


@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_masks_on_triton(on_triton, case, need_weights):
    theirs, _ = make_pair(batch_first=True)
    ours = MultiheadAttention(E, H, batch_first=True)
    q, mem = tokens(L, batch_first=True), tokens(S, batch_first=True)
    assert_triton_within_rule(theirs, ours, (q, mem, mem), need_weights=need_weights, **MASK_CASES[case]())
    assert ("attention_weights" if need_weights else "fused_attention") in on_triton


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_attention_kinds_on_triton(on_triton, kind):
    theirs, _ = make_pair(kdim=8, vdim=12) if kind == "cross" else make_pair()
    ours = MultiheadAttention(E, H, kdim=8, vdim=12) if kind == "cross" else MultiheadAttention(E, H)
    q = tokens(L)
    inputs = (q, tokens(S, 8), tokens(S, 12)) if kind == "cross" else (q, q, q)
    assert_triton_within_rule(theirs, ours, inputs, need_weights=False, key_padding_mask=bool_mask(N, S if kind == "cross" else L))
    assert on_triton


def test_is_causal_hint_on_triton(on_triton):
    theirs, _ = make_pair(batch_first=True)
    ours = MultiheadAttention(E, H, batch_first=True)
    x = tokens(L, batch_first=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    assert_triton_within_rule(theirs, ours, (x, x, x), attn_mask=causal.isinf(), is_causal=True, need_weights=False)
    assert on_triton


def test_dropout_only_in_training_on_triton(on_triton):
    theirs, _ = make_pair(dropout=0.5)
    ours = MultiheadAttention(E, H, dropout=0.5)
    x = tokens(L).float()
    ours.load_state_dict(theirs.float().state_dict())
    ours.train()
    a, _ = ours(x, x, x, need_weights=False)
    b, _ = ours(x, x, x, need_weights=False)
    assert not torch.allclose(a, b) and on_triton
    ours.eval(), theirs.double().eval()
    assert_triton_within_rule(theirs, ours, (tokens(L),) * 3, need_weights=False)


def test_fully_masked_row_on_triton(on_triton):
    _, ours = make_pair(batch_first=True, dtype=torch.float32)
    x = tokens(L, batch_first=True, dtype=torch.float32)
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[2] = True
    out, weights = ours(x, x, x, attn_mask=mask)
    torch.testing.assert_close(out[:, 2], ours.out_proj.bias.expand(N, E), atol=0, rtol=0)
    assert (weights[:, 2] == 0).all() and torch.isfinite(out).all() and on_triton


def test_causal_block_with_padding_on_triton(on_triton):
    # the block on the kernels against the same block's math through SDPA in float64
    block = SelfAttentionBlock(E, H, causal=True)
    x = torch.randn(2, 6, E)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    got = block(x, key_padding_mask=pad)
    assert on_triton
    ref = block.double()
    x64 = x.double()
    q, k, v = (t.view(2, 6, H, E // H).transpose(1, 2) for t in ref.qkv(ref.norm1(x64)).chunk(3, -1))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() & ~pad[:, None, None, :]
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    y = x64 + ref.proj(attn.transpose(1, 2).reshape(2, 6, E))
    expected = y + ref.mlp(ref.norm2(y))
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kwargs", [{"need_weights": False}, {"need_weights": True}, {"causal": True}, {"padding": True}], ids=str
)
def test_mha_cuda_fp16_matches_torch(kwargs):
    theirs, ours = make_pair(dtype=torch.float16, device="cuda", batch_first=True)
    ref, _ = make_pair(dtype=F64, device="cuda", batch_first=True)
    ref.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 64, E, dtype=torch.float16, device="cuda")
    call = {"need_weights": kwargs.get("need_weights", False)}
    if kwargs.get("causal"):
        call.update(attn_mask=torch.ones(64, 64, dtype=torch.bool, device="cuda").triu(1), is_causal=True)
    if kwargs.get("padding"):
        pad = torch.zeros(2, 64, dtype=torch.bool, device="cuda")
        pad[0, 40:] = True
        call["key_padding_mask"] = pad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # masks run on the reference until the kernels take them
        xs = [x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_(), x.double().requires_grad_()]
        outs = [m(t, t, t, **call)[0] for m, t in zip((ours, theirs, ref), xs)]
    dout = torch.randn_like(outs[2])
    for o, t in zip(outs, xs):
        (o.double() * dout).sum().backward()  # noqa: B023
    err = lambda a: (a.double() - outs[2].double()).abs().max().item()  # noqa: E731
    assert err(outs[0]) <= 2 * err(outs[1]) + 2e-3
    gerr = lambda a: (a.double() - xs[2].grad.double()).abs().max().item()  # noqa: E731
    assert gerr(xs[0].grad) <= 2 * gerr(xs[1].grad) + 2e-3
