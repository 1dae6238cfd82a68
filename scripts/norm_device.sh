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
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_fuse.py \
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
if [[ $STAGES == *e2e* ]]; then
  split=2
  for variant in "--fuse-norm" ""; do
    left=$(( LIMIT - $(elapsed) ))
    [ $left -lt 90 ] && { echo "e2e $variant skipped: ${left}s left"; continue; }
    tag=${variant:-plain}; tag=${tag#--}
    python3 launch/bench.py --arch ${NORM_ARCH:-llava-1.5-7b} --serving --variants int4 --batch ${NORM_BATCH:-1} \
      $variant --budget $(( left / split )) --out "$OUT/e2e_$tag.md" --json "$OUT/e2e_$tag.json" > "$OUT/e2e_$tag.log" 2>&1
    echo "e2e $tag rc=$? $(elapsed)s"; grep -E "^\| ${NORM_ARCH:-llava}" "$OUT/e2e_$tag.md" 2>/dev/null | head -4
    split=1
  done
fi
date -u
