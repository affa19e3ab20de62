#!/usr/bin/env bash
# The one prepared GPU check: on a bare GPU machine (torch + Triton + nvcc already there, no
# network) it builds the package with its CUDA extension, runs the GPU and Triton tests, runs
# compute-sanitizer over the CUDA tests, checks the compression step for host syncs / CUDA-graph
# capture, and runs the op benchmarks. Everything it measures lands in $OUT (default results/gpu).
# Sized to finish in under 10 minutes (stage limits add up to 585 s); every stage has its own timeout so a hang costs
# one stage, not the whole lease.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
# The device tool brings back at most 8 files from $OUT: logs go to $LOGS and come back as one tarball.
LOGS=${LOGS:-/tmp/kvpk_gpu_logs}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
export KVPRESS_KERNELS_CUDA_ARCHS=${KVPRESS_KERNELS_CUDA_ARCHS:-90-real}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
summary="$LOGS/summary.txt"
: > "$summary"
stage() {  # stage NAME TIMEOUT_S CMD...  — runs CMD, logs to $OUT/NAME.log, records rc and wall time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$(( $(date +%s) - t0 ))s" | tee -a "$summary"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$summary"
  return 0
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee -a "$summary"

# 1. Build: the CUDA extension in place (no dependency resolution: the machine has no network).
stage build 120 $PY setup.py build_ext --inplace
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stage info 30 $PY -m kvpress_kernels.cli info

# 2. Tests of the kernels on CUDA tensors (Triton compiled, CUDA extension), bf16 included.
KERNEL_TESTS="tests/test_append.py tests/test_compaction.py tests/test_scoring.py tests/test_segments.py \
  tests/test_selection.py tests/test_decode_attention.py tests/test_cache.py tests/test_cuda_ext.py \
  tests/test_bad_inputs.py tests/test_properties.py tests/test_determinism.py tests/test_regressions.py"
stage pytest_gpu 120 $PY -m pytest -q -ra -m "gpu or triton" $KERNEL_TESTS

# 3. compute-sanitizer over the CUDA extension's tests.
stage memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -m gpu tests/test_cuda_ext.py
stage racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 $PY -m pytest -q -m gpu tests/test_cuda_ext.py

# 4. No host syncs, CUDA-graph capture and replay, soak (benchmarks/gpu_sync_graph_check.py).
if [ -f benchmarks/gpu_sync_graph_check.py ]; then
  stage sync_graph 45 $PY benchmarks/gpu_sync_graph_check.py --out "$LOGS"
fi

# 5. Benchmarks of every op and of the whole compression step, all providers side by side.
stage bench 90 $PY -m kvpress_kernels.cli bench --budget-s 75 --no-plots --out "$LOGS/bench"

echo "done; results in $OUT" | tee -a "$summary"
cp "$summary" "$OUT/summary.txt"
tar -czf "$OUT/gpu_logs.tgz" -C "$LOGS" .
