"""What a benchmark row is, how its FLOPs are counted, and how rows are written.

FLOP convention (FlashAttention's benchmarks): a forward pass does two matmuls of
2 * L * S * D flops per head, so 4 * batch * heads * L * S * D; causal attention
skips half the score matrix, so half of that; the backward does 2.5x the forward
(five matmuls against two), and fwd_bwd is the sum, 3.5x. Shapes keep the total
work per step fixed: batch = tokens / seqlen and heads = hidden / headdim.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

PASSES = ("fwd", "bwd", "fwd_bwd")
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FA_TOKENS, FA_HIDDEN = 16384, 2048

# One row per (impl, pass, dtype, causal, shape). status: ok | skipped | oom | wrong | error;
# note says why a row is not ok; timer says what the ms are (CUDA events, CPU clock, interpreter).
RECORD_FIELDS = (
    "gpu", "torch", "triton", "cuda", "date", "impl", "pass", "dtype", "causal",
    "batch", "heads", "seqlen", "headdim", "ms", "tflops", "peak_mem_bytes",
    "status", "note", "timer", "check_err",
)  # fmt: skip


def fa_shape(seqlen: int, headdim: int, tokens: int = FA_TOKENS, hidden: int = FA_HIDDEN) -> tuple:
    """(batch, heads) of the FlashAttention convention: tokens and hidden size fixed."""
    if hidden % headdim:
        raise ValueError(f"hidden {hidden} is not a multiple of headdim {headdim}")
    return max(1, tokens // seqlen), hidden // headdim


def attention_flops(batch, heads, seqlen_q, seqlen_k, headdim, causal: bool, pass_: str) -> float:
    fwd = 4.0 * batch * heads * seqlen_q * seqlen_k * headdim
    if causal:
        fwd /= 2
    return fwd * PASS_FLOP_FACTOR[pass_]


def tflops(flops: float, ms) -> float | None:
    """FLOP/s in units of 10^12 for a run of `ms` milliseconds (None when there is no time)."""
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def file_stem(device_name: str) -> str:
    """Results file name from a device name: "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA H100 PCIe" -> "h100-pcie", "NVIDIA GeForce RTX 4090" -> "rtx4090", "cpu" -> "cpu"."""
    words = [w for w in re.split(r"[\s\-_/()]+", device_name.lower()) if w]
    words = [w for w in words if w not in ("nvidia", "geforce", "tesla", "amd", "radeon", "instinct")]
    for i, word in enumerate(words):
        if re.search(r"\d", word) and not re.fullmatch(r"\d+gb", word):
            # a bare number names the model only with its series: "rtx 4090"
            model = words[i - 1] + word if word.isdigit() and i > 0 else word
            variant = [w for w in words[i + 1 :] if w in ("pcie", "nvl")]
            return "-".join([model, *variant])
    slug = "-".join(words)
    return re.sub(r"[^a-z0-9.-]", "", slug) or "unknown"


def machine_info(device: str) -> dict:
    """The fields every record of one run shares: what ran it, and when (UTC)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device == "cuda"
    return {
        "gpu": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def make_record(machine: dict, pass_: str, **fields) -> dict:
    """A record with every field of RECORD_FIELDS (missing ones None), tflops derived from ms."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}")
    record = {name: None for name in RECORD_FIELDS}
    record.update({k: machine[k] for k in ("gpu", "torch", "triton", "cuda", "date")})
    record.update(fields, **{"pass": pass_})
    unknown = set(record) - set(RECORD_FIELDS)
    if unknown:
        raise KeyError(f"not record fields: {sorted(unknown)}")
    if record["ms"] is not None and record["tflops"] is None:
        flops = attention_flops(
            record["batch"], record["heads"], record["seqlen"], record["seqlen"],
            record["headdim"], record["causal"], record["pass"],
        )  # fmt: skip
        record["tflops"] = tflops(flops, record["ms"])
    return record


def write_json(records: list, path: Path) -> None:
    path.write_text(json.dumps(records, indent=1) + "\n")


def read_json(path: Path) -> list:
    return json.loads(Path(path).read_text())
