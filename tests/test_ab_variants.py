"""bench/ab_variants.py without a GPU: its arguments, --list, the refusal to measure
without a GPU, and the winners it writes into a tile table, from fake measurements."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ab_variants  # noqa: E402
from records import make_record  # noqa: E402

from attn_kernels.triton import tuning, variants  # noqa: E402

MACHINE = {"gpu": "fake", "torch": "2.x", "triton": "3.x", "cuda": None, "date": "2026-01-01T00:00:00+00:00"}


def test_defaults_are_the_issue_grid():
    _, s = ab_variants.parse_args([])
    assert s.variants == list(variants.names())
    assert (s.headdims, s.seqlens, s.causals, s.passes) == ([64, 128], [4096, 16384], [False, True], ["fwd", "bwd"])
    assert (s.tokens, s.hidden) == (16384, 2048)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        ab_variants.parse_args(["--variants", "nope"])
    assert "unknown variant nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab_variants.parse_args(["--passes", "fwd_bwd"])


def test_list_prints_every_name(capsys):
    assert ab_variants.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(variants.names())


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu(capsys):
    assert ab_variants.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def _records(times):
    """Fake ok records: times {(impl, pass, D, causal, seqlen): ms}."""
    return [make_record(MACHINE, p, impl=impl, dtype="bf16", causal=c, batch=16384 // L, heads=2048 // d, seqlen=L,
                        headdim=d, ms=ms, status="ok") for (impl, p, d, c, L), ms in times.items()]


def test_winners_and_table_from_fake_measurements(tmp_path):
    times = {}
    for L in (4096, 16384):
        times[("triton[baseline]", "fwd", 128, False, L)] = 2.0
        times[("triton[interior]", "fwd", 128, False, L)] = 1.5
        times[("triton[baseline]", "bwd", 128, True, L)] = 3.0
        times[("triton[interior]", "bwd", 128, True, L)] = 3.5
        times[("sdpa.flash", "fwd", 128, False, L)] = 1.8
    records = _records(times)
    # a variant with a wrong cell never wins, however fast its other cells
    records.append(make_record(MACHINE, "fwd", impl="triton[interior]", dtype="bf16", causal=True, batch=4,
                               heads=16, seqlen=4096, headdim=64, ms=None, status="wrong"))
    records += _records({("triton[interior]", "fwd", 64, True, 16384): 0.1, ("triton[baseline]", "fwd", 64, True,
                                                                               16384): 1.0})
    found = ab_variants.winners(records)
    assert found[("fwd", 128, False)] == ("interior", 3.0)
    assert found[("bwd", 128, True)] == ("baseline", 6.0)
    assert found[("fwd", 64, True)][0] == "baseline"

    # an existing entry keeps its tiles; new keys get the first guess; the backward sets both kernels
    path = tmp_path / "fake-gpu.json"
    old = tuning.Key.of("fwd", torch.bfloat16, 128, False)
    path.write_text(json.dumps({"gpu": "fake", "configs": {old.name(): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4,
                                                                            num_stages=2)}}))
    written = ab_variants.write_table(path, found, dict(gpu="fake", date="today"), ab_variants.baseline_totals(records))
    assert set(written) == {"fwd/16bit/d128/full", "dkdv/16bit/d128/banded", "dq/16bit/d128/banded",
                            "fwd/16bit/d64/banded"}
    data = json.loads(path.read_text())
    assert data["configs"][old.name()]["BLOCK_M"] == 64 and data["configs"][old.name()]["variant"] == "interior"
    assert data["configs"][old.name()]["baseline_ms"] == 4.0
    tuning._files.pop(path, None)
    assert tuning.read_configs(path)[old.name()] == tuning.Blocks(64, 64, 4, 2)  # still a valid tile table
    dq = tuning.Key.of("dq", torch.bfloat16, 128, True)
    assert tuning.read_configs(path)[dq.name()] == tuning.default(dq)
    tuning._files.pop(path, None)

    # and variants.select reads it back
    import unittest.mock as mock

    with mock.patch.object(tuning, "TABLE_DIR", tmp_path), mock.patch.object(tuning, "gpu_of", lambda d: "fake-gpu"), \
            mock.patch.dict("os.environ", {variants.ENV: "auto"}):
        assert variants.select(old, torch.device("cpu")).name == "interior"
        assert variants.select(dq, torch.device("cpu")).name == "baseline"

    table = ab_variants.render_table(records)
    assert "| fwd | 128 | no | 4096 |" in table and "1.20x" in table  # interior 1.5 ms vs flash 1.8 ms


def test_main_writes_results_and_the_table_last(tmp_path, monkeypatch, capsys):
    """main() past the GPU check, with the measurements faked: files, table, order of output."""
    fake = _records({("triton[baseline]", "fwd", 64, False, 4096): 2.0, ("triton[interior]", "fwd", 64, False, 4096): 1.0,
                     ("sdpa.flash", "fwd", 64, False, 4096): 1.5})

    def run_benchmark(settings, machine, timer, log=print, checkpoint=None):
        checkpoint(fake[:1])  # a run cut short after its first config still leaves files
        assert (tmp_path / "out" / "ab.json").exists()
        return fake

    monkeypatch.setattr(ab_variants, "run_benchmark", run_benchmark)
    monkeypatch.setattr(ab_variants, "machine_info", lambda device: MACHINE)
    monkeypatch.setattr(ab_variants.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "fake-gpu")
    monkeypatch.setattr(ab_variants, "ROOT", tmp_path)
    assert ab_variants.main(["--out", str(tmp_path / "out"), "--name", "ab", "--write-table"]) == 0
    data = json.loads((tmp_path / "out" / "ab.json").read_text())
    assert data["winners"] == {"fwd/d64/full": {"variant": "interior", "total_ms": 1.0}}
    assert data["table"]["content"]["configs"]["fwd/16bit/d64/full"]["variant"] == "interior"
    assert json.loads((tmp_path / "fake-gpu.json").read_text()) == data["table"]["content"]
    assert "| fwd | 64 | no | 4096 |" in (tmp_path / "out" / "ab.md").read_text()
    assert capsys.readouterr().out.rstrip().endswith("| 1.50x |")  # the table is printed last
