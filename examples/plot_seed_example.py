"""The attention tutorial's first example as a heatmap (docs/attention_example.png):
in 猫喜欢追逐老鼠, the query for 喜欢 over the keys 猫 / 追逐 / 老鼠.

    python examples/plot_seed_example.py [--out docs/attention_example.png]

The weights are softmax(q k^T / sqrt(2)) from `attention_weights`; the true values
are [0.2984, 0.2942, 0.4073] (the tutorial printed wrong ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import common  # noqa: F401  (puts the checkout on sys.path)
from attn_kernels import attention_weights
from attn_kernels.viz import plot_attention

QUERY = torch.tensor([[1.0, 0.8]])  # 喜欢
KEYS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.9]])  # 猫, 追逐, 老鼠
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "attention_example.png"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="PNG path")
    args = parser.parse_args(argv)
    weights = attention_weights(QUERY, KEYS)  # (1, 3)
    path = plot_attention(
        weights, ["喜欢"], ["猫", "追逐", "老鼠"], args.out,
        title="“喜欢” 对 “猫 / 追逐 / 老鼠” 的注意力权重", fmt=".4f", figsize=(6.0, 2.6),
    )
    print(f"weights {[round(w, 4) for w in weights[0].tolist()]} -> {path}")
    return {"weights": weights[0].tolist(), "path": str(path)}


if __name__ == "__main__":
    main()
