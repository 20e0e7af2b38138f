#!/usr/bin/env bash
# The GPU check: ONE run of at most 9 minutes on a GPU machine (sized for an H200, 16
# cores, no network). Steps in priority order, each with a time cap (seconds), so
# that what matters most finishes even when a later step would not:
#   gpu       (15)  torch sees a CUDA GPU, versions (else nothing else runs)
#   build     (120) pip install --no-build-isolation --no-deps -e . with MAX_JOBS = all
#                   cores (the CUDA extension), and the backends that are available
#   tests     (100) the gpu-marked tests, then a core subset (kernels, variants,
#                   CUDA backend), in parallel with pytest-xdist; every test on CUDA
#   sanitize  (100) compute-sanitizer on small odd shapes: memcheck of both backends
#                   (scripts/sanitize_case.py, baseline and every Triton variant),
#                   racecheck + synccheck of the CUDA backend (scripts/sanitize_cuda.py)
#                   and of the Triton kernels
#   ab        (180) bench/ab_variants.py --write-table: every Triton variant next to
#                   SDPA flash / cuDNN, winners into attn_kernels/triton/tuned/<gpu>.json
#   bench     (40)  bench/bench_attention.py --quick --strict
# Optional steps, run only when named in GPU_CHECK_STEPS: decode, tune, goal (see
# bench/NOTES.md). A step past its cap (or past what is left of GPU_CHECK_BUDGET) is
# killed and reported as TIMEOUT; later steps still get what is left.
#
# Everything lands in ONE folder ($GPU_CHECK_OUT), at most 8 files of at most 16 MiB,
# no subfolders (what a short remote run can hand back):
#   setup.log tests.log sanitize.log ab.log ab.json ab.md bench.log summary.md
# summary.md, the step table, is also printed last. Exit status 1 if a step failed.
#
# Environment:
#   PYTHON              the interpreter with CUDA torch (default: python)
#   GPU_CHECK_STEPS     steps to run (default: "gpu build tests sanitize ab bench")
#   GPU_CHECK_OUT       the results folder (default: $OUT when set, else bench/results/gpu_check)
#   GPU_CHECK_BUDGET    seconds for the whole run (default 540)
#   GPU_CHECK_CAP_<step>  a step's cap in seconds (e.g. GPU_CHECK_CAP_ab=240)
#   GPU_CHECK_JOBS      cores for the build and pytest-xdist (default: nproc)
#   GPU_CHECK_STRICT=1  a step that cannot run here (no compute-sanitizer) fails instead of SKIP
#   GPU_CHECK_CPU=1     CPU mode, to test this script's plumbing without a GPU: no GPU
#                       check, no pip install, a tiny test subset in the interpreter,
#                       the benchmarks' CPU refusal / CPU mode; same files and summary
#   TUNE_ARGS, GOAL_ARGS  more arguments of the optional tune and goal steps
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
STEPS=${GPU_CHECK_STEPS:-gpu build tests sanitize ab bench}
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-bench/results/gpu_check}}
BUDGET=${GPU_CHECK_BUDGET:-540}
JOBS=${GPU_CHECK_JOBS:-$(nproc 2>/dev/null || echo 4)}
STRICT=${GPU_CHECK_STRICT:-0}
CPU_MODE=${GPU_CHECK_CPU:-0}
MAX_FILE_BYTES=$((16 * 1024 * 1024))
SKIP=77 # a step's exit status for "cannot run here" (automake's convention)
mkdir -p "$OUT_DIR"
if [ "$CPU_MODE" = 1 ]; then export TRITON_INTERPRET=1; fi

declare -A CAP=([gpu]=15 [build]=120 [tests]=100 [sanitize]=100 [ab]=180 [bench]=40 [decode]=60 [tune]=300 [goal]=300)
declare -A LOG=([gpu]=setup [build]=setup [tests]=tests [sanitize]=sanitize [ab]=ab [bench]=bench [decode]=bench
                [tune]=ab [goal]=bench)

step_gpu() {
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
    if [ "$CPU_MODE" = 1 ]; then echo "CPU mode: no GPU check"; return 0; fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    fi
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print(torch.cuda.get_device_name())"
}

step_build() {
    if [ "$CPU_MODE" = 1 ]; then
        echo "CPU mode: no pip install"
    else
        # --no-build-isolation: build against the torch installed here; --no-deps: no network
        MAX_JOBS=$JOBS "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
    fi
    "$PY" -c "import attn_kernels
for name, status in attn_kernels.available_backends().items():
    print(f'{name:10} {\"yes\" if status.available else \"no\":4} {status.detail}')"
}

step_tests() {
    local parallel=()
    if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "$JOBS"); fi
    if [ "$CPU_MODE" = 1 ]; then
        "$PY" -m pytest -q -p no:randomly -n 0 tests/test_ab_variants.py -k "list or defaults"
        return
    fi
    local status=0
    "$PY" -m pytest -q "${parallel[@]}" -m gpu tests || status=1
    "$PY" -m pytest -q "${parallel[@]}" tests/test_attention_fwd.py tests/test_attention_bwd.py \
        tests/test_triton_variants.py tests/test_attention_varlen.py tests/test_attention_cuda.py || status=1
    return $status
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

step_sanitize() {
    local tool status=0 variant
    if [ "$CPU_MODE" = 1 ] || ! tool=$(find_sanitizer); then
        echo "compute-sanitizer not found (or CPU mode): install the CUDA toolkit or set CUDA_HOME"
        return $SKIP
    fi
    echo "using $tool"
    # a plain run first: it compiles the kernels, which then load from Triton's cache
    "$PY" scripts/sanitize_case.py || status=1
    # API errors are left out: torch probes the driver with calls that are meant to fail.
    # Most telling first: memcheck of both backends, the CUDA backend's shared-memory
    # races, then each Triton variant (the step may run out of time before the last)
    local common=(--report-api-errors no --error-exitcode 1 --print-limit 20)
    echo "--- memcheck, both backends (Triton baseline)"
    ATTN_KERNELS_TRITON_VARIANT=baseline PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$tool" --tool memcheck "${common[@]}" "$PY" scripts/sanitize_case.py || status=1
    echo "--- racecheck + synccheck, CUDA backend"
    "$tool" --tool racecheck --racecheck-report all "${common[@]}" "$PY" scripts/sanitize_cuda.py || status=1
    "$tool" --tool synccheck "${common[@]}" "$PY" scripts/sanitize_cuda.py || status=1
    for variant in $("$PY" bench/ab_variants.py --list | awk '$1 != "baseline" {print $1}'); do
        if [ "$variant" = ws ] && ! "$PY" -c "import sys, torch; sys.exit(torch.cuda.get_device_capability()[0] < 10)"; then
            echo "--- memcheck, Triton variant ws: skipped (it refuses GPUs below sm_100)"
            continue
        fi
        echo "--- memcheck, Triton variant $variant"
        ATTN_KERNELS_TRITON_VARIANT=$variant PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "$tool" --tool memcheck "${common[@]}" "$PY" scripts/sanitize_case.py || status=1
    done
    echo "--- racecheck + synccheck, Triton kernels"
    "$tool" --tool racecheck --racecheck-report all "${common[@]}" "$PY" scripts/sanitize_case.py || status=1
    "$tool" --tool synccheck "${common[@]}" "$PY" scripts/sanitize_case.py || status=1
    return $status
}

step_ab() {
    "$PY" bench/ab_variants.py --list
    if [ "$CPU_MODE" = 1 ]; then
        # the benchmark must refuse clearly without a GPU (exit 2)
        "$PY" bench/ab_variants.py --out "$OUT_DIR" --name ab
        [ $? -eq 2 ] && return $SKIP
        return 1
    fi
    "$PY" bench/ab_variants.py --write-table --out "$OUT_DIR" --name ab
}

step_bench() {
    local tmp status
    tmp=$(mktemp -d)
    if [ "$CPU_MODE" = 1 ]; then
        "$PY" bench/bench_attention.py --device cpu --quick --seqlens 64 --impls naive,sdpa.math --passes fwd \
            --causal no --out "$tmp" --name quick
    else
        "$PY" bench/bench_attention.py --quick --strict --out "$tmp" --name quick
    fi
    status=$?
    # only the log comes back: the Markdown tables are appended to it
    cat "$tmp"/*.md 2>/dev/null
    rm -rf "$tmp"
    return $status
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
caps=()
start_all=$SECONDS

run_step() {
    local name=$1 start=$SECONDS status cap left log
    cap=${CAP[$name]}
    local override="GPU_CHECK_CAP_$name"
    cap=${!override:-$cap}
    left=$((BUDGET - (SECONDS - start_all)))
    if [ "$left" -lt "$cap" ]; then cap=$left; fi
    log="$OUT_DIR/${LOG[$name]}.log"
    names+=("$name")
    caps+=("$cap")
    if [ "$cap" -le 0 ]; then
        results+=("not run (budget spent)")
        seconds+=(0)
        return
    fi
    echo "=== $name (cap ${cap}s)" >>"$log"
    export -f "step_$name" find_sanitizer 2>/dev/null
    export PY JOBS CPU_MODE OUT_DIR SKIP
    # the step runs in its own process group, so that timeout ends all it started
    timeout --kill-after=5 "$cap" bash -c "set -o pipefail; step_$name" >>"$log" 2>&1
    status=$?
    tail -n 5 "$log"
    seconds+=($((SECONDS - start)))
    case $status in
        0) results+=(PASS) ;;
        124 | 137) results+=("TIMEOUT") ;;
        "$SKIP") if [ "$STRICT" = 1 ]; then results+=("FAIL (cannot run)"); else results+=(SKIP); fi ;;
        *) results+=("FAIL ($status)") ;;
    esac
}

for log in setup tests sanitize ab bench; do : >"$OUT_DIR/$log.log"; done
no_gpu=0
for step in $STEPS; do
    if [ -z "${CAP[$step]:-}" ]; then
        echo "unknown step $step (known: ${!CAP[*]})"
        names+=("$step") results+=("FAIL (unknown)") seconds+=(0) caps+=(0)
    elif [ "$no_gpu" = 1 ]; then
        names+=("$step") results+=("not run (no GPU)") seconds+=(0) caps+=(0)
    else
        run_step "$step"
        if [ "$step" = gpu ] && [ "${results[-1]}" != PASS ]; then no_gpu=1; fi
    fi
done

# what comes back: at most 8 files of at most 16 MiB, all in $OUT_DIR
for f in "$OUT_DIR"/*; do
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt "$MAX_FILE_BYTES" ]; then
        tail -c "$MAX_FILE_BYTES" "$f" >"$f.tmp" && mv "$f.tmp" "$f"
    fi
done

failed=0
{
    echo "# gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - start_all)) s of $BUDGET s)"
    echo
    echo "| step | result | seconds | cap |"
    echo "| --- | --- | --- | --- |"
    for i in "${!names[@]}"; do
        echo "| ${names[$i]} | ${results[$i]} | ${seconds[$i]} | ${caps[$i]} |"
        case "${results[$i]}" in PASS | SKIP) ;; *) failed=1 ;; esac
    done
    echo
    if [ "$failed" = 1 ]; then echo "gpu_check: FAILED"; else echo "gpu_check: passed"; fi
} >"$OUT_DIR/summary.md"
echo
echo "results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
cat "$OUT_DIR/summary.md"
exit $failed
