#!/bin/bash
# One device call: build, correctness of every sk config, timing sweep, memcheck, GPU tests.
# bash kernels/w4a16/run_device.sh   (writes logs under $OUT)
set -o pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a GRACE_DS_KERNEL_CACHE=/tmp/grace_kc MAX_JOBS=8
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,clocks.max.sm --format=csv; date -u; } 2>&1 | tee "$OUT/sweep.log"
timeout 150 python3 -m kernels.w4a16.build > "$OUT/build.log" 2>&1; echo "build rc=$? $(( $(date +%s) - T0 ))s" | tee -a "$OUT/sweep.log"
grep -E "error|warning" "$OUT/build.log" | head -20
timeout $(( 170 - ($(date +%s) - T0) )) python3 -m kernels.w4a16.sweep_sk --out "$OUT" 2>&1 | tee -a "$OUT/sweep.log"
echo "sweep rc=$? $(( $(date +%s) - T0 ))s"
left=$(( 185 - ($(date +%s) - T0) ))
if [ $left -gt 15 ]; then
  timeout $left compute-sanitizer --tool memcheck python3 -m kernels.w4a16.memcheck > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$? $(( $(date +%s) - T0 ))s"; tail -3 "$OUT/memcheck.log"
fi
left=$(( 200 - ($(date +%s) - T0) ))
if [ $left -gt 15 ]; then
  timeout $left python3 -m pytest -m gpu tests/test_kernels.py -q -x -k "not compile" > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$? $(( $(date +%s) - T0 ))s"; tail -3 "$OUT/pytest.log"
fi
left=$(( 285 - ($(date +%s) - T0) ))
if [ $left -gt 20 ]; then
  timeout $left ncu -k regex:w4a16 --launch-skip 3 -c 3 --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 -m kernels.w4a16.profile_one > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$? $(( $(date +%s) - T0 ))s"
fi
cat "$OUT/sweep.md" 2>/dev/null
