"""A/B of the GLU epilogue (kernels/NOTES.md v15): a gated MLP's gate/up GEMM and its SiLU x mul as one
kernel (`w4a16_gemm_glu`) against what a compiled decode step ran before, the plain GEMM then inductor's
fused activation kernel. Both sides are compiled the same way (torch.compile, fullgraph) and timed as
CUDA-graph replays over enough weight copies to flush L2 (as bench.py); the GEMM alone is timed too, so
the activation's cost shows. Each GLU output is checked against the two-kernel one first.

    python -m kernels.w4a16.glu_bench [--shapes 22016x4096 37888x3584] [--ms 1 16] [--pdl] [--out DIR]

--pdl: programmatic dependent launch for our kernels and inductor's (triton.enable_pdl), as `--serving`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .bench import emit_table, graph_time, parse_shape, rel_err, weight_copies
from .op import load_extension, set_pdl

DEFAULT_SHAPES = "22016x4096 37888x3584"   # LLaVA-1.5-7B / Qwen2-VL-7B fused gate/up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES.split(), help="fused [gate; up] weights NxK (N = 2I)")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 16], help="token counts")
    ap.add_argument("--pdl", action="store_true", help="PDL for our kernels and inductor's, as --serving")
    ap.add_argument("--out", type=Path, default=None, help="write glu.md and glu.json here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("glu_bench: needs a CUDA GPU")
    ext = load_extension()
    if args.pdl:
        set_pdl(True)
    opts = {"triton.enable_pdl": True} if args.pdl else {}
    shapes = [s for text in args.shapes for s in parse_shape(text)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16

    def two_kernels(x, qw, sc):
        y = torch.ops.grace.w4a16_gemm(x, qw, sc, 128)
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gemm_only(x, qw, sc):
        return torch.ops.grace.w4a16_gemm(x, qw, sc, 128)

    def one_kernel(x, qw, sc):
        return torch.ops.grace.w4a16_gemm_glu(x, qw, sc, 128)

    compiled = {name: torch.compile(fn, fullgraph=True, options=opts) for name, fn in
                (("two", two_kernels), ("gemm", gemm_only), ("glu", one_kernel))}
    rows = []
    head = (f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `python -m kernels.w4a16.glu_bench"
            f"{' --pdl' if args.pdl else ''}`; bf16, us = median of 20 CUDA-graph replays over >= 256 MB of weight copies")
    print(head, flush=True)
    for N, K in shapes:
        if N % 32:
            raise SystemExit(f"glu_bench: {N}x{K}: N must be 2 x I with I a multiple of 16")
        packs = weight_copies(N, K)[1]
        for M in args.ms:
            x = torch.randn(M, K, device="cuda", dtype=dt, generator=gen)
            want = compiled["two"](x, packs[0]["qweight"], packs[0]["scales"])
            got = compiled["glu"](x, packs[0]["qweight"], packs[0]["scales"])
            err = rel_err(got, want.double())
            us = {name: graph_time([lambda p=p, f=f: f(x, p["qweight"], p["scales"]) for p in packs])
                  for name, f in compiled.items()}
            row = dict(N=N, K=K, M=M, kernel=ext.glu_kernel(M, N, K), gemm_us=us["gemm"], two_us=us["two"],
                       glu_us=us["glu"], rel_err_vs_two=err, pdl=args.pdl)
            rows.append(row)
            print(f"{N}x{K} M={M} {row['kernel']}: GEMM {us['gemm']:.1f} us, GEMM + activation {us['two']:.1f}, "
                  f"GLU {us['glu']:.1f} ({us['two'] - us['glu']:+.1f} saved), rel err {err:.1e}", flush=True)
    table = [head, "", "| N x K | M | GLU path | GEMM us | GEMM + activation us | GLU us | saved us | rel err vs two |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['N']}x{r['K']} | {r['M']} | {r['kernel']} | {r['gemm_us']:.1f} | {r['two_us']:.1f} | "
              f"{r['glu_us']:.1f} | {r['two_us'] - r['glu_us']:+.1f} | {r['rel_err_vs_two']:.1e} |" for r in rows]
    emit_table(table, rows, args.out, "glu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
