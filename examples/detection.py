"""Object detection, DETR style: a small CNN turns the image into an 8x8 grid of
feature tokens, a self-attention encoder mixes them, and a fixed set of learned
object queries cross-attends to them; each query predicts a class (or "no
object") and a box. Training matches queries to objects one-to-one with the
Hungarian algorithm (scipy's linear_sum_assignment), so there is no anchor and no
non-maximum suppression.

Images are generated: 32x32, one to three non-overlapping squares, disks and
triangles with their boxes. Prints the mean IoU of each object's matched box and
the F1 of detections at IoU >= 0.5 with the right class.

    python examples/detection.py [--steps 1000] [--seed 0]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import common
from attn_kernels.nn import CrossAttentionBlock, SelfAttentionBlock

SIZE = 32
CLASSES = ["square", "disk", "triangle"]
NO_OBJECT = len(CLASSES)
NUM_QUERIES = 5
MAX_OBJECTS = 3


# ---- data --------------------------------------------------------------------


PIXEL_Y, PIXEL_X = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")


def draw(kind: str, cx: float, cy: float, side: float) -> torch.Tensor:
    """A (SIZE, SIZE) bool mask of one shape centred at (cx, cy), `side` pixels across."""
    dx, dy, half = PIXEL_X - cx, PIXEL_Y - cy, side / 2
    if kind == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if kind == "disk":
        return dx**2 + dy**2 <= half**2
    # triangle, apex up: the half-width grows from 0 at the top to `half` at the bottom
    return (dy.abs() <= half) & (dx.abs() <= (dy + half) / 2)


def apart(a: tuple, b: tuple) -> bool:
    """Whether two square boxes (cx, cy, side) in pixels do not overlap."""
    gap = (a[2] + b[2]) / 2
    return abs(a[0] - b[0]) >= gap or abs(a[1] - b[1]) >= gap


def make_image(generator: torch.Generator):
    """(image (1, SIZE, SIZE), labels (n,), boxes (n, 4) as normalised cx, cy, w, h)."""
    rand = lambda: float(torch.rand((), generator=generator))  # noqa: E731
    image = torch.zeros(SIZE, SIZE)
    labels, boxes = [], []
    for _ in range(common.randint(generator, 1, MAX_OBJECTS + 1)):
        for _attempt in range(20):  # rejection-sample a spot that overlaps nothing
            side = 7 + 8 * rand()
            cx, cy = side / 2 + rand() * (SIZE - side), side / 2 + rand() * (SIZE - side)
            if all(apart((cx, cy, side), other) for other in boxes):
                kind = common.randint(generator, 0, len(CLASSES))
                image[draw(CLASSES[kind], cx, cy, side)] = 0.6 + 0.4 * rand()
                labels.append(kind)
                boxes.append((cx, cy, side, side))
                break
    image += 0.05 * torch.randn(SIZE, SIZE, generator=generator)
    return image[None], torch.tensor(labels), torch.tensor(boxes) / SIZE


class Targets(NamedTuple):
    """The objects of a batch, image after image: labels (T,), boxes (T, 4), counts per image."""

    labels: torch.Tensor
    boxes: torch.Tensor
    counts: list


def make_batch(generator: torch.Generator, size: int, device):
    """(images (B, 1, SIZE, SIZE), Targets)."""
    images, labels, boxes = zip(*(make_image(generator) for _ in range(size)))
    targets = Targets(torch.cat(labels).to(device), torch.cat(boxes).to(device), [len(t) for t in labels])
    return torch.stack(images).to(device), targets


# ---- boxes -------------------------------------------------------------------


def to_corners(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor, generalized: bool = False) -> torch.Tensor:
    """Pairwise (N, M) IoU of cx-cy-w-h boxes; generalized=True gives GIoU (in [-1, 1])."""
    a, b = to_corners(a)[:, None], to_corners(b)[None]
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    area = lambda box: (box[..., 2:] - box[..., :2]).prod(-1)  # noqa: E731
    union = area(a) + area(b) - inter
    iou = inter / union
    if not generalized:
        return iou
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).prod(-1)
    return iou - (hull - union) / hull


# ---- model -------------------------------------------------------------------


def grid_positions(side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine codes (side * side, dim): half the channels code the row,
    half the column, so a query can ask for "tokens near (x, y)" from the first step."""
    freqs = 1.0 / 100.0 ** (torch.arange(dim // 4) / (dim // 4))
    angles = torch.arange(side)[:, None] * freqs  # (side, dim / 4)
    codes = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, dim / 2)
    rows = codes[:, None].expand(side, side, -1)
    cols = codes[None].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, dim)


class Detector(nn.Module):
    def __init__(self, dim: int = 64, num_heads: int = 4, depth: int = 2):
        super().__init__()
        self.backbone = nn.Sequential(  # (B, 1, 32, 32) -> (B, dim, 8, 8)
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(dim, dim, 3, stride=2, padding=1),
        )
        self.register_buffer("positions", grid_positions(SIZE // 4, dim))
        self.encoder = common.Encoder(dim, num_heads, depth)
        self.queries = nn.Parameter(torch.randn(NUM_QUERIES, dim))
        # decoder layer: queries talk to each other (no duplicates), then look at the image
        self.query_self = nn.ModuleList(SelfAttentionBlock(dim, num_heads) for _ in range(depth))
        self.query_cross = nn.ModuleList(CrossAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, len(CLASSES) + 1)
        self.box_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4))

    def forward(self, images: torch.Tensor) -> list:
        """[(class logits (B, Q, classes + 1), boxes (B, Q, 4) normalised cx, cy, w, h)], one
        pair a decoder layer (the last is the answer; the others train the early layers too)."""
        features = self.backbone(images).flatten(2).transpose(1, 2)  # (B, 64 tokens, dim)
        memory = self.encoder(features + self.positions)
        q = self.queries.expand(len(images), -1, -1)
        outputs = []
        for self_block, cross_block in zip(self.query_self, self.query_cross):
            q = cross_block(self_block(q), memory)
            outputs.append((self.class_head(self.norm(q)), self.box_head(self.norm(q)).sigmoid()))
        return outputs


# ---- matching and loss -------------------------------------------------------


@torch.no_grad()
def hungarian(logits: torch.Tensor, boxes: torch.Tensor, targets: Targets):
    """The cheapest one-to-one match of queries to objects in each image, as flat index
    tensors (image, query, object): costs for the whole batch at once, then scipy per image."""
    from scipy.optimize import linear_sum_assignment

    flat_boxes = boxes.flatten(0, 1)
    cost = (
        -logits.flatten(0, 1).softmax(-1)[:, targets.labels]
        + 5 * torch.cdist(flat_boxes, targets.boxes, p=1)
        - 2 * box_iou(flat_boxes, targets.boxes, generalized=True)
    ).view(*logits.shape[:2], -1).cpu()  # (B, Q, all objects)
    images, queries, objects, first = [], [], [], 0
    for b, count in enumerate(targets.counts):
        rows, cols = linear_sum_assignment(cost[b, :, first : first + count].numpy())
        images += [b] * len(rows)
        queries += rows.tolist()
        objects += (cols + first).tolist()
        first += count
    return tuple(torch.tensor(i, device=logits.device) for i in (images, queries, objects))


class SetLoss(nn.Module):
    """Class cross-entropy over all queries ("no object" for the unmatched, down-weighted)
    plus L1 and GIoU box losses on the matched ones."""

    def __init__(self, no_object_weight: float = 0.5):
        super().__init__()
        weights = torch.ones(len(CLASSES) + 1)
        weights[NO_OBJECT] = no_object_weight
        self.register_buffer("class_weights", weights)

    def forward(self, outputs: list, targets: Targets) -> torch.Tensor:
        """Summed over the decoder layers' outputs, each matched on its own."""
        return sum(self.layer_loss(logits, boxes, targets) for logits, boxes in outputs)

    def layer_loss(self, logits, boxes, targets: Targets) -> torch.Tensor:
        image, query, obj = hungarian(logits, boxes, targets)
        classes = torch.full(logits.shape[:2], NO_OBJECT, dtype=torch.long, device=logits.device)
        classes[image, query] = targets.labels[obj]
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), classes.flatten(), self.class_weights)
        matched, truth = boxes[image, query], targets.boxes[obj]
        l1 = (matched - truth).abs().sum(-1)
        giou = box_iou(matched, truth, generalized=True).diagonal()
        return ce + (5 * l1 + 2 * (1 - giou)).mean()


# ---- evaluation --------------------------------------------------------------


@torch.no_grad()
def evaluate(model: Detector, generator: torch.Generator, size: int, device) -> dict:
    from scipy.optimize import linear_sum_assignment

    model.eval()
    images, targets = make_batch(generator, size, device)
    logits, boxes = model(images)[-1]
    image, query, obj = hungarian(logits, boxes, targets)
    ious = box_iou(boxes[image, query], targets.boxes[obj]).diagonal()
    # detections: the queries that claim an object, matched one-to-one to objects by IoU
    kinds = logits.argmax(-1)
    true_positives, first = 0, 0
    for b, count in enumerate(targets.counts):
        keep = kinds[b] != NO_OBJECT
        if keep.any():
            overlap = box_iou(boxes[b, keep], targets.boxes[first : first + count])
            rows, cols = linear_sum_assignment(-overlap.cpu().numpy())
            hit = (overlap[rows, cols] >= 0.5) & (kinds[b, keep][rows] == targets.labels[first + cols])
            true_positives += int(hit.sum())
        first += count
    precision = true_positives / max(1, int((kinds != NO_OBJECT).sum()))
    recall = true_positives / len(targets.labels)
    return {
        "mean_iou": ious.mean().item(),
        "precision_iou50": precision,
        "recall_iou50": recall,
        "f1_iou50": 2 * precision * recall / max(1e-9, precision + recall),
    }


def main(argv=None) -> dict:
    run = common.Run(__doc__, default_steps=1000, argv=argv)
    model = Detector().to(run.device)
    loss_fn = SetLoss().to(run.device)

    def batch_loss(step):
        images, targets = make_batch(run.data, 32, run.device)
        return loss_fn(model(images), targets)

    losses = common.train(model, batch_loss, run.steps, lr=1e-3, clip=0.5)
    metrics = evaluate(model, run.held_out(), 300, run.device)
    return run.finish("DETR-style detection (held-out images)", losses, metrics)


if __name__ == "__main__":
    main()
