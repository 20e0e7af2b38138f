"""The Triton kernels compile for sm_90 (nothing runs) without heavy register spills,
on a slice of scripts/compile_sweep.py's matrix: float32 at a padded head dim with a
float mask and its gradient (the case that spilled 37-66 KB per thread before the
float32 tiles were resized), D = 256, and bf16 packed causal. The whole matrix, and
the same with the GPU machines' Triton 3.6, is run by hand: its tables are in
bench/results/static/."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["float32 D=80 plain", "float32 D=80 float_mask_grad", "float32 D=256 causal",
         "bfloat16 D=80 varlen_causal"]
MAX_SPILL = 256  # bytes per thread; the float32 cases spilled 1.6-66 KB before


def _sweep(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compile_sweep.py"), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_kernels_compile_for_sm90_without_heavy_spills():
    args = [a for case in CASES for a in ("-k", f"fwd+bwd {case}")]
    done = _sweep(*args, "--max-spill", str(MAX_SPILL))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{len(CASES)} cases") and summary.endswith(f"{len(CASES)} ok"), summary
    rows = [line for line in done.stdout.splitlines() if "_kernel" in line]
    assert len(rows) == 4 * len(CASES), rows  # forward, preprocess, dK/dV, dQ per case
    # every launch asks for FMA contraction itself (launch_config.FP_FUSION), so Triton 3.9 has no
    # default to warn about (its default turns to off in 3.10)
    assert "TRITON_DEFAULT_FP_FUSION" not in done.stderr, done.stderr[-2000:]


def test_the_spill_gate_fails_a_case():
    done = _sweep("-k", "fwd+bwd float32 D=80 plain", "--max-spill", "-1")
    assert done.returncode == 1, done.stdout[-2000:]
    assert done.stdout.strip().endswith("1 spills"), done.stdout[-500:]


def test_16bit_kernels_with_a_mask_or_dropout_compile_without_spills():
    # the per-score mask load / dropout draw needs registers: with the plain tiles these spilled
    # 88 B - 1.4 KB on sm_90 (tuning.Key.masked picks smaller first tiles)
    cases = ["[None] fwd+bwd bfloat16 D=80 bool_mask", "[None] fwd+bwd bfloat16 D=64 dropout",
             "[tma] fwd+bwd bfloat16 D=64 bool_mask"]
    done = _sweep(*[a for case in cases for a in ("-k", case)], "--max-spill", "0")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].endswith(f"{len(cases)} ok"), done.stdout[-500:]
