"""bench/bench_attention.py: FLOP counting, records and their files, the guards that
keep a wrong or failing implementation from being timed, and a tiny CPU run."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_attention  # noqa: E402
import impls  # noqa: E402
import measure  # noqa: E402
import records  # noqa: E402
from plot import write_plot  # noqa: E402
from report import render_markdown  # noqa: E402

MACHINE = {"gpu": "cpu", "torch": "2.x", "triton": "3.x", "cuda": None, "date": "2026-01-01T00:00:00+00:00"}
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def tiny_settings(**changes):
    base = dict(device="cpu", seqlens=[16, 32], headdims=[8], dtypes=["fp32"], causals=[False, True],
                passes=list(records.PASSES), impls=[], tokens=64, hidden=16, warmup_ms=0, rep_ms=1)  # fmt: skip
    base.update(changes)
    return bench_attention.Settings(**base)


class CountingTimer:
    """Stands in for do_bench: counts what it was asked to time."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        fn()
        return 2.0


def raising(exc):
    """An Impl.prepare whose run raises exc."""

    def run_(q, k, v):
        raise exc

    return lambda q, k, causal: run_


def run(impl_list, **changes):
    timer = CountingTimer()
    rows = bench_attention.run_benchmark(tiny_settings(**changes), impl_list, MACHINE, timer, log=lambda line: None)
    return rows, timer


# FLOPs and shapes


def test_flops_follow_the_flashattention_convention():
    fwd = records.attention_flops(2, 16, 1024, 1024, 128, causal=False, pass_="fwd")
    assert fwd == 4 * 2 * 16 * 1024 * 1024 * 128
    assert records.attention_flops(2, 16, 1024, 1024, 128, causal=True, pass_="fwd") == fwd / 2
    assert records.attention_flops(2, 16, 1024, 1024, 128, causal=False, pass_="bwd") == 2.5 * fwd
    assert records.attention_flops(2, 16, 1024, 1024, 128, causal=True, pass_="fwd_bwd") == 3.5 * fwd / 2


FA_SHAPES = [(512, 64, 32, 32), (2048, 128, 8, 16), (16384, 256, 1, 8), (32768, 64, 1, 32)]


@pytest.mark.parametrize("seqlen,headdim,batch,heads", FA_SHAPES)
def test_fa_shape_keeps_tokens_and_hidden(seqlen, headdim, batch, heads):
    assert records.fa_shape(seqlen, headdim) == (batch, heads)


def test_tflops_conversion():
    assert records.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert records.tflops(4 * 8 * 16 * 2048**2 * 128, 1.0) == pytest.approx(274.877906944)
    assert records.tflops(1e12, None) is None and records.tflops(1e12, 0.0) is None


@pytest.mark.parametrize("name,stem", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA RTX A6000", "a6000"),
    ("Tesla V100-SXM2-16GB", "v100"), ("NVIDIA L4", "l4"), ("cpu", "cpu"),
])  # fmt: skip
def test_file_stem_from_gpu_name(name, stem):
    assert records.file_stem(name) == stem


# records and their files


def test_record_schema_and_json_markdown_round_trip(tmp_path):
    shape = dict(dtype="bf16", causal=True, batch=4, heads=16, seqlen=4096, headdim=128)
    ok = records.make_record(MACHINE, "fwd_bwd", impl="naive", ms=10.0, peak_mem_bytes=3 << 30, status="ok", **shape)
    oom = dict(ok, impl="sdpa.math", ms=None, tflops=None, peak_mem_bytes=None, status="oom", note="out of memory")
    assert set(ok) == set(records.RECORD_FIELDS)
    assert ok["pass"] == "fwd_bwd" and ok["gpu"] == "cpu" and ok["date"] == MACHINE["date"]
    assert ok["tflops"] == pytest.approx(3.5 * 4 * 4 * 16 * 4096**2 * 128 / 2 / 10e-3 / 1e12)
    with pytest.raises(KeyError):
        records.make_record(MACHINE, "fwd", flops=1)
    records.write_json([ok, oom], tmp_path / "x.json")
    assert records.read_json(tmp_path / "x.json") == [ok, oom]
    md = render_markdown([ok, oom])
    assert "## TFLOP/s: fwd_bwd, bf16, D=128, causal" in md
    assert f"| naive | {ok['tflops']:.1f} |" in md and "| sdpa.math | oom |" in md
    assert "| naive | 3072 |" in md  # peak memory in MiB
    assert "sdpa.math: oom: out of memory" in md


def test_cpu_end_to_end_writes_json_markdown_and_plot(tmp_path, capsys):
    impl_names = "naive,attn_kernels.reference,sdpa.math,sdpa.efficient,flex"
    argv = ["--device", "cpu", "--seqlens", "16,32", "--headdims", "8", "--tokens", "64", "--hidden", "16",
            "--impls", impl_names, "--rep-ms", "1", "--out", str(tmp_path)]  # fmt: skip
    assert bench_attention.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json", "cpu.md", "cpu.png"]
    rows = json.loads((tmp_path / "cpu.json").read_text())
    assert len(rows) == 5 * 2 * 2 * 3  # impls x seqlens x causal x passes
    assert all(set(r) == set(records.RECORD_FIELDS) for r in rows)
    status = {r["impl"]: r["status"] for r in rows}
    assert status["naive"] == status["sdpa.math"] == status["attn_kernels.reference"] == "ok"
    assert status["flex"] == status["sdpa.efficient"] == "skipped"  # no GPU: reasons recorded
    assert all(r["tflops"] > 0 and r["timer"] == "CPU wall clock (median)" for r in rows if r["status"] == "ok")
    assert "CPU run" in (tmp_path / "cpu.md").read_text()
    assert "its times say nothing about GPU kernels" in capsys.readouterr().out


@pytest.mark.skipif(HAS_CUDA, reason="the Triton interpreter path is the CPU one")
def test_interpreted_triton_runs_one_head_at_the_first_seqlen_and_says_so():
    rows, timer = run([impls.IMPLS["attn_kernels.triton"]], causals=[True])
    timed = [r for r in rows if r["status"] == "ok"]
    assert [(r["seqlen"], r["batch"], r["heads"]) for r in timed] == [(16, 1, 1)] * 3
    assert all("interpreter" in r["timer"] for r in rows)
    assert {r["status"] for r in rows if r["seqlen"] == 32} == {"skipped"}
    assert "attn_kernels.triton† |" in render_markdown(rows)


# the guards


def test_wrong_output_is_marked_wrong_and_never_timed():
    wrong = impls.Impl("wrong", lambda q, k, causal: lambda q, k, v: v * 1.1)
    nan = impls.Impl("nan", lambda q, k, causal: lambda q, k, v: torch.full_like(v, float("nan")))
    rows, timer = run([wrong, nan])
    assert timer.calls == 0
    assert {r["status"] for r in rows} == {"wrong"} and all(r["ms"] is None for r in rows)
    assert "fp32 ref" in rows[0]["note"]


def test_wrong_gradient_blocks_the_backward_passes_only():
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out):
            return out.clone()

        @staticmethod
        def backward(ctx, grad):
            return -grad

    def prepare(q, k, causal):
        return lambda q, k, v: BadGrad.apply(impls.IMPLS["naive"].prepare(q, k, causal)(q, k, v))

    rows, timer = run([impls.Impl("bad_grad", prepare)], causals=[False])
    assert {r["pass"]: r["status"] for r in rows} == {"fwd": "ok", "bwd": "wrong", "fwd_bwd": "wrong"}
    assert timer.calls == 2  # the fwd pass at both seqlens


def test_out_of_memory_is_recorded_not_raised():
    def prepare(q, k, causal):
        def run_(q, k, v):
            if q.shape[-2] > 16:  # like the naive version at 16k: fine at first, then too big
                raise OOM("CUDA out of memory. Tried to allocate 32.00 GiB")
            return impls.IMPLS["naive"].prepare(q, k, causal)(q, k, v)

        return run_

    always = impls.Impl("always_oom", raising(OOM("out of memory")))
    rows, _ = run([impls.Impl("big_oom", prepare), always], causals=[False])
    by = {(r["impl"], r["seqlen"]): r["status"] for r in rows}
    assert by == {("big_oom", 16): "ok", ("big_oom", 32): "oom", ("always_oom", 16): "oom", ("always_oom", 32): "oom"}
    assert all(r["note"].startswith("out of memory") for r in rows if r["status"] == "oom")


def test_skip_reasons_are_recorded():
    gone = impls.Impl("gone", impls.IMPLS["naive"].prepare, unavailable=lambda device: "not installed here")
    refuses = impls.Impl("refuses", raising(RuntimeError("no kernel for D=8")))
    ours = impls.Impl("attn_kernels.buggy", refuses.prepare, refusals=(NotImplementedError,))
    sdpa_efficient, ours_cuda = impls.IMPLS["sdpa.efficient"], impls.IMPLS["attn_kernels.cuda"]
    rows, timer = run([gone, refuses, ours, sdpa_efficient, ours_cuda], seqlens=[16])
    notes = {r["impl"]: (r["status"], r["note"]) for r in rows}
    assert notes["gone"] == ("skipped", "not installed here")
    assert notes["refuses"][0] == "skipped" and "RuntimeError: no kernel for D=8" in notes["refuses"][1]
    assert notes["attn_kernels.buggy"][0] == "error"  # not a refusal: our own code failing
    assert notes["sdpa.efficient"][0] == "skipped" and notes["sdpa.efficient"][1]  # CPU tensors: refused, says why
    if "cuda" not in impls.attn_kernels.available_backends():
        assert notes["attn_kernels.cuda"] == ("skipped", notes["attn_kernels.cuda"][1])
        assert "available_backends" in notes["attn_kernels.cuda"][1]
    assert timer.calls == 0
    assert bench_attention.strict_failures(rows) == [r for r in rows if r["impl"] == "attn_kernels.buggy"]


def test_check_shape_shrinks_batch_then_heads():
    assert measure.check_shape(32, 32, 512, 2 << 30) == (32, 32, 512)
    assert measure.check_shape(1, 32, 16384, 2 << 30) == (1, 2, 16384)  # 1 GiB a head
    assert measure.check_shape(8, 16, 4096, 1 << 30) == (1, 16, 4096)


def test_parse_args_quick_lists_and_errors():
    _, s = bench_attention.parse_args(["--device", "cpu", "--quick", "--passes", "fwd,bwd", "--causal", "yes"])
    assert s.passes == ["fwd", "bwd"] and s.causals == [True] and s.seqlens == [128, 256]
    _, s = bench_attention.parse_args(["--device", "cpu", "--seqlens", "1024", "512,2048", "--dtypes", "bf16"])
    assert s.seqlens == [512, 1024, 2048] and s.dtypes == ["bf16"]
    with pytest.raises(SystemExit):
        bench_attention.parse_args(["--device", "cpu", "--impls", "cudnn"])


def test_plot_writes_a_png(tmp_path):
    rows = [
        records.make_record(MACHINE, p, impl=i, dtype="bf16", causal=c, batch=16384 // s, heads=16, seqlen=s,
                            headdim=128, ms=s / 1000 * (1 + n), peak_mem_bytes=s << 12, status="ok", note="")
        for p in records.PASSES for n, i in enumerate(("sdpa.flash", "attn_kernels.triton"))
        for c in (False, True) for s in (512, 1024, 2048)
    ]  # fmt: skip
    write_plot(rows, tmp_path / "h100.png")
    assert (tmp_path / "h100.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_end_to_end_every_impl(tmp_path):
    argv = ["--device", "cuda", "--seqlens", "256", "512", "--headdims", "64", "--dtypes", "bf16",
            "--tokens", "2048", "--hidden", "256", "--out", str(tmp_path), "--name", "t", "--strict"]  # fmt: skip
    assert bench_attention.main(argv) == 0
    rows = json.loads((tmp_path / "t.json").read_text())
    ok = {r["impl"] for r in rows if r["status"] == "ok"}
    assert {"naive", "sdpa.math", "sdpa.flash", "attn_kernels.triton"} <= ok
    timed = [r for r in rows if r["status"] == "ok"]
    assert all(r["peak_mem_bytes"] > 0 and r["gpu"] == torch.cuda.get_device_name() for r in timed)
