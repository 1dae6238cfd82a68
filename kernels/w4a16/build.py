"""Explicit build step: ``python -m kernels.w4a16.build`` compiles the CUDA extension into the cache."""
from __future__ import annotations

import time

from .op import build_dir, load_extension


def main() -> None:
    t = time.time()
    ext = load_extension(verbose=True)
    print(f"built {ext.__file__} in {time.time() - t:.1f}s (cache {build_dir()})")


if __name__ == "__main__":
    main()
