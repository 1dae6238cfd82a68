#!/bin/bash
# Device run of the RMSNorm fold in the lean W4A16 kernels (kernels/NOTES.md v21; built 2026-11-30 without a
# device), in one call: build; its GPU tests (every cp.async-ring config, plain and GLU, against float64; the
# folded model layers against norm-then-layer) and the lean / GLU ones around them; compute-sanitizer memcheck;
# the kernel A/B (python -m kernels.w4a16.norm_bench --pdl: the residual add + RMSNorm kernel then the GEMM,
# against the add then the folded GEMM); then, with the time left, launch/bench.py --serving INT4 with and
# without --fuse-norm (NORM_ARCH, NORM_BATCH), same call.
#   bash scripts/norm_device.sh                     (device call: carry [".whl"], timeout_s 598)
#   NORM_STAGES="bench,e2e" bash scripts/norm_device.sh  (the A/Bs only)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); LIMIT=${NORM_LIMIT:-580}
STAGES=${NORM_STAGES:-tests,memcheck,bench,e2e}
. scripts/device_wheels.sh
elapsed() { echo $(( $(date +%s) - T0 )); }
w4a16_device_build
echo "build $(elapsed)s"
if [[ $STAGES == *tests* ]]; then
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_fuse.py \
    -k "norm or glu or lean_configs or op_matches or gpu_folded" > "$OUT/pytest.log" 2>&1
  echo "gpu tests rc=$? $(elapsed)s"; grep -E "passed|failed|^FAILED|^E " "$OUT/pytest.log" | head -20
fi
if [[ $STAGES == *memcheck* ]]; then
  timeout 150 compute-sanitizer --tool memcheck python3 -m kernels.w4a16.memcheck 2>&1 | tail -2
  echo "memcheck $(elapsed)s"
fi
if [[ $STAGES == *bench* ]]; then
  timeout 200 python3 -m kernels.w4a16.norm_bench --pdl --out "$OUT/norm" 2>&1 | grep -v Warning | tail -12
  echo "norm_bench $(elapsed)s"
fi
[[ $STAGES == *e2e* ]] && e2e_ab --fuse-norm "${NORM_ARCH:-llava-1.5-7b}" "${NORM_BATCH:-1}" "$LIMIT" "$T0"
date -u
