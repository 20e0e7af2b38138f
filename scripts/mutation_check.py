"""Mutation testing: does the test suite catch plausible one-line bugs?

Each mutant below replaces one exact snippet of one file with a plausible bug (an
off-by-one tile range, a swapped window, a dropped rescale, ...) and names the tests
that should catch it. The script copies the repository to a temporary directory,
checks that pytest there imports the copy's `attn_kernels` (a plugin written into the
copy fails the session otherwise), runs the named tests once unmutated (they must
pass), then for each mutant: writes the mutated file, runs its tests with -x, restores
the file. A mutant is
  killed          its tests fail;
  SURVIVED        its tests pass: a gap in the suite (add the test that kills it);
  NOT APPLICABLE  its snippet is not in the file exactly once: the list is out of date;
  BROKEN          pytest could not run (import / collection error): not a meaningful bug;
  UNTESTED        every selected test was skipped (e.g. no emulator for the CUDA kernels).
Anything but "killed" makes the exit status 1. The CUDA mutants run through the
emulator tests (g++ and the CUDA headers), which rebuild the mutated kernels.

    python scripts/mutation_check.py                 # all mutants, report to stdout
    python scripts/mutation_check.py --only M01,C02  # some of them
    python scripts/mutation_check.py --report scripts/mutation_report.md
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRITON = "attn_kernels/triton"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple  # pytest arguments, e.g. ("tests/test_oracles.py", "-k", "window")
    bug: str  # what the mutant gets wrong


MUTANTS = [
    # ---- the four of issue #13
    Mutant("M01", f"{TRITON}/tiling.py", "hi = tl.minimum(S, start_m + BLOCK_M + band_hi)",
           "hi = tl.minimum(S, start_m + BLOCK_M + band_hi - 1)",
           ("tests/test_oracles.py", "-k", "causal_alignments or asymmetric_windows"),
           "key-tile range one short: the last key of a banded row block is never visited"),
    Mutant("M02", "attn_kernels/_checks.py", "left, right = self.window", "right, left = self.window",
           ("tests/test_oracles.py", "-k", "asymmetric_window"),
           "sliding window's left and right extents swapped in AttentionSpec.band"),
    Mutant("M03", f"{TRITON}/tiling.py", "c.to(tl.int64) * stride_mn", "c.to(tl.int64)",
           ("tests/test_oracles.py", "-k", "mask_layouts"),
           "mask column stride ignored (transposed / sliced / broadcast masks read wrong entries)"),
    Mutant("M04", f"{TRITON}/attention_fwd.py", "lse2 = m_i + tl.math.log2(l_safe)",
           "lse2 = (m_i + tl.math.log2(l_safe)).to(Q.dtype.element_ty).to(tl.float32)",
           ("tests/test_attention_fwd.py", "-k", "matches_reference"),
           "LSE rounded to the input dtype before it is stored"),
    # ---- forward
    Mutant("M05", f"{TRITON}/attention_fwd.py", "acc = acc * alpha[:, None] + tl.dot(", "acc = acc + tl.dot(",
           ("tests/test_attention_fwd.py", "-k", "matches_reference"),
           "online softmax: accumulator not rescaled when the running max grows"),
    Mutant("M06", f"{TRITON}/attention_fwd.py", "l_i = l_i * alpha + tl.sum(p, 1)", "l_i = l_i + tl.sum(p, 1)",
           ("tests/test_attention_fwd.py", "-k", "matches_reference"),
           "online softmax: denominator not rescaled when the running max grows"),
    Mutant("M07", f"{TRITON}/tiling.py", "return block, off_zh, off_z, off_h, off_h // GROUP",
           "return block, off_zh, off_z, off_h, off_h % GROUP",
           ("tests/test_attention_fwd.py", "-k", "matches_reference"),
           "GQA: query head h reads key/value head h % GROUP instead of h // GROUP"),
    Mutant("M08", f"{TRITON}/tiling.py", "tl.abs(r + (S - L) - c)", "tl.abs(r - c)",
           ("tests/test_oracles.py", "-k", "alibi"),
           "ALiBi distance aligned top-left (|i - j|) instead of bottom-right when L != S"),
    Mutant("M09", "attn_kernels/_checks.py", "1.0 / math.sqrt(dim_qk)", "1.0 / dim_qk",
           ("tests/test_attention_fwd.py", "-k", "matches_sdpa"),
           "default scale 1/E instead of 1/sqrt(E) (the reference shares it: only SDPA catches it)"),
    Mutant("M10", f"{TRITON}/attention_weights.py", "p = tl.math.exp2(s - lse2[:, None])",
           "p = tl.math.exp2(s - lse2[:, None] + 0.01)",
           ("tests/test_attention_weights.py",),
           "attention_weights: probabilities off by 0.7% (rows do not sum to 1)"),
    # ---- backward
    Mutant("M11", f"{TRITON}/tiling.py", "hi = tl.minimum(L, start_n + BLOCK_N - band_lo)",
           "hi = tl.minimum(L, start_n + BLOCK_N - band_lo - 1)",
           ("tests/test_oracles.py", "-k", "asymmetric_windows"),
           "dK/dV query-tile range one short under a window's left edge"),
    Mutant("M12", f"{TRITON}/attention_bwd.py", "delta -= tl.load(DLse + row", "delta += tl.load(DLse + row",
           ("tests/test_attention_bwd.py", "-k", "lse_gradient"),
           "gradient of the returned lse enters delta with the wrong sign"),
    Mutant("M13", f"{TRITON}/attention_bwd.py", "ds = ds * (1.0 - t * t)", "ds = ds * (1.0 - t)",
           ("tests/test_attention_variants.py", "-k", "softcap"),
           "dQ: softcap derivative 1 - tanh instead of 1 - tanh^2"),
    Mutant("M14", f"{TRITON}/attention_bwd.py", "pt_dropped = tl.where(keep, pt / (1.0 - dropout_p), 0.0)",
           "pt_dropped = tl.where(keep, pt, 0.0)",
           ("tests/test_gaps.py", "-k", "dropout"),
           "dV: kept probabilities not scaled by 1 / (1 - p)"),
    Mutant("M15", f"{TRITON}/attention_bwd.py", "dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)",
           "dp = tl.where(keep, dp, 0.0)",
           ("tests/test_gaps.py", "-k", "dropout"),
           "dQ: dP of kept weights not scaled by 1 / (1 - p)"),
    # ---- dropout
    Mutant("M16", f"{TRITON}/attention_fwd.py", "out = out / (1.0 - dropout_p)", "out = out * (1.0 - dropout_p)",
           ("tests/test_attention_dropout.py",),
           "forward: kept weights scaled by (1 - p) instead of 1 / (1 - p)"),
    Mutant("M17", f"{TRITON}/tiling.py", "return tl.rand(seed, offsets) >= dropout_p",
           "return tl.rand(seed, offsets) >= dropout_p / 2",
           ("tests/test_attention_dropout.py",),
           "drops a fraction p / 2 while scaling by 1 / (1 - p)"),
    # ---- varlen
    Mutant("M18", f"{TRITON}/tiling.py", "seq_len_k = tl.load(CuSeqK + off_z + 1) - k_start",
           "seq_len_k = tl.load(CuSeqK + off_z + 1) - q_start",
           ("tests/test_attention_varlen.py",),
           "packed batches: a sequence's key length taken from the query prefix sums"),
    Mutant("M19", f"{TRITON}/tiling.py", "band_lo + seq_len_k - seq_len_q, band_hi",
           "band_lo, band_hi",
           ("tests/test_attention_varlen.py",),
           "packed batches: window's left edge not aligned bottom-right per sequence"),
    # ---- decode
    Mutant("M20", f"{TRITON}/attention_decode.py", "keep = keep & (rel <= 0)", "keep = keep & (rel < 0)",
           ("tests/test_attention_decode.py", "-k", "contiguous or gqa"),
           "decode: causal mask hides the query's own key"),
    Mutant("M21", f"{TRITON}/attention_decode.py", "keep = keep & (rel <= win_right)",
           "keep = keep & (rel <= win_right + 1)",
           ("tests/test_attention_decode.py", "-k", "asymmetric or variants"),
           "decode: window one key too wide on the right"),
    Mutant("M22", f"{TRITON}/attention_decode.py", "w = tl.math.exp2(lse_s - shift)",
           "w = tl.where(lse_s == float('-inf'), 0.0, 1.0)",
           ("tests/test_attention_decode.py", "-k", "splits"),
           "decode: split-KV partial outputs averaged instead of weighted by their LSE"),
    Mutant("M23", f"{TRITON}/attention_decode.py", "hi = tl.minimum(hi, LQ + diag)",
           "hi = tl.minimum(hi, LQ + diag - 1)",
           ("tests/test_attention_decode.py", "-k", "contiguous or gqa"),
           "decode: key range one short (the newest key is never read)"),
    # ---- CUDA kernels, on the CPU emulator
    Mutant("C01", "csrc/kernels/attention_fwd.cuh", "(p.causal && col > row)", "(p.causal && col >= row)",
           ("tests/test_attention_cuda.py", "-k", "emulated"),
           "CUDA forward: causal mask hides the diagonal"),
    Mutant("C02", "csrc/kernels/attention_fwd.cuh", "const float alpha = exp2f(row_max[i] - shift);",
           "const float alpha = 1.0f;",
           ("tests/test_attention_cuda.py", "-k", "emulated"),
           "CUDA forward: online softmax never rescales"),
    Mutant("C03", "csrc/kernels/attention_bwd_dq.cuh", "(ds[t][e] - delta[e >> 1])", "(ds[t][e] + delta[e >> 1])",
           ("tests/test_attention_cuda.py", "-k", "emulated"),
           "CUDA dQ: delta added instead of subtracted"),
    Mutant("C04", "csrc/kernels/attention_bwd_dkdv.cuh", "p.causal ? n0 / BLOCK_M * BLOCK_M : 0",
           "p.causal ? (n0 / BLOCK_M + 1) * BLOCK_M : 0",
           ("tests/test_attention_cuda.py", "-k", "emulated"),
           "CUDA dK/dV: causal walk skips the diagonal query tile"),
]

PROBE = '''"""Written by scripts/mutation_check.py into its copy: fail unless the copy is tested."""
import pytest


def pytest_sessionstart(session):
    import attn_kernels

    here = {root!r}
    if not attn_kernels.__file__.startswith(here):
        raise pytest.UsageError(f"mutation_check: imported {{attn_kernels.__file__}}, not the copy in {{here}}")
'''

IGNORED = shutil.ignore_patterns(".git", ".venv", ".venv-*", "__pycache__", ".pytest_cache", "*.egg-info")


def make_copy(workdir: Path) -> Path:
    copy = workdir / "repo"
    shutil.copytree(ROOT, copy, ignore=IGNORED, symlinks=True)
    (copy / "mutation_probe.py").write_text(PROBE.format(root=str(copy)))
    return copy


def pytest_env(copy: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def run_pytest(copy: Path, tests: tuple, timeout: float, jobs: str) -> tuple:
    """-> (return code or 'timeout', summary line, first failing test, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfEs", "-p", "no:randomly", "-p", "no:cacheprovider",
           "-p", "mutation_probe", "-n", jobs, *tests]
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=copy, env=pytest_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", "", time.time() - start
    text = done.stdout + done.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else ""
    failed = next((line.split(" - ")[0].replace("FAILED ", "") for line in lines if line.startswith("FAILED ")), "")
    if done.returncode not in (0, 1):
        failed = failed or "\n".join(lines[-15:])
    return done.returncode, summary, failed, time.time() - start


def count(summary: str, word: str) -> int:
    found = re.search(rf"(\d+) {word}", summary)
    return int(found.group(1)) if found else 0


def verdict(code, summary: str) -> str:
    if code == "timeout":
        return "killed (timeout)"
    if code == 1:
        return "killed"
    if code == 0:
        return "UNTESTED" if count(summary, "passed") == 0 else "SURVIVED"
    if code == 5:
        return "UNTESTED"
    return "BROKEN"


def check_mutant(copy: Path, mutant: Mutant, timeout: float, jobs: str) -> dict:
    target = copy / mutant.path
    source = target.read_text() if target.is_file() else ""
    found = source.count(mutant.original)
    row = dict(name=mutant.name, path=mutant.path, bug=mutant.bug, tests=" ".join(mutant.tests),
               seconds=0.0, detail="")
    if found != 1:
        row.update(status="NOT APPLICABLE", detail=f"snippet found {found} times: {mutant.original!r}")
        return row
    target.write_text(source.replace(mutant.original, mutant.replacement))
    try:
        code, summary, failed, seconds = run_pytest(copy, mutant.tests, timeout, jobs)
    finally:
        target.write_text(source)
    row.update(status=verdict(code, summary), seconds=seconds, detail=failed or summary)
    return row


def markdown(rows: list, baseline: dict, total: float) -> str:
    killed = sum(r["status"].startswith("killed") for r in rows)
    lines = [
        "# Mutation report",
        "",
        f"`python scripts/mutation_check.py` ({time.strftime('%Y-%m-%d %H:%M %Z')}, CPU: Triton interpreter and the "
        f"CUDA emulator): **{killed} of {len(rows)} mutants killed**, {total / 60:.1f} min.",
        f"Unmutated baseline (every selection below, before mutating): {baseline['status']} ({baseline['detail']}).",
        "",
        "| mutant | file | bug | tests | result | s | first failing test / note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {r['name']} | `{r['path']}` | {r['bug']} | `{r['tests']}` | {r['status']} | "
                     f"{r['seconds']:.0f} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    parser.add_argument("-n", "--jobs", default="0", help="pytest-xdist workers per run (0 = in process)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the tests unmutated first")
    args = parser.parse_args(argv)
    wanted = set(filter(None, args.only.split(",")))
    mutants = [m for m in MUTANTS if not wanted or m.name in wanted]
    if wanted - {m.name for m in mutants}:
        parser.error(f"unknown mutants: {sorted(wanted - {m.name for m in MUTANTS})}")

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as workdir:
        copy = make_copy(Path(workdir))
        print(f"copy: {copy}", flush=True)
        baseline = dict(status="skipped", detail="--skip-baseline")
        if not args.skip_baseline:
            # each selection, unmutated: its tests must pass, or no verdict means anything
            for tests in dict.fromkeys(m.tests for m in mutants):
                code, summary, failed, seconds = run_pytest(copy, tests, args.timeout, args.jobs)
                print(f"baseline {' '.join(tests)}: rc {code}, {summary} ({seconds:.0f} s)", flush=True)
                if code != 0:
                    print(f"the unmutated tests do not pass: {failed}", file=sys.stderr)
                    return 1
            baseline = dict(status="passed", detail=f"{len(set(m.tests for m in mutants))} selections")
        rows = []
        for mutant in mutants:
            row = check_mutant(copy, mutant, args.timeout, args.jobs)
            rows.append(row)
            print(f"{row['name']} {row['status']:<16} {row['seconds']:5.0f} s  {mutant.bug}  [{row['detail'][:120]}]",
                  flush=True)
    text = markdown(rows, baseline, time.time() - start)
    print(text)
    if args.report:
        args.report.write_text(text)
    return 0 if all(r["status"].startswith("killed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
