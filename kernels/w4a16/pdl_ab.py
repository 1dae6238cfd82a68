"""A/B of programmatic dependent launch (set_pdl) for the W4A16 op and chosen configs, alternating off / on
several rounds in one process so that drift shows up as spread rather than as a PDL effect.

    python -m kernels.w4a16.pdl_ab [--shapes 8192x28672 28672x8192] [--ms 1 16] [--configs 44 46 58 61] [--rounds 3]
        [--mark FILE [--margin 0.03]]

Each timing is bench.py's: one CUDA graph over >= 256 MB of weight copies (a chain of independent GEMMs, as
in `bench --pdl`), median of 20 replays. Prints one line per (shape, M, method): the rounds' times with PDL
off and on, and the ratio of the medians.

--mark FILE: a tuned-choice file (kernels/w4a16/tuned/<card>.json, op.load_tuned) gets "pdl": 0 on the op's
entry for each (M, N, K) where the op's own kernel was more than --margin slower with PDL than without (the
entry is added with the op's current choice if there is none), and loses it where PDL was not slower. Only
the register / split-K / lean kernels ("c<id>"): the wgmma dispatch comes before the table. A later
`sweep_decode --write-tuned --merge` that re-measures a shape writes its entry afresh, without the bit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from .bench import graph_time, parse_shape, weight_copies
from .op import load_extension


def mark_pdl(data: dict | None, results: list[dict], card: str, margin: float, command: str, date: str):
    """The tuned-choice file's data with each result's verdict applied; returns (data, lines describing the
    changes). results: {M, N, K, kernel ("c<id>" / "wg<id>" / "dequant"), cfg, splits, off_us, on_us}."""
    data = dict(card=card, date=date, command=command, torch=torch.__version__, choices=[]) if data is None else dict(data)
    if data.get("card") != card:
        raise ValueError(f"--mark: the file was measured on {data.get('card')!r}, this is {card!r}; mark another file")
    choices = [dict(c) for c in data.get("choices", [])]
    index = {(c["M"], c["N"], c["K"]): c for c in choices}
    changes = []
    for r in results:
        if not str(r["kernel"]).startswith("c"):
            continue
        key, slower = (r["M"], r["N"], r["K"]), r["on_us"] > (1 + margin) * r["off_us"]
        entry = index.get(key)
        where = f"{r['N']}x{r['K']} M={r['M']} {r['kernel']}: PDL on {r['on_us']:.1f} us, off {r['off_us']:.1f}"
        if slower:
            if entry is None:
                entry = dict(M=r["M"], N=r["N"], K=r["K"], cfg=r["cfg"], splits=r["splits"], us=round(r["off_us"], 2),
                             date=date, command=command)
                choices.append(entry)
                index[key] = entry
            entry.update(pdl=0, pdl_off_us=round(r["off_us"], 2), pdl_on_us=round(r["on_us"], 2), pdl_date=date)
            changes.append(f"{where}: pdl 0")
        elif entry is not None and entry.get("pdl") == 0:
            for k in ("pdl", "pdl_off_us", "pdl_on_us", "pdl_date"):
                entry.pop(k, None)
            changes.append(f"{where}: pdl bit removed")
    data["choices"] = sorted(choices, key=lambda c: (c["M"], c["N"], c["K"]))
    return data, changes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[[(8192, 28672)], [(28672, 8192)]])
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--configs", nargs="*", type=int, default=[], help="tc/lean config ids timed directly too")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mark", default=None, metavar="FILE",
                    help="set / clear the op's per-shape \"pdl\": 0 in this tuned-choice file (module docstring)")
    ap.add_argument("--margin", type=float, default=0.03, help="with --mark: how much slower PDL must be (0.03 = 3%%)")
    args = ap.parse_args(argv)
    ext = load_extension()
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    results = []
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
                if name.startswith("op "):
                    results.append(dict(M=M, N=N, K=K, kernel=ext.op_kernel(M, N, K), cfg=ext.choose_config(M, N, K),
                                        splits=ext.choose_splits(M, N, K), off_us=off, on_us=on))
        del Q
        torch.cuda.empty_cache()
    if args.mark:
        from grace_ds.export.io import atomic_write_json

        old = json.loads(open(args.mark).read()) if os.path.exists(args.mark) else None
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        data, changes = mark_pdl(old, results, torch.cuda.get_device_name(), args.margin,
                                 "python -m kernels.w4a16.pdl_ab " + " ".join(argv if argv is not None else sys.argv[1:]),
                                 date)
        atomic_write_json(args.mark, data)
        print("\n".join([f"{args.mark}:"] + (changes or ["no change"])))


if __name__ == "__main__":
    main()
