#!/usr/bin/env bash
# The GPU fast path on a bare GPU box, in one go (under 10 minutes on an H100/H200):
#   1. checks torch sees CUDA (installs a CUDA build only if pip can reach an index),
#   2. installs wheels carried in ./.whl (for an offline box: e.g. pyzmq, so the load
#      test's latency ends at frames published over ZeroMQ), then CuPy for torch's CUDA
#      major version if missing (cupy-cuda12x / cupy-cuda13x),
#   3. makes the project importable (editable install without dependencies, or a
#      namespace link folder when pip cannot install),
#   4. runs the GPU tests (pytest -m gpu: kernels == torch references, captured == eager),
#   5. runs the GPU parts of the tokenizer and generator benchmarks (`run.py --gpu-only`:
#      this box's CPU rows would not be the CPU figures we report) and writes their JSON.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default: $OUT if set, else benchmarks/results
#   QUICK=1 bash benchmarks/gpu.sh          # CI-sized repeats and load tests (about 2 minutes less)
#   ECHOPULSE_COMMIT=abc1234 bash ...        # the commit the JSON names, for a copy of the tree without .git
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
STATUS=0
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*"; }
have() { "$PY" -c "import $1" >/dev/null 2>&1; }

log "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || log "nvidia-smi not found"

# 1. a GPU, and torch with CUDA
nvidia-smi -L >/dev/null 2>&1 || { log "no NVIDIA GPU visible here: run this on a GPU box"; exit 2; }
cuda_torch() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if ! cuda_torch; then
    log "torch is missing or CPU-only: trying a CUDA build from the PyTorch index"
    "$PY" -m pip install -q --upgrade torch --index-url https://download.pytorch.org/whl/cu128 || true
fi
cuda_torch || { log "torch cannot use the GPU: nothing to measure"; exit 1; }
CUDA_MAJOR="$("$PY" -c 'import torch; print(torch.version.cuda.split(".")[0])')"
log "torch $("$PY" -c 'import torch; print(torch.__version__)') (CUDA $CUDA_MAJOR), GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"

# 2. carried wheels, then CuPy for that CUDA major version
if ls .whl/*.whl >/dev/null 2>&1; then
    SITE="$(mktemp -d)/site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        log "carried wheels installed: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        log "could not install the carried wheels in .whl"
    fi
fi
if ! have cupy; then
    pkg="cupy-cuda${CUDA_MAJOR}x"
    if ls .whl/cupy_cuda"${CUDA_MAJOR}"x-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --find-links .whl "$pkg" || log "could not install $pkg from .whl"
    else
        "$PY" -m pip install -q "$pkg" || log "could not install $pkg"
    fi
fi
have cupy && log "cupy $("$PY" -c 'import cupy; print(cupy.__version__)')" \
    || log "no CuPy: CuPy kernels' tests and rows are skipped; torch kernels and graphs still run"

# 3. what the GPU run imports, then the project itself
for pair in numpy:numpy scipy:scipy numba:numba safetensors:safetensors msgpack:msgpack tqdm:tqdm pytest:pytest; do
    mod="${pair%%:*}"; pkg="${pair##*:}"
    have "$mod" || "$PY" -m pip install -q "$pkg" || log "could not install $pkg"
done
if ! have echopulse.core.resident; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
fi
if ! have echopulse.core.resident; then
    NS="$(mktemp -d)/ns"; mkdir -p "$NS/echopulse"
    for part in core kernels stream bridges; do ln -sfn "$PWD/$part" "$NS/echopulse/$part"; done
    export PYTHONPATH="$NS${PYTHONPATH:+:$PYTHONPATH}"
    log "project importable through $NS (pip install -e . failed)"
fi
have echopulse.core.resident || { log "cannot import echopulse: stopping"; exit 1; }
have zmq || log "no pyzmq (carry its wheel in .whl): the load test's latency ends at frames on the host"

# 4. GPU tests (without pytest-asyncio its ini options are unknown: not an error here)
PYTEST_FLAGS=(-v -m gpu -p no:cacheprovider -rs)
have pytest_asyncio || PYTEST_FLAGS+=(-W "ignore::pytest.PytestConfigWarning")
log "GPU tests"
timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest "${PYTEST_FLAGS[@]}" tests/test_gpu_kernels.py tests/test_gpu_graph.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "GPU tests FAILED (see $OUT_DIR/gpu_tests.log)"; STATUS=1; }

# 5. benchmarks: CPU tiny + GPU paper side by side, with the machine in the JSON
GPU_NAME="$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower())')"
MODE=(); [ "${QUICK:-0}" = "1" ] && MODE=(--quick)
log "benchmarks (${MODE[*]:-full})"
# tokenizer first (seconds), then the generator; the JSON is rewritten after each stage
timeout "${BENCH_TIMEOUT:-330}" "$PY" benchmarks/run.py "${MODE[@]}" --gpu-only --only tokenizer,generator \
    --out "$OUT_DIR/gpu_${GPU_NAME}.json" 2>&1 \
    | tee "$OUT_DIR/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "benchmark FAILED (see $OUT_DIR/gpu_bench.log)"; STATUS=1; }
log "done (status $STATUS); results in $OUT_DIR"
exit "$STATUS"
