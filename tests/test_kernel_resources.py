"""bench/kernel_resources.py: the Triton kernels compiled for GPUs that are not here.

Each check runs in a fresh interpreter without TRITON_INTERPRET (the test session
has it on, and the interpreter compiles nothing). Shared memory and spills come
from the Triton installed here (the GPU machine's may lower a kernel differently)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_cli_reports_the_forward_kernel_for_sm90(tmp_path):
    out = tmp_path / "rows.json"
    _python("import sys; sys.path.insert(0, 'bench'); import kernel_resources as kr; "
            f"sys.exit(kr.main(['--dims', '64', '--dtypes', 'bfloat16', '--causal', 'no', '--passes', 'fwd', "
            f"'--json', {str(out)!r}]))")
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["attn_fwd_kernel"]
    row = rows[0]
    assert 0 < row["registers"] <= 255 and 0 < row["shared_bytes"] <= 227 * 1024 and row["fits"]


STEP_DOWN = """
import sys, json
sys.path.insert(0, 'bench')
import kernel_resources as kr
from attn_kernels.triton import tuning
key = tuning.Key.of('{kind}', __import__('torch').bfloat16, {dim}, False)
blocks, chain = tuning.default(key), []
while blocks is not None:
    with tuning.forced({kind}=blocks):
        row = [r for r in kr.measure('', kr._attention_launches('bfloat16', {dim}, False, 1024, True), {arch})
               if r.kernel == kr.KERNEL_OF_KIND['{kind}']][0]
    chain.append((str(blocks), row.shared_bytes, row.fits))
    if row.fits:
        break
    blocks = tuning.smaller(blocks)
print(json.dumps(chain))
"""


@pytest.mark.parametrize("kind,dim", [("dq", 128), ("dq", 256)])
def test_step_down_reaches_tiles_that_fit_sm86(kind, dim):
    """A GPU with 99 KiB of shared memory per block (sm_86 / sm_89: RTX 30xx / 40xx, A10,
    L4, L40) refuses the dQ tiles chosen for an A100 / H100; the step-down that the
    launch does on OutOfResources must reach tiles that it takes within a few steps."""
    chain = json.loads(_python(STEP_DOWN.format(kind=kind, dim=dim, arch=86)).strip().splitlines()[-1])
    assert chain[-1][2], chain
    assert len(chain) <= 4, chain
