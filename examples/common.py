"""What every example shares: arguments and seeding (`Run`), the training loop
(`train`, `Optimizer`), token embeddings, padding, a transformer encoder, and the
digits data set.

Each example runs as `python examples/NAME.py [--steps N] [--seed S] [--device D]
[--threads T]` and exposes `main(argv=None) -> dict` with at least first_loss,
last_loss and its metric, so the tests can import it and run a few steps.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

# running `python examples/NAME.py` from a checkout without `pip install -e .`
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from attn_kernels.nn import SelfAttentionBlock  # noqa: E402


# ---- set-up -----------------------------------------------------------------


def parse_args(description: str, default_steps: int, argv=None, extra: Optional[Callable] = None):
    """--steps, --seed, --device, --threads for every example; `extra(parser)` adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=default_steps, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, weights and sampling")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when there is one)")
    # these models are too small to gain much from more CPU threads, and spare
    # OpenMP threads spin (several times slower) when other processes share the cores
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(max(1, args.threads))
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def seed_everything(seed: int) -> torch.Generator:
    """Seeds python, numpy and torch; returns a CPU generator for the example's data."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)  # every device's default generator
    return torch.Generator().manual_seed(seed)


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """A uniform int in [low, high) from the example's generator (data stays reproducible)."""
    return int(torch.randint(low, high, (1,), generator=generator))


# ---- training ---------------------------------------------------------------


class Optimizer:
    """AdamW with linear warm-up then cosine decay, and gradient clipping: `opt.step(loss)`."""

    def __init__(self, params: Iterable, lr: float, steps: int, *, warmup: float = 0.05,
                 weight_decay: float = 0.01, betas=(0.9, 0.999), clip: Optional[float] = 1.0):
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas)
        warmup_steps = max(1, int(warmup * steps))

        def lr_factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, steps - warmup_steps)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor)
        self.clip = clip

    def step(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.schedule.step()
        return loss.item()


def log_every(steps: int) -> int:
    """About ten progress lines a run."""
    return max(1, steps // 10)


def train(model: nn.Module, batch_loss: Callable[[int], torch.Tensor], steps: int, lr: float, **opt_kwargs) -> list:
    """Runs `steps` optimiser steps on `batch_loss(step)` (a fresh batch each call); the losses."""
    opt = Optimizer(model.parameters(), lr, steps, **opt_kwargs)
    losses = []
    for step in range(steps):
        model.train()
        losses.append(opt.step(batch_loss(step)))
        if (step + 1) % log_every(steps) == 0 or step + 1 == steps:
            recent = losses[-log_every(steps):]
            print(f"step {step + 1:5d}/{steps}  loss {sum(recent) / len(recent):.4f}", flush=True)
    return losses


def loss_ends(losses: Sequence[float]) -> dict:
    """Mean loss over the first and the last few steps: one step alone is too noisy to compare."""
    window = max(1, min(20, len(losses) // 4))
    return {
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
    }


def report(name: str, results: dict, started: float) -> dict:
    """Adds the wall time, prints every result, returns them."""
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n{name}:")
    width = max(len(key) for key in results)
    for key, value in results.items():
        print(f"  {key:>{width}s}: {value:.4f}" if isinstance(value, float) else f"  {key:>{width}s}: {value}")
    return results


class Run:
    """One example run: its arguments, the seeded stream of training data, the clock.

    run = Run(__doc__, default_steps=1000, argv=argv)   # parses --steps/--seed/--device/...
    ... train with run.data, run.steps, run.device ...
    return run.finish("title", losses, {"metric": value})
    """

    def __init__(self, doc: str, default_steps: int, argv=None, extra: Optional[Callable] = None):
        self.args = parse_args(doc.strip().splitlines()[0], default_steps, argv, extra)
        self.steps, self.device = self.args.steps, self.args.device
        self.data = seed_everything(self.args.seed)  # a CPU generator for the training data
        self.started = time.perf_counter()

    def held_out(self) -> torch.Generator:
        """A generator for evaluation data: another seed, so not the training stream's draws."""
        return torch.Generator().manual_seed(10_000 + self.args.seed)

    def finish(self, title: str, losses: Sequence[float], metrics: dict) -> dict:
        """{first_loss, last_loss, **metrics, seconds}, printed."""
        return report(title, {**loss_ends(losses), **metrics}, self.started)


# ---- sequences --------------------------------------------------------------

PAD = 0


def pad_batch(seqs: Sequence[Sequence[int]], length: Optional[int] = None) -> torch.Tensor:
    """Right-pads integer sequences with PAD into a (B, T) LongTensor."""
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), PAD, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


class TokenEmbedding(nn.Module):
    """Token plus learned position embeddings: (B, T) ids -> (B, T, dim)."""

    def __init__(self, vocab_size: int, dim: int, max_len: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.positions = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions[: ids.shape[1]]


class Encoder(nn.Module):
    """`depth` pre-norm SelfAttentionBlocks and the final LayerNorm that pre-norm blocks need:
    (B, T, dim), key_padding_mask (B, T) True = padding -> (B, T, dim)."""

    def __init__(self, dim: int, num_heads: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.norm(x)


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor, ignore: int = PAD) -> float:
    """Share of non-ignored positions whose argmax is the target."""
    keep = targets != ignore
    return ((logits.argmax(-1) == targets) & keep).sum().item() / max(1, keep.sum().item())


# ---- images -----------------------------------------------------------------


def load_digits_split(device, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (no download), scaled to [0, 1]:
    (train_images (N, 1, 8, 8), train_labels, test_images, test_labels) on `device`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train_ = order[:n_test], order[n_test:]
    return tuple(t.to(device) for t in (images[train_], labels[train_], images[test], labels[test]))


def random_batch(generator: torch.Generator, size: int, *tensors: torch.Tensor):
    """The same random rows of each tensor (drawn with the example's CPU generator)."""
    rows = torch.randint(len(tensors[0]), (size,), generator=generator).to(tensors[0].device)
    return tuple(t[rows] for t in tensors)
