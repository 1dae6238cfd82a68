"""W4A16 benchmark + correctness sweep (one device call does everything).

    python -m kernels.w4a16.bench [--quick] [--out DIR] [--configs] [--check-only]
    python -m kernels.w4a16.bench --shapes 7b-fused --ms 1 16 --no-check   # the fused 7B layers and heads

For every weight (N, K) and M in {1, 16, 64, 256, 1024, 2048}: time of bf16 cuBLAS (x @ W.T),
torch._weight_int4pack_mm (group 128), our op (auto path) and, with --configs, every tensor-core
config + the dequantise+cuBLAS path; speed-ups; achieved TB/s vs the measured copy bandwidth.
Timing: each method is captured in a CUDA graph that runs it over enough weight copies (>= 256 MB
in total) that L2 (50-60 MB) cannot serve them; the graph is replayed after a warm-up and the
median replay time / copies is reported. Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from .op import load_extension
from .pack import pack_weights
from .reference import GROUP_SIZE

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)]
# What a fused 7B decoder layer runs (grace_ds.export.fuse) and the INT4 output heads:
# LLaVA-1.5-7B q/k/v 12288x4096, gate/up 22016x4096, lm_head 32064x4096; Qwen2-VL-7B q/k/v 4608x3584,
# o 3584x3584, gate/up 37888x3584, down 3584x18944, lm_head 152064x3584 (LLaVA's o 4096x4096 and down
# 4096x11008 are issue shapes). tests/test_kernels.py derives them from the models' configs
# (grace_ds.export.arch.w4a16_shapes); the LLaVA head was listed as 32000 rows until 2026-11-29 13:40.
SHAPE_SETS = {
    "issue": SHAPES,
    "7b-fused": [(12288, 4096), (22016, 4096), (32064, 4096), (4608, 3584), (3584, 3584), (37888, 3584),
                 (3584, 18944), (152064, 3584)],
}


def parse_shape(text: str) -> list[tuple[int, int]]:
    """A named set (issue, 7b-fused) or NxK."""
    if text in SHAPE_SETS:
        return list(SHAPE_SETS[text])
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: expected one of {sorted(SHAPE_SETS)} or NxK, e.g. 12288x4096")
    if n % 16 or k % 128:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: N must be a multiple of 16 and K of 128")
    return [(n, k)]


MS = [1, 16, 64, 256, 1024, 2048]
CHECK_MS = [1, 3, 16, 33, 64, 256, 1024]


def rand_weight(N, K, device, gen=None):
    codes = torch.randint(-8, 8, (N, K), dtype=torch.int8, device=device, generator=gen)
    scales = torch.rand(N, K // GROUP_SIZE, device=device, generator=gen) * 0.015 + 0.005
    return codes, scales


def packed_bytes(N, K):
    """Bytes our kernels read for an (N, K) weight: int4 codes + one bf16 scale per group."""
    return N * K // 2 + N * (K // GROUP_SIZE) * 2


def gemm_tbs(N, K, M, us):
    """TB/s of one (M, N, K) W4A16 GEMM taking `us`: packed weights + bf16 x + bf16 out."""
    return (packed_bytes(N, K) + M * K * 2 + M * N * 2) / (us * 1e-6) / 1e12


def weight_copies(N, K, total=256e6):
    """Enough distinct bf16 and packed copies of an (N, K) weight (>= total bytes of each) that timing a
    pass over all of them reads DRAM, not L2 (50-60 MB). Returns (bf16 list, packed list)."""
    W = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
         for _ in range(max(1, math.ceil(total / (N * K * 2))))]
    Q = [pack_weights(*rand_weight(N, K, "cuda"), dtype=torch.bfloat16)
         for _ in range(max(1, math.ceil(total / packed_bytes(N, K))))]
    return W, Q


def tile_fits(mt: int, M: int) -> bool:
    """Whether a config with MT token tiles of 8 is worth timing at M tokens: its tile covers M in one or
    two chunks (any MT=1 config at small M), or, from M = 64 on, the tiles of 64 tokens and up, and MT=4."""
    return (mt * 8 >= min(M, 64) and (mt * 8 < 2 * M or mt == 1 or M >= 64)) or (M >= 64 and mt == 4)


def rel_err(out, ref):
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def ref64(x, codes, scales_q):
    w = codes.double() * scales_q.double().repeat_interleave(GROUP_SIZE, dim=1)
    return x.double() @ w.t()


def graph_time(fns, reps=20, warm=3):
    """Median time (us) of one fn call; fns run in sequence inside one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm-up outside the graph (cuBLAS handles, workspace, lazy init)
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(warm):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(fns))
    del g
    return statistics.median(times)


def emit_table(table: list[str], rows: list[dict], out_dir, stem: str) -> None:
    """Print an A/B script's markdown table; with out_dir, also write it as <stem>.md and its rows as <stem>.json
    (glu_bench, norm_bench)."""
    from pathlib import Path

    print("\n".join(table))
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.md").write_text("\n".join(table) + "\n")
        (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1))


def copy_bandwidth():
    """Device-to-device copy of 1 GiB (float32), bytes read + written over the median time."""
    n = 1 << 28
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e-3)
    del a, b
    return 2 * 4 * n / statistics.median(ts) / 1e12


def to_int4pack(codes, scales):
    """torch's tinygemm layout: (N, K/2) uint8, even k in the high nibble, q = code + 8;
    scales_and_zeros (K/g, N, 2) bf16 with zero 0 (w = (q - 8) * s + z)."""
    q = (codes.to(torch.int32) + 8)
    w_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(w_u8.contiguous(), 8)
    sz = torch.stack([scales.t().float(), torch.zeros_like(scales.t().float())], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def check(ext, shapes, ms, dtypes, cfg_list, log):
    """Kernel vs float64 reference: every shape x M x dtype, the auto op + listed configs.
    Outputs of the explicit-config runs are NaN-poisoned first; fresh inputs every check."""
    worst = 0.0
    fails = []
    n = 0
    for (N, K) in shapes:
        codes, scales = rand_weight(N, K, "cuda")
        for dt in dtypes:
            p = pack_weights(codes, scales, dtype=dt)
            sq = scales.to(dt)
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=dt)
                ref = ref64(x, codes, sq)
                res = {}
                res["op"] = rel_err(torch.ops.grace.w4a16_gemm(x, p["qweight"], p["scales"], 128), ref)
                for cfg in cfg_list(M):
                    out = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
                    ext.tc_gemm_out(x, p["qweight"], p["scales"], cfg, out)
                    res[f"c{cfg}"] = rel_err(out, ref)
                for k, e in res.items():
                    n += 1
                    ok = e == e and e <= 1e-2
                    worst = max(worst, e) if e == e else float("inf")
                    if not ok:
                        fails.append((N, K, M, str(dt), k, e))
                log.write(json.dumps({"N": N, "K": K, "M": M, "dtype": str(dt), **res}) + "\n")
            del p
        del codes, scales
        torch.cuda.empty_cache()
    return n, worst, fails


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", action="store_true", help="time every tensor-core config too")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                    help="weights to run: issue (default), 7b-fused, or NxK ...")
    ap.add_argument("--ms", nargs="+", type=int, default=None, help=f"token counts to time (default {MS})")
    ap.add_argument("--pdl", action="store_true",
                    help="also time our op with programmatic dependent launch (column ours_pdl)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    ext = load_extension()
    print(f"build/load {time.time() - t0:.1f}s", flush=True)
    dev = torch.cuda.get_device_name()
    nc = ext.num_configs
    info = {c: list(ext.config_info(c)) for c in range(nc)}
    print("configs (MT,TN,WN,WK):", info, flush=True)
    shapes = [s for group in args.shapes for s in group] if args.shapes else SHAPES
    shapes = shapes[:2] if args.quick else shapes
    ms = args.ms or MS

    def cfgs_for(M):
        return [c for c in range(nc) if tile_fits(info[c][0], M)]

    if not args.no_check:
        with open(os.path.join(args.out, "check.jsonl"), "w") as log:
            t = time.time()
            n, worst, fails = check(ext, shapes, CHECK_MS, [torch.bfloat16], lambda M: [c for c in range(nc)] if M <= 64 else cfgs_for(M), log)
            n2, worst2, fails2 = check(ext, shapes, [1, 3, 16, 33, 64, 256], [torch.float16], lambda M: [int(ext.choose_config(M, 0, 0))] if ext.choose_config(M, 0, 0) >= 0 else [], log)
            print(f"CHECK: {n + n2} comparisons, worst rel err {max(worst, worst2):.2e}, "
                  f"{len(fails) + len(fails2)} failures ({time.time() - t:.0f}s)", flush=True)
            for f in (fails + fails2)[:20]:
                print("  FAIL", f, flush=True)
    if args.check_only:
        return

    bw = copy_bandwidth()
    print(f"device {dev}; copy bandwidth {bw:.2f} TB/s (read+write)", flush=True)
    rows = []
    with open(os.path.join(args.out, "bench.jsonl"), "w") as log:
        for (N, K) in shapes:
            W, Q = weight_copies(N, K)
            try:
                I4 = [to_int4pack(*rand_weight(N, K, "cuda")) for _ in range(len(Q))]
            except Exception as e:  # noqa: BLE001
                print("int4pack unavailable:", repr(e)[:200], flush=True)
                I4 = None
            for M in ms:
                if args.quick and M == 2048:
                    continue
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                r = {"N": N, "K": K, "M": M}
                r["cublas"] = graph_time([lambda w=w: torch.matmul(x, w.t()) for w in W])
                if I4 is not None:
                    reps = 5 if M >= 256 else 20
                    r["int4pack"] = graph_time(
                        [lambda a=a: torch.ops.aten._weight_int4pack_mm(x, a[0], 128, a[1]) for a in I4], reps=reps)

                def ours():   # our op over every weight copy
                    return graph_time([lambda q=q: torch.ops.grace.w4a16_gemm(x, q["qweight"], q["scales"], 128) for q in Q])

                r["ours"] = ours()
                r["cfg"] = int(ext.choose_config(M, N, K))   # the mma.sync rules' choice
                r["kernel"] = str(ext.op_kernel(M, N, K))     # what the op ran (wg<id> on Hopper at 48..384)
                if args.pdl:
                    ext.set_pdl(1)
                    r["ours_pdl"] = ours()
                    ext.set_pdl(0)
                if args.configs and r["cfg"] >= 0:
                    ext.set_persistent(1)
                    r["ours_persist"] = ours()
                    ext.set_persistent(0)
                if args.configs:
                    for c in cfgs_for(M):
                        r[f"c{c}"] = graph_time([lambda q=q, c=c: ext.tc_gemm(x, q["qweight"], q["scales"], c) for q in Q], reps=10)
                    if M >= 64:
                        for cb in (0, 16, 32):
                            r[f"deq{cb}"] = graph_time([lambda q=q, cb=cb: ext.deq_gemm(x, q["qweight"], q["scales"], cb << 20) for q in Q], reps=10)
                r["tbs"] = gemm_tbs(N, K, M, r["ours"])
                r["bw_frac"] = r["tbs"] / bw
                rows.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
                extra = ""
                if args.configs:
                    ks = [k for k in r if k.startswith("c") and k[1:].isdigit() or k.startswith("deq")]
                    best = min(ks, key=lambda k: r[k])
                    extra = f" [cfg {r['cfg']} persistent {r.get('ours_persist', float('nan')):.1f}us] best {best} {r[best]:.1f}us | " + " ".join(f"{k}={r[k]:.1f}" for k in ks)
                pdl = f" pdl {r['ours_pdl']:.1f}us ({r['cublas'] / r['ours_pdl']:.2f}x)" if "ours_pdl" in r else ""
                print(f"{N}x{K} M={M}: cublas {r['cublas']:.1f}us int4pack {r.get('int4pack', float('nan')):.1f}us "
                      f"ours {r['ours']:.1f}us ({r['cublas'] / r['ours']:.2f}x){pdl} {r['tbs']:.2f}TB/s{extra}", flush=True)
            del W, Q, I4
            torch.cuda.empty_cache()

    lines = [f"Card: {dev}; torch {torch.__version__}; copy bandwidth {bw:.2f} TB/s (read+write); "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `python -m kernels.w4a16.bench`", "",
             "| N x K | M | cuBLAS bf16 us | int4pack_mm us | ours us | vs cuBLAS | vs int4pack | ours TB/s | % copy BW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i4 = r.get("int4pack", float("nan"))
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['cublas']:.1f} | {i4:.1f} | {r['ours']:.1f} | "
                     f"{r['cublas'] / r['ours']:.2f}x | {i4 / r['ours']:.2f}x | {r['tbs']:.2f} | {100 * r['bw_frac']:.0f}% |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
