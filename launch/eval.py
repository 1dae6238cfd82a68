"""Score a checkpoint on shard sets: same as `python -m grace_ds.eval` (see its --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grace_ds.eval.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
