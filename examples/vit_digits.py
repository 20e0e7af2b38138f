"""Image classification with a tiny vision transformer on scikit-learn's bundled 8x8
digits (no download): 4x4 patches at stride 2 (a 3x3 grid of overlapping patches,
9 tokens), self-attention blocks over the patches, and attention pooling (one
learned query) in place of a class token.

    python examples/vit_digits.py [--steps 600] [--seed 0]
"""

from __future__ import annotations

import torch
from torch import nn

import common
from attn_kernels.nn import AttentionPooling

PATCH, STRIDE = 4, 2  # overlapping patches: 2x2 ones carry too little to learn from fast
GRID = (8 - PATCH) // STRIDE + 1
NUM_PATCHES = GRID * GRID


def patchify(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) -> (B, 9, 16): row-major 4x4 patches, flattened."""
    patches = images.unfold(2, PATCH, STRIDE).unfold(3, PATCH, STRIDE)  # (B, 1, 3, 3, 4, 4)
    return patches.reshape(len(images), NUM_PATCHES, PATCH * PATCH)


def shift_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Moves each digit by up to one pixel in each direction (zero fill)."""
    padded = nn.functional.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, len(images)), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + 8, x : x + 8] for i, (y, x) in enumerate(zip(dy, dx))])


class TinyViT(nn.Module):
    def __init__(self, dim: int = 64, num_heads: int = 4, depth: int = 3, num_classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Linear(PATCH * PATCH, dim)
        self.positions = nn.Parameter(torch.randn(NUM_PATCHES, dim) * 0.02)
        self.encoder = common.Encoder(dim, num_heads, depth)
        self.pool = AttentionPooling(dim, num_heads=num_heads)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(self.patch_embed(patchify(images)) + self.positions)
        return self.head(self.pool(tokens).squeeze(1))


def main(argv=None) -> dict:
    run = common.Run(__doc__, default_steps=600, argv=argv)
    train_x, train_y, test_x, test_y = common.load_digits_split(run.device, seed=run.args.seed)
    model = TinyViT().to(run.device)
    loss_fn = nn.CrossEntropyLoss()

    def batch_loss(step):
        images, labels = common.random_batch(run.data, 128, train_x, train_y)
        return loss_fn(model(shift_augment(images, run.data)), labels)

    losses = common.train(model, batch_loss, run.steps, lr=3e-3, weight_decay=0.05)
    model.eval()
    with torch.no_grad():
        test_accuracy = (model(test_x).argmax(-1) == test_y).float().mean().item()
    return run.finish("tiny ViT on 8x8 digits", losses, {"test_accuracy": test_accuracy, "test_images": len(test_y)})


if __name__ == "__main__":
    main()
