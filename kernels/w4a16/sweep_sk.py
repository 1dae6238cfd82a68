"""Correctness + timing sweep of the split-K shared-memory-x ("sk") configs against the
register-only kernel (v3 table) and bf16 cuBLAS, in one device call.

    python -m kernels.w4a16.sweep_sk [--out DIR] [--quick]

1. Check (float64 reference, fresh random inputs per check, NaN-poisoned outputs): every shape,
   M in {1,3,16,33,64,128}, bf16 and fp16, every sk config with its automatic split count and
   with forced splits {1, 3}, plus the op's automatic path.
2. Timing (bf16, medians of CUDA-graph replays over >= 256 MB of weight copies, see bench.py):
   cuBLAS, the v3 choice, the op, and the sk configs that fit M with splits {auto, 1, 2, 4, 8}.
Writes check.jsonl, sweep.jsonl and sweep.md under --out; prints a compact table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .bench import SHAPES, graph_time, rand_weight, rel_err, weight_copies
from .op import load_extension
from .pack import pack_weights
from .reference import GROUP_SIZE

CHECK_MS = [1, 3, 16, 33, 64, 128]
TIME_MS = [1, 16, 32, 64, 128, 256]
SPLITS = [0, 1, 2, 4, 8]


def sk_for_m(ext, M):
    out = []
    for c in range(ext.first_sk, ext.first_lean):
        mt = ext.sk_info(c)[0]
        if M <= 8 and mt == 1 or 8 < M <= 16 and mt == 2 or 16 < M <= 32 and mt in (4, 8) \
                or 32 < M <= 64 and mt in (4, 8) or 64 < M <= 128 and mt in (4, 8, 16) or M > 128 and c in (28, 35, 38):
            out.append(c)
    return out


def check(ext, shapes, log):
    n, worst, fails = 0, 0.0, []
    ids = list(range(ext.first_sk, ext.first_lean))
    for (N, K) in shapes:
        codes, scales = rand_weight(N, K, "cuda")
        for dt in (torch.bfloat16, torch.float16):
            p = pack_weights(codes, scales, dtype=dt)
            w64 = codes.double() * scales.to(dt).double().repeat_interleave(GROUP_SIZE, dim=1)
            for M in CHECK_MS:
                res = {}
                x = torch.randn(M, K, device="cuda", dtype=dt)
                ref = x.double() @ w64.t()
                junk = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
                del junk
                res["op"] = rel_err(torch.ops.grace.w4a16_gemm(x, p["qweight"], p["scales"], 128), ref)
                for c in ids:
                    for s in (0, 1, 3):
                        x = torch.randn(M, K, device="cuda", dtype=dt)  # fresh inputs per check
                        ref = x.double() @ w64.t()
                        out = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
                        ext.tc_gemm_out(x, p["qweight"], p["scales"], c, out, s)
                        res[f"c{c}s{s}"] = rel_err(out, ref)
                for k, e in res.items():
                    n += 1
                    if not (e == e and e <= 1e-2):
                        fails.append((N, K, M, str(dt), k, e))
                        worst = float("inf")
                    else:
                        worst = max(worst, e)
                log.write(json.dumps({"N": N, "K": K, "M": M, "dtype": str(dt), **res}) + "\n")
            del p, w64
        del codes, scales
        torch.cuda.empty_cache()
    return n, worst, fails


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    ext = load_extension()
    print(f"build/load {time.time() - t0:.1f}s; device {torch.cuda.get_device_name()}", flush=True)
    print("sk configs (MT,TN,WN,KC,NS,P,MB):", {c: list(ext.sk_info(c)) for c in range(ext.first_sk, ext.first_lean)},
          flush=True)
    shapes = SHAPES[:2] if args.quick else SHAPES
    if not args.no_check:
        t = time.time()
        with open(os.path.join(args.out, "check.jsonl"), "w") as log:
            n, worst, fails = check(ext, shapes, log)
        print(f"CHECK: {n} comparisons, worst rel err {worst:.2e}, {len(fails)} failures ({time.time() - t:.0f}s)",
              flush=True)
        for f in fails[:30]:
            print("  FAIL", f, flush=True)

    rows = []
    with open(os.path.join(args.out, "sweep.jsonl"), "w") as log:
        for (N, K) in shapes:
            W, Q = weight_copies(N, K)
            for M in TIME_MS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                r = {"N": N, "K": K, "M": M}
                r["cublas"] = graph_time([lambda w=w: torch.matmul(x, w.t()) for w in W])
                r["op"] = graph_time([lambda q=q: torch.ops.grace.w4a16_gemm(x, q["qweight"], q["scales"], 128)
                                      for q in Q])
                r["op_cfg"] = int(ext.choose_config(M, N, K))
                r["op_kernel"] = str(ext.op_kernel(M, N, K))   # wg<id> where the op runs the Hopper wgmma kernel
                v3 = int(ext.choose_config_v3(M, N, K))
                r["v3_cfg"] = v3
                if v3 >= 0:
                    r["v3"] = graph_time([lambda q=q: ext.tc_gemm(x, q["qweight"], q["scales"], v3) for q in Q])
                else:
                    r["v3"] = graph_time([lambda q=q: ext.deq_gemm(x, q["qweight"], q["scales"], 0) for q in Q])
                sk = {}
                for c in sk_for_m(ext, M):
                    seen = set()
                    for s in (SPLITS if M < 128 else SPLITS[:4]):
                        eff = int(ext.sk_splits(c, M, N, K, s, 0))
                        if eff in seen:
                            continue
                        seen.add(eff)
                        key = f"c{c}s{eff}" + ("a" if s == 0 else "")
                        sk[key] = graph_time(
                            [lambda q=q, c=c, s=s: ext.tc_gemm(x, q["qweight"], q["scales"], c, s) for q in Q], reps=10)
                r["sk"] = sk
                best = min(sk, key=sk.get) if sk else None
                r["sk_best"] = best
                rows.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
                print(f"{N}x{K} M={M}: cublas {r['cublas']:.1f} op {r['op']:.1f} ({r['op_kernel']}) v3 {r['v3']:.1f} "
                      f"(c{v3}) best sk {best} {sk.get(best, float('nan')):.1f} | "
                      + " ".join(f"{k}={v:.1f}" for k, v in sk.items()), flush=True)
            del W, Q
            torch.cuda.empty_cache()

    lines = [f"{torch.cuda.get_device_name()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             "`python -m kernels.w4a16.sweep_sk` (us; x = speed-up over cuBLAS)", "",
             "| N x K | M | cuBLAS | v3 (cfg) | op (cfg) | best sk | best sk cfg | v3 x | op x | best sk x |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["sk_best"]
        bt = r["sk"].get(b, float("nan")) if b else float("nan")
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['cublas']:.1f} | {r['v3']:.1f} (c{r['v3_cfg']}) | "
                     f"{r['op']:.1f} ({r['op_kernel']}) | {bt:.1f} | {b} | {r['cublas'] / r['v3']:.2f}x | "
                     f"{r['cublas'] / r['op']:.2f}x | {r['cublas'] / bt:.2f}x |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
