#!/usr/bin/env bash
# GPU check: CUDA tests and the benchmark harness on a machine with one CUDA GPU.
#
#   bash bench/gpu_check.sh OUT_DIR          (make gpu-check OUT=OUT_DIR)
#
# Sets up .venv the way the Makefile does (make install-dev; TORCH_SPEC must name a CUDA build
# of torch: default torch==2.13.0, which is the CUDA build on Linux x86_64 from PyPI; point pip
# elsewhere with PIP_INDEX_URL / PIP_FIND_LINKS; or set PY=/path/to/python of a provisioned
# environment with a CUDA torch), then, each step under `timeout`:
#   env      nvidia-smi, torch / triton versions, GPU name          -> env.txt
#   cuda     pytest tests/test_cuda.py tests/test_ops.py (opcheck)  -> junit-cuda.xml, cuda.log
#   kernels  pytest tests/ops, compiled Triton (no interpreter) -> junit-kernels.xml, ...
#   bench    python -m bench --device cuda -k "$BENCH_K" (full shapes; default: the kernel
#            workloads) --repeats $BENCH_REPEATS (2)      -> report files, bench.log
# A failing step does not stop the others; OUT_DIR/summary.txt always lists each step's exit
# status (124: the step hit its time limit). Time limits in seconds, overridable: T_INSTALL
# (600), T_ENV (60), T_CUDA (90), T_KERNELS (120), T_BENCH (330), and T_TOTAL (540) for the
# whole script, install included: each step's limit is cut to what is left of T_TOTAL.
set -u

if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -eq 1 ] && exit 0 || exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$ROOT" || exit 2

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${VENV:-.venv}"
PY_OVERRIDDEN=${PY:+1}
PY="${PY:-$VENV/bin/python}"  # set PY to use a provisioned interpreter instead of .venv
T_INSTALL="${T_INSTALL:-600}"
T_ENV="${T_ENV:-60}"
T_CUDA="${T_CUDA:-90}"
T_KERNELS="${T_KERNELS:-120}"
T_BENCH="${T_BENCH:-330}"
T_TOTAL="${T_TOTAL:-540}"  # every step's limit is cut to what is left of this
# the kernel workloads worth the GPU minutes (the whole set no longer fits T_BENCH)
BENCH_K="${BENCH_K:-trigram_bag or window_attention or hat_ops or fp8_linear or dictionary or rms_norm}"
BENCH_REPEATS="${BENCH_REPEATS:-2}"

SUMMARY="$OUT/summary.txt"
START=$(date +%s)
: >"$OUT/steps.log"
touch "$OUT/.gpu_check_started"  # older report files in OUT are not this run's
declare -a STEPS=()

# step NAME LIMIT_S CMD...: run CMD under timeout (SIGINT first, so pytest still writes its
# results, then KILL 30 s later), output to OUT/NAME.log, record the exit status.
step() {
    local name="$1" limit="$2"
    shift 2
    local t0 rc left
    t0=$(date +%s)
    left=$(( T_TOTAL - (t0 - START) ))
    if [ "$left" -lt 15 ]; then
        STEPS+=("$(printf '%-8s exit=-     0s  skipped: T_TOTAL=%ss used up' "$name" "$T_TOTAL")")
        echo "   $name: skipped, T_TOTAL used up" | tee -a "$OUT/steps.log"
        write_summary
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.log"
    timeout -s INT -k 30 "$limit" "$@" >"$OUT/$name.log" 2>&1 </dev/null
    rc=$?
    STEPS+=("$(printf '%-8s exit=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*")")
    echo "   $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.log"
    write_summary
    return 0
}

write_summary() {
    {
        echo "aa-compile GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ)," \
            "$(( $(date +%s) - START ))s so far)"
        echo "repo: $ROOT"
        echo "out:  $OUT"
        echo "TORCH_SPEC: $TORCH_SPEC"
        echo
        echo "steps (exit 0 = ok, 124 = time limit, 5 = pytest collected no tests):"
        local s
        for s in "${STEPS[@]}"; do echo "  $s"; done
        if [ "$OUT/latest.md" -nt "$OUT/.gpu_check_started" ]; then
            echo
            echo "benchmark table (latest.md):"
            grep '^|' "$OUT/latest.md"
        fi
    } >"$SUMMARY"
}

write_summary
trap write_summary EXIT

# -- 1. virtual environment (as the Makefile does it) --------------------------------------
if [ -x "$PY" ] && "$PY" -c 'import torch, aa_compile, pytest_benchmark' >/dev/null 2>&1; then
    STEPS+=("install  exit=0   skipped: $VENV already has torch, aa_compile and pytest-benchmark")
elif [ -n "$PY_OVERRIDDEN" ]; then
    step install "$T_INSTALL" "$PY" -m pip install --quiet -e ".[dev]"
else
    step install "$T_INSTALL" make -C "$ROOT" install-dev VENV="$VENV" TORCH_SPEC="$TORCH_SPEC"
fi

# -- 2. environment -------------------------------------------------------------------------
env_info() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "TRITON_INTERPRET: ${TRITON_INTERPRET:-<unset>}"
    echo
    echo "## nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed"
    echo
    echo "## torch / triton"
    "$PY" -c '
import platform
import torch
print("python", platform.python_version(), platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
print("cuda available:", torch.cuda.is_available())
if not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA device (a CPU build of torch, or no driver)")
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
'
}
export PY
export -f env_info
step env "$T_ENV" bash -c env_info
[ -f "$OUT/env.log" ] && mv "$OUT/env.log" "$OUT/env.txt"

# -- 3. CUDA tests, Triton kernels compiled for the GPU (never the interpreter) ------------------
step cuda "$T_CUDA" env -u TRITON_INTERPRET "$PY" -m pytest tests/test_cuda.py tests/test_ops.py -p no:cacheprovider \
    -q -rs --junitxml="$OUT/junit-cuda.xml"
step kernels "$T_KERNELS" env -u TRITON_INTERPRET "$PY" -m pytest tests/ops \
    -p no:cacheprovider -q -rs --junitxml="$OUT/junit-kernels.xml"

# -- 4. benchmark harness, full shapes ----------------------------------------------------------
step bench "$T_BENCH" env -u TRITON_INTERPRET "$PY" -m bench --device cuda -k "$BENCH_K" \
    --repeats "$BENCH_REPEATS" --out "$OUT"

write_summary
echo
cat "$SUMMARY"
