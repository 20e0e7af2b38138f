"""The eager reference: the tutorial's worked examples with their true values, and
agreement with torch's own SDPA (float64 math) on every feature the oracle has."""

import pytest
import torch
import torch.nn.functional as F

from attn_kernels import attention_weights, fused_attention, reference


def test_seed_article_example_weights_and_output():
    # ../shared/seed-article.txt, with the default 1/sqrt(E) scale (the article prints other numbers)
    q = torch.tensor([[1.0, 0.8]])
    k = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.9]])
    v = torch.tensor([[1.0, 0.1], [0.9, 0.2], [0.8, 0.3]])
    weights = attention_weights(q, k)
    out = fused_attention(q, k, v)
    torch.testing.assert_close(weights, torch.tensor([[0.2984, 0.2942, 0.4073]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, torch.tensor([[0.8891, 0.2109]]), atol=1e-4, rtol=0)


def test_seed_article_two_keys():
    q = torch.tensor([[2.0, 3.0, 1.0]])
    k = torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    torch.testing.assert_close(attention_weights(q, k), torch.tensor([[0.7604, 0.2396]]), atol=1e-4, rtol=0)


def _qkv(hq=4, hkv=4, L=9, S=13, E=8, Ev=6):
    f64 = torch.float64
    return torch.randn(2, hq, L, E, dtype=f64), torch.randn(2, hkv, S, E, dtype=f64), torch.randn(2, hkv, S, Ev, dtype=f64)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"scale": 1.0},
        {"enable_gqa": True},
        {"enable_gqa": True, "is_causal": True},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
    ],
    ids=["plain", "causal", "scale", "gqa", "gqa-causal", "bool-mask", "float-mask"],
)
def test_reference_matches_sdpa(kwargs):
    q, k, v = _qkv(hkv=2 if kwargs.get("enable_gqa") else 4)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(9, 13) > 0.3
        kwargs["attn_mask"][:, 0] = True  # SDPA gives NaN for fully masked rows
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 9, 13, dtype=torch.float64)
    out, lse = reference.attention(q, k, v, return_lse=True, **kwargs)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs))
    assert lse.shape == (2, 4, 9)


def test_fully_masked_rows_give_zero_not_nan():
    q, k, v = _qkv()
    mask = torch.ones(9, 13, dtype=torch.bool)
    mask[3] = False
    out, lse = reference.attention(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.isneginf(lse[:, :, 3]).all() and torch.isfinite(lse[:, :, :3]).all()
    weights = reference.attention_weights(q, k, attn_mask=mask)
    assert torch.equal(weights[:, :, 3], torch.zeros_like(weights[:, :, 3]))


def test_dropout_mask_replays_exactly():
    q, k, v = _qkv()
    keep = torch.rand(2, 4, 9, 13) > 0.25
    out = reference.attention(q, k, v, dropout_p=0.25, dropout_mask=keep)
    probs = reference.attention_weights(q, k)
    torch.testing.assert_close(out, (probs * keep / 0.75) @ v)


def test_dropout_is_random_and_unbiased_in_expectation():
    q, k, v = _qkv(L=4, S=5)
    no_drop = reference.attention(q, k, v)
    drops = torch.stack([reference.attention(q, k, v, dropout_p=0.5) for _ in range(2000)])
    assert not torch.equal(drops[0], drops[1])
    torch.testing.assert_close(drops.mean(0), no_drop, atol=0.1, rtol=0)
