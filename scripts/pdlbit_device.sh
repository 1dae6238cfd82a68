#!/bin/bash
# Device run of the per-shape PDL bit (kernels/NOTES.md v16), in one call: build; the GPU tests around it
# (set_choice with "pdl": 0, PDL, GLU, the op); the op's PDL A/B on the decode shapes that follow a GEMM
# under --glu, marking the shipped H200 table (python -m kernels.w4a16.pdl_ab --mark); then
# launch/bench.py --serving INT4 at batch 1 for each PDLBIT_E2E variant ("glu", "glu-unmarked", "plain"),
# same machine, same call. The marked table comes back in $OUT/nvidia_h200.json.
#   bash scripts/pdlbit_device.sh                           (device call: carry [".whl"], timeout_s 598)
#   PDLBIT_STAGES=e2e PDLBIT_ARCH=qwen2-vl-7b PDLBIT_E2E="glu plain" bash scripts/pdlbit_device.sh
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); LIMIT=${PDLBIT_LIMIT:-580}
STAGES=${PDLBIT_STAGES:-tests,mark,e2e}
ARCH=${PDLBIT_ARCH:-llava-1.5-7b}
TABLE=kernels/w4a16/tuned/nvidia_h200.json
. scripts/device_wheels.sh
elapsed() { echo $(( $(date +%s) - T0 )); }
w4a16_device_build
echo "build $(elapsed)s"
cp "$TABLE" /tmp/unmarked.json
if [[ $STAGES == *tests* ]]; then
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_fuse.py \
    -k "set_choice or pdl or glu or op_matches or fused_w4a16" > "$OUT/pytest.log" 2>&1
  echo "gpu tests rc=$? $(elapsed)s"; grep -E "passed|failed|^FAILED|^E " "$OUT/pytest.log" | head -20
fi
if [[ $STAGES == *mark* ]]; then
  timeout 150 python3 -m kernels.w4a16.pdl_ab --shapes ${PDLBIT_SHAPES:-4096x11008 3584x18944 8192x28672} \
    --ms 1 --mark "$TABLE" 2>&1 | grep -v Warning | tail -14
  echo "pdl_ab $(elapsed)s"; cp "$TABLE" "$OUT/nvidia_h200.json"; git diff --stat -- "$TABLE"
fi
if [[ $STAGES == *e2e* ]]; then
  E2E=(${PDLBIT_E2E:-glu-unmarked glu}); n=${#E2E[@]}
  for variant in "${E2E[@]}"; do
    left=$(( LIMIT - $(elapsed) ))
    [ $left -lt 80 ] && { echo "e2e $variant skipped: ${left}s left"; n=$(( n - 1 )); continue; }
    flags=""; [[ $variant == glu* ]] && flags="--glu"
    cp "$TABLE" /tmp/marked.json
    [[ $variant == *unmarked ]] && cp /tmp/unmarked.json "$TABLE"
    python3 launch/bench.py --arch "$ARCH" --serving --variants int4 --batch 1 $flags ${PDLBIT_E2E_ARGS} \
      --budget $(( left / n )) --out "$OUT/e2e_$variant.md" --json "$OUT/e2e_$variant.json" > "$OUT/e2e_$variant.log" 2>&1
    echo "e2e $variant rc=$? $(elapsed)s"; grep -E "^\|" "$OUT/e2e_$variant.md" 2>/dev/null | head -6
    grep -iE "mismatch|tie" "$OUT/e2e_$variant.log" | head -3
    cp /tmp/marked.json "$TABLE"; n=$(( n - 1 ))
  done
fi
date -u
