#!/usr/bin/env bash
# The README's test command: the whole CPU suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=15 "$@"
