"""The accuracy rule of the test suite (FlashAttention's convention):

    err(kernel) <= 2 * err(PyTorch at the same dtype) + floor

err is the max abs difference from the float64 reference on the same inputs;
"PyTorch at the same dtype" is `reference.py` run in the input dtype; the floor is
two units of rounding of the result's dtype at the result's magnitude (it matters
where PyTorch happens to be exact, e.g. S = 1); in fp32 it is 1e-5 of the result's
magnitude, since there both errors are a few ulps and their ratio is noise.
"""

from __future__ import annotations

import torch

from attn_kernels import reference

FLOOR_ULPS = 2.0
FLOOR_MIN = 1e-5


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    same = x == ref  # also where both are the same infinity (lse of an empty row)
    diff = torch.where(same, torch.zeros_like(x), (x - ref).abs())
    return diff.max().item() if diff.numel() else 0.0


def floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    finite = ref[torch.isfinite(ref)]
    magnitude = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return max(FLOOR_ULPS * torch.finfo(dtype).eps, FLOOR_MIN) * magnitude


def assert_within_rule(name: str, kernel: torch.Tensor, lowp: torch.Tensor, ref: torch.Tensor):
    assert kernel.shape == ref.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(ref.shape)}"
    assert kernel.dtype == lowp.dtype, f"{name}: dtype {kernel.dtype} != {lowp.dtype}"
    assert not kernel.isnan().any(), f"{name}: NaN in the result"
    err, err_pt = max_err(kernel, ref), max_err(lowp, ref)
    bound = 2.0 * err_pt + floor(ref, lowp.dtype)
    assert err <= bound, f"{name}: error {err:.3g} > 2 x PyTorch's {err_pt:.3g} + floor = {bound:.3g}"


def check_against_reference(fn, q, k, v, grad=True, **kwargs):
    """Run fn(q, k, v, **kwargs), and the reference at float64 and at the input dtype,
    on the same inputs; apply the rule to out (and lse with return_lse=True) and,
    with grad, to dq, dk, dv (the lse, when returned, is part of the loss) and to the
    gradient of a float attn_mask that requires grad."""
    with_lse = kwargs.get("return_lse", False)
    mask = kwargs.get("attn_mask")
    float_mask = type(mask) is torch.Tensor and mask.is_floating_point()  # not a CausalBias
    mask_grad = grad and float_mask and mask.requires_grad
    dout = None
    results = {}
    for label, runner, dtype in (
        ("kernel", fn, q.dtype),
        ("lowp", reference.attention, q.dtype),
        ("ref", reference.attention, torch.float64),
    ):
        ins = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
        if float_mask:  # the mask in the run's dtype, as SDPA requires
            kwargs["attn_mask"] = mask.detach().to(dtype).requires_grad_(mask_grad)
            if mask_grad:
                ins.append(kwargs["attn_mask"])
        res = runner(*ins[:3], **kwargs)
        out, lse = res if with_lse else (res, None)
        grads = ()
        if grad:
            if dout is None:
                dout = torch.randn(out.shape, dtype=torch.float64, device=out.device)
            loss = (out * dout.to(out.dtype)).sum()
            if lse is not None:
                loss = loss + (lse.masked_fill(lse.isinf(), 0.0) * 0.5).sum()
            grads = torch.autograd.grad(loss, ins)
        results[label] = (out, lse, grads)

    (out_k, lse_k, g_k), (out_l, lse_l, g_l), (out_r, lse_r, g_r) = results.values()
    assert_within_rule("out", out_k, out_l, out_r)
    if with_lse:
        assert lse_k.dtype == torch.float32
        assert_within_rule("lse", lse_k, lse_l, lse_r)
    for name, a, b, c in zip(("dq", "dk", "dv", "dmask"), g_k, g_l, g_r):
        assert_within_rule(name, a, b, c)
