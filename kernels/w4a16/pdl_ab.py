"""A/B of programmatic dependent launch (set_pdl) for the W4A16 op and chosen configs, alternating off / on
several rounds in one process so that drift shows up as spread rather than as a PDL effect.

    python -m kernels.w4a16.pdl_ab [--shapes 8192x28672 28672x8192] [--ms 1 16] [--configs 44 46 58 61] [--rounds 3]

Each timing is bench.py's: one CUDA graph over >= 256 MB of weight copies (a chain of independent GEMMs, as
in `bench --pdl`), median of 20 replays. Prints one line per (shape, M, method): the rounds' times with PDL
off and on, and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from .bench import graph_time, parse_shape, weight_copies
from .op import load_extension


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[[(8192, 28672)], [(28672, 8192)]])
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--configs", nargs="*", type=int, default=[], help="tc/lean config ids timed directly too")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    ext = load_extension()
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for N, K in [s for group in args.shapes for s in group]:
        _, Q = weight_copies(N, K)
        for M in args.ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            methods = {f"op ({ext.op_kernel(M, N, K)})":
                       lambda: [lambda q=q: torch.ops.grace.w4a16_gemm(x, q["qweight"], q["scales"], 128) for q in Q]}
            for c in args.configs:
                methods[f"c{c}"] = lambda c=c: [lambda q=q: ext.tc_gemm(x, q["qweight"], q["scales"], c, 0) for q in Q]
            for name, fns in methods.items():
                t = {0: [], 1: []}
                try:
                    for _ in range(args.rounds):
                        for pdl in (0, 1):
                            ext.set_pdl(pdl)
                            t[pdl].append(graph_time(fns()))
                finally:
                    ext.set_pdl(0)
                off, on = statistics.median(t[0]), statistics.median(t[1])
                print(f"{N}x{K} M={M} {name}: off {' '.join(f'{v:.1f}' for v in t[0])} us | "
                      f"on {' '.join(f'{v:.1f}' for v in t[1])} us | on/off {on / off:.3f}", flush=True)
        del Q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
