#!/usr/bin/env bash
# Create .venv with the CPU build of torch and the project (editable) at the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c ci/constraints-cpu.txt torch==2.13.0
python -m pip install -q -c ci/constraints-cpu.txt -e ".[test]"
# Triton for its CPU interpreter only (tests/test_kv8_triton.py runs it in a subprocess): kept out of
# the venv's site-packages because DeepSpeed's ZeRO-3 tests hang in-process when triton is importable
# on a machine without a GPU.
[ -d .venv/triton-interp/triton ] || python -m pip install -q --no-deps --target .venv/triton-interp -c ci/constraints-cpu.txt triton
python -c "import torch, deepspeed, transformers, webdataset; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
