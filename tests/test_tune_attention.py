"""bench/tune_attention.py on the CPU: the table merge and the printed summary (the
search itself is tests/test_tuning.py; timing needs a GPU)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import tune_attention  # noqa: E402


def _entry(m, n, ms, default_ms):
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=8, num_stages=3, ms=ms, default_ms=default_ms)


def test_merge_keeps_old_keys_and_renews_the_header(tmp_path):
    table, cache = tmp_path / "t.json", tmp_path / "c.json"
    table.write_text(json.dumps({"gpu": "old", "configs": {"fwd/16bit/d64/full": _entry(64, 64, 1.0, 1.0),
                                                          "fwd/16bit/d128/full": _entry(64, 64, 2.0, 2.0)}}))
    cache.write_text(json.dumps({"configs": {"fwd/16bit/d128/full": _entry(128, 128, 1.5, 2.0)}}))
    data = tune_attention.merge_into_table(cache, table, {"gpu": "new", "date": "2026-11-24"})
    assert data == json.loads(table.read_text())
    assert data["gpu"] == "new" and list(data["configs"]) == ["fwd/16bit/d128/full", "fwd/16bit/d64/full"]
    assert data["configs"]["fwd/16bit/d128/full"]["BLOCK_M"] == 128
    text = tune_attention.summary(data["configs"])
    assert "fwd/16bit/d128/full" in text and "1.33x" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_to_run_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        tune_attention.main([])
    assert "CUDA GPU" in capsys.readouterr().err
