# Sourced by the device scripts (scripts/*_device.sh): installs the carried wheels (.whl/, built by
# ../shared/tools/device-wheels.sh) into /tmp/site and puts them on PYTHONPATH, or exits with a message.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: is .whl/ carried (carry [\".whl\"]) and built by ../shared/tools/device-wheels.sh?"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
