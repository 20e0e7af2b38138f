"""attention_weights on the CPU backend: the probabilities softmax(scores), tile by tile.

    lse = the blocked forward's log-sum-exp (cpu_blocked.forward without V)
    W[i, j] = exp(s_ij - lse_i)                 0 on rows with no allowed key
Backward (W is the output, dW its gradient):
    D_i = rowsum(dW * W);  dS = P * (dW - D)    P recomputed from lse in float32
then dQ, dK and the float mask's gradient as in cpu_blocked.backward. The result has
L x S values per head (it is what was asked for); no other L x S buffer is made.
"""

from __future__ import annotations

import torch

from .cpu_blocked import backward, forward, grad_buffers
from .cpu_tiles import Problem


def _fill_probs(prob: Problem, lse: torch.Tensor, probs: torch.Tensor) -> None:
    lse_safe = lse.masked_fill(torch.isneginf(lse), 0.0)
    for i0, i1 in prob.query_blocks():
        qi = prob.q_tile(i0, i1)
        for j0, j1 in prob.key_blocks(i0, i1):
            s, _ = prob.scores(qi, prob.kv_tile(prob.k, j0, j1), i0, i1, j0, j1)
            probs[:, :, :, i0:i1, j0:j1] = s.sub_(lse_safe[:, :, :, i0:i1, None]).exp_()


class BlockedWeights(torch.autograd.Function):
    """(q5 (Z, Hkv, G, L, E), k4 (Z, Hkv, S, E), mask) -> W (Z, Hkv, G, L, S) in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, mask, make):
        prob = make(q, k, None, mask)
        lse = torch.empty(q.shape[:-1], dtype=prob.acc)
        forward(prob, None, lse)
        probs = torch.zeros((*q.shape[:-1], k.shape[2]), dtype=q.dtype)
        _fill_probs(prob, lse, probs)
        ctx.make = make
        ctx.save_for_backward(q, k, mask, lse, probs)
        return probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dweights):
        q, k, mask, lse, probs = ctx.saved_tensors
        prob = ctx.make(q, k, None, mask)
        delta = torch.empty(lse.shape, dtype=prob.acc)
        for i0, i1 in prob.query_blocks():  # rowsum(dW * W), a block of rows at a time
            rows = (slice(None),) * 3 + (slice(i0, i1),)
            delta[rows] = (dweights[rows].to(prob.acc) * probs[rows].to(prob.acc)).sum(-1)
        want = ctx.needs_input_grad
        grads = grad_buffers((want[0], want[1], want[2]), prob, names=("q", "k", "mask"))
        backward(prob, lse, delta, grads, dweights=dweights)
        dmask = prob.mask.restore(grads["mask"], mask.dtype) if "mask" in grads else None
        return (
            grads["q"].to(q.dtype) if "q" in grads else None,
            grads["k"].to(k.dtype) if "k" in grads else None,
            dmask,
            None,
        )
