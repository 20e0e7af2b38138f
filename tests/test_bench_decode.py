"""The decode benchmark's byte count, and a tiny CPU run writing its JSON and table."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_decode  # noqa: E402


def test_kv_bytes_counts_keys_and_values_once():
    # B=1, 16k keys, 8 heads of 128 in bf16: 2 * 16384 * 8 * 128 * 2 bytes
    assert bench_decode.kv_bytes(1, 16384, torch.bfloat16) == 67_108_864
    assert bench_decode.kv_bytes(4, 100, torch.float32, heads_kv=2, dim=16) == 2 * 4 * 100 * 2 * 16 * 4


def test_cpu_run_writes_checked_records(tmp_path):
    code = bench_decode.main(["--device", "cpu", "--batches", "1", "--cache-lens", "256",
                              "--impls", "attn_kernels,attn_kernels.paged,sdpa", "--out", str(tmp_path)])
    assert code == 0
    records = json.loads((tmp_path / "cpu-decode.json").read_text())
    assert {r["impl"] for r in records} == {"attn_kernels", "attn_kernels.paged", "sdpa"}
    assert all(r["status"] == "ok" and r["gbps"] > 0 and r["copy_gbps"] > 0 for r in records)
    assert "| 1 | 256 | attn_kernels |" in (tmp_path / "cpu-decode.md").read_text()
