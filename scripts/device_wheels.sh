# Sourced by the device scripts (scripts/*_device.sh): installs the carried wheels (.whl/, built by
# ../shared/tools/device-wheels.sh) into /tmp/site and puts them on PYTHONPATH, or exits with a message.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: is .whl/ carried (carry [\".whl\"]) and built by ../shared/tools/device-wheels.sh?"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# The W4A16 extension's build as the kernel device scripts run it: Hopper sm_90a, the build cache in /tmp, 16
# jobs; prints the card, the date and the commit, then builds, or shows the build log's tail and exits.
w4a16_device_build() {
  export TORCH_CUDA_ARCH_LIST=9.0a GRACE_DS_KERNEL_CACHE=/tmp/grace_kc MAX_JOBS=16
  nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
  timeout 240 python3 -m kernels.w4a16.build > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
}

# A/B of one launch/bench.py flag, INT4 --serving, in the time left: `e2e_ab FLAG ARCH "BATCHES" LIMIT T0 [ARGS...]`
# runs the bench with FLAG, then without, each given its share of LIMIT - (now - T0) seconds (half, then the rest),
# into $OUT/e2e_<flag>.{md,json,log} and $OUT/e2e_plain.*; a run with < 90 s left is skipped and says so.
e2e_ab() {
  local flag=$1 arch=$2 batches=$3 limit=$4 t0=$5 split=2 variant left tag
  shift 5
  for variant in "$flag" ""; do
    left=$(( limit - ($(date +%s) - t0) ))
    [ $left -lt 90 ] && { echo "e2e ${variant:-plain} skipped: ${left}s left"; continue; }
    tag=${variant:-plain}; tag=${tag#--}
    python3 launch/bench.py --arch "$arch" --serving --variants int4 --batch $batches $variant "$@" \
      --budget $(( left / split )) --out "$OUT/e2e_$tag.md" --json "$OUT/e2e_$tag.json" > "$OUT/e2e_$tag.log" 2>&1
    echo "e2e $tag rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^\|" "$OUT/e2e_$tag.md" 2>/dev/null | head -6
    split=1
  done
}
