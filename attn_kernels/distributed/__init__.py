"""Context (sequence) parallelism on torch.distributed: attention over a sequence split
across ranks, equal to `fused_attention` on the whole sequence, forward and backward.

    shard_sequence(x, dim, *, group, layout)     this rank's part of a full tensor
    unshard_sequence(x, dim, *, group, layout)   the full tensor from every rank's part
    ring_attention(q, k, v, ...)                 K/V shards travel around a ring (p2p)
    allgather_attention(q, k, v, ..., cu_seqlens)  all-gather K/V (Llama 3); windows, documents
    ulysses_attention(q, k, v, ...)              all-to-all from sequence to head split

Each rank passes its shards (B, H, N/W, D) in a layout ("zigzag": chunks r and 2W-1-r
of 2W, which balances causal work; "contiguous": chunk r of W) and gets its rows of
the output (and of the lse). Causal masks and windows are in global positions. Any
backend of `fused_attention` runs the local work (the reference on CPU, the Triton
kernels on GPUs or under the interpreter); NCCL on GPUs, gloo on CPU.

| scheme    | communication per call (fwd / bwd)                  | limits                          |
| --------- | --------------------------------------------------- | ------------------------------- |
| ring      | W-1 K/V exchanges / W-1 K/V + W dK/dV exchanges      | no windows; causal needs L == S |
| allgather | all-gather K, V / reduce-scatter dK, dV (fp32)       | whole K/V in memory per rank    |
| ulysses   | all-to-all Q, K, V, O (+lse) / the same in reverse  | heads divisible by W            |

Every call first all-gathers a small record of shapes and flags (one collective), so
arguments that differ across ranks raise the same ValueError on every rank instead
of deadlocking; an uninitialised process group raises a RuntimeError.

Why the backward is built this way. Ulysses and all-gather are compositions of
autograd-aware collectives (`_AllToAll`, `_GatherRows`) with one ordinary
`fused_attention` (or `fused_attention_varlen`) call, so the single-device backward
runs unchanged. The ring is a custom autograd Function: each step's block needs its
gradient *inside the whole-sequence softmax*, i.e. with the global O and LSE, which
the block's own autograd does not know. Rather than reaching into a backend's
backward kernel (`triton_bwd` takes out/lse, the reference has none), `ring._block_grads`
recomputes the block with the public `fused_attention(..., return_lse=True)` and
feeds `torch.autograd.grad` upstream gradients rescaled so that the result is exact
(dout_b = w dout and an lse gradient that swaps the block's delta for the global
one; derivation there). That keeps this package on the public API and every backend
at the price of one block forward per ring step in the backward (about +40% backward
FLOPs); a backend hook `ops.attention_backward(dout, q, k, v, out, lse, dlse)` would
remove it, and `_block_grads` is the one place to call it from.
"""

from .allgather import allgather_attention
from .ring import ring_attention
from .sharding import LAYOUTS, shard_sequence, unshard_sequence
from .ulysses import ulysses_attention

__all__ = [
    "shard_sequence",
    "unshard_sequence",
    "ring_attention",
    "allgather_attention",
    "ulysses_attention",
    "LAYOUTS",
]
