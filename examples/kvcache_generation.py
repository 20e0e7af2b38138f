"""Greedy generation with a KV cache: prefill with `fused_attention`, then one token at
a time with `fused_attention_with_kvcache`, checked against recomputing full causal
attention over the whole sequence at every step (the tokens must be identical).

    python examples/kvcache_generation.py [--steps 24] [--paged] [--seed 0] [--backend auto]

A small randomly initialised GQA decoder (4 query heads sharing 2 key/value heads);
no training is needed to compare two ways of computing the same greedy continuation.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from attn_kernels import fused_attention, fused_attention_with_kvcache

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 97, 64, 4, 2, 2
HEAD_DIM = DIM // HEADS
BLOCK_SIZE = 16


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q = nn.Linear(DIM, HEADS * HEAD_DIM)
        self.kv = nn.Linear(DIM, 2 * KV_HEADS * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def project(self, x):
        """x (B, L, DIM) -> q (B, L, H, D), k and v (B, L, Hkv, D)."""
        B, L, _ = x.shape
        h = self.norm1(x)
        k, v = self.kv(h).view(B, L, 2, KV_HEADS, HEAD_DIM).unbind(2)
        return self.q(h).view(B, L, HEADS, HEAD_DIM), k, v

    def finish(self, x, attn):
        x = x + self.out(attn.flatten(2))
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        """Full causal attention over tokens (B, L) -> logits (B, L, VOCAB)."""
        x = self.embed(tokens)
        for layer in self.layers:
            q, k, v = layer.project(x)
            attn = fused_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True,
                                   backend=self.backend)
            x = layer.finish(x, attn.transpose(1, 2))
        return self.head(x)

    def step(self, tokens, caches, cache_seqlens, block_table=None):
        """New tokens (B, n) against the caches, which receive their keys -> logits (B, n, VOCAB)."""
        x = self.embed(tokens)
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            q, k, v = layer.project(x)
            attn = fused_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=k, v_new=v,
                                                block_table=block_table, backend=self.backend)
            x = layer.finish(x, attn)
        return self.head(x)


def new_caches(batch: int, capacity: int, paged: bool, device):
    """Per layer (k_cache, v_cache); paged ones come with a shuffled block table."""
    if not paged:
        shape = (batch, capacity, KV_HEADS, HEAD_DIM)
        return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in range(LAYERS)], None
    blocks = batch * capacity // BLOCK_SIZE
    table = torch.randperm(blocks, device=device).view(batch, -1).to(torch.int32)
    shape = (blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in range(LAYERS)], table


@torch.no_grad()
def generate_with_cache(model, prompt, steps: int, paged: bool):
    B, L = prompt.shape
    capacity = -(-(L + steps) // BLOCK_SIZE) * BLOCK_SIZE
    caches, table = new_caches(B, capacity, paged, prompt.device)
    seqlens = torch.zeros(B, dtype=torch.int32, device=prompt.device)
    logits = model.step(prompt, caches, seqlens, table)  # prefill: the whole prompt at once
    seqlens += L
    tokens = [logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        logits = model.step(tokens[-1][:, None], caches, seqlens, table)
        seqlens += 1
        tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


@torch.no_grad()
def generate_by_recomputing(model, prompt, steps: int):
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--paged", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", help="auto | triton | reference")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyDecoder(args.backend).to(device).eval()
    prompt = torch.randint(0, VOCAB, (3, 11), device=device)

    start = time.perf_counter()
    cached = generate_with_cache(model, prompt, args.steps, args.paged)
    cached_s = time.perf_counter() - start
    start = time.perf_counter()
    recomputed = generate_by_recomputing(model, prompt, args.steps)
    recomputed_s = time.perf_counter() - start
    same = bool(torch.equal(cached, recomputed))
    print(f"{args.steps} tokens x {prompt.shape[0]} sequences on {device} ({'paged' if args.paged else 'contiguous'} cache): "
          f"identical to full recomputation: {same}  (cache {cached_s:.2f} s, recompute {recomputed_s:.2f} s)")
    return {"identical": same, "tokens": cached}


if __name__ == "__main__":
    main()
