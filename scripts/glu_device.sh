#!/bin/bash
# Device run of the GLU epilogue (kernels/NOTES.md v15), in one call: build; the kernels' GPU tests for it
# (every GLU config against float64, the op's two paths, graph and compile) and the lean / PDL ones around
# it; compute-sanitizer memcheck; the kernel A/B (python -m kernels.w4a16.glu_bench --pdl); then, with the
# time left, launch/bench.py --serving INT4 with and without it (--glu), same machine, same call.
#   bash scripts/glu_device.sh                                    (device call: carry [".whl"], timeout_s 598)
#   GLU_STAGES="e2e" GLU_ARCH=qwen2-vl-7b GLU_BATCH="1 16" bash scripts/glu_device.sh   (e2e A/B only)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); LIMIT=${GLU_LIMIT:-580}
STAGES=${GLU_STAGES:-tests,memcheck,bench,e2e}
. scripts/device_wheels.sh
elapsed() { echo $(( $(date +%s) - T0 )); }
w4a16_device_build
echo "build $(elapsed)s"
if [[ $STAGES == *tests* ]]; then
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_fuse.py \
    -k "glu or lean_configs or cuda_graph or pdl or op_matches or fused_w4a16" > "$OUT/pytest.log" 2>&1
  echo "gpu tests rc=$? $(elapsed)s"; grep -E "passed|failed|^FAILED|^E " "$OUT/pytest.log" | head -20
fi
if [[ $STAGES == *memcheck* ]]; then
  timeout 150 compute-sanitizer --tool memcheck python3 -m kernels.w4a16.memcheck 2>&1 | tail -2
  echo "memcheck $(elapsed)s"
fi
if [[ $STAGES == *bench* ]]; then
  timeout 150 python3 -m kernels.w4a16.glu_bench --pdl --out "$OUT/glu" 2>&1 | grep -v Warning | tail -8
  echo "glu_bench $(elapsed)s"
fi
[[ $STAGES == *e2e* ]] && e2e_ab --glu "${GLU_ARCH:-llava-1.5-7b}" "${GLU_BATCH:-1}" "$LIMIT" "$T0" $GLU_E2E_ARGS
date -u
