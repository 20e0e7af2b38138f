"""Image generation with a self-attention GAN (SAGAN style) on scikit-learn's 8x8
digits: generator and discriminator are small CNNs with self-attention over the
spatial positions of their feature maps, so every pixel can depend on every other
(a stroke at the top of a 7 on the one at the bottom). Class-conditional (projection
discriminator), hinge loss, spectral norm on the discriminator.

Prints the losses; writes a grid of samples (one row a digit class) to --out; and,
as the metric, the share of samples that a nearest-neighbour digit classifier
(trained on the real images) reads as the class they were asked for.

    python examples/generation.py [--steps 1500] [--seed 0] [--out /tmp/attn_kernels_digits.png]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import common
from attn_kernels.nn import SelfAttentionBlock

NOISE = 32
CLASSES = 10


class SpatialSelfAttention(nn.Module):
    """A transformer block over the H*W positions of a (B, C, H, W) feature map."""

    def __init__(self, channels: int, num_heads: int, side: int):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(side * side, channels) * 0.02)
        self.block = SelfAttentionBlock(channels, num_heads, mlp_ratio=2.0)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = maps.shape
        tokens = self.block(maps.flatten(2).transpose(1, 2) + self.positions)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.label = nn.Embedding(CLASSES, NOISE)
        self.project = nn.Linear(2 * NOISE, 64 * 4 * 4)
        self.body = nn.Sequential(
            SpatialSelfAttention(64, 4, side=4),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(64, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            SpatialSelfAttention(32, 2, side=8),
            nn.Conv2d(32, 1, 3, padding=1), nn.Sigmoid(),  # pixels in [0, 1], as the data
        )

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.project(torch.cat([noise, self.label(labels)], dim=1))
        return self.body(x.view(-1, 64, 4, 4))


def with_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral norm on every weight layer, the attention block's included: it keeps the
    discriminator Lipschitz so it cannot win outright and starve the generator of gradient."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Linear, nn.Conv2d, nn.Embedding)):
            setattr(module, name, spectral_norm(child))
        else:
            with_spectral_norm(child)
    return module


class Discriminator(nn.Module):
    """Projection discriminator: score = w . h(x) + embed(y) . h(x)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            SpatialSelfAttention(64, 4, side=4),
        )
        self.score = nn.Linear(64, 1)
        self.label = nn.Embedding(CLASSES, 64)
        with_spectral_norm(self)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(images).sum(dim=(2, 3))  # (B, 64)
        return self.score(h).squeeze(1) + (self.label(labels) * h).sum(1)


def sample_grid(generator: Generator, per_class: int, device, seed: int):
    """(CLASSES * per_class images, their labels): row c of the grid is digit c."""
    labels = torch.arange(CLASSES, device=device).repeat_interleave(per_class)
    noise = torch.randn(len(labels), NOISE, generator=torch.Generator().manual_seed(seed)).to(device)
    generator.eval()
    with torch.no_grad():
        return generator(noise, labels), labels


def save_grid(images: torch.Tensor, per_class: int, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tiles = nn.functional.pad(images.cpu(), (1, 1, 1, 1)).view(CLASSES, per_class, 10, 10)  # 1-pixel gaps
    grid = tiles.permute(0, 2, 1, 3).reshape(CLASSES * 10, per_class * 10)  # row c = class c
    fig = Figure(figsize=(per_class * 0.6, CLASSES * 0.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    fig.savefig(path)


def class_match(images: torch.Tensor, labels: torch.Tensor, train_x, train_y, test_x, test_y) -> dict:
    """How often a classifier trained on real digits reads each sample as its requested class."""
    from sklearn.neighbors import KNeighborsClassifier

    flat = lambda t: t.flatten(1).cpu().numpy()  # noqa: E731
    classifier = KNeighborsClassifier(n_neighbors=5).fit(flat(train_x), train_y.cpu().numpy())
    return {
        "sample_class_match": float((classifier.predict(flat(images)) == labels.cpu().numpy()).mean()),
        "classifier_real_test_accuracy": float(classifier.score(flat(test_x), test_y.cpu().numpy())),
    }


def main(argv=None) -> dict:
    def extra(parser):
        parser.add_argument("--out", default="/tmp/attn_kernels_digits.png", help="PNG grid of samples")

    run = common.Run(__doc__, default_steps=1500, argv=argv, extra=extra)
    train_x, train_y, test_x, test_y = common.load_digits_split(run.device, seed=run.args.seed)
    gen, disc = Generator().to(run.device), Discriminator().to(run.device)
    gan_adam = dict(betas=(0.0, 0.9), weight_decay=0.0, clip=None)
    opt_g = common.Optimizer(gen.parameters(), 2e-4, run.steps, **gan_adam)
    opt_d = common.Optimizer(disc.parameters(), 2e-4, run.steps, **gan_adam)
    d_losses, g_losses = [], []
    for step in range(run.steps):
        gen.train()
        real, labels = common.random_batch(run.data, 64, train_x, train_y)
        noise = torch.randn(len(real), NOISE, generator=run.data).to(run.device)
        fake = gen(noise, labels)
        # hinge loss: push real scores above +1 and fake scores below -1 (one pass for both)
        real_score, fake_score = disc(torch.cat([real, fake.detach()]), torch.cat([labels, labels])).chunk(2)
        d_loss = nn.functional.relu(1 - real_score).mean() + nn.functional.relu(1 + fake_score).mean()
        d_losses.append(opt_d.step(d_loss))
        g_losses.append(opt_g.step(-disc(fake, labels).mean()))
        if (step + 1) % common.log_every(run.steps) == 0 or step + 1 == run.steps:
            print(f"step {step + 1:5d}/{run.steps}  d_loss {d_losses[-1]:.4f}  g_loss {g_losses[-1]:.4f}", flush=True)

    images, labels = sample_grid(gen, 10, run.device, run.args.seed)
    save_grid(images, 10, run.args.out)
    print(f"samples (row = digit 0..9) -> {run.args.out}")
    metrics = {"last_g_loss": common.loss_ends(g_losses)["last_loss"]}
    metrics.update(class_match(images, labels, train_x, train_y, test_x, test_y), out=run.args.out)
    # first_loss / last_loss are the discriminator's: the generator's rises as D learns
    return run.finish("self-attention GAN on 8x8 digits", d_losses, metrics)


if __name__ == "__main__":
    main()
