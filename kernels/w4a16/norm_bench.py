"""A/B of the RMSNorm fold (kernels/NOTES.md v21): what a compiled decode step runs between two GEMMs today - the
residual add and the RMSNorm in one inductor kernel, then the W4A16 GEMM (or its GLU form) - against the residual
add alone, then the GEMM with the norm folded in (`ext.lean_norm_gemm`, the op's config for the shape). Timed as
CUDA-graph replays over enough weight copies to flush L2 (as bench.py); each folded output is checked against the
unfused one first. The fold is worth building into the model only where "folded" beats "unfused".

    python -m kernels.w4a16.norm_bench [--shapes 12288x4096 4608x3584] [--glu-shapes 22016x4096 37888x3584]
                                       [--ms 1 16] [--pdl] [--out DIR]

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

EPS = 1e-6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["12288x4096", "4608x3584"], help="q/k/v weights NxK (plain GEMM)")
    ap.add_argument("--glu-shapes", nargs="+", default=["22016x4096", "37888x3584"],
                    help="fused [gate; up] weights NxK (the GLU epilogue)")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 16], help="token counts")
    ap.add_argument("--pdl", action="store_true", help="PDL for our kernels and inductor's, as --serving")
    ap.add_argument("--fallback", type=int, default=61, help="folded config where the op's has no fold")
    ap.add_argument("--fallback-glu", type=int, default=58, help="the same, with the GLU epilogue")
    ap.add_argument("--out", type=Path, default=None, help="write norm.md and norm.json here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("norm_bench: needs a CUDA GPU")
    ext = load_extension()
    if args.pdl:
        set_pdl(True)
    opts = {"triton.enable_pdl": True} if args.pdl else {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16

    def unfused(h, d, gamma, qw, sc, glu):
        x = h + d
        xn = F.rms_norm(x, (x.shape[-1],), gamma, EPS)
        return (torch.ops.grace.w4a16_gemm_glu if glu else torch.ops.grace.w4a16_gemm)(xn, qw, sc, 128), x

    step = torch.compile(unfused, fullgraph=True, options=opts, dynamic=False)
    rows = []
    head = (f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `python -m kernels.w4a16.norm_bench"
            f"{' --pdl' if args.pdl else ''}`; bf16, us = median of CUDA-graph replays over >= 256 MB of weight copies")
    print(head, flush=True)
    cases = [(s, False) for t in args.shapes for s in parse_shape(t)] + \
            [(s, True) for t in args.glu_shapes for s in parse_shape(t)]
    for (N, K), glu in cases:
        packs = weight_copies(N, K)[1]
        gamma = (torch.rand(K, device="cuda", generator=gen) + 0.5).to(dt)
        for M in args.ms:
            op_cfg = int(ext.choose_config(M, N, K))
            # the op's config where it has the fold, else a cp.async-ring one that does (the row says which)
            cfg = op_cfg if ext.lean_norm_ok(op_cfg, glu) else args.fallback_glu if glu else args.fallback
            h = torch.randn(M, K, device="cuda", dtype=dt, generator=gen)
            d = torch.randn(M, K, device="cuda", dtype=dt, generator=gen)

            def folded(p):
                x = h + d
                return ext.lean_norm_gemm(x, p["qweight"], p["scales"], gamma, EPS, cfg, glu), x

            want = step(h, d, gamma, packs[0]["qweight"], packs[0]["scales"], glu)[0]
            err = rel_err(folded(packs[0])[0], want.double())
            us_unfused = graph_time([lambda p=p: step(h, d, gamma, p["qweight"], p["scales"], glu) for p in packs])
            us_folded = graph_time([lambda p=p: folded(p) for p in packs])
            rows.append(dict(N=N, K=K, M=M, glu=glu, cfg=cfg, op_cfg=op_cfg, unfused_us=us_unfused,
                             folded_us=us_folded, rel_err=err, pdl=args.pdl))
            print(f"{N}x{K}{' glu' if glu else ''} M={M} c{cfg} (op c{op_cfg}): unfused {us_unfused:.1f} us, "
                  f"folded {us_folded:.1f} ({us_unfused - us_folded:+.1f} saved), rel err {err:.1e}", flush=True)
    table = [head, "", "| N x K | GLU | M | folded config (op's) | add + norm, then GEMM us | add, then folded GEMM us "
             "| saved us | rel err |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['N']}x{r['K']} | {'yes' if r['glu'] else 'no'} | {r['M']} | c{r['cfg']} (c{r['op_cfg']}) | "
              f"{r['unfused_us']:.1f} | {r['folded_us']:.1f} | {r['unfused_us'] - r['folded_us']:+.1f} | "
              f"{r['rel_err']:.1e} |" for r in rows]
    emit_table(table, rows, args.out, "norm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
