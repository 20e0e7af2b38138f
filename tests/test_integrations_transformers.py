"""attn_implementation="attn_kernels" in Hugging Face transformers: tiny randomly
initialised models (no download) give the logits and gradients of the same model
with attn_implementation="eager"."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import attn_kernels.integrations.transformers as ak_hf  # noqa: E402

ak_hf.register()
TOL = {"atol": 2e-5, "rtol": 1e-5}


def twins(model_cls, config):
    """(eager model, attn_kernels model) with the same random weights, in eval mode."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    eager = model_cls(config).eval()
    config = copy.deepcopy(config)
    config._attn_implementation = "attn_kernels"
    ours = model_cls(config).eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "attn_kernels"
    return eager, ours


def logits_and_grads(model, inputs, cotangent, keep):
    """Logits, and gradients of <logits[keep], cotangent[keep]> for every parameter."""
    model.zero_grad()
    logits = model(**inputs).logits
    (logits * cotangent * keep).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_model(eager, ours, inputs, keep=None):
    """Logits (where `keep`, broadcastable to them, is 1) and parameter gradients match."""
    with torch.no_grad():
        shape = eager(**inputs).logits.shape
    cotangent = torch.randn(shape)
    keep = torch.ones(shape) if keep is None else keep.to(torch.float32)
    logits_e, grads_e = logits_and_grads(eager, inputs, cotangent, keep)
    logits_o, grads_o = logits_and_grads(ours, inputs, cotangent, keep)
    torch.testing.assert_close(logits_o * keep, logits_e * keep, **TOL)
    assert grads_o.keys() == grads_e.keys() and len(grads_e) > 0
    for name in grads_e:
        torch.testing.assert_close(grads_o[name], grads_e[name], **TOL, msg=name)


@pytest.fixture
def llama_config():
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def spy(monkeypatch):
    """Record the keyword arguments of every call the backend makes to fused_attention."""
    calls, real = [], ak_hf.fused_attention

    def recording(q, k, v, **kwargs):
        calls.append({"heads": (q.shape[1], k.shape[1]), **kwargs})
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(ak_hf, "fused_attention", recording)
    return calls


def test_import_attn_kernels_does_not_import_transformers():
    code = "import sys, attn_kernels, attn_kernels.nn; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_llama_causal_gqa_with_padding(llama_config, monkeypatch):
    eager, ours = twins(transformers.LlamaForCausalLM, llama_config)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    calls = spy(monkeypatch)
    # padded query rows have no key to attend to: eager gives them a uniform average, the
    # kernels (and SDPA) 0; nothing else sees those rows, so compare the real tokens
    assert_same_model(eager, ours, {"input_ids": ids, "attention_mask": mask}, keep=mask[..., None])
    # key/value reach the kernel with their 2 heads: GQA without repeat_kv copies
    assert calls and all(c["heads"] == (4, 2) and c["enable_gqa"] for c in calls)
    assert all(c["attn_mask"] is not None and not c["is_causal"] for c in calls)


def test_llama_without_padding_uses_the_causal_flag(llama_config, monkeypatch):
    eager, ours = twins(transformers.LlamaForCausalLM, llama_config)
    calls = spy(monkeypatch)
    assert_same_model(eager, ours, {"input_ids": torch.randint(0, 64, (2, 9))})
    assert calls and all(c["is_causal"] and c["attn_mask"] is None for c in calls)


def test_llama_matches_sdpa_everywhere_and_generates_the_same(llama_config):
    eager, ours = twins(transformers.LlamaForCausalLM, llama_config)
    config = copy.deepcopy(llama_config)
    config._attn_implementation = "sdpa"
    sdpa = transformers.LlamaForCausalLM(config).eval()
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        inputs = {"input_ids": ids, "attention_mask": mask}
        torch.testing.assert_close(ours(**inputs).logits, sdpa(**inputs).logits, **TOL)
        kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False}
        # decoding: one query token against the cache (is_causal off, padding mask on)
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


def test_llama_output_attentions(llama_config):
    eager, ours = twins(transformers.LlamaForCausalLM, llama_config)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        want = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert got is not None and len(got) == len(want) == 2
    rows = mask.bool()[:, None, :, None]  # real query tokens
    for g, w in zip(got, want):
        assert g.shape == (2, 4, 6, 6)
        torch.testing.assert_close(g * rows, w * rows, **TOL)


def test_bert_bidirectional_with_padding(monkeypatch):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    eager, ours = twins(transformers.BertForTokenClassification, config)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # right padding: every query still has keys, so compare all rows
    calls = spy(monkeypatch)
    assert_same_model(eager, ours, {"input_ids": ids, "attention_mask": mask})
    assert len(calls) == 2 and all(c["attn_mask"] is not None and not c["is_causal"] for c in calls)
    assert_same_model(eager, ours, {"input_ids": ids})
    assert len(calls) == 4 and calls[-1]["attn_mask"] is None and not calls[-1]["is_causal"]


def test_vit(monkeypatch):
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    eager, ours = twins(transformers.ViTForImageClassification, config)
    calls = spy(monkeypatch)
    assert_same_model(eager, ours, {"pixel_values": torch.randn(2, 3, 16, 16)})
    assert len(calls) == 2 and not calls[0]["is_causal"]


def test_from_pretrained(tmp_path, llama_config):
    llama_config._attn_implementation = "eager"
    saved = transformers.LlamaForCausalLM(llama_config).eval()
    saved.save_pretrained(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="attn_kernels").eval()
    assert model.config._attn_implementation == "attn_kernels"
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, saved(input_ids=ids).logits, **TOL)


# ---------------------------------------------------------------- the same models on the Triton kernels


@pytest.fixture
def on_triton(monkeypatch):
    """The backend's calls with backend="triton" (the interpreter on CPU); returns the
    list of calls that reached the kernels."""
    import functools

    from attn_kernels import api, triton_ops

    reached = []
    for name in ("fused_attention", "attention_weights"):
        monkeypatch.setattr(ak_hf, name, functools.partial(getattr(api, name), backend="triton"))
        real = getattr(triton_ops, name)

        def spy_op(*args, _real=real, _name=name, **kwargs):
            reached.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(triton_ops, name, spy_op)
    return reached


@pytest.mark.parametrize("padding", [False, True])
def test_llama_on_triton(llama_config, on_triton, padding):
    eager, ours = twins(transformers.LlamaForCausalLM, llama_config)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    if padding:
        mask[1, :3] = 0  # left padding: compare the real tokens (see test_llama_causal_gqa_with_padding)
    assert_same_model(eager, ours, {"input_ids": ids, "attention_mask": mask}, keep=mask[..., None])
    assert on_triton.count("fused_attention") == 2  # one per layer


def test_bert_on_triton(on_triton):
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    eager, ours = twins(transformers.BertForTokenClassification, config)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    assert_same_model(eager, ours, {"input_ids": ids, "attention_mask": mask})
    assert on_triton


def test_llama_output_attentions_on_triton(llama_config, on_triton):
    eager, ours = twins(transformers.LlamaForCausalLM, llama_config)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        want = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    rows = mask.bool()[:, None, :, None]
    for g, w in zip(got, want):
        torch.testing.assert_close(g * rows, w * rows, **TOL)
    assert "attention_weights" in on_triton


def test_softcap_and_dropout_on_triton(on_triton):
    from attn_kernels import reference

    q, k, v = _qkv()
    out, _ = ak_hf.attention_forward(_Module(False), q, k, v, None, softcap=0.5)
    expected = reference.attention(q.double(), k.double(), v.double(), softcap=0.5, enable_gqa=True)
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=0)
    module = _Module(False)
    module.train()
    a, _ = ak_hf.attention_forward(module, q, k, v, None, dropout=0.5)
    b, _ = ak_hf.attention_forward(module, q, k, v, None, dropout=0.5)
    assert not torch.allclose(a, b)
    assert len(on_triton) == 3


# ---------------------------------------------------------------- the attention function itself


class _Module(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal


def _qkv(L=5, S=5, hq=4, hkv=2, D=8):
    return torch.randn(2, hq, L, D), torch.randn(2, hkv, S, D), torch.randn(2, hkv, S, D)


def _sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs).transpose(1, 2)


@pytest.mark.parametrize("module_causal, flag", [(True, None), (False, None), (False, True), (True, False)])
def test_causal_flag_and_module_default(module_causal, flag):
    q, k, v = _qkv()
    out, weights = ak_hf.attention_forward(_Module(module_causal), q, k, v, None, is_causal=flag)
    causal = module_causal if flag is None else flag
    assert weights is None and out.shape == (2, 5, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=causal))


def test_single_query_token_is_never_causal():
    q, k, v = _qkv(L=1, S=6)
    out, _ = ak_hf.attention_forward(_Module(True), q, k, v, None)
    torch.testing.assert_close(out, _sdpa(q, k, v))


@pytest.mark.parametrize("kind", ["bool", "float", "float32 mask, float64 query"])
def test_masks_and_scaling(kind):
    q, k, v = _qkv(L=4, S=6)
    if kind == "bool":
        mask = torch.rand(2, 1, 4, 6) > 0.3
        mask[..., 0] = True
    else:
        mask = torch.randn(2, 1, 4, 6)
    if kind.startswith("float32"):
        q, k, v = q.double(), k.double(), v.double()
    out, _ = ak_hf.attention_forward(_Module(True), q, k, v, mask, scaling=0.3)
    sdpa_mask = mask.to(q.dtype) if mask.is_floating_point() else mask
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=sdpa_mask, scale=0.3))


def test_position_bias_is_added():
    q, k, v = _qkv(L=4, S=4, hq=2, hkv=2)
    bias = torch.randn(1, 2, 4, 4)
    out, _ = ak_hf.attention_forward(_Module(False), q, k, v, None, position_bias=bias)
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=bias))
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    out, _ = ak_hf.attention_forward(_Module(True), q, k, v, None, position_bias=bias)
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf"))))


def test_dropout_only_in_training():
    q, k, v = _qkv()
    module = _Module(False)
    module.eval()
    out, _ = ak_hf.attention_forward(module, q, k, v, None, dropout=0.5)
    torch.testing.assert_close(out, _sdpa(q, k, v))
    module.train()
    a, _ = ak_hf.attention_forward(module, q, k, v, None, dropout=0.5)
    b, _ = ak_hf.attention_forward(module, q, k, v, None, dropout=0.5)
    assert not torch.allclose(a, b)


def test_softcap_is_passed_to_the_kernel_and_sinks_raise():
    from attn_kernels import reference

    q, k, v = _qkv()
    out, _ = ak_hf.attention_forward(_Module(False), q, k, v, None, softcap=0.5)
    expected = reference.attention(q, k, v, softcap=0.5, enable_gqa=q.shape[1] != k.shape[1])
    torch.testing.assert_close(out, expected.transpose(1, 2))
    with pytest.raises(ValueError, match="s_aux"):
        ak_hf.attention_forward(_Module(False), q, k, v, None, s_aux=torch.zeros(q.shape[1]))


def test_register_is_idempotent():
    assert ak_hf.register() == ak_hf.register() == "attn_kernels"
    assert "attn_kernels" in transformers.AttentionInterface._global_mapping
