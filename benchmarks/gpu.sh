#!/usr/bin/env bash
# The GPU fast path on a bare GPU box, in one go, inside the lent box's 10 minutes a command:
#   1. checks torch sees CUDA (a CUDA build from the PyTorch index only with INSTALL_TORCH=1:
#      the lent box is offline and has one; a developer's torch is never replaced unasked),
#   2. installs wheels carried in ./.whl (for an offline box: e.g. pyzmq, so the load
#      test's latency ends at frames published over ZeroMQ), then CuPy for torch's CUDA
#      major version if missing (cupy-cuda12x / cupy-cuda13x),
#   3. makes the project importable (editable install without dependencies, or a
#      namespace link folder when pip cannot install),
#   4. runs the GPU tests (pytest -m gpu: kernels == torch references, captured == eager),
#   5. runs the GPU parts of the tokenizer and generator benchmarks (`run.py --gpu-only`:
#      this box's CPU rows would not be the CPU figures we report) and writes their JSON,
#      whatever the tests said, and rewritten as the benchmark goes, so a run cut short
#      keeps what it measured.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default: $OUT if set, else benchmarks/results
#                                            # (a relative OUT_DIR or $OUT: from where it is called)
#   QUICK=1 bash benchmarks/gpu.sh          # CI-sized repeats and load tests (about 2 minutes less)
#   ECHOPULSE_COMMIT=abc1234 bash ...        # the commit the JSON names, for a copy of the tree without .git
#   BUDGET_S=570 (default)                   # seconds for the whole script: keep it under the command's own limit
#                                            # (the device tool's timeout_s); TEST_TIMEOUT / BENCH_TIMEOUT cap steps 4 / 5
#                                            # (all three whole seconds, else it stops at once)
# Exit status: 0 all passed and measured; 1 a test or the benchmark failed (results still
# written), or torch cannot use the GPU, or the project cannot be imported; 2 no GPU here.
set -uo pipefail
START_DIR="$PWD"
ROOT="$(cd "$(dirname "$0")/.." && pwd)" || exit 1
cd "$ROOT" || exit 1

PY="${PYTHON:-python3}"
# the time limits are bash arithmetic: anything but whole seconds would end every step at once
BUDGET_S="${BUDGET_S:-570}"
for limit in BUDGET_S TEST_TIMEOUT BENCH_TIMEOUT; do
    value="${!limit:-1}"
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "gpu.sh: $limit must be a whole number of seconds, got '$value'"; exit 1; }
done
OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then
    OUT_DIR="benchmarks/results"
else
    case "$OUT_DIR" in /*) ;; *) OUT_DIR="$START_DIR/$OUT_DIR" ;; esac  # argument or $OUT: relative to where it was called from
fi
mkdir -p "$OUT_DIR" || { echo "gpu.sh: cannot create $OUT_DIR"; exit 1; }
export PYTHONUNBUFFERED=1
STATUS=0
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*"; }
have() { "$PY" -c "import $1" >/dev/null 2>&1; }
# seconds a step may take: its own cap, or what the budget leaves once `reserve` is kept for later steps
step_limit() {
    local own=$1 rest=$((BUDGET_S - SECONDS - $2))
    ((rest < own)) && own=$rest
    ((own < 1)) && own=1
    echo "$own"
}
# pip from an index, bounded: offline, a retrying pip would spend the box's minutes waiting
pip_index() { timeout 240 "$PY" -m pip install -q --retries 1 --timeout 15 "$@"; }

log "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || log "nvidia-smi not found"
if [ -n "${ECHOPULSE_COMMIT:-}" ]; then
    log "measuring commit $ECHOPULSE_COMMIT (ECHOPULSE_COMMIT)"
else
    log "WARNING: ECHOPULSE_COMMIT is not set: the JSON's commit is git's HEAD here, if any (a copied tree's .git may be stale or absent); its source_sha256 names the code measured"
fi

# 1. a GPU, and torch with CUDA
nvidia-smi -L >/dev/null 2>&1 || { log "no NVIDIA GPU visible here: run this on a GPU box"; exit 2; }
cuda_torch() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if ! cuda_torch && [ "${INSTALL_TORCH:-0}" = "1" ]; then
    log "torch is missing or CPU-only: trying a CUDA build from the PyTorch index (INSTALL_TORCH=1)"
    pip_index --upgrade torch --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}" || true
fi
cuda_torch || { log "torch cannot use the GPU: nothing to measure (INSTALL_TORCH=1 tries a CUDA build from the PyTorch index)"; exit 1; }
CUDA_MAJOR="$("$PY" -c 'import torch; print(torch.version.cuda.split(".")[0])')"
log "torch $("$PY" -c 'import torch; print(torch.__version__)') (CUDA $CUDA_MAJOR), GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"

# 2. carried wheels, then CuPy for that CUDA major version
if ls .whl/*.whl >/dev/null 2>&1; then
    SITE="$(mktemp -d)/site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        log "carried wheels installed: $(printf '%s ' .whl/*.whl)"
    else
        log "could not install the carried wheels in .whl"
    fi
fi
if ! have cupy; then
    pkg="cupy-cuda${CUDA_MAJOR}x"
    if ls .whl/cupy_cuda"${CUDA_MAJOR}"x-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --find-links .whl "$pkg" || log "could not install $pkg from .whl"
    else
        pip_index "$pkg" || log "could not install $pkg"
    fi
fi
if have cupy; then
    log "cupy $("$PY" -c 'import cupy; print(cupy.__version__)')"
else
    log "no CuPy: CuPy kernels' tests and rows are skipped; torch kernels and graphs still run"
fi

# 3. what the GPU run imports, then the project itself
for pair in numpy:numpy scipy:scipy numba:numba safetensors:safetensors msgpack:msgpack tqdm:tqdm pytest:pytest; do
    mod="${pair%%:*}"; pkg="${pair##*:}"
    have "$mod" || pip_index "$pkg" || log "could not install $pkg"
done
if ! have echopulse.core.resident; then
    timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
fi
if ! have echopulse.core.resident; then
    NS="$(mktemp -d)/ns"; mkdir -p "$NS/echopulse"
    for part in core kernels stream bridges; do ln -sfn "$PWD/$part" "$NS/echopulse/$part"; done
    export PYTHONPATH="$NS${PYTHONPATH:+:$PYTHONPATH}"
    log "project importable through $NS (pip install -e . failed)"
fi
have echopulse.core.resident || { log "cannot import echopulse: stopping"; exit 1; }
have zmq || log "no pyzmq (carry its wheel in .whl): the load test's latency ends at frames on the host"

# 4. GPU tests (without pytest-asyncio its ini options are unknown: not an error here);
# the benchmark keeps at least 240 s of the budget
PYTEST_FLAGS=(-v -m gpu -p no:cacheprovider -rs)
have pytest_asyncio || PYTEST_FLAGS+=(-W "ignore::pytest.PytestConfigWarning")
TESTS_S="$(step_limit "${TEST_TIMEOUT:-200}" 240)"
log "GPU tests (at most ${TESTS_S} s)"
timeout "$TESTS_S" "$PY" -m pytest "${PYTEST_FLAGS[@]}" tests/test_gpu_kernels.py tests/test_gpu_graph.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
rc="${PIPESTATUS[0]}"
[ "$rc" -eq 124 ] && log "GPU tests stopped at their ${TESTS_S} s limit"
[ "$rc" -eq 0 ] || { log "GPU tests FAILED (status $rc; see $OUT_DIR/gpu_tests.log)"; STATUS=1; }

# 5. benchmarks: the GPU parts, with the machine in the JSON
GPU_NAME="$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower())')"
JSON="$OUT_DIR/gpu_${GPU_NAME}.json"
MODE=(); [ "${QUICK:-0}" = "1" ] && MODE=(--quick)
BENCH_S="$(step_limit "${BENCH_TIMEOUT:-330}" 10)"
log "benchmarks (${MODE[*]:-full}, at most ${BENCH_S} s)"
# tokenizer first (seconds), then the generator; the JSON is rewritten after each section
timeout "$BENCH_S" "$PY" benchmarks/run.py "${MODE[@]}" --gpu-only --only tokenizer,generator --out "$JSON" 2>&1 \
    | tee "$OUT_DIR/gpu_bench.log"
rc="${PIPESTATUS[0]}"
[ "$rc" -eq 124 ] && log "benchmark stopped at its ${BENCH_S} s limit: the JSON holds the sections done"
[ "$rc" -eq 0 ] || { log "benchmark FAILED (status $rc; see $OUT_DIR/gpu_bench.log)"; STATUS=1; }
[ -s "$JSON" ] || { log "no benchmark JSON was written"; STATUS=1; }

# the summary last, where a caller that keeps only the end of the output sees it
log "summary: commit ${ECHOPULSE_COMMIT:-not given}; GPU tests: $(tail -n 1 "$OUT_DIR/gpu_tests.log" | tr -d '=')"
have cupy || log "summary: no CuPy, so no CuPy kernel tests or rows"
have zmq || log "summary: no pyzmq, so load-test latency ends at frames on the host"
log "done in ${SECONDS} s (status $STATUS); results in $OUT_DIR"
exit "$STATUS"
