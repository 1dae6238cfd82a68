#!/bin/bash
# End-to-end generation benchmark on a lent GPU machine, in one call: install the carried wheels,
# build the W4A16 extension, run launch/bench.py with the given arguments, then (time allowing) the
# same architectures in `--mode graph` as a second table. Logs and tables land under $OUT.
#   bash scripts/e2e_device.sh --arch llava-1.5-7b qwen2-vl-7b --mode compile --int4-lm-head
#   E2E_TESTS=1 bash scripts/e2e_device.sh ... --fuse-proj     # GPU tests of kernels and serving path first
#   E2E_TESTS=after E2E_TESTS_S=150 bash scripts/e2e_device.sh ... # bench first, tests in the last 150 s
#   E2E_ATTN=1 bash scripts/e2e_device.sh ... --kv-int8             # + benchmarks/bench_kv8_attention.py first
#   E2E_ATTN=1 E2E_ATTN_ARGS="--sweep --arch llava-1.5-7b --batch 16" ...  # its launch sweep and options, one case
#   E2E_TEST_FILES="tests/test_kv8.py" E2E_TESTS=after ...          # only these files' GPU tests
# (device call: carry [".whl"], timeout_s 598; the wheels come from ../shared/tools/device-wheels.sh)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); LIMIT=${E2E_LIMIT:-570}
. scripts/device_wheels.sh
export TORCH_CUDA_ARCH_LIST=9.0a GRACE_DS_KERNEL_CACHE=/tmp/grace_kc MAX_JOBS=16
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
# at most 8 files under $OUT come back: the build's and the attention bench's logs stay in /tmp
timeout 240 python3 -m kernels.w4a16.build > /tmp/build.log 2>&1 || tail -20 /tmp/build.log; echo "build $(( $(date +%s) - T0 ))s"
gpu_tests() {  # the kernels (every config, PDL), then the serving path (fusion, int8 cache, capture)
  local t=$1
  timeout "$t" python3 -m pytest -m gpu -q -p no:cacheprovider ${E2E_TEST_FILES:-tests/test_kernels.py tests/test_kv8_triton.py \
    tests/test_kv8.py tests/test_fuse.py tests/test_export.py} -k "not (bench and compile)" > "$OUT/pytest.log" 2>&1
  echo "gpu tests rc=$? $(( $(date +%s) - T0 ))s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/pytest.log" | tail -12
}
[ "$E2E_TESTS" = 1 ] && gpu_tests 240
if [ "$E2E_ATTN" = 1 ]; then   # one layer's decode attention: bf16 SDPA vs the int8 cache, portable and Triton
  timeout 150 python3 benchmarks/bench_kv8_attention.py $E2E_ATTN_ARGS --out "$OUT/attn.md" > /tmp/attn.log 2>&1
  echo "attention bench rc=$? $(( $(date +%s) - T0 ))s"; tail -${E2E_ATTN_LINES:-16} /tmp/attn.log
fi
left=$(( LIMIT - ($(date +%s) - T0) ))
budget=$(( left - 10 )); [ "$E2E_TESTS" = after ] && budget=$(( left - ${E2E_TESTS_S:-150} ))
python3 launch/bench.py "$@" --budget $budget --out "$OUT/e2e.md" --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" | grep -v Warning
echo "bench rc=$? $(( $(date +%s) - T0 ))s"
left=$(( LIMIT - ($(date +%s) - T0) ))
[ "$E2E_TESTS" = after ] && [ $left -gt 30 ] && gpu_tests $(( left - 10 ))
left=$(( LIMIT - ($(date +%s) - T0) ))
if [ -n "$E2E_GRAPH_ARGS" ] && [ $left -gt 60 ]; then
  python3 launch/bench.py $E2E_GRAPH_ARGS --mode graph --budget $(( left - 10 )) --out "$OUT/e2e_graph.md" \
    --json "$OUT/e2e_graph.json" 2>&1 | tee "$OUT/e2e_graph.log" | grep -v Warning
  echo "graph bench rc=$? $(( $(date +%s) - T0 ))s"
fi
date -u
