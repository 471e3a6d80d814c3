#!/usr/bin/env bash
# GPU check: CUDA tests, every Triton kernel on the device, and the benchmark harness, on a
# machine with one CUDA GPU (H100/H200: about 7 minutes). See docs/gpu.md.
#
#   bash bench/gpu_check.sh OUT_DIR     (or OUT=OUT_DIR bash bench/gpu_check.sh; make gpu-check)
#
# Uses .venv if it has torch, aa_compile and pytest-benchmark, else sets it up as the Makefile
# does (TORCH_SPEC must name a CUDA build of torch: default torch==2.13.0, the CUDA build on
# Linux x86_64 from PyPI), or PY=/path/to/python of a provisioned environment. Steps, each
# under `timeout`, none stops the others:
#   env     nvidia-smi, torch / triton / CUDA versions, GPU name          -> env.txt
#   cuda    pytest tests/test_cuda.py tests/test_ops.py (opcheck on CUDA) -> junit-cuda.xml
#   kernels pytest tests/ops: every kernel against its reference, Triton compiled for the GPU
#   smoke   pytest tests/test_triton_aot.py -k "on_the_gpu and SMOKE_K" (bf16): each kernel at
#           the launch configuration the AOT test compiled, once at full size on the device,
#           compared with the CPU kernel                                  -> junit-smoke.xml
#   tensorrt pytest tests/test_export_tensorrt.py: inner_compiler="tensorrt" against eager
#           (skipped, with the reason, where torch-tensorrt is not provisioned) -> junit-tensorrt.xml
#   bench   python -m bench --device cuda, full shapes, bfloat16 kernel workloads
#           (BENCH_K) --repeats BENCH_REPEATS (2)  -> latest.{json,md,png} (roofline column)
# OUT_DIR/summary.{txt,md,json} list each step's exit status (0 ok, 124 time limit, 5 no
# tests); NAME.log holds each step's output. Time limits in seconds: T_INSTALL (600), T_ENV
# (30), T_CUDA (60), T_KERNELS (100), T_SMOKE (90), T_TENSORRT (60), T_BENCH (190); T_TOTAL (480) for the whole
# script, install included: each step's limit is cut to what is left of T_TOTAL.
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    usage
    exit 0
fi
DEST="${1:-${OUT:-}}"
if [ $# -gt 1 ] || [ -z "$DEST" ]; then
    usage >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$DEST"
OUT="$(cd "$DEST" && pwd)"
cd "$ROOT" || exit 2

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${VENV:-.venv}"
PY_OVERRIDDEN=${PY:+1}
PY="${PY:-$VENV/bin/python}"  # set PY to use a provisioned interpreter instead of .venv
T_INSTALL="${T_INSTALL:-600}"
T_ENV="${T_ENV:-30}"
T_CUDA="${T_CUDA:-60}"
T_KERNELS="${T_KERNELS:-100}"
T_SMOKE="${T_SMOKE:-90}"
T_TENSORRT="${T_TENSORRT:-60}"  # installs nothing: torch-tensorrt must be provisioned (docs/gpu.md)
T_BENCH="${T_BENCH:-190}"
T_TOTAL="${T_TOTAL:-480}"  # every step's limit is cut to what is left of this
# the kernel workloads at full size in bfloat16 (the dictionary decode has float32 only)
BENCH_K="${BENCH_K:-(trigram_bag or window_attention or hat_ops or fp8_linear or rms_norm) and bfloat16 or dictionary}"
BENCH_REPEATS="${BENCH_REPEATS:-2}"
# the smoke's cases (every kernel has a bf16 case; "" runs all dtypes, about 3x longer)
SMOKE_K="${SMOKE_K:-bf16}"

START=$(date +%s)
: >"$OUT/steps.log"
touch "$OUT/.gpu_check_started"  # older report files in OUT are not this run's
declare -a STEPS=()  # "name|exit|seconds|command"

write_summary() {
    local s name rc secs cmd
    {
        echo "aa-compile GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ)," \
            "$(( $(date +%s) - START ))s so far)"
        echo "repo: $ROOT"
        echo "out:  $OUT"
        echo "TORCH_SPEC: $TORCH_SPEC"
        echo
        echo "steps (exit 0 = ok, 124 = time limit, 5 = pytest collected no tests):"
        for s in "${STEPS[@]}"; do
            IFS='|' read -r name rc secs cmd <<<"$s"
            printf '  %-8s exit=%-3s %4ss  %s\n' "$name" "$rc" "$secs" "$cmd"
        done
        if [ "$OUT/latest.md" -nt "$OUT/.gpu_check_started" ]; then
            echo
            echo "benchmark table (latest.md):"
            grep '^|' "$OUT/latest.md"
        fi
    } >"$OUT/summary.txt"
    {
        echo "# aa-compile GPU check"
        echo
        [ -f "$OUT/env.txt" ] && grep -E '^(date|torch|triton|device|python):' "$OUT/env.txt" \
            | sed 's/^/- /'
        echo
        echo "| step | exit | seconds | command |"
        echo "|---|---:|---:|---|"
        for s in "${STEPS[@]}"; do
            IFS='|' read -r name rc secs cmd <<<"$s"
            echo "| $name | $rc | $secs | \`${cmd//|/\\|}\` |"
        done
    } >"$OUT/summary.md"
    {
        echo "{\"schema\": \"aa-gpu-check/1\", \"out\": \"$OUT\", \"steps\": ["
        local first=1
        for s in "${STEPS[@]}"; do
            IFS='|' read -r name rc secs cmd <<<"$s"
            [ $first -eq 1 ] || echo ","
            first=0
            [[ "$rc" =~ ^[0-9]+$ ]] || rc=null
            cmd=${cmd//\\/\\\\}
            printf '  {"name": "%s", "exit": %s, "seconds": %s, "command": "%s"}' \
                "$name" "$rc" "$secs" "${cmd//\"/\\\"}"
        done
        echo
        echo "]}"
    } >"$OUT/summary.json"
}

# step NAME LIMIT_S CMD...: run CMD under timeout (SIGINT first, so pytest still writes its
# results, then KILL 20 s later), output to OUT/NAME.log, record the exit status.
step() {
    local name="$1" limit="$2"
    shift 2
    local t0 rc left
    t0=$(date +%s)
    left=$(( T_TOTAL - (t0 - START) ))
    if [ "$left" -lt 15 ]; then
        STEPS+=("$name|-|0|skipped: T_TOTAL=${T_TOTAL}s used up")
        echo "   $name: skipped, T_TOTAL used up" | tee -a "$OUT/steps.log"
        write_summary
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.log"
    timeout -s INT -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1 </dev/null
    rc=$?
    STEPS+=("$name|$rc|$(( $(date +%s) - t0 ))|$*")
    echo "   $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.log"
    write_summary
    return 0
}

write_summary
trap write_summary EXIT

# -- 1. virtual environment (as the Makefile does it) --------------------------------------
if [ -x "$PY" ] && "$PY" -c 'import torch, aa_compile, pytest_benchmark' >/dev/null 2>&1; then
    STEPS+=("install|0|0|skipped: $PY already has torch, aa_compile and pytest-benchmark")
elif [ -n "$PY_OVERRIDDEN" ]; then
    step install "$T_INSTALL" "$PY" -m pip install --quiet -e ".[dev]"
else
    step install "$T_INSTALL" make -C "$ROOT" install-dev VENV="$VENV" TORCH_SPEC="$TORCH_SPEC"
fi

# -- 2. environment -------------------------------------------------------------------------
env_info() {
    local rc=0
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "TRITON_INTERPRET: ${TRITON_INTERPRET:-<unset>}"
    "$PY" -c '
import platform
import torch
print("python:", platform.python_version(), platform.platform())
print("torch:", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA device (a CPU build of torch, or no driver)")
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
' || rc=$?
    echo
    echo "## nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed"
    return $rc
}
export PY
export -f env_info
step env "$T_ENV" bash -c env_info
[ -f "$OUT/env.log" ] && mv "$OUT/env.log" "$OUT/env.txt"

# -- 3. tests on the GPU: Triton compiled for it (never the interpreter) ---------------------
PYTEST=(env -u TRITON_INTERPRET "$PY" -m pytest -p no:cacheprovider -q -rs)
step cuda "$T_CUDA" "${PYTEST[@]}" tests/test_cuda.py tests/test_ops.py \
    --junitxml="$OUT/junit-cuda.xml"
step kernels "$T_KERNELS" "${PYTEST[@]}" tests/ops --junitxml="$OUT/junit-kernels.xml"
step smoke "$T_SMOKE" "${PYTEST[@]}" tests/test_triton_aot.py -k "on_the_gpu${SMOKE_K:+ and $SMOKE_K}" \
    --junitxml="$OUT/junit-smoke.xml"
step tensorrt "$T_TENSORRT" "${PYTEST[@]}" tests/test_export_tensorrt.py \
    --junitxml="$OUT/junit-tensorrt.xml"

# -- 4. benchmark harness, full shapes --------------------------------------------------------
step bench "$T_BENCH" env -u TRITON_INTERPRET "$PY" -m bench --device cuda -k "$BENCH_K" \
    --repeats "$BENCH_REPEATS" --out "$OUT"

write_summary
echo
cat "$OUT/summary.txt"
