"""Ring attention: K/V shards travel around the ring of ranks; each rank attends its
queries to every shard in turn and merges the partial results through their LSE.

Forward, on rank r of W, for step t = 0 .. W-1 (the shard of rank src = r - t):
    start sending the K/V shard it holds to r + 1 and receiving the next from r - 1
    (one batch_isend_irecv), then, while that travels, call
    fused_attention(q_rows, k_cols, v_cols, return_lse=True) for the rows and columns
    that the causal mask lets see each other (`ring_blocks`), and merge:
        lse = logaddexp(lse, lse_b);  out = out * exp(lse_old - lse) + out_b * exp(lse_b - lse)
    in fp32 (never in the input dtype: error would grow with W).
Backward: K/V travel around again, and with them fp32 accumulators of dK/dV that
reach their owner after W hops; dQ stays local. Each block's gradient is the one it
has inside the whole-sequence attention, computed from the global O and LSE (see
`_block_grads`). Communication per call: W-1 exchanges of K/V forward; W-1 of K/V
plus W of dK/dV backward.
"""

from __future__ import annotations

import torch

from ..api import fused_attention
from ._args import Call, require_self_attention, validate
from ._comm import accumulation_dtype, ring_exchange, wait

_ALL = slice(None)
_TAG_KV, _TAG_DKV = 0, 1


def ring_blocks(call: Call, src: int, len_q: int, len_k: int) -> list:
    """[(query rows, key columns, causal)] this rank computes against the K/V shard of
    rank `src`; an empty list when the causal mask hides that shard entirely.

    Causal, zigzag (rank r holds chunks r, 2W-1-r): the own shard is causal; the
    shard of src < r is fully visible to both local chunks but only its first chunk is
    earlier; of src > r, only the local second chunk sees it, fully. Contiguous: the
    own shard causal, earlier ranks fully visible, later ranks hidden.
    """
    if not call.is_causal:
        return [(_ALL, _ALL, False)]
    if src == call.rank:
        return [(_ALL, _ALL, True)]
    if call.layout == "contiguous":
        return [(_ALL, _ALL, False)] if src < call.rank else []
    if src < call.rank:
        return [(_ALL, slice(0, len_k // 2), False)]
    return [(slice(len_q // 2, len_q), _ALL, False)]


def _block(call: Call, q, k, v, causal: bool):
    """The single-device call on one block: (out_b, lse_b)."""
    return fused_attention(q, k, v, is_causal=causal, enable_gqa=call.enable_gqa, return_lse=True,
                           **call.attention_kwargs())


def _merge(out, lse, out_b, lse_b) -> None:
    """out, lse (accumulators, in place) <- the softmax over both key sets, from their LSEs."""
    new = torch.logaddexp(lse, lse_b.to(lse.dtype))
    safe = new.masked_fill(torch.isneginf(new), 0.0)  # rows no key reached yet stay 0 (not NaN)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(out_b.to(out.dtype) * torch.exp(lse_b - safe).unsqueeze(-1))
    lse.copy_(new)


def _block_grads(call: Call, q, k, v, out, lse, dout, dlse, causal: bool):
    """(dq, dk, dv) of one block inside the whole-sequence attention.

    The block's probabilities are P = w * P_b with w = exp(lse_b - lse) (lse: global).
    The single-device backward of the block call, given upstream gradients
        dout_b = w * dout,   dlse_b = rowsum(dout_b * (out_b - out)) + w * dlse,
    gives dS = P_b * (dout_b . v - rowsum(dout_b * out_b) + dlse_b)
             = P * (dout . v - rowsum(dout * out) + dlse),
    the exact gradient with delta from the global O. The block forward is recomputed
    for it (one extra block forward per step) so that any backend's own backward runs.
    """
    acc = lse.dtype
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out_b, lse_b = _block(call, q, k, v, causal)
    weight = torch.where(torch.isneginf(lse), 0.0, torch.exp(lse_b.detach().to(acc) - lse))
    dout_b = (dout.to(acc) * weight.unsqueeze(-1)).to(dout.dtype)
    dlse_b = (dout_b.to(acc) * (out_b.detach().to(acc) - out.to(acc))).sum(-1)
    if dlse is not None:
        dlse_b = dlse_b + weight * dlse.to(acc)
    return torch.autograd.grad((out_b, lse_b), (q, k, v), (dout_b, dlse_b.to(lse_b.dtype)))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: Call):
        acc = accumulation_dtype(q.dtype)
        B, H, L, _ = q.shape
        out = torch.zeros((B, H, L, v.shape[-1]), dtype=acc, device=q.device)
        lse = torch.full((B, H, L), float("-inf"), dtype=acc, device=q.device)
        kv = (k.contiguous(), v.contiguous())
        for step in range(call.world):
            if step + 1 < call.world:
                next_kv, works = ring_exchange(kv, call.group, call.rank, call.world, _TAG_KV)
            src = (call.rank - step) % call.world
            for rows, cols, causal in ring_blocks(call, src, L, k.shape[2]):
                out_b, lse_b = _block(call, q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal)
                _merge(out[:, :, rows], lse[:, :, rows], out_b, lse_b)
            if step + 1 < call.world:
                wait(works)
                kv = tuple(next_kv)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        acc = lse.dtype
        if dout is None:  # only the lse was used
            dout = torch.zeros_like(out)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = (k.contiguous(), v.contiguous())
        dkv, dkv_works = None, None  # dK/dV accumulators in flight to this rank, and their works
        for step in range(call.world):
            if step + 1 < call.world:
                next_kv, kv_works = ring_exchange(kv, call.group, call.rank, call.world, _TAG_KV)
            src = (call.rank - step) % call.world
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            for rows, cols, causal in ring_blocks(call, src, q.shape[2], k.shape[2]):
                g = _block_grads(call, q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], out[:, :, rows],
                                 lse[:, :, rows], dout[:, :, rows], None if dlse is None else dlse[:, :, rows], causal)
                dq[:, :, rows] += g[0]
                dk[:, :, cols] += g[1]
                dv[:, :, cols] += g[2]
            if call.world > 1:
                # the accumulators of src's dK/dV arrive from r - 1, gain this rank's part, go on to r + 1
                if dkv_works is not None:
                    wait(dkv_works)
                    dk += dkv[0]
                    dv += dkv[1]
                dkv, dkv_works = ring_exchange((dk, dv), call.group, call.rank, call.world, _TAG_DKV)
            else:
                dkv = (dk, dv)
            if step + 1 < call.world:
                wait(kv_works)
                kv = tuple(next_kv)
        wait(dkv_works)  # after W hops, this rank's own dK/dV
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def ring_attention(query, key, value, *, group=None, is_causal=False, scale=None, enable_gqa=False,
                   layout="zigzag", window_size=(-1, -1), softcap=0.0, return_lse=False, backend="auto"):
    """Attention over the whole sequence from this rank's shards, by ring attention.

    Args:
        query: (B, Hq, L_local, E), this rank's shard in `layout` (see `shard_sequence`).
        key: (B, Hkv, S_local, E); value: (B, Hkv, S_local, Ev): this rank's shards.
        group: the process group (default: the world).
        is_causal: causal in global positions (needs L_local == S_local).
        scale, enable_gqa, softcap, backend: as `fused_attention` (every block call
            runs on `backend`).
        layout: "zigzag" (balanced causal work) or "contiguous".
        window_size: only (-1, -1); sliding windows: use `allgather_attention` or
            `ulysses_attention`.
        return_lse: also return this rank's rows of the global lse.

    Returns:
        out (B, Hq, L_local, Ev) in the input dtype, this rank's rows of the attention
        over the whole sequence; with return_lse also lse (B, Hq, L_local), float32
        (float64 for float64 inputs), differentiable.
    """
    call = validate("ring_attention", query, key, value, group=group, layout=layout, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa, window_size=window_size, softcap=softcap,
                    backend=backend, return_lse=return_lse)
    if call.window != (-1, -1):
        raise NotImplementedError(
            f"ring_attention: window_size={call.window} is not supported (only (-1, -1)); "
            "use allgather_attention or ulysses_attention for sliding windows"
        )
    if call.is_causal:
        require_self_attention(call, query, key, "is_causal=True")
    out, lse = _RingAttention.apply(query, key, value, call)
    return (out, lse) if return_lse else out
