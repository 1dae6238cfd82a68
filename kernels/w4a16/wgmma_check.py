"""Device check + sweep of the Hopper wgmma W4A16 kernel (csrc/w4a16_wgmma.cuh; first run on an H100
2026-11-28: 271/271 correct, results in kernels/BENCHMARKS.md).

    python -m kernels.w4a16.wgmma_check --out DIR [--quick] [--configs 6,7] [--ms 16,64] [--no-op]

One device call (H100/H200, < 3 min including the ~60-100 s build):
1. build the extension (subprocess `python -m kernels.w4a16.build`);
2. correctness, in a worker subprocess: every wg config (ids 0..num_wgmma_configs-1, table in
   csrc/w4a16_api.h) x shapes (N, K) x M in {64, 100, 128, 256, 1024, 2048}, bf16 (+ fp16 on two
   shapes x M in {64, 100, 256}), automatic split count; plus forced splits=3 (the atomic path) and
   the op with every M >= 64 sent to the wgmma kernel (set_wgmma_dispatch(1)); "op" timings use
   set_wgmma_dispatch(-1) (the dispatch before the wgmma kernel). Fresh random x per check, NaN-poisoned
   outputs, relative Frobenius error vs a float64 reference (reference.py semantics) <= 1e-2.
   Every case is appended (flushed) to DIR/wg_check.jsonl before and after it runs. A crash (e.g.
   an illegal address kills the CUDA context) kills only the worker: the parent marks the config
   that was running as crashed and starts a new worker that skips it and the cases already done.
3. timing, in a second worker (same crash handling), only for configs with no failure: bf16 cuBLAS
   x @ W.T, the default op (dispatch off), each wg config whose token tile fits M, and the op with
   the opt-in dispatch. Method = bench.py's: each method runs inside one CUDA graph over enough
   weight copies (>= 256 MB) that L2 cannot serve them (L2 effectively flushed), 3 warm-up replays,
   median of 20 replays (CUDA events) / copies.
Writes DIR/wg_check.jsonl, DIR/wg_time.jsonl, DIR/wgmma_check.json (summary) and DIR/wgmma_table.md;
prints the markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)]
MS = [64, 100, 128, 256, 1024, 2048]
FP16_SHAPES = [(4096, 4096), (28672, 8192)]
FP16_MS = [64, 100, 256]
TOL = 1e-2


def _fits(x_tile: int, M: int) -> bool:
    """Token tiles worth timing at M (correctness runs every config at every M)."""
    return (x_tile <= 32 and M <= 2 * x_tile) or x_tile == 64 or (x_tile == 128 and M >= 100) or \
        (x_tile == 256 and M >= 256)


# ------------------------------------------------------------------------------------------ workers
def _append(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _done_keys(path, kind):
    return {r["key"] for r in _load(path, kind)}


def worker_check(out, skip_cfgs, quick, only=(), ms_sel=(), no_op=False):
    import torch

    from .bench import rand_weight, rel_err
    from .op import load_extension
    from .pack import pack_weights
    from .reference import GROUP_SIZE

    ext = load_extension()
    path = os.path.join(out, "wg_check.jsonl")
    done = _done_keys(path, "result")
    ncfg = int(ext.num_wgmma_configs)
    cfgs = [c for c in range(ncfg) if c not in skip_cfgs and (not only or c in only)]
    shapes = SHAPES[:2] if quick else SHAPES
    ms_b = list(ms_sel) or MS
    ms_h = [m for m in ms_b if m in FP16_MS or m < 64][:3] if ms_sel else FP16_MS
    plan = [(s, torch.bfloat16, ms_b) for s in shapes] + [(s, torch.float16, ms_h) for s in FP16_SHAPES if s in shapes]
    for (N, K), dt, ms in plan:
        codes = scales = p = w64 = None
        for M in ms:
            cases = [(f"c{c}", c, 0) for c in cfgs] + [(f"c{c}s3", c, 3) for c in (cfgs if only else cfgs[:1]) if M <= 128]
            if -1 not in skip_cfgs and not no_op:
                cases.append(("op_wg", -1, 0))
            for name, cfg, splits in cases:
                key = f"{N}x{K}|{M}|{str(dt)[6:]}|{name}"
                if key in done:
                    continue
                if codes is None:  # lazily: a resumed worker may have nothing left on this shape
                    codes, scales = rand_weight(N, K, "cuda")
                    p = pack_weights(codes, scales, dtype=dt)
                    w64 = codes.double() * scales.to(dt).double().repeat_interleave(GROUP_SIZE, dim=1)
                _append(path, {"kind": "start", "key": key, "cfg": cfg})
                rec = {"kind": "result", "key": key, "N": N, "K": K, "M": M, "dtype": str(dt)[6:], "case": name,
                       "cfg": cfg, "splits": splits}
                try:
                    x = torch.randn(M, K, device="cuda", dtype=dt)  # fresh inputs per check
                    ref = x.double() @ w64.t()
                    if cfg >= 0:
                        o = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
                        ext.wgmma_gemm_out(x, p["qweight"], p["scales"], cfg, o, splits)
                        rec["eff_splits"] = int(ext.wgmma_splits(cfg, M, N, K, splits, int(dt == torch.float16)))
                    else:
                        junk = torch.full((M, N), float("nan"), device="cuda", dtype=dt)  # poison the allocator
                        del junk
                        ext.set_wgmma_dispatch(1)
                        try:
                            o = torch.ops.grace.w4a16_gemm(x, p["qweight"], p["scales"], 128)
                        finally:
                            ext.set_wgmma_dispatch(-1)
                    torch.cuda.synchronize()
                    e = rel_err(o, ref)
                    rec["rel_err"] = e
                    rec["ok"] = bool(e == e and e <= TOL)
                    if not rec["ok"] and o.numel():  # where it is wrong: a hint for the first debug round
                        bad = (o.double() - ref).abs() > 0.05 * ref.abs().max()
                        bad |= ~torch.isfinite(o)
                        rec["bad_frac"] = float(bad.float().mean())
                        rows = bad.any(dim=1).nonzero().flatten()[:8].tolist()
                        cols = bad.any(dim=0).nonzero().flatten()[:8].tolist()
                        rec["bad_tokens"], rec["bad_features"] = rows, cols
                except Exception as ex:  # noqa: BLE001 - recorded, the run goes on
                    rec["ok"] = False
                    rec["error"] = repr(ex)[:400]
                _append(path, rec)
                print(f"check {key}: {rec.get('rel_err', rec.get('error'))}", flush=True)
                if "error" in rec and "CUDA" in rec["error"]:
                    sys.exit(3)  # context may be gone: let the parent restart without this config
        del codes, scales, p, w64
        torch.cuda.empty_cache()


def worker_time(out, cfgs, quick, skip_cfgs=frozenset(), ms_sel=(), no_op=False, forced=()):
    import torch

    from .bench import graph_time, weight_copies
    from .op import load_extension

    ext = load_extension()
    path = os.path.join(out, "wg_time.jsonl")
    done = _done_keys(path, "result")
    info = {c: list(ext.wgmma_info(c)) for c in cfgs}
    shapes = SHAPES[:2] if quick else SHAPES
    ms = list(ms_sel) or (MS[:4] if quick else MS)
    for (N, K) in shapes:
        W, Q = weight_copies(N, K)
        for M in ms:
            ext.set_wgmma_dispatch(-1)    # "op" = the op without the wgmma kernel (the pre-v5 dispatch)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            methods = [("cublas", lambda: [lambda w=w: torch.matmul(x, w.t()) for w in W]),
                       ("op", lambda: [lambda q=q: torch.ops.grace.w4a16_gemm(x, q["qweight"], q["scales"], 128) for q in Q])]
            methods += [(f"c{c}", lambda c=c: [lambda q=q: ext.wgmma_gemm(x, q["qweight"], q["scales"], c) for q in Q])
                        for c in cfgs if _fits(info[c][0], M)]
            methods += [(f"c{c}s{sp}", lambda c=c, sp=sp: [lambda q=q: ext.wgmma_gemm(x, q["qweight"], q["scales"], c, sp)
                                                          for q in Q])
                        for c in cfgs if _fits(info[c][0], M) for sp in forced]
            if -1 not in skip_cfgs and not no_op:
                methods.append(("op_wg", None))
            for name, fns in methods:
                key = f"{N}x{K}|{M}|{name}"
                if key in done:
                    continue
                cfg = int(name[1:].split("s")[0]) if name.startswith("c") and name[1:].split("s")[0].isdigit() else -1
                _append(path, {"kind": "start", "key": key, "cfg": cfg})
                rec = {"kind": "result", "key": key, "N": N, "K": K, "M": M, "method": name, "cfg": cfg}
                try:
                    if name == "op_wg":
                        ext.set_wgmma_dispatch(1)
                        try:
                            rec["us"] = graph_time([lambda q=q: torch.ops.grace.w4a16_gemm(x, q["qweight"], q["scales"], 128) for q in Q])
                        finally:
                            ext.set_wgmma_dispatch(-1)
                        rec["wg_cfg"] = int(ext.choose_wgmma(M))
                    else:
                        rec["us"] = graph_time(fns())
                    if cfg >= 0:
                        forced_s = int(name.split("s")[1]) if "s" in name else 0
                        rec["splits"] = int(ext.wgmma_splits(cfg, M, N, K, forced_s, 0))
                except Exception as ex:  # noqa: BLE001
                    rec["error"] = repr(ex)[:400]
                _append(path, rec)
                print(f"time {key}: {rec.get('us', rec.get('error'))}", flush=True)
                if "error" in rec and "CUDA" in rec["error"]:
                    sys.exit(3)
        del W, Q
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ parent
def _last_start_cfg(path):
    """(cfg, key, recorded) of the case that killed the worker: the last one started without a result
    (recorded False), else the last result with a CUDA error (recorded True); (None, None, False)."""
    started, finished, last_err = {}, set(), None
    if os.path.exists(path):
        for line in open(path):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == "start":
                started[r["key"]] = r["cfg"]
            elif r.get("kind") == "result":
                finished.add(r["key"])
                if "CUDA" in r.get("error", ""):
                    last_err = r
    pending = [k for k in started if k not in finished]
    if pending:
        return started[pending[-1]], pending[-1], False
    if last_err is not None:
        return last_err.get("cfg"), last_err["key"], True
    return None, None, False


def _run_worker(kind, out, extra, deadline, quick, crashed, sel=()):
    """Runs a worker until it finishes, restarting without the config that crashed it."""
    path = os.path.join(out, "wg_check.jsonl" if kind == "check" else "wg_time.jsonl")
    for _attempt in range(8):
        left = deadline - time.time()
        if left < 5:
            print(f"{kind}: out of time", flush=True)
            return
        cmd = [sys.executable, "-m", "kernels.w4a16.wgmma_check", "--worker", kind, "--out", out,
               "--cfgs", ",".join(map(str, extra)), "--skip", ",".join(map(str, sorted(crashed)))]
        if quick:
            cmd.append("--quick")
        cmd += sel
        try:
            rc = subprocess.run(cmd, timeout=left).returncode
        except subprocess.TimeoutExpired:
            print(f"{kind}: worker timed out (partial results kept)", flush=True)
            return
        if rc == 0:
            return
        cfg, key, recorded = _last_start_cfg(path)
        print(f"{kind}: worker exited rc={rc}; case that killed it: {key} (cfg {cfg})", flush=True)
        if key is None or cfg is None or cfg in crashed:
            return  # crashed outside any case (e.g. import), or twice on the same config: give up
        if not recorded:
            _append(path, {"kind": "result", "key": key, "cfg": cfg, "ok": False, "crashed": True, "rc": rc})
        crashed.add(cfg)  # -1 = the op with the opt-in dispatch
        extra[:] = [c for c in extra if c != cfg]


def _load(path, kind="result"):
    out = []
    if os.path.exists(path):
        for line in open(path):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == kind:
                out.append(r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="two shapes, M <= 256 (timing)")
    ap.add_argument("--budget", type=float, default=175.0, help="seconds for the whole run, build included")
    ap.add_argument("--configs", default="", help="comma-separated wg config ids to check and time (default: all)")
    ap.add_argument("--ms", default="", help="comma-separated token counts for both the checks and the timing")
    ap.add_argument("--time-ms", default="", help="comma-separated token counts for the timing (default: --ms)")
    ap.add_argument("--splits", default="", help="comma-separated forced split counts to time besides the automatic one")
    ap.add_argument("--no-op", action="store_true", help="leave out the op with the opt-in wgmma dispatch")
    ap.add_argument("--worker", choices=["check", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--cfgs", default="", help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", "16")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    ids = lambda s: [int(v) for v in s.split(",") if v != ""]  # noqa: E731
    if args.worker == "check":
        return worker_check(args.out, set(ids(args.skip)), args.quick, set(ids(args.configs)), ids(args.ms), args.no_op)
    if args.worker == "time":
        return worker_time(args.out, ids(args.cfgs), args.quick, set(ids(args.skip)), ids(args.time_ms or args.ms), args.no_op,
                           ids(args.splits))

    t0 = time.time()
    deadline = t0 + args.budget
    for f in ("wg_check.jsonl", "wg_time.jsonl"):
        if os.path.exists(os.path.join(args.out, f)):
            os.remove(os.path.join(args.out, f))
    with open(os.path.join(args.out, "wg_build.log"), "w") as log:
        try:
            rc = subprocess.run([sys.executable, "-m", "kernels.w4a16.build"], stdout=log, stderr=subprocess.STDOUT,
                                timeout=max(10, deadline - time.time() - 30)).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    print(f"build rc={rc} ({time.time() - t0:.0f}s); log {args.out}/wg_build.log", flush=True)
    if rc != 0:
        os.system(f"grep -E 'error|C75|warning' {args.out}/wg_build.log | head -30")
        return 1
    os.system(f"grep -E 'C7512|spill' {args.out}/wg_build.log | head -10")

    crashed: set[int] = set()
    # 60% of what is left goes to correctness, the rest to timing
    t_check_end = time.time() + 0.6 * (deadline - time.time())
    sel = (["--configs", args.configs] if args.configs else []) + (["--ms", args.ms] if args.ms else []) + \
        (["--time-ms", args.time_ms] if args.time_ms else []) + (["--no-op"] if args.no_op else []) + \
        (["--splits", args.splits] if args.splits else [])
    _run_worker("check", args.out, [], t_check_end, args.quick, crashed, sel)
    checks = _load(os.path.join(args.out, "wg_check.jsonl"))
    # a config is timed only if its automatic-split cases all passed (forced-split failures are reported)
    bad_cfgs = {r["cfg"] for r in checks if not r.get("ok") and r.get("cfg", -1) >= 0 and not r.get("splits")}
    bad_cfgs |= {c for c in crashed if c >= 0}
    all_cfgs = sorted({r["cfg"] for r in checks if r.get("cfg", -1) >= 0} | {c for c in crashed if c >= 0})
    good = [c for c in all_cfgs if c not in bad_cfgs]
    n_ok = sum(1 for r in checks if r.get("ok"))
    worst = max([r["rel_err"] for r in checks if "rel_err" in r and r["rel_err"] == r["rel_err"]] or [float("nan")])
    print(f"CHECK: {n_ok}/{len(checks)} ok, worst rel err {worst:.2e}; configs passing: {good}; failing: {sorted(bad_cfgs)}; "
          f"crashed: {sorted(crashed)} ({time.time() - t0:.0f}s)", flush=True)
    for r in [r for r in checks if not r.get("ok")][:25]:
        print("  FAIL", {k: r.get(k) for k in ("key", "rel_err", "error", "crashed", "bad_frac", "bad_tokens", "bad_features")}, flush=True)

    _run_worker("time", args.out, list(good), deadline, args.quick, {-1} if -1 in crashed else set(), sel)
    times = _load(os.path.join(args.out, "wg_time.jsonl"))

    # ---- table: one row per (shape, M)
    rows = {}
    for r in times:
        rows.setdefault((r["N"], r["K"], r["M"]), {})[r["method"]] = r.get("us", float("nan"))
    try:
        dev = subprocess.run([sys.executable, "-c", "import torch;print(torch.cuda.get_device_name())"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        dev = "?"
    cfg_cols = [f"c{c}" for c in good] + [f"c{c}s{sp}" for c in good for sp in ids(args.splits)]
    lines = [f"Card: {dev}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `python -m kernels.w4a16.wgmma_check`; "
             f"bf16, us = median of 20 CUDA-graph replays over >= 256 MB of weight copies (L2 flushed, as bench.py); "
             f"correctness: {n_ok}/{len(checks)} ok, worst rel err {worst:.2e}, failing configs {sorted(bad_cfgs)}", "",
             "| N x K | M | cuBLAS us | op us | " + " | ".join(f"{c} us" for c in cfg_cols) +
             " | op+wgmma us | best wg | best vs cuBLAS | best vs op |",
             "|---|---|---|---|" + "---|" * len(cfg_cols) + "---|---|---|---|"]
    summary_rows = []
    for (N, K, M), d in sorted(rows.items()):
        wg = {c: d[c] for c in cfg_cols if c in d and d[c] == d[c]}
        best = min(wg, key=wg.get) if wg else None
        cb, op = d.get("cublas", float("nan")), d.get("op", float("nan"))
        bt = wg[best] if best else float("nan")
        lines.append(f"| {N}x{K} | {M} | {cb:.1f} | {op:.1f} | " +
                     " | ".join(f"{d.get(c, float('nan')):.1f}" for c in cfg_cols) +
                     f" | {d.get('op_wg', float('nan')):.1f} | {best or '-'} | {cb / bt:.2f}x | {op / bt:.2f}x |")
        summary_rows.append({"N": N, "K": K, "M": M, **d, "best": best})
    table = "\n".join(lines)
    with open(os.path.join(args.out, "wgmma_table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "wgmma_check.json"), "w") as f:
        json.dump({"device": dev, "checks": len(checks), "ok": n_ok, "worst_rel_err": worst, "passing_cfgs": good,
                   "failing_cfgs": sorted(bad_cfgs), "crashed_cfgs": sorted(crashed), "rows": summary_rows,
                   "failures": [r for r in checks if not r.get("ok")][:200], "seconds": time.time() - t0}, f, indent=1)
    print(table)
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
