#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU:
#   gpu       torch sees a CUDA GPU (else the other steps are not run)
#   build     pip install --no-build-isolation -e . (compiles the CUDA extension when
#             setup.py has one; with none, a plain editable install) and lists the backends
#   tests     python -m pytest tests: on a GPU every test runs on CUDA tensors, the
#             gpu-marked ones included (-n 4 when pytest-xdist is installed)
#   memcheck  compute-sanitizer memcheck on scripts/sanitize_case.py (small odd shapes)
#   bench     python bench/bench_attention.py --quick --strict (writes bench/results/<gpu>-quick.*)
#   decode    python bench/bench_decode.py --quick (KV-cache decode bandwidth vs SDPA, FlexAttention)
# Two more steps, not run unless named in GPU_CHECK_STEPS (both write files to commit):
#   tune      python bench/tune_attention.py: searches the Triton tiles on this GPU and
#             writes attn_kernels/triton/tuned/<gpu>.json (about 1 minute per key, see bench/NOTES.md)
#   goal      the H100 speed issue's table: bf16, D 64 and 128, seqlen 4096 to 16384,
#             causal and not, fwd and bwd, attn_kernels next to every SDPA backend
#             (writes bench/results/<gpu>.*)
# Each step's output goes to its log; a summary table is printed last, and the exit
# status is 1 if any step failed.
#
# Environment:
#   PYTHON              the interpreter with CUDA torch (default: python)
#   GPU_CHECK_STEPS     the steps to run (default: "gpu build tests memcheck bench decode")
#   TUNE_ARGS           arguments of the tune step (e.g. "--dims 128 --causal no")
#   GOAL_ARGS           more arguments of the goal step (e.g. "--name h100-baseline")
#   GPU_CHECK_LOG_DIR   where the logs go (default: bench/results/gpu_check)
#   GPU_CHECK_STRICT=1  a step that cannot run here (no compute-sanitizer) fails instead of SKIP
#   GPU_CHECK_ALLOW_CPU=1  go on without a GPU (to test this script; the GPU tests then skip)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
STEPS=${GPU_CHECK_STEPS:-gpu build tests memcheck bench decode}
LOG_DIR=${GPU_CHECK_LOG_DIR:-bench/results/gpu_check}
STRICT=${GPU_CHECK_STRICT:-0}
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
SKIP=77 # a step's exit status for "cannot run here" (automake's convention)
mkdir -p "$LOG_DIR"

step_gpu() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    fi
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)
assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
print(torch.cuda.get_device_name())"
}

step_build() {
    # --no-build-isolation: build against the torch installed here; --no-deps: no network
    "$PY" -m pip install --no-build-isolation --no-deps -e .
    if [ -d csrc ]; then
        "$PY" -c "import attn_kernels._C as ext; print('extension built:', ext.__file__)"
    else
        echo "no csrc/: nothing to compile (Python and Triton only)"
    fi
    "$PY" -c "import attn_kernels
for name, status in attn_kernels.available_backends().items():
    print(f'{name:10} {\"yes\" if status.available else \"no\":4} {status.detail}')"
}

step_tests() {
    local parallel=()
    if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 4); fi
    "$PY" -m pytest -q "${parallel[@]}" tests
}

find_sanitizer() {
    if command -v compute-sanitizer; then return; fi
    local candidate
    for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
        if [ -x "$candidate" ]; then echo "$candidate" && return; fi
    done
    # the pip wheel nvidia-cuda-sanitizer-api ships the binary in site-packages
    "$PY" - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
found = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "**", "compute-sanitizer"), recursive=True)
         if os.path.isfile(p) and os.access(p, os.X_OK)]
print(found[0]) if found else sys.exit(1)
EOF
}

step_memcheck() {
    local tool
    if ! tool=$(find_sanitizer); then
        echo "compute-sanitizer not found: install the CUDA toolkit or set CUDA_HOME"
        return $SKIP
    fi
    echo "using $tool"
    # a plain run first: it compiles the kernels, which then load from Triton's cache
    "$PY" scripts/sanitize_case.py
    # API errors are left out: torch probes the driver with calls that are meant to fail
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool memcheck --report-api-errors no --error-exitcode 1 \
        --print-limit 20 "$PY" scripts/sanitize_case.py
}

step_bench() {
    "$PY" bench/bench_attention.py --quick --strict
}

step_decode() {
    "$PY" bench/bench_decode.py --quick
}

step_tune() {
    "$PY" bench/tune_attention.py ${TUNE_ARGS:-}
}

step_goal() {
    "$PY" bench/bench_attention.py --strict --seqlens 4096 8192 16384 --headdims 64 128 --dtypes bf16 \
        --passes fwd,bwd --impls sdpa.flash,sdpa.efficient,sdpa.cudnn,attn_kernels.triton,attn_kernels.cuda \
        ${GOAL_ARGS:-}
}

names=()
results=()
seconds=()

record() { # name result seconds
    names+=("$1")
    results+=("$2")
    seconds+=("$3")
}

run_step() {
    local name=$1 start=$SECONDS status
    echo "=== $name"
    set +e
    (set -e && "step_$name") 2>&1 | tee "$LOG_DIR/$name.log"
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" -eq 0 ]; then
        record "$name" PASS $((SECONDS - start))
    elif [ "$status" -eq "$SKIP" ]; then
        if [ "$STRICT" = 1 ]; then record "$name" "FAIL (cannot run)" $((SECONDS - start)); else record "$name" SKIP $((SECONDS - start)); fi
    else
        record "$name" "FAIL ($status)" $((SECONDS - start))
    fi
}

no_gpu=0
for step in $STEPS; do
    if ! declare -F "step_$step" >/dev/null; then
        echo "unknown step $step (known: gpu build tests memcheck bench decode tune goal)"
        record "$step" "FAIL (unknown)" 0
    elif [ "$no_gpu" = 1 ]; then
        record "$step" "not run (no GPU)" 0
    else
        run_step "$step"
        if [ "$step" = gpu ] && [ "${results[-1]}" != PASS ] && [ "$ALLOW_CPU" != 1 ]; then
            no_gpu=1
        fi
    fi
done

failed=0
echo
echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), logs in $LOG_DIR)"
printf '  %-9s %-17s %8s\n' step result seconds
for i in "${!names[@]}"; do
    printf '  %-9s %-17s %8s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}"
    case "${results[$i]}" in PASS | SKIP) ;; *) failed=1 ;; esac
done
if [ "$failed" = 1 ]; then
    echo "gpu_check: FAILED"
    exit 1
fi
echo "gpu_check: passed"
