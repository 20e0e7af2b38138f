"""Tune the Triton kernels' tiles on this GPU and write the table that ships with the package.

    python bench/tune_attention.py                      # D 64 128 256, full and causal, bf16
    python bench/tune_attention.py --dims 128 --causal no

For each (head dim, causal) it runs one forward + backward of fused_attention at a
FlashAttention-benchmark shape (16k tokens, hidden 2048, seqlen 4096 by default) with
ATTN_KERNELS_AUTOTUNE=1, so each of the fwd, dK/dV and dQ kernels searches
tuning.candidates on real tensors (CUDA events, median; a candidate whose output
differs from the first guess's is dropped). The winners, with their time and the
first guess's time, are merged into attn_kernels/triton/tuned/<gpu>.json together
with the GPU, versions and date, and printed. fp16 shares bf16's entries. Commit the
table with the benchmark that shows what it changed (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attn_kernels  # noqa: E402
from attn_kernels.triton import tuning  # noqa: E402


def tune_one(dim: int, causal: bool, seqlen: int, tokens: int, hidden: int, dtype: torch.dtype) -> None:
    """One forward + backward with the search on: fills the cache for fwd, dkdv and dq."""
    batch, heads = max(1, tokens // seqlen), max(1, hidden // dim)
    q, k, v = (torch.randn(batch, heads, seqlen, dim, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    out = attn_kernels.fused_attention(q, k, v, is_causal=causal, backend="triton")
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


def merge_into_table(cache: Path, table: Path, header: dict) -> dict:
    """Entries of the fresh cache over those already in the table; the header is renewed."""
    try:
        configs = json.loads(table.read_text()).get("configs", {})
    except (OSError, ValueError):
        configs = {}
    configs.update(json.loads(cache.read_text())["configs"])
    data = dict(header, configs=dict(sorted(configs.items())))
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(json.dumps(data, indent=1) + "\n")
    return data


def summary(configs: dict) -> str:
    lines = [f"{'key':<24} {'tiles':>9} {'warps':>5} {'stages':>6} {'ms':>9} {'first guess':>11} {'speed-up':>8}"]
    for name, c in configs.items():
        first = c.get("default_ms")
        gain = f"{first / c['ms']:.2f}x" if first else "refused"
        first_text = f"{first:.4f}" if first else "-"
        lines.append(f"{name:<24} {c['BLOCK_M']:>4}x{c['BLOCK_N']:<4} {c['num_warps']:>5} {c['num_stages']:>6} "
                     f"{c['ms']:>9.4f} {first_text:>11} {gain:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * D")
    parser.add_argument("--table", type=Path, help="default: attn_kernels/triton/tuned/<gpu>.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("tuning times kernels on a CUDA GPU, and torch sees none")

    device = torch.device("cuda")
    gpu = tuning.gpu_name(device)
    table = args.table or tuning.table_path(gpu)
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    with tempfile.TemporaryDirectory() as tmp:
        # search from scratch: no committed table, an empty cache
        os.environ["ATTN_KERNELS_AUTOTUNE"] = "1"
        os.environ["ATTN_KERNELS_CACHE_DIR"] = tmp
        tuning.TABLE_DIR = Path(tmp) / "no-table"
        for dim in args.dims:
            for causal in causals:
                print(f"tuning D={dim} causal={causal} ...", flush=True)
                tune_one(dim, causal, args.seqlen, args.tokens, args.hidden, torch.bfloat16)
        header = dict(
            gpu=torch.cuda.get_device_name(device), date=datetime.date.today().isoformat(),
            shape=f"bf16, seqlen {args.seqlen}, {args.tokens} tokens, hidden {args.hidden}",
            **tuning.versions(),
        )
        data = merge_into_table(tuning.cache_path(gpu), table, header)
    print(f"\n{data['gpu']}: triton {data['triton']}, torch {data['torch']}, {data['date']}; written to {table}")
    print(summary(data["configs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
