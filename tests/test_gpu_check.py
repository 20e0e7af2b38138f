"""scripts/gpu_check.sh in its CPU mode: the plumbing of the one GPU run (steps, caps,
the results folder of at most 8 files, the summary table last), without a GPU."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(tmp_path, **env):
    full = dict(os.environ, GPU_CHECK_CPU="1", GPU_CHECK_OUT=str(tmp_path), **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)


def _summary(tmp_path) -> dict:
    rows = [line.split("|")[1:-1] for line in (tmp_path / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| step", "| ---"))]
    return {cells[0].strip(): cells[1].strip() for cells in rows}


def test_cpu_mode_runs_every_step_into_one_flat_folder(tmp_path):
    done = _run(tmp_path, GPU_CHECK_STEPS="gpu build tests sanitize ab")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _summary(tmp_path) == {"gpu": "PASS", "build": "PASS", "tests": "PASS", "sanitize": "SKIP", "ab": "SKIP"}
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 << 20 for f in files)
    assert "interior" in (tmp_path / "ab.log").read_text()  # --list ran; then the no-GPU refusal
    assert "no CUDA GPU" in (tmp_path / "ab.log").read_text()
    assert done.stdout.rstrip().endswith("gpu_check: passed")  # the summary table is printed last


def test_a_step_past_its_cap_is_a_timeout_and_the_run_fails(tmp_path):
    done = _run(tmp_path, GPU_CHECK_STEPS="gpu tests nosuchstep", GPU_CHECK_CAP_tests="1")
    assert done.returncode == 1
    assert _summary(tmp_path) == {"gpu": "PASS", "tests": "TIMEOUT", "nosuchstep": "FAIL (unknown)"}
