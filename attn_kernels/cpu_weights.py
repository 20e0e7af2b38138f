"""attention_weights on the CPU backend: the probabilities softmax(scores), a block of
query rows at a time (the result holds L x S values per head: that is what is asked
for; no other L x S buffer is made).

Forward, per block of rows i (all the keys j its band allows, in one tile):
    s = scores(i, j)  (cpu_tiles.Problem.scores);  lse_i = logsumexp_j s;  W = exp(s - lse)
Backward (dW the gradient of W):
    D_i = rowsum(dW * W);  dS = P * (dW - D)   (= the float mask's gradient)
    dS *= 1 - tanh^2 (softcap);  dQ_i = scale * dS K;  dK += scale * dS^T Q_i
P is the saved W for float32 / float64 without softcap; otherwise it is recomputed
in float32 from the saved lse (16-bit W is rounded; softcap needs the tanh anyway).
"""

from __future__ import annotations

import torch

from . import cpu_tiles
from .cpu_blocked import grad_buffers
from .cpu_tiles import Problem


def _row_blocks(prob: Problem) -> list:
    """Blocks of query rows: scores against every key of a tile, or of an eighth of
    the result (which is there anyway) if that is more; at most 128 rows."""
    Z, Hkv, G = prob.sizes
    row = max(1, Z * Hkv * G * prob.len_k)
    budget = max(cpu_tiles.TILE_ELEMS, row * prob.len_q // 8)
    rows = max(1, min(128, budget // row))
    return [(i0, min(i0 + rows, prob.len_q)) for i0 in range(0, prob.len_q, rows)]


class BlockedWeights(torch.autograd.Function):
    """(q5 (Z, Hkv, G, L, E), k4 (Z, Hkv, S, E), mask) -> W (Z, Hkv, G, L, S) in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, mask, make):
        prob = make(q, k, None, mask)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=prob.acc)
        probs = torch.zeros((*q.shape[:-1], k.shape[2]), dtype=q.dtype)
        for i0, i1 in _row_blocks(prob):
            j0, j1 = prob.key_span(i0, i1)
            if j1 == j0:
                continue
            s, _ = prob.scores(prob.q_tile(i0, i1), prob.kv_tile(k, j0, j1), i0, i1, j0, j1)
            block_lse = torch.logsumexp(s, dim=-1, keepdim=True)
            lse[:, :, :, i0:i1] = block_lse.squeeze(-1)
            probs[:, :, :, i0:i1, j0:j1] = s.sub_(block_lse.masked_fill(torch.isneginf(block_lse), 0.0)).exp_()
        ctx.make = make
        ctx.save_for_backward(q, k, mask, lse, probs)
        return probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dweights):
        q, k, mask, lse, probs = ctx.saved_tensors
        prob = ctx.make(q, k, None, mask)
        want = ctx.needs_input_grad
        grads = grad_buffers((want[0], want[1], want[2]), prob, names=("q", "k", "mask"))
        recompute = prob.softcap > 0.0 or probs.dtype != prob.acc
        lse_safe = lse.masked_fill(torch.isneginf(lse), 0.0)
        Z, Hkv, G = prob.sizes
        for i0, i1 in _row_blocks(prob):
            j0, j1 = prob.key_span(i0, i1)
            if j1 == j0:
                continue
            qi, kj = prob.q_tile(i0, i1), prob.kv_tile(k, j0, j1)
            tanh = None
            if recompute:
                s, tanh = prob.scores(qi, kj, i0, i1, j0, j1, keep_tanh=True)
                p = s.sub_(lse_safe[:, :, :, i0:i1, None]).exp_()
            else:
                p = probs[:, :, :, i0:i1, j0:j1]
            dw = dweights[:, :, :, i0:i1, j0:j1].to(prob.acc)
            ds = (dw - (dw * p).sum(-1, keepdim=True)).mul_(p)  # W is 0 outside [j0, j1): D needs no more
            if "mask" in grads:
                prob.mask.accumulate(grads["mask"], ds, i0, i1, j0, j1)
            if tanh is not None:
                ds.mul_(tanh.square_().neg_().add_(1.0))
            ds = ds.view(Z, Hkv, G * (i1 - i0), j1 - j0)
            if "q" in grads:
                grads["q"][:, :, :, i0:i1] += torch.matmul(ds, kj).view(Z, Hkv, G, i1 - i0, kj.shape[-1])
            if "k" in grads:
                grads["k"][:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qi)  # qi holds the scale
        if "q" in grads:
            grads["q"].mul_(prob.scale)
        dmask = prob.mask.restore(grads["mask"], mask.dtype) if "mask" in grads else None
        return (
            grads["q"].to(q.dtype) if "q" in grads else None,
            grads["k"].to(k.dtype) if "k" in grads else None,
            dmask,
            None,
        )
