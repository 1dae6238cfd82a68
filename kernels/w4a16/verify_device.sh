#!/bin/bash
# Correctness-only kernel check, small enough to share a device call with other work (timings from
# it mean nothing: the GPU may be shared). Build, the GPU tests, compute-sanitizer memcheck over every
# tensor-core and wgmma config, then wgmma_check's float64 comparisons. One log: $OUT/kernels.log.
#   CUDA_VISIBLE_DEVICES=1 bash kernels/w4a16/verify_device.sh &     (budget: about 330 s)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a GRACE_DS_KERNEL_CACHE=/tmp/grace_kc MAX_JOBS=${MAX_JOBS:-6}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/kernels.log"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u; } > "$LOG" 2>&1
timeout 170 python3 -m kernels.w4a16.build >> "$LOG" 2>&1; echo "== build rc=$? $(el)s" >> "$LOG"
timeout 90 python3 -m pytest -m gpu tests/test_kernels.py -q -x -p no:cacheprovider -k "not compile" >> "$LOG" 2>&1
echo "== pytest rc=$? $(el)s" >> "$LOG"
timeout 90 compute-sanitizer --tool memcheck python3 -m kernels.w4a16.memcheck > /tmp/memcheck.log 2>&1
echo "== memcheck rc=$? $(el)s" >> "$LOG"; tail -4 /tmp/memcheck.log >> "$LOG"
left=$(( 330 - $(el) ))
if [ $left -gt 30 ]; then
  timeout $left python3 -m kernels.w4a16.wgmma_check --out /tmp/wg --budget $(( left - 5 )) > /tmp/wg.log 2>&1
  echo "== wgmma_check rc=$? $(el)s" >> "$LOG"; grep -iE "pass|fail|worst|checks" /tmp/wg.log | tail -8 >> "$LOG"
fi
echo "== done $(el)s" >> "$LOG"
