#!/usr/bin/env bash
# The README's test command: the whole CPU suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-builds deepspeed_shm_comm once per torch build; a cache shared between venvs with
# different torch builds is rebuilt over and over, so keep it beside the interpreter in use.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(python -c "import sys; print(sys.prefix)")/torch_extensions}
python -m pytest -q --durations=15 "$@"
