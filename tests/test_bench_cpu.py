"""bench/bench_cpu.py: a tiny run writes checked rows and the three tables."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_cpu  # noqa: E402


def test_quick_run_writes_checked_rows_and_tables(tmp_path):
    result = bench_cpu.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "cpu-quick.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    assert {r["section"] for r in rows} == {"attention", "features", "mha"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    assert all(r["peak_bytes"] > 0 and r["sdpa_peak_bytes"] > 0 for r in rows if r["section"] == "features")
    table = (tmp_path / "cpu-quick.md").read_text()
    for heading in ("F.scaled_dot_product_attention", "Features SDPA lacks", "MultiheadAttention"):
        assert heading in table
    assert "| 1x2x64x16 causal | bf16 | fwd+bwd |" in table
