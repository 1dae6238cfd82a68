#!/bin/bash
# Decode tuning on a lent GPU machine, in one call: build the W4A16 extension, sweep its configs on the
# weights a fused 7B decoder runs (kernels/w4a16/sweep_decode.py) and write the card's tuned table
# (kernels/w4a16/tuned/<card>.json, copied to $OUT to be committed), then the end-to-end bench with that
# table loaded (the arguments), then - time allowing - the decode attention kernels' launch sweep and
# the W4A16 and kv8 attention GPU tests (the latter runs every kv8_triton.LAUNCH variant, fma included).
# Tables land under $OUT, at most 7 files (the device returns 8): the sweep's jsonl and table, the tuned table, the bench's table, JSON and log, the attention table. The other logs
# stay in /tmp/decode_logs; their tails are printed.
#   bash scripts/decode_device.sh --arch llava-1.5-7b --mode compile --int4-lm-head ... --timeout 240
# (device call: carry [".whl"], timeout_s 598; DECODE_LIMIT seconds in all, default 570)
# Knobs: DECODE_PRETEST_K="expr" runs `pytest -m gpu tests/test_kernels.py -k expr` right after the build
# (correctness before timing; DECODE_PRETEST_S, default 150); DECODE_SWEEP_ARGS adds sweep_decode
# arguments (e.g. "--shapes issue 7b-fused"); DECODE_SWEEP=0 skips the sweep (the committed table is
# used); no bench arguments skip the end-to-end bench.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOGS=/tmp/decode_logs; mkdir -p $LOGS
T0=$(date +%s); LIMIT=${DECODE_LIMIT:-570}
. scripts/device_wheels.sh
export TORCH_CUDA_ARCH_LIST=9.0a GRACE_DS_KERNEL_CACHE=/tmp/grace_kc MAX_JOBS=16
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
timeout 240 python3 -m kernels.w4a16.build > $LOGS/build.log 2>&1 || tail -20 $LOGS/build.log; echo "build $(( $(date +%s) - T0 ))s"
if [ -n "$DECODE_PRETEST_K" ]; then
  timeout ${DECODE_PRETEST_S:-150} python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py -k "$DECODE_PRETEST_K" \
    > $LOGS/pretest.log 2>&1
  echo "gpu pretests rc=$? $(( $(date +%s) - T0 ))s"; grep -E "passed|failed|^FAILED|^ERROR|^E |Fatal" $LOGS/pretest.log | head -30
fi
if [ "${DECODE_SWEEP:-1}" != 0 ]; then
  timeout ${DECODE_SWEEP_S:-150} python3 -m kernels.w4a16.sweep_decode --out "$OUT" --write-tuned $DECODE_SWEEP_ARGS \
    > $LOGS/sweep_decode.log 2>&1
  echo "sweep_decode rc=$? $(( $(date +%s) - T0 ))s"; grep -E "^\||tuned table|Error|^  lean" $LOGS/sweep_decode.log
  cp kernels/w4a16/tuned/*.json "$OUT/" 2>/dev/null
fi
if [ $# -gt 0 ]; then
  budget=$(( $(left) - ${DECODE_AFTER_S:-90} ))
  python3 launch/bench.py "$@" --budget $budget --out "$OUT/e2e.md" --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" \
    | grep -v Warning | grep -E "^\||^- |\[bench\]" | grep -v "^| \`" | cut -c1-400 | head -60
  echo "bench rc=$? $(( $(date +%s) - T0 ))s"
fi
if [ "${DECODE_ATTN:-1}" != 0 ] && [ "$(left)" -gt 75 ]; then
  timeout $(( $(left) - 45 )) python3 benchmarks/bench_kv8_attention.py --sweep --out "$OUT/attn.md" > $LOGS/attn.log 2>&1
  echo "attention sweep rc=$? $(( $(date +%s) - T0 ))s"; grep -E "kernel16|kv8 b|Error" $LOGS/attn.log | tail -40
fi
if [ "$(left)" -gt 25 ]; then
  timeout $(( $(left) - 5 )) python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_kv8_triton.py \
    -k "set_choice or op_matches or graph or gpu_kernel_matches" > $LOGS/pytest.log 2>&1
  echo "gpu tests rc=$? $(( $(date +%s) - T0 ))s"; grep -E "passed|failed|^FAILED|^ERROR|Fatal|File \"/work" $LOGS/pytest.log | tail -12
fi
date -u
