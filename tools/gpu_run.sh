#!/usr/bin/env bash
# numoe on a lent GPU machine. Usage (from the repository root):
#   bash tools/gpu_run.sh [check|test|bench|all|bf16] ...
# check: device sanity, full-size correctness of every CUDA op vs the CPU backend,
#        kernel timings (tools/gpu_check.py)
# test:  the pytest suite on the real GPU (tests/test_cuda.py first, then all)
# bench: the GPU layer table (numoe vs HF transformers) and the routing table
# bf16:  tests/test_cuda.py, then the 16-bit checks and timings (tools/gpu_bf16.py)
# decode: the CUDA-graph tests, the decode layer timings (OLMoE T=1..64, bf16 and
#        float32, graph vs eager vs HF), the routing table, the full-size backward check
# run CMD...: any command in this environment (e.g. run python3 tools/gpu_profile.py)
# Logs and JSON go to $OUT (or ./gpu_out). Expects numpy<2.5 for numba-cuda: when a
# .whl/ folder is present its wheels are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export OUT
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/numpy ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/numba_cache}"
# numba-cuda's low-occupancy warning is its own class (numba.cuda.core.errors), which the
# pytest filter in pyproject.toml does not cover; numoe silences it for its own launches,
# this covers direct numba launches elsewhere (e.g. the layer's helper kernels).
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
mode="${1:-all}"; shift || true
rc=0

sanity() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import numpy, numba, numba_cuda, scipy, ml_dtypes; print('numpy', numpy.__version__, 'numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'scipy', scipy.__version__, 'ml_dtypes', ml_dtypes.__version__)"
  python3 -c "import cffi; print('cffi', cffi.__version__)" || echo "no cffi: no tensor-core path"
  python3 -c "import numoe; print(numoe.backends())"
}

if [ -z "${NUMOE_CUDA_FAST_LAUNCH:-}" ]; then
  if ! python3 tools/fastlaunch_smoke.py > "$OUT/fastlaunch.log" 2>&1; then
    echo "fast launch smoke test failed: using numba launches (see fastlaunch.log)"
    export NUMOE_CUDA_FAST_LAUNCH=0
  fi
  tail -2 "$OUT/fastlaunch.log"
fi

case "$mode" in
  check|all)
    sanity 2>&1 | tee "$OUT/sanity.log"
    python3 tools/gpu_check.py "$@" 2>&1 | tee "$OUT/check.log" || rc=1
    ;;&
  test|all)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" || rc=1
    timeout "${NUMOE_GPU_PYTEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -k "cuda" tests 2>&1 | tee "$OUT/pytest_all.log" || rc=1
    ;;&
  bench|all)
    python3 tools/gpu_bench.py "$@" 2>&1 | tee "$OUT/bench.log" || rc=1
    ;;
  bf16)
    sanity 2>&1 | tee "$OUT/sanity.log"
    python3 tools/gpu_bf16.py "$@" 2>&1 | tee "$OUT/bf16.log" || rc=1
    timeout "${NUMOE_GPU_PYTEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" || rc=1
    ;;
  decode)
    sanity 2>&1 | tee "$OUT/sanity.log"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k graph 2>&1 \
      | tee "$OUT/pytest_graph.log" || rc=1
    timeout 200 python3 tools/gpu_bf16.py --only layer_timings,routing_timings --Ts 1,4,16,64 \
      --no-qwen --budget 0.3 2>&1 | tee "$OUT/decode.log" || rc=1
    timeout 200 python3 tools/gpu_backward_check.py --dtypes float32,float64,bfloat16 --time \
      2>&1 | tee "$OUT/backward_check.log" || rc=1
    ;;
  run)
    "$@" || rc=1
    ;;
  check|test) ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
exit $rc
