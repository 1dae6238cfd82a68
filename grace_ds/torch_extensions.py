"""Where DeepSpeed and torch JIT-build their C++ extensions (deepspeed_shm_comm on CPU, ops on GPU).

torch's default cache, ~/.cache/torch_extensions, is shared by every Python environment of the
user. Two venvs with different torch builds (a dev venv and CI's fresh .venv, say) then rebuild
deepspeed_shm_comm over each other at every process start, minutes each time on 2 cores. One cache
per environment avoids that. Standard library only: the test conftest calls it before torch loads.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def use_per_env_extensions_dir() -> str:
    """Default TORCH_EXTENSIONS_DIR to a cache private to this Python environment (an explicit
    setting wins); returns the directory in effect. Child processes inherit it through the env."""
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"grace_ds-{tag}"))
