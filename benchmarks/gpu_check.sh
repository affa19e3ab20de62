#!/usr/bin/env bash
# The one prepared GPU check: on a bare GPU machine (torch + Triton + nvcc already there, no
# network) it builds the package with its CUDA extension, runs the GPU and Triton tests, runs
# compute-sanitizer over the CUDA tests, checks the compression step for host syncs / CUDA-graph
# capture, and runs the op benchmarks. Everything it measures lands in $OUT (default results/gpu).
#
# A GPU run is short and rare, so the script is proven on CPU first: DRY_RUN=1 (CI runs it) drives
# every stage's real driver at tiny sizes (pure-Python build, GPU tests collected and skipped,
# Triton in the interpreter, the sync/graph check's CPU flow, bench --quick on CPU; the sanitizer
# stages report "compute-sanitizer not found" when it is absent, without failing), produces the same
# summary.txt and log tarball, and exits 1 if any stage's driver failed (a path, an option, an
# exception). A real run always exits 0: its logs are what matters.
#
# Real-run stage limits add up to 475 s including the build (well under the 10-minute call), and a
# total budget (GPU_CHECK_BUDGET_S, default 540 s) caps every stage at what is left.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh               # on the GPU machine
#   DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_check.sh      # anywhere (CI)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
OUT=${OUT:-results/gpu}
# The device tool brings back at most 8 files from $OUT: logs go to $LOGS and come back as one tarball.
LOGS=${LOGS:-$(mktemp -d /tmp/kvpk_gpu_logs.XXXXXX)}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
export KVPRESS_KERNELS_CUDA_ARCHS=${KVPRESS_KERNELS_CUDA_ARCHS:-90-real}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
# The dry run's limits are generous (a shared CI runner is slow and nothing there is leased); the real
# run's are the ones that must fit the GPU call.
if [ "$DRY" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET_S:-1800}; else BUDGET=${GPU_CHECK_BUDGET_S:-540}; fi
T_START=$(date +%s)
summary="$LOGS/summary.txt"
: > "$summary"
failed=0
stage() {  # stage NAME TIMEOUT_S CMD...  — runs CMD, logs to $LOGS/NAME.log, records rc and wall time
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T_START) ))
  if [ "$left" -lt 5 ]; then
    echo "$name skipped: total budget ${BUDGET}s spent" | tee -a "$summary"
    failed=1
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$(( $(date +%s) - t0 ))s" | tee -a "$summary"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$summary"
  [ "$rc" -ne 0 ] && failed=1
  return 0
}
sanitizer() {  # sanitizer NAME TOOL TIMEOUT_S PYTEST_ARGS...
  local name=$1 tool=$2 limit=$3; shift 3
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -z "$cs" ]; then
    echo "$name: compute-sanitizer not found (skipped)" | tee -a "$summary"
    return 0
  fi
  stage "$name" "$limit" "$cs" --tool "$tool" --error-exitcode 9 $PY -m pytest -q "$@"
}

{
  echo "date: $(date -u +%FT%TZ)$([ "$DRY" = 1 ] && echo ' (DRY RUN: CPU, tiny sizes)')"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee -a "$summary"

KERNEL_TESTS="tests/test_append.py tests/test_compaction.py tests/test_scoring.py tests/test_segments.py \
  tests/test_selection.py tests/test_decode_attention.py tests/test_native_dot.py tests/test_cache.py \
  tests/test_cuda_ext.py tests/test_bad_inputs.py tests/test_properties.py tests/test_determinism.py \
  tests/test_regressions.py"
if [ "$DRY" = 1 ]; then
  # 1. The same build command, pure Python (no nvcc on a CPU runner needed; CI builds the extension itself).
  stage build 300 env KVPRESS_KERNELS_SKIP_CUDA=1 $PY setup.py -q build_ext --inplace
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  stage info 120 $PY -m kvpress_kernels.cli info
  # 2. The same test files and marker: collected, GPU tests skip cleanly (the interpreter tests run in CI's suite).
  stage pytest_gpu 400 $PY -m pytest -q -ra -m gpu $KERNEL_TESTS
  # 3. Sanitizers: the same invocation when compute-sanitizer exists (a CPU run then checks nothing on a device).
  sanitizer memcheck memcheck 300 -m gpu tests/test_cuda_ext.py
  sanitizer racecheck racecheck 300 -m gpu tests/test_cuda_ext.py
  # 4. The sync/graph/soak driver's CPU flow (eager, a short soak).
  stage sync_graph 300 $PY benchmarks/gpu_sync_graph_check.py --device cpu --soak 2 --out "$LOGS"
  # 5. Every benchmark script, quick shapes, on CPU.
  stage bench 600 $PY -m kvpress_kernels.cli bench --quick --device cpu --budget-s 60 --no-plots --strict \
    --out "$LOGS/bench"
else
  # 1. Build: the CUDA extension in place (no dependency resolution: the machine has no network).
  stage build 120 $PY setup.py build_ext --inplace
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  stage info 20 $PY -m kvpress_kernels.cli info
  # 2. Tests of the kernels on CUDA tensors (Triton compiled, CUDA extension), bf16 included.
  stage pytest_gpu 100 $PY -m pytest -q -ra -m "gpu or triton" $KERNEL_TESTS
  # 3. compute-sanitizer over the CUDA extension's tests.
  sanitizer memcheck memcheck 60 -m gpu tests/test_cuda_ext.py
  sanitizer racecheck racecheck 60 -m gpu tests/test_cuda_ext.py
  # 4. No host syncs, CUDA-graph capture and replay, soak (benchmarks/gpu_sync_graph_check.py).
  stage sync_graph 40 $PY benchmarks/gpu_sync_graph_check.py --out "$LOGS"
  # 5. Benchmarks of every op and of the whole compression step, all providers side by side.
  stage bench 75 $PY -m kvpress_kernels.cli bench --budget-s 60 --no-plots --out "$LOGS/bench"
fi

echo "done in $(( $(date +%s) - T_START ))s; stages failed: $failed; results in $OUT" | tee -a "$summary"
cp "$summary" "$OUT/summary.txt"
tar -czf "$OUT/gpu_logs.tgz" -C "$LOGS" .
if [ "$DRY" = 1 ] && [ "$failed" != 0 ]; then
  echo "DRY RUN FAILED: a stage's driver broke (see $LOGS/*.log)" >&2
  exit 1
fi
exit 0
