#!/bin/bash
# Device run of the decode attention's walks (kv8_triton LAUNCH / LAUNCH16 "spread" and "bound"), in one call:
# the attention kernels' GPU tests (bound against the whole walk, bit for bit; float64 references); the one-layer
# A/B (benchmarks/bench_kv8_attention.py --bound-ab: spread / bound / whole) at the bench's cache (896 positions,
# 768 attended) and at a 4096-position cache; then launch/bench.py --serving for LLaVA-1.5-7B at batch 1 and 16
# (BOUND_E2E_ARGS, default "--variants int4"; e.g. "--variants bf16 int4 --cache-len 4096").
#   bash scripts/bound_device.sh                     (device call: carry [".whl"], timeout_s <= 598)
#   BOUND_LIMIT=220 BOUND_TESTS=matches BOUND_E2E_BATCH=1 bash scripts/bound_device.sh   (a shorter call)
#   BOUND_TEST_FILES="tests/test_kv8_triton.py tests/test_export.py" BOUND_TESTS="gpu and (kernel or peak)" ...
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); LIMIT=${BOUND_LIMIT:-400}
. scripts/device_wheels.sh
export TORCH_CUDA_ARCH_LIST=9.0a GRACE_DS_KERNEL_CACHE=/tmp/grace_kc MAX_JOBS=16
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
elapsed() { echo $(( $(date +%s) - T0 )); }
(timeout 240 python3 -m kernels.w4a16.build > /tmp/build.log 2>&1; echo "build rc=$?" >> /tmp/build.log) &
timeout ${BOUND_TESTS_S:-120} python3 -m pytest -q -m gpu -p no:cacheprovider ${BOUND_TEST_FILES:-tests/test_kv8_triton.py} -k "${BOUND_TESTS:-gpu}" > "$OUT/pytest.log" 2>&1
echo "gpu tests rc=$? $(elapsed)s"; grep -E "passed|failed|^FAILED|^E " "$OUT/pytest.log" | head -12
timeout 150 python3 benchmarks/bench_kv8_attention.py --bound-ab --reps 100 --out "$OUT/attn.md" > /tmp/attn.log 2>&1
echo "attention A/B rc=$? $(elapsed)s"; grep -E "kernel16|kv8 \||kv8, no|copy rate" "$OUT/attn.md"
timeout 60 python3 benchmarks/bench_kv8_attention.py --bound-ab --reps 60 --arch llava-1.5-7b --length 4096 \
  --out "$OUT/attn4096.md" > /tmp/attn4096.log 2>&1
echo "attention A/B 4096 rc=$? $(elapsed)s"; grep -E "kernel16|kv8 \||kv8, no" "$OUT/attn4096.md"
wait; tail -1 /tmp/build.log
left=$(( LIMIT - $(elapsed) ))
[ $left -gt 70 ] && timeout $(( left - 3 )) python3 launch/bench.py --arch llava-1.5-7b --serving ${BOUND_E2E_ARGS:---variants int4} \
  --batch ${BOUND_E2E_BATCH:-1 16} --budget $(( left - 5 )) \
  --out "$OUT/e2e.md" --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
echo "e2e rc=$? $(elapsed)s"; grep -E "^\| llava" "$OUT/e2e.md" 2>/dev/null
date -u
