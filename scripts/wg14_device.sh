#!/bin/bash
# First device run of the v14 wgmma kernel (producer warps, kernels/NOTES.md v14), in one call:
# 1. wgmma_check on v14's configs 20-22 and v13's c6 in worker subprocesses under a budget (a deadlocked
#    config costs the budget, not the call), checks at M in {1, 17, 48, 64, 100, 128}, timing at 48, 64
#    and 128 tokens;
# 2. only if every check passed: the kernels' GPU tests and compute-sanitizer memcheck, which run every
#    wg config in-process, then the op's table at 48..128 tokens (v14 is not in the dispatch yet).
#   bash scripts/wg14_device.sh        (device call: carry [".whl"], timeout_s 598)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
. scripts/device_wheels.sh
export TORCH_CUDA_ARCH_LIST=9.0a GRACE_DS_KERNEL_CACHE=/tmp/grace_kc MAX_JOBS=16
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
python3 -m kernels.w4a16.wgmma_check --out "$OUT/wg" --configs 6,20,21,22 --ms 1,17,48,64,100,128 \
  --time-ms 48,64,128 --no-op --budget 240 2>&1 | grep -v "^check \|^time " | tail -25
echo "wgmma_check $(( $(date +%s) - T0 ))s"
if ! grep -q "failing configs \[\]" "$OUT/wg/wgmma_table.md" 2>/dev/null; then
  echo "v14 did not pass every check (or the check did not finish): GPU tests and memcheck skipped"; exit 1
fi
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k "wgmma or op_matches" 2>&1 | tail -3
timeout 120 compute-sanitizer --tool memcheck python3 -m kernels.w4a16.memcheck 2>&1 | tail -2
echo "tests + memcheck $(( $(date +%s) - T0 ))s"
left=$(( 585 - ($(date +%s) - T0) ))
[ $left -lt 40 ] && { echo "bench skipped: ${left}s left"; exit 0; }
timeout $left python3 -m kernels.w4a16.bench --no-check --ms 48 64 128 --out "$OUT/bench" 2>&1 | tail -20
date -u
