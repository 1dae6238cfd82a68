"""One study training in a fresh process: `python -m grace_ds.study.train_one CONFIG.json`.

Used by `launch/study.py --subprocess`, so every run starts with a clean CUDA context and process
group (the in-process default is faster; this is the fallback when a run leaks state).
"""

import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m grace_ds.study.train_one CONFIG.json", file=sys.stderr)
        return 2
    from grace_ds.engine import run_training
    from grace_ds.engine.config import config_from_dict

    with open(argv[0]) as f:
        raw = json.load(f)
    result = run_training(config_from_dict(raw))
    return 0 if result.final_dir is not None else 1


if __name__ == "__main__":
    sys.exit(main())
