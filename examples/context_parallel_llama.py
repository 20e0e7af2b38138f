"""Context parallelism: a small Llama-style decoder trained with its sequence split
over 2 processes gives the losses and gradients of one process.

    python examples/context_parallel_llama.py                  # launches 2 gloo processes itself
    torchrun --nproc-per-node 2 examples/context_parallel_llama.py --device cuda   # NCCL, 2 GPUs

Every rank holds the same weights and the same batch, but embeds, projects and
scores only its shard of the sequence (zigzag layout: chunks r and 2W-1-r of 2W), with
RoPE at the tokens' global positions. Attention is the only layer that needs the
other shards: `attn_kernels.distributed.ring_attention` (or --scheme allgather /
ulysses) computes causal attention over the whole sequence. The loss is summed over
each rank's tokens and all-reduced, and the weight gradients are all-reduced (as DDP
would), so every rank takes the same optimizer step. Rank 0 also trains the same
model in one process on the whole sequence with `fused_attention` and reports the
largest difference in losses, first-step gradients and final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import common  # noqa: E402  (puts the repository on sys.path)
from attn_kernels import distributed as cp, fused_attention  # noqa: E402

SCHEMES = {"ring": cp.ring_attention, "allgather": cp.allgather_attention, "ulysses": cp.ulysses_attention}
VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 64, 64, 4, 2, 2


# ---- the model -------------------------------------------------------------------


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of x (B, H, L, D) at integer positions (L,) (rotate-half form)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    """Pre-norm decoder block: RMSNorm, grouped-query attention with RoPE, SwiGLU MLP."""

    def __init__(self):
        super().__init__()
        self.head_dim = DIM // HEADS
        self.attn_norm, self.mlp_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.wq = nn.Linear(DIM, HEADS * self.head_dim, bias=False)
        self.wkv = nn.Linear(DIM, 2 * KV_HEADS * self.head_dim, bias=False)
        self.wo = nn.Linear(HEADS * self.head_dim, DIM, bias=False)
        self.w_gate_up = nn.Linear(DIM, 2 * 2 * DIM, bias=False)
        self.w_down = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x, positions, attention):
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, L, HEADS, self.head_dim).transpose(1, 2)
        k, v = self.wkv(h).view(B, L, 2, KV_HEADS, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(rope(q, positions), rope(k, positions), v)
        x = x + self.wo(out.transpose(1, 2).reshape(B, L, -1))
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class TinyLlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens, positions, attention):
        """tokens (B, L) at global positions (L,) -> logits (B, L, VOCAB); `attention`
        maps q (B, H, L, D), k, v (B, KV_HEADS, L, D) to (B, H, L, D)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions, attention)
        return self.head(self.norm(x))


def make_batch(seed: int, batch: int, seq_len: int) -> tuple:
    """Tokens that repeat a random motif (a few steps on the same batch learn it) and
    next-token targets (-100 at the last position)."""
    gen = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (batch, 7), generator=gen)
    tokens = motif.repeat(1, -(-seq_len // 7))[:, :seq_len]
    targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
    return tokens, targets


# ---- training --------------------------------------------------------------------


def train(args, device, attention, shard) -> dict:
    """Train from seed args.seed; `shard(x, dim)` picks this process's part of the
    sequence and `attention` is the causal attention over it. Losses and gradients are
    summed over every process by `reduce` (identity in one process)."""
    torch.manual_seed(args.seed)
    model = TinyLlama().to(device=device, dtype=args.dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    positions = shard(torch.arange(args.seq_len, device=device), 0)
    reduce = (lambda t: dist.all_reduce(t)) if dist.is_initialized() else (lambda t: None)  # noqa: E731
    losses, first_grads = [], None
    for step in range(args.steps):
        tokens, targets = (shard(t.to(device), 1) for t in make_batch(args.seed, args.batch, args.seq_len))
        logits = model(tokens, positions, attention)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100)
        count = (targets != -100).sum().to(logits.dtype)
        reduce(count)
        optimizer.zero_grad()
        (loss_sum / count).backward()
        for p in model.parameters():
            reduce(p.grad)
        total = loss_sum.detach().to(args.dtype)
        reduce(total)
        losses.append((total / count).item())
        if first_grads is None:
            first_grads = [p.grad.detach().clone() for p in model.parameters()]
        optimizer.step()
    return dict(losses=losses, grads=first_grads, params=[p.detach() for p in model.parameters()])


def max_relative_diff(a: list, b: list) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def worker(args) -> dict:
    """One rank of the distributed run (a torchrun process, or one launched by `launch`)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
    try:
        scheme = SCHEMES[args.scheme]

        def attention(q, k, v):
            return scheme(q, k, v, is_causal=True, enable_gqa=True, layout=args.layout, backend=args.backend)

        started = time.time()
        sharded = train(args, device, attention, lambda x, dim: cp.shard_sequence(x, dim, layout=args.layout))
        seconds = time.time() - started
        dist.barrier()  # no rank tears its connections down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    # the same training in this one process, on the whole sequence
    whole = train(args, device, lambda q, k, v: fused_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                backend=args.backend), lambda x, dim: x)
    return dict(
        scheme=args.scheme, world_size=world, first_loss=sharded["losses"][0], last_loss=sharded["losses"][-1],
        max_loss_diff=max(abs(a - b) for a, b in zip(sharded["losses"], whole["losses"])),
        max_grad_diff=max_relative_diff(sharded["grads"], whole["grads"]),
        max_param_diff=max_relative_diff(sharded["params"], whole["params"]),
        seconds=seconds,
    )


def launch(args, argv) -> dict:
    """Start args.world_size copies of this script as gloo ranks (as torchrun would) and
    return rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   WORLD_SIZE=str(args.world_size))
        procs = [subprocess.Popen([sys.executable, __file__, *argv, "--results", str(out)],
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(args.world_size)]
        try:
            codes = [p.wait(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise RuntimeError(f"a rank failed: exit codes {codes}")
        return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extra_args(parser):
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="ring")
    parser.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    parser.add_argument("--world-size", type=int, default=2, help="processes to launch (without torchrun)")
    parser.add_argument("--seq-len", type=int, default=64, help="global sequence length (divisible by 2W)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="float64 makes the match exact to rounding; float32 shows fp32 rounding")
    parser.add_argument("--backend", default="auto", help="fused_attention backend of every attention call")
    parser.add_argument("--results", default=None, help=argparse.SUPPRESS)  # set by `launch` for rank 0


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = common.parse_args(__doc__.splitlines()[0], default_steps=5, argv=argv, extra=_extra_args)
    args.dtype = getattr(torch, args.dtype)
    if "RANK" not in os.environ:  # not a rank yet: start the ranks
        results = launch(args, argv)
        print(json.dumps(results, indent=1))
        return results
    results = worker(args)
    if args.results and results:
        Path(args.results).write_text(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
