"""The accuracy rule of the test suite (FlashAttention's convention):

    err(kernel) <= 2 * err(PyTorch at the same dtype) + floor

err is the max abs difference from the float64 oracle (`reference.py` in float64,
with every mask, window, causal alignment and ALiBi distance built in `oracles.py`
from the positions i, j and L, S) on the same inputs. "PyTorch at the same dtype" is
the larger error of two computations PyTorch users run, never the project's own
reference run in the input dtype (a budget taken from code under test, and one that
was 5-1000x too loose when it rounded the scores, exp and logsumexp to 16 bits):
  - FlashAttention-style (`flash_style`): the reference in float32 on the same
    low-precision inputs (softmax in fp32), O rounded to the dtype; the backward in
    fp32 with delta = rowsum(dO * O) taken from the rounded O, gradients rounded to
    the dtype;
  - SDPA's math backend at the input dtype, where SDPA can express the call (no
    softcap, dropout or ALiBi; its gradients only when the lse is not in the loss).
For the returned lse (float32) the budget comes from the float32 reference alone.
The floor (where PyTorch happens to be exact, e.g. S = 1) is small and relative to
the typical value (the median magnitude of the finite, non-zero reference values;
for gradients at least the output's, since a gradient whose terms cancel is ~0 in
float64), never to the largest: 1 ulp of fp16 / bf16, 32 ulps of fp32 (there both
errors are a few ulps and their ratio is noise; also the lse's floor).

Measured by `python scripts/accuracy_table.py` (tests/ACCURACY.md; CPU, Triton
interpreter, causal, L=100, S=129, E=64, unit inputs and x12): for out, dq, dk, dv in
fp16 / bf16 the budget is 2.1-2.8x PyTorch's own error (the old rule's, 2 x the
16-bit reference + 2 ulps at max|ref|: 5-1000x); for the lse 11-45x its fp32 error,
where the old one was 1e4-1e5x.
"""

from __future__ import annotations

import torch
from oracles import Oracle

from attn_kernels import reference

# the floor in units of rounding (eps) of the result's dtype, at the reference's typical magnitude
FLOOR_ULPS = {torch.float16: 1.0, torch.bfloat16: 1.0, torch.float32: 32.0, torch.float64: 32.0}
LSE_COTANGENT = 0.5  # the lse's weight in the loss when a call returns it


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref|, 0 where both are the same infinity (the lse of an empty row)."""
    x, ref = x.double(), ref.double()
    same = x == ref
    diff = torch.where(same, torch.zeros_like(x), (x - ref).abs())
    return diff.max().item() if diff.numel() else 0.0


def typical(ref: torch.Tensor) -> float:
    """The median magnitude of the finite, non-zero values of ref (1 when there are none):
    exact zeros (masked rows, unreached keys) do not make the floor vanish."""
    values = ref[torch.isfinite(ref) & (ref != 0)].double().abs()
    return values.median().item() if values.numel() else 1.0


def floor(ref: torch.Tensor, dtype: torch.dtype, magnitude: float = 0.0) -> float:
    """FLOOR_ULPS units of rounding of dtype at the typical magnitude of ref, or at
    `magnitude` when larger (a gradient whose terms cancel, e.g. dq of a row that sees
    one key, is ~0 in float64 while its terms have the output's magnitude)."""
    return FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * max(typical(ref), magnitude)


def budget(ref: torch.Tensor, dtype: torch.dtype, pytorch, magnitude: float = 0.0) -> float:
    """2 x the largest error of PyTorch's results (None entries skipped) + floor."""
    errs = [max_err(p, ref) for p in pytorch if p is not None]
    return 2.0 * max(errs) + floor(ref, dtype, magnitude)


def assert_within_rule(name: str, kernel: torch.Tensor, ref: torch.Tensor, pytorch, dtype=None, magnitude=0.0):
    """kernel and ref (float64) on the same inputs; pytorch: PyTorch's results at the
    kernel's precision (a list; None entries skipped); dtype: whose rounding sets the
    floor (default kernel.dtype); magnitude: a lower bound of the floor's typical value
    (gradients pass the output's, see `floor`)."""
    pytorch = [p for p in pytorch if p is not None]
    assert pytorch, f"{name}: no PyTorch result to set the budget"
    assert kernel.shape == ref.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(ref.shape)}"
    assert kernel.dtype == pytorch[0].dtype, f"{name}: dtype {kernel.dtype} != {pytorch[0].dtype}"
    assert not kernel.isnan().any(), f"{name}: NaN in the result"
    assert not ref.isnan().any(), f"{name}: NaN in the oracle (a broken test)"
    err = max_err(kernel, ref)
    bound = budget(ref, dtype or kernel.dtype, pytorch, magnitude)
    errs = ", ".join(f"{max_err(p, ref):.3g}" for p in pytorch)
    assert err <= bound, f"{name}: error {err:.3g} > 2 x PyTorch's ({errs}) + floor = {bound:.3g}"


def loss_of(out, lse, dout, dlse):
    """<out, dout> (+ <lse, dlse> over the finite lse when both are given)."""
    loss = (out * dout.to(out.dtype)).sum()
    if lse is not None and dlse is not None:
        loss = loss + (lse.masked_fill(lse.isinf(), 0.0) * dlse.to(lse.dtype)).sum()
    return loss


def flash_style(run, inputs, dtype, dout=None, dlse=None, rowsum=None, round_grads=True):
    """PyTorch at `dtype`, the way FlashAttention computes: run(*inputs in float32) ->
    (out, lse or None) on the same (low-precision) input values; O rounded to dtype.
    With dout: the backward in fp32 with delta from the rounded O (the lse cotangent
    is shifted by rowsum(dO * (O - O_rounded)), which is exactly that), gradients of
    the inputs that require grad rounded to dtype. rowsum maps a tensor shaped like out
    to the lse's layout (default: sum over the last dim). round_grads=False keeps the
    gradients in fp32 (to test this function). Returns (out, lse, grads)."""
    ins = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    out, lse = run(*ins)
    out_rounded = out.detach().to(dtype)
    grads = ()
    if dout is not None:
        with torch.no_grad():
            error = dout.float() * (out.detach() - out_rounded.float())
            shift = rowsum(error) if rowsum is not None else error.sum(-1)
            dlse_total = shift if dlse is None else dlse.float() + shift
        wanted = [t for t in ins if t.requires_grad]
        grads = torch.autograd.grad(loss_of(out, lse, dout.float(), dlse_total), wanted)
        grads = tuple(g.to(dtype) if round_grads else g for g in grads)
    return out_rounded, None if lse is None else lse.detach().float(), grads


def sdpa_math(q, k, v, attn_mask, scale=None, enable_gqa=False):
    """torch's SDPA, math backend, at the inputs' dtype."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa
        )


def check_against_reference(fn, q, k, v, grad=True, *, dropout_mask=None, **kwargs):
    """Run fn(q, k, v, **kwargs) and apply the rule to out (and lse with
    return_lse=True) and, with grad, to dq, dk, dv and the gradient of a float
    attn_mask that requires grad (the lse, when returned, is part of the loss).

    The oracle and PyTorch's runs take the call's causal flags, CausalBias, window and
    ALiBi as masks from `oracles.Oracle`, never through the package. fn runs first and
    before any random draw here, so a dropout test seeds the generator right before
    this call and passes the keep-mask it replays (`dropout_mask`, bool (..., Hq, L, S)).
    """
    with_lse = kwargs.get("return_lse", False)
    dtype = q.dtype
    user_mask = kwargs.get("attn_mask")
    float_mask = type(user_mask) is torch.Tensor and user_mask.is_floating_point()  # not a CausalBias
    mask_grad = grad and float_mask and user_mask.requires_grad

    # the inputs every run sees, in the input dtype; a float mask in it too, as SDPA requires
    lowp = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    mask_lowp = user_mask.detach().to(dtype).requires_grad_(mask_grad) if float_mask else None
    if mask_grad:
        lowp.append(mask_lowp)

    # the kernel
    call = dict(kwargs, attn_mask=mask_lowp) if float_mask else kwargs
    res = fn(*lowp[:3], **call)
    out_k, lse_k = res if with_lse else (res, None)
    dout = torch.randn(out_k.shape, device=out_k.device).to(dtype)  # exact in every run's dtype
    dlse = torch.full(lse_k.shape, LSE_COTANGENT, device=lse_k.device) if with_lse else None
    grads_k = torch.autograd.grad(loss_of(out_k, lse_k, dout, dlse), lowp) if grad else ()

    oracle = Oracle(kwargs, q, k)
    extra = dict(oracle.rest, dropout_mask=dropout_mask) if dropout_mask is not None else oracle.rest

    def run(q_, k_, v_, user=None, probs_dtype=None):
        """reference.attention with the oracle's masks, in q_'s dtype -> (out, lse)."""
        if user is None and float_mask:
            user = mask_lowp.detach().to(q_.dtype)
        return reference.attention(q_, k_, v_, attn_mask=oracle.mask(q_.dtype, user), return_lse=True,
                                   probs_dtype=probs_dtype, **extra)

    # the float64 oracle
    ref_ins = [t.detach().double().requires_grad_(t.requires_grad) for t in lowp]
    out_r, lse_r = run(*ref_ins)
    grads_r = torch.autograd.grad(loss_of(out_r, lse_r, dout, dlse), ref_ins) if grad else ()

    # PyTorch at the input dtype: FlashAttention-style (P rounded for P @ V, dS for dS K and dS^T Q, as the kernels do) ...
    def run_flash(*ins):
        return run(*ins, probs_dtype=dtype)

    out_f, lse_f, grads_f = flash_style(run_flash, lowp, dtype, dout if grad else None, dlse)

    # ... and SDPA's math backend where it can express the call (its grads: not with the lse in the loss)
    out_s, grads_s = None, (None,) * len(grads_k)
    if oracle.sdpa_expressible and dtype != torch.float64:
        sdpa_grad = grad and not with_lse
        sd_ins = [t.detach().requires_grad_(sdpa_grad) for t in lowp]
        user = sd_ins[3] if mask_grad else (mask_lowp.detach() if float_mask else None)
        out_s = sdpa_math(*sd_ins[:3], oracle.mask(dtype, user), oracle.rest.get("scale"),
                          oracle.rest.get("enable_gqa", False))
        if sdpa_grad:
            grads_s = torch.autograd.grad(loss_of(out_s, None, dout, None), sd_ins)
        out_s = out_s.detach()
        if out_s.isnan().any():  # rows SDPA leaves NaN: it does not express this call
            out_s, grads_s = None, (None,) * len(grads_k)

    assert_within_rule("out", out_k, out_r, [out_f, out_s])
    if with_lse:
        assert lse_k.dtype == torch.float32
        assert_within_rule("lse", lse_k, lse_r, [lse_f], torch.float32)
    for name, a, r, f, s in zip(("dq", "dk", "dv", "dmask"), grads_k, grads_r, grads_f, grads_s):
        if s is not None and s.isnan().any():
            s = None
        assert_within_rule(name, a, r, [f, s], magnitude=typical(out_r))


def check_weights(fn, q, k, grad=False, **kwargs):
    """fn(q, k, **kwargs) -> probabilities (..., Hq, L, S) (attention_weights) against
    the float64 oracle; PyTorch's: the fp32 reference rounded to the dtype. With grad,
    also the gradients of <P, W> for q, k and a float attn_mask that requires grad."""
    dtype = q.dtype
    user_mask = kwargs.get("attn_mask")
    float_mask = type(user_mask) is torch.Tensor and user_mask.is_floating_point()
    mask_grad = grad and float_mask and user_mask.requires_grad
    lowp = [t.detach().requires_grad_(grad) for t in (q, k)]
    mask_lowp = user_mask.detach().to(dtype).requires_grad_(mask_grad) if float_mask else None
    if mask_grad:
        lowp.append(mask_lowp)
    probs = fn(*lowp[:2], **(dict(kwargs, attn_mask=mask_lowp) if float_mask else kwargs))
    w = torch.randn(probs.shape, device=probs.device).to(dtype)
    grads_k = torch.autograd.grad(loss_of(probs, None, w, None), lowp) if grad else ()

    oracle = Oracle(kwargs, q, k)
    rest = {name: value for name, value in oracle.rest.items() if name != "dropout_p"}

    def run(q_, k_, user=None):
        if user is None and float_mask:
            user = mask_lowp.detach().to(q_.dtype)
        return reference.attention_weights(q_, k_, oracle.mask(q_.dtype, user), **rest), None

    ref_ins = [t.detach().double().requires_grad_(t.requires_grad) for t in lowp]
    ref, _ = run(*ref_ins)
    grads_r = torch.autograd.grad(loss_of(ref, None, w, None), ref_ins) if grad else ()
    probs_f, _, grads_f = flash_style(run, lowp, dtype, w if grad else None)
    assert_within_rule("weights", probs.detach(), ref.detach(), [probs_f])
    for name, a, r, f in zip(("dq", "dk", "dmask"), grads_k, grads_r, grads_f):
        assert_within_rule(name, a, r, [f], magnitude=typical(ref))
