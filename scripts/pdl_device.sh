#!/bin/bash
# Launch overlap on a lent Hopper machine, in one call (kernels/NOTES.md v12): the GPU tests of the Triton
# kernels' PDL, then batch-1 decode of LLaVA-1.5-7B under --serving without and with --triton-pdl (int4,
# then the bf16 baseline with --triton-pdl). Logs under $OUT. (The 2026-11-29 17:27 run, commit d676206,
# also timed an L2 prefetch of the lean kernels' weights, since removed: slower in every case.)
#   bash scripts/pdl_device.sh          (device call: carry [".whl"], timeout_s 598)
#   PDL_E2E="--arch qwen2-vl-7b --batch 16" bash scripts/pdl_device.sh   (another model or batch)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); LIMIT=${PDL_LIMIT:-585}
. scripts/device_wheels.sh
export TORCH_CUDA_ARCH_LIST=9.0a GRACE_DS_KERNEL_CACHE=/tmp/grace_kc MAX_JOBS=16
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
python3 -c "import torch, triton; from torch._inductor import config as c; print('torch', torch.__version__, 'triton', triton.__version__, 'inductor enable_pdl', hasattr(c.triton, 'enable_pdl'))"
timeout 240 python3 -m kernels.w4a16.build > /tmp/build.log 2>&1 || tail -20 /tmp/build.log; echo "build $(( $(date +%s) - T0 ))s"
timeout ${PDL_TESTS_S:-120} python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_kv8_triton.py \
  -k "pdl" > "$OUT/pytest.log" 2>&1
echo "gpu tests rc=$? $(( $(date +%s) - T0 ))s"; grep -E "passed|failed|^FAILED|^E " "$OUT/pytest.log" | tail -12
e2e() {   # name, then bench.py arguments; int4 unless --variants is given
  local name=$1; shift
  local left=$(( LIMIT - ($(date +%s) - T0) ))
  [ $left -lt 60 ] && { echo "$name: skipped, ${left}s left"; return; }
  python3 launch/bench.py ${PDL_E2E:---arch llava-1.5-7b --batch 1} --serving --variants int4 "$@" \
    --budget $(( left - 5 )) --timeout $(( left - 5 )) --json "/tmp/e2e_$name.json" > "$OUT/e2e_$name.log" 2>&1
  echo "e2e $name rc=$? $(( $(date +%s) - T0 ))s"
  grep -E "^\| .* \| (int4|bf16) \| [0-9]" "$OUT/e2e_$name.log" | cut -c1-220
}
e2e serving
e2e triton_pdl --triton-pdl
e2e bf16_triton_pdl --triton-pdl --variants bf16
date -u
