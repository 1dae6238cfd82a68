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
