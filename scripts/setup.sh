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
python -c "import torch, deepspeed, transformers, webdataset; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
