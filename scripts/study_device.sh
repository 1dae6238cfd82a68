#!/bin/bash
# The study on a lent GPU machine, in one call: install the carried wheels, run launch/study.py with
# the given arguments, and leave the tables, per-run logs and scores under $OUT.
#   bash scripts/study_device.sh --preset gpu --out /tmp/study --jobs 24 --time-budget 480 --deadline 565 --prune --no-progress
# (device call: carry [".whl"]; the wheels come from ../shared/tools/device-wheels.sh)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. scripts/device_wheels.sh
export TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader -l 10 > "$OUT/gpu_util.csv" 2>&1 &
UTIL=$!
( while sleep 10; do echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg)"; done ) > "$OUT/load.txt" &
LOAD=$!
python3 launch/study.py "$@" 2>&1 | tee "$OUT/study.log"
rc=${PIPESTATUS[0]}
kill $UTIL $LOAD 2>/dev/null
# the study directory is the value after --out
dir=$(python3 - "$@" <<'PY'
import sys
a = sys.argv[1:]
print(a[a.index("--out") + 1] if "--out" in a else "runs/study-gpu")
PY
)
cp "$dir"/study.md "$dir"/study.json "$OUT"/ 2>/dev/null
( cd "$dir" && tar czf "$OUT/runs.tgz" preset.json $(ls -d runs/*/log.txt runs/*/eval.json runs/*/config.json runs/*/train/metrics.jsonl 2>/dev/null) )
echo "study rc=$rc"; date -u
exit $rc
