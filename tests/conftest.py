import os

import pytest

from grace_ds.torch_extensions import use_per_env_extensions_dir

# Keep CPU tests deterministic and light on a 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Before anything imports torch/deepspeed: tests that fork ranks or launch train.py share one
# per-environment JIT cache with the library (see grace_ds/torch_extensions.py).
use_per_env_extensions_dir()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
