"""Launches for an Nsight Compute look at the bottleneck (one launch each, after a warm-up):
    ncu -k regex:w4a16 --launch-skip N ... python -m kernels.w4a16.profile_one [--runs NxK:M:CFG[:SPLITS] ...]
CFG is a config id of tc_gemm, or wgN for the Hopper wgmma kernel's config N. N = the number of runs (each is launched once to warm up, then once to profile). Default runs: on
28672x8192, sk config 35 (M=64, 1 split), sk config 39 (M=64) and register-only config 9 (M=16)."""
import argparse

import torch

from .bench import rand_weight
from .op import load_extension
from .pack import pack_weights


def parse_run(text: str):
    try:
        parts = text.split(":")
        n, k = (int(v) for v in parts[0].lower().split("x"))
        cfg = ("wg", int(parts[2][2:])) if parts[2].startswith("wg") else ("tc", int(parts[2]))
        return n, k, int(parts[1]), cfg, int(parts[3]) if len(parts) > 3 else 0
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"--runs {text!r}: expected NxK:M:CFG[:SPLITS], e.g. 12288x4096:1:52 or "
                                         f"28672x8192:16:wg13")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", type=parse_run,
                    default=[(28672, 8192, 64, ("tc", 35), 1), (28672, 8192, 64, ("tc", 39), 0),
                             (28672, 8192, 16, ("tc", 9), 0)])
    args = ap.parse_args(argv)
    ext = load_extension()
    packed = {}
    runs = []
    for n, k, m, c, s in args.runs:
        if (n, k) not in packed:
            packed[n, k] = pack_weights(*rand_weight(n, k, "cuda"), dtype=torch.bfloat16)
        runs.append((torch.randn(m, k, device="cuda", dtype=torch.bfloat16), packed[n, k], c, s))
    for _ in range(2):   # warm-up round (skipped with --launch-skip len(runs)), then the profiled one
        for x, p, (kind, c), s in runs:
            gemm = ext.wgmma_gemm if kind == "wg" else ext.tc_gemm
            gemm(x, p["qweight"], p["scales"], c, s)
        torch.cuda.synchronize()
    print("profile_one done")


if __name__ == "__main__":
    main()
