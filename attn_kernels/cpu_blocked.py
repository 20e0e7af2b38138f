"""The CPU backend's blocked attention: forward and backward with online softmax,
O(N) memory (never an L x S buffer), for the calls torch's fused CPU kernel does not
cover (see cpu.py).

Forward (FlashAttention-2, per query block i over the key blocks j it may see):
    s = scores(i, j)                              cpu_tiles.Problem.scores
    m' = max(m, rowmax s);  p = exp(s - m')       (rows with only -inf keep m' = -inf, p = 0)
    l = l * exp(m - m') + rowsum p
    acc = acc * exp(m - m') + (p * keep) @ v_j    keep: dropout keep-mask / (1 - p_drop)
    out = acc / l  (0 where l = 0);  lse = m + log l  (-inf where l = 0)

Backward (per key block j over the query blocks i that may see it; P recomputed from lse):
    D = rowsum(dO * O) - dlse                    dlse: the returned lse's gradient
    p = exp(s - lse);  pd = p * keep / (1 - p_drop)
    dV_j += pd^T dO_i;  dP = (dO_i V_j^T) * keep / (1 - p_drop)
    dS = p * (dP - D)                            = d loss / d score, the float mask's gradient
    dS *= 1 - tanh^2                             through the softcap
    dQ_i += scale * dS K_j;  dK_j += scale * dS^T Q_i

Accumulation is float32 (float64 for float64 inputs); dQ, dK, dV are accumulated in
full-size buffers (O(N * D)), the mask gradient in a buffer of the mask's own shape.
The backward is sequential tensor code: bit-reproducible.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cpu_tiles import MaskLayout, Problem


def forward(prob: Problem, out: Optional[torch.Tensor], lse: torch.Tensor) -> None:
    """Write out (Z, Hkv, G, L, Ev) (skipped when prob.v is None) and lse (Z, Hkv, G, L)."""
    Z, Hkv, G = prob.sizes
    neg_inf = float("-inf")
    for i0, i1 in prob.query_blocks():
        rows = i1 - i0
        qi = prob.q_tile(i0, i1)
        m = torch.full((Z, Hkv, G, rows, 1), neg_inf, dtype=prob.acc)
        l = torch.zeros((Z, Hkv, G, rows, 1), dtype=prob.acc)
        acc = None
        if prob.v is not None:
            acc = torch.zeros((Z, Hkv, G * rows, prob.v.shape[-1]), dtype=prob.acc)
        for j0, j1 in prob.key_blocks(i0, i1):
            s, _ = prob.scores(qi, prob.kv_tile(prob.k, j0, j1), i0, i1, j0, j1)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == neg_inf, 0.0)
            p = s.sub_(m_safe).exp_()
            alpha = (m - m_safe).exp_()
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            if acc is not None:
                if prob.dropout_p > 0.0:
                    p.masked_fill_(~prob.keep(i0, i1, j0, j1), 0.0)
                acc.mul_(alpha.view(Z, Hkv, G * rows, 1))
                acc.add_(torch.matmul(p.view(Z, Hkv, G * rows, j1 - j0), prob.kv_tile(prob.v, j0, j1)))
            m = m_new
        empty = l == 0.0
        lse[:, :, :, i0:i1] = (m + torch.log(l)).masked_fill_(empty, neg_inf).squeeze(-1)
        if acc is not None:
            inv = 1.0 / (1.0 - prob.dropout_p) if prob.dropout_p > 0.0 else 1.0
            out_tile = acc.view(Z, Hkv, G, rows, acc.shape[-1]) * (inv / l.masked_fill(empty, 1.0))
            out[:, :, :, i0:i1] = out_tile


def row_delta(dout, out, dlse=None) -> torch.Tensor:
    """D = rowsum(dO * O) - dlse, in float32 / float64: (..., L)."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    return delta if dlse is None else delta - dlse.to(acc)


def backward(prob: Problem, lse, delta, grads: dict, dout=None, dweights=None) -> None:
    """Accumulate into grads["q"] (Z, Hkv, G, L, E), ["k"] (Z, Hkv, S, E), ["v"]
    (Z, Hkv, S, Ev) and ["mask"] (MaskLayout.mask5's shape), whichever are present,
    all in the accumulation dtype. lse, delta (Z, Hkv, G, L). The gradient reaches the
    probabilities either from dout (Z, Hkv, G, L, Ev) through V (attention), or as
    dweights (Z, Hkv, G, L, S) (attention_weights, no dropout)."""
    Z, Hkv, G = prob.sizes
    lse_safe = lse.to(prob.acc).masked_fill(torch.isneginf(lse), 0.0)  # empty rows: s = -inf, p = 0
    drop = prob.dropout_p > 0.0
    inv_keep = 1.0 / (1.0 - prob.dropout_p) if drop else 1.0
    dq, dk, dv = grads.get("q"), grads.get("k"), grads.get("v")
    dmask = grads.get("mask")
    for j0, j1 in prob.key_blocks_all():
        cols = j1 - j0
        kj = prob.kv_tile(prob.k, j0, j1)
        vj = prob.kv_tile(prob.v, j0, j1) if dweights is None else None
        for i0, i1 in prob.query_blocks_for(j0, j1):
            rows = i1 - i0
            qi = prob.q_tile(i0, i1)
            s, tanh = prob.scores(qi, kj, i0, i1, j0, j1, keep_tanh=True)
            p = s.sub_(lse_safe[:, :, :, i0:i1, None]).exp_()
            if dweights is not None:
                ds = dweights[:, :, :, i0:i1, j0:j1].to(prob.acc) - delta[:, :, :, i0:i1, None]
            else:
                do_i = dout[:, :, :, i0:i1].to(prob.acc).reshape(Z, Hkv, G * rows, dout.shape[-1])
                keep = prob.keep(i0, i1, j0, j1) if drop else None
                if dv is not None:
                    pd = p.masked_fill(~keep, 0.0).mul_(inv_keep) if drop else p
                    dv[:, :, j0:j1] += torch.matmul(pd.view(Z, Hkv, G * rows, cols).transpose(-1, -2), do_i)
                ds = torch.matmul(do_i, vj.transpose(-1, -2)).view(Z, Hkv, G, rows, cols)  # dP
                if drop:
                    ds.masked_fill_(~keep, 0.0).mul_(inv_keep)
                ds.sub_(delta[:, :, :, i0:i1, None])
            ds.mul_(p)
            if dmask is not None:
                prob.mask.accumulate(dmask, ds, i0, i1, j0, j1)
            if tanh is not None:
                ds.mul_(tanh.square_().neg_().add_(1.0))
            ds = ds.view(Z, Hkv, G * rows, cols)
            if dq is not None:
                dq[:, :, :, i0:i1] += torch.matmul(ds, kj).view(Z, Hkv, G, rows, kj.shape[-1])
            if dk is not None:
                dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qi)  # qi holds the scale
    if dq is not None:
        dq.mul_(prob.scale)


def grad_buffers(want, prob: Problem, names=("q", "k", "v", "mask")) -> dict:
    """Zeroed accumulation buffers for the inputs whose gradient is wanted."""
    shapes = {"q": prob.q.shape, "k": prob.k.shape, "v": None if prob.v is None else prob.v.shape,
              "mask": None if prob.mask is None else prob.mask.mask5.shape}
    return {n: torch.zeros(shapes[n], dtype=prob.acc) for n, w in zip(names, want) if w and shapes[n] is not None}


class BlockedAttention(torch.autograd.Function):
    """(q5, k4, v4, mask) -> (out5, lse4) on the blocked path; differentiable in q, k, v,
    a float mask and through the returned lse. `make` builds the Problem from the
    (possibly detached) tensors, so the backward sees the same modifiers."""

    @staticmethod
    def forward(ctx, q, k, v, mask, make):
        prob = make(q, k, v, mask)
        Z, Hkv, G, L, _ = q.shape
        out = torch.empty((Z, Hkv, G, L, v.shape[-1]), dtype=q.dtype)
        lse = torch.empty((Z, Hkv, G, L), dtype=prob.acc)
        forward(prob, out, lse)
        ctx.make = make
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse.float() if lse.dtype != torch.float64 else lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        want = ctx.needs_input_grad
        if dout is None and dlse is None:
            return None, None, None, None, None
        prob = ctx.make(q, k, v, mask)
        if dout is None:
            dout = torch.zeros_like(out)
        grads = grad_buffers(want[:4], prob)
        backward(prob, lse, row_delta(dout, out, dlse), grads, dout=dout)
        dmask = prob.mask.restore(grads["mask"], mask.dtype) if "mask" in grads else None
        return (
            grads["q"].to(q.dtype) if "q" in grads else None,
            grads["k"].to(k.dtype) if "k" in grads else None,
            grads["v"].to(v.dtype) if "v" in grads else None,
            dmask,
            None,
        )


def mask_layout(mask, batch, heads_q, heads_kv) -> Optional[MaskLayout]:
    return None if mask is None else MaskLayout(mask, batch, heads_q, heads_kv)
