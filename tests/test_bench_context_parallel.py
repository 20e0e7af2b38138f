"""The context-parallel benchmark needs GPUs and NCCL: here only its refusals and --help."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_context_parallel  # noqa: E402


def test_refuses_without_enough_gpus():
    assert "needs CUDA GPUs (NCCL): none found" in bench_context_parallel.refusal(world=2, gpus=0)
    assert "WORLD_SIZE=4 ranks but only 2 GPU(s)" in bench_context_parallel.refusal(world=4, gpus=2)
    assert bench_context_parallel.refusal(world=1, gpus=1) is None  # W = 1: the overhead run
    assert bench_context_parallel.refusal(world=8, gpus=8) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_main_refuses_clearly_on_cpu(capsys, tmp_path):
    assert bench_context_parallel.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "needs CUDA GPUs" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_help_and_bad_schemes():
    with pytest.raises(SystemExit) as exit_info:
        bench_context_parallel.parse_args(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit):
        bench_context_parallel.parse_args(["--schemes", "ring,striped"])
    args = bench_context_parallel.parse_args(["--quick", "--schemes", "ring,ulysses"])
    assert args.schemes == ["ring", "ulysses"] and args.seqlens == [4096]
