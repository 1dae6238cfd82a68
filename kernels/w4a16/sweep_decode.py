"""Which config is fastest for the weights a 7B decoder actually runs, at decode batch sizes.

    python -m kernels.w4a16.sweep_decode [--shapes 7b-fused] [--ms 1 16] [--out DIR] [--write-tuned [FILE]]
    python -m kernels.w4a16.sweep_decode --model CHECKPOINT_DIR --write-tuned   # your model's shapes

The op's config table (`choose` in csrc/w4a16_binding.cpp) was fitted on the issue's five shapes.
A fused 7B layer runs other ones (bench.SHAPE_SETS["7b-fused"]: LLaVA's q/k/v 12288x4096, Qwen2-VL's
4608x3584, the heads, ...). For every shape and M this times bf16 cuBLAS, the op as it chooses, every
register-only config that fits M and every split-K config that fits M with splits {auto, 1, 2, 4, 8}
(bench.py's method: medians of CUDA-graph replays over >= 256 MB of weight copies, bf16), then
checks the fastest candidate against a float64 reference (fresh inputs, NaN-poisoned output).
Writes decode.jsonl and decode.md under --out and prints the table last. --write-tuned writes the
winners that beat the op's rule by more than --min-gain (and passed the check) as the card's tuned
table (op.tuned_path(): tuned/<card>.json, which op.load_extension loads on that card).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .bench import (SHAPE_SETS, gemm_tbs, graph_time, parse_shape, rand_weight, ref64, rel_err, tile_fits,
                    weight_copies)
from .op import load_extension, tuned_path
from .pack import pack_weights
from .sweep_sk import SPLITS, sk_for_m


def candidates(ext, M, N, K):
    """(label, config, splits) for every register-only config, classic and lean, that fits M
    (bench.tile_fits) and every distinct split of the sk ones that do (sweep_sk.sk_for_m)."""
    regs = list(range(ext.first_sk)) + list(range(ext.first_lean, ext.num_configs))
    out = [(f"c{c}", c, 0) for c in regs if tile_fits(ext.config_info(c)[0], M)]
    for c in sk_for_m(ext, M):
        seen = set()
        for s in SPLITS:
            eff = int(ext.sk_splits(c, M, N, K, s, 0))
            if eff not in seen:
                seen.add(eff)
                out.append((f"c{c}s{eff}" + ("a" if s == 0 else ""), c, s))
    return out


def model_shapes(name: str, fuse: bool = True, lm_head: bool = True) -> list[tuple[int, int]]:
    """W4A16 shapes of a model named by a directory holding its config.json or a bench --arch name."""
    from pathlib import Path

    from grace_ds.export.arch import BENCH_ARCHS, bench_config, w4a16_shapes

    if Path(name, "config.json").is_file():
        import transformers

        config = transformers.AutoConfig.from_pretrained(name)
    elif name in BENCH_ARCHS:
        config = bench_config(name)
    else:
        raise SystemExit(f"--model {name!r}: neither a directory with a config.json nor one of {BENCH_ARCHS}")
    shapes = w4a16_shapes(config, fuse=fuse, lm_head=lm_head)
    bad = [(n, k) for n, k in shapes if n % 16 or k % 128]
    if bad:
        raise SystemExit(f"--model {name!r}: weights {bad} do not fit the kernel (N a multiple of 16, K of 128)")
    return shapes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="default: 7b-fused")
    ap.add_argument("--model", nargs="+", default=None, metavar="NAME_OR_DIR",
                    help="the shapes a model's W4A16 linears run (grace_ds.export.arch.w4a16_shapes): a directory "
                         "with its config.json (a checkpoint, packed or not) or a launch/bench.py --arch name")
    ap.add_argument("--unfused", action="store_true", help="--model: q/k/v and gate/up separate (no --fuse-proj)")
    ap.add_argument("--bf16-head", action="store_true", help="--model: the output head is not INT4 (no --int4-lm-head)")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--write-tuned", nargs="?", const="", default=None, metavar="FILE",
                    help="write the winners as a tuned table (default file: this card's op.tuned_path())")
    ap.add_argument("--merge", action="store_true",
                    help="--write-tuned into an existing table of this card: keep its entries for the (M, N, K) "
                         "this run did not measure (e.g. --ms 16 keeps the M=1 entries)")
    ap.add_argument("--min-gain", type=float, default=0.03,
                    help="a winner enters the tuned table only if it is this fraction faster than the rule's choice")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ext = load_extension()
    ext.clear_choices()   # "op" below is the rules' choice, not an earlier tuned table's
    shapes = [s for g in args.shapes for s in g] if args.shapes else [] if args.model else SHAPE_SETS["7b-fused"]
    for name in args.model or ():
        shapes += [s for s in model_shapes(name, not args.unfused, not args.bf16_head) if s not in shapes]
    dev = torch.cuda.get_device_name()
    rows = []
    with open(os.path.join(args.out, "decode.jsonl"), "w") as log:
        for (N, K) in shapes:
            W, Q = weight_copies(N, K)
            for M in args.ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                r = {"N": N, "K": K, "M": M, "op_cfg": int(ext.choose_config(M, N, K)),
                     "op_splits": int(ext.choose_splits(M, N, K)), "op_kernel": str(ext.op_kernel(M, N, K))}
                r["cublas"] = graph_time([lambda w=w: torch.matmul(x, w.t()) for w in W])
                r["op"] = graph_time([lambda q=q: torch.ops.grace.w4a16_gemm(x, q["qweight"], q["scales"], 128)
                                      for q in Q])
                launch = {label: (c, s) for label, c, s in candidates(ext, M, N, K)}
                times = {label: graph_time([lambda q=q, c=c, s=s: ext.tc_gemm(x, q["qweight"], q["scales"], c, s)
                                            for q in Q], reps=10)
                         for label, (c, s) in launch.items()}
                best = min(times, key=times.get)
                lean = {k: v for k, v in times.items() if launch[k][0] >= ext.first_lean}
                other = {k: v for k, v in times.items() if launch[k][0] < ext.first_lean}
                r["best_lean"] = min(lean, key=lean.get) if lean else None
                r["best_other"] = min(other, key=other.get) if other else None
                c, s = launch[best]
                codes, scales = rand_weight(N, K, "cuda")   # the winner against float64, fresh inputs
                p = pack_weights(codes, scales, dtype=torch.bfloat16)
                xc = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                ext.tc_gemm_out(xc, p["qweight"], p["scales"], c, out, s)
                r.update(times=times, best=best, best_us=times[best], best_cfg=c, best_splits=s,
                         best_err=rel_err(out, ref64(xc, codes, scales.to(torch.bfloat16))),
                         tbs_op=gemm_tbs(N, K, M, r["op"]))
                rows.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
                top = sorted(times.items(), key=lambda kv: kv[1])[:5]
                print(f"{N}x{K} M={M}: cublas {r['cublas']:.1f} op {r['op']:.1f} ({r['op_kernel']}) best {best} "
                      f"{times[best]:.1f} err {r['best_err']:.1e} | " + " ".join(f"{k}={v:.1f}" for k, v in top), flush=True)
                if r["best_lean"] and r["best_other"]:
                    print(f"  lean {r['best_lean']} {times[r['best_lean']]:.1f} vs classic/sk {r['best_other']} "
                          f"{times[r['best_other']]:.1f}", flush=True)
            del W, Q
            torch.cuda.empty_cache()
    lines = [f"{dev}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `python -m kernels.w4a16.sweep_decode` "
             "(us, bf16; x = speed-up over cuBLAS)", "",
             "| N x K | M | cuBLAS | op (cfg) | op x | op TB/s | fastest config | its us | its x | its TB/s | its rel err "
             "| fastest lean / other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def us(r, k):
        return f"{k} {r['times'][k]:.1f}" if k else "-"

    for r in rows:
        tbs = gemm_tbs(r["N"], r["K"], r["M"], r["best_us"])
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['cublas']:.1f} | {r['op']:.1f} ({r['op_kernel']}) | "
                     f"{r['cublas'] / r['op']:.2f}x | {r['tbs_op']:.2f} | {r['best']} | {r['best_us']:.1f} | "
                     f"{r['cublas'] / r['best_us']:.2f}x | {tbs:.2f} | {r['best_err']:.1e} | "
                     f"{us(r, r.get('best_lean'))} / {us(r, r.get('best_other'))} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if args.write_tuned is not None:
        path = write_tuned(rows, args.write_tuned or tuned_path(), dev, args.min_gain, " ".join(sys.argv),
                           merge=args.merge)
        print(f"tuned table: {path}")


def write_tuned(rows, path, card: str, min_gain: float, command: str, merge: bool = False):
    """The rows' winners that beat the rule by more than min_gain and passed the float64 check. merge: an
    existing file of the same card keeps its entries for the (M, N, K) the rows did not measure (each kept
    entry records the date and command it came from); measured ones are replaced or dropped. Rows where the
    op runs the Hopper wgmma kernel (op_kernel "wg<id>", 48..384 tokens) are left out with a message: the
    table is consulted after that dispatch, so such an entry would never be used."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    wins, unreachable = [], []
    for r in rows:
        if r["best_us"] < (1 - min_gain) * r["op"] and r["best_err"] <= 1e-2:
            (unreachable if str(r.get("op_kernel", "")).startswith("wg") else wins).append(r)
    for r in unreachable:
        print(f"tuned table: {r['N']}x{r['K']} M={r['M']}: c{r['best_cfg']} beat the op's {r['op_kernel']} "
              f"({r['best_us']:.1f} against {r['op']:.1f} us) but is not written: the wgmma dispatch comes first "
              f"(GRACE_W4A16_WGMMA=0 turns it off)", flush=True)
    choices = [dict(M=r["M"], N=r["N"], K=r["K"], cfg=r["best_cfg"], splits=r["best_splits"], us=round(r["best_us"], 2),
                    rule_us=round(r["op"], 2), rule_cfg=r["op_cfg"], cublas_us=round(r["cublas"], 2), date=date)
               for r in wins]
    from grace_ds.export.io import atomic_write_json

    path = os.fspath(path)
    if merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("card") != card:
            raise ValueError(f"--merge: {path} was measured on {old.get('card')!r}, this is {card!r}; write another file")
        measured = {(r["M"], r["N"], r["K"]) for r in rows}
        kept = [dict(c, date=c.get("date", old.get("date")), command=c.get("command", old.get("command")))
                for c in old.get("choices", []) if (c["M"], c["N"], c["K"]) not in measured]
        choices = sorted(kept + choices, key=lambda c: (c["M"], c["N"], c["K"]))
    data = dict(card=card, date=date, command=command, torch=torch.__version__, choices=choices)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, data)
    return path


if __name__ == "__main__":
    sys.exit(main())
