#!/bin/bash
# The INT8 KV cache's decode attention on a lent GPU machine, in one call: its GPU tests (the Triton
# kernel under every option against float64, the compiled decode step's logits), the per-layer
# benchmark with the launch sweep and the options, then an Nsight Compute profile of the kernel at
# LLaVA-1.5-7B batch 16. Logs and tables land under $OUT.
#   bash scripts/kv8_device.sh          (device call: carry [".whl"], timeout_s 598)
#   KV8_TEST_FILES=tests/test_kv8_triton.py bash scripts/kv8_device.sh   (the kernel tests only: ~20 s, not ~150)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
. scripts/device_wheels.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader; date -u
timeout ${KV8_TESTS_S:-200} python3 -m pytest -m gpu -q -p no:cacheprovider ${KV8_TEST_FILES:-tests/test_kv8_triton.py tests/test_kv8.py} \
  > "$OUT/pytest.log" 2>&1
echo "gpu tests rc=$? $(( $(date +%s) - T0 ))s"; grep -E "passed|failed|^FAILED|^ERROR|Error" "$OUT/pytest.log" | tail -12
timeout ${KV8_SWEEP_S:-260} python3 benchmarks/bench_kv8_attention.py --sweep --out "$OUT/attn.md" > "$OUT/attn.log" 2>&1
echo "attention bench rc=$? $(( $(date +%s) - T0 ))s"; grep -v "^$" "$OUT/attn.log" | tail -60
if command -v ncu > /dev/null; then   # one launch of the kernel, outside any graph (the bench's check call)
  timeout ${KV8_NCU_S:-90} ncu -k regex:_kv8_decode_kernel -c 1 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
    python3 benchmarks/bench_kv8_attention.py --arch llava-1.5-7b --batch 16 --layers 2 --reps 5 > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$? $(( $(date +%s) - T0 ))s"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Waves Per SM|Issued Ipc|No Eligible|Shared Memory Config|Dynamic Shared" "$OUT/ncu.txt" | head -30
fi
date -u
