"""Decode attention, one layer, one query token: bf16 cache + SDPA vs the int8 cache (not a test).

Three ways to attend over a static KV cache of L positions (the first `--filled` attended, the rest
masked, as in a decode step of launch/bench.py):

  sdpa16        bf16 cache, F.scaled_dot_product_attention with a bool mask (what the bf16 and the
                default INT4 variants of launch/bench.py run; GQA through enable_gqa)
  kv8-portable  the packed int8 cache (grace_ds.export.kv8), the portable multiply + reduce form,
                torch.compile'd (what `--kv-int8 --kv8-portable` runs)
  kv8           the same cache through the registered attention function, torch.compile'd: what
                `--kv-int8` runs (on the GPU the Triton split-K kernel, grace_ds.export.kv8_triton;
                the launch sweep and the options are timed this way)
  kv8-triton    the kernel called directly, its mask -> bias conversion an eager kernel of its own
  kernel16      the bf16 cache through the same split-K kernel's 16-bit form (`--attn16-kernel`,
                kv8.decode16_attention_forward), compiled: each kv head read once for its query heads

Each timed call reads a different layer's cache out of `--layers` copies (enough to exceed L2), so
the cache comes from DRAM as in a real decode step. Reported: median us per call, the cache bytes
read per call, and the rate (GB/s) against a device-to-device copy measured in the same run.
Every kernel output is compared with a float64 reference on the same cache first.

    python benchmarks/bench_kv8_attention.py                  # GPU: LLaVA-1.5-7B and Qwen2-VL-7B, batch 1 and 16
    python benchmarks/bench_kv8_attention.py --small          # CPU smoke run (tiny shapes; sdpa16 and kv8 only)
    python benchmarks/bench_kv8_attention.py --count-prefill  # host cost of a prefill: aten calls per layer (CPU)
    python benchmarks/bench_kv8_attention.py --count-prefill --chunk 8   # ... and of the same prefill in chunks

--count-prefill counts, rather than times, the aten calls of one prompt pass of a tiny LLaVA through
grace_ds.export.decode.StaticDecoder with the 16-bit and with the int8 cache (each call is a kernel
launch on a GPU, and a batch-1 prefill is launch-bound), with count_host_ops.Tally.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grace_ds.export import kv8, kv8_triton  # noqa: E402

SHAPES = {  # name: (query heads, kv heads, head dim)
    "llava-1.5-7b": (32, 32, 128),
    "qwen2-vl-7b": (28, 4, 128),
}


def portable(q, k, v, mask, scaling):
    """kv8's portable decode attention, the form used where the kernel is not."""
    return kv8.portable_decode_attention(q, k, v, mask, scaling)


def registered(q, k, v, mask, scaling):
    """The attention function registered with transformers, as a compiled decode step runs it: on the
    GPU the Triton kernel (kv8_triton.LAUNCH is read at each call), with the mask -> bias conversion
    fused by inductor."""
    return kv8.kv8_attention_forward(None, q, k, v, mask, scaling=scaling)[0]


def kernel16(q, k, v, mask, scaling):
    """The same split-K kernel over the bf16 cache (`--attn16-kernel`), through its registered function."""
    return kv8.decode16_attention_forward(None, q, k, v, mask, scaling=scaling)[0]


def triton_op(q, k, v, mask, scaling):
    """The kernel called directly, with its mask -> bias conversion (kv8._decode_bias) as a separate eager
    kernel; the kernel writes the query's dtype."""
    return kv8_triton.kv8_decode_attention(q, k, v, kv8._decode_bias(mask), scaling).transpose(1, 2)


def sdpa(q, k, v, mask, scaling):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                          enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


SIXTEEN = ("sdpa16", "kernel16")   # the methods over the bf16 cache
SWEEP = ([32, 64, 128], [4], [2, 3, 4], [264, 1056])   # block, warps, stages, programs (8 warps never led: 12:45 UTC)
SWEEP_SMALL = ([32], [4], [1], [264, 1056])
SWEEP16 = ([32, 64], [4], [2, 3, 4], [264, 1056])
# kernel options (kv8_triton.LAUNCH) timed at the fastest launch configuration, each switched on its own
# ("none": all off, the kernel as first measured, with plain int8 -> fp16 casts)
OPTIONS = {"skip": {"skip": True}, "no qk_int8": {"qk_int8": False}, "no vwords": {"vwords": False},
           "no asm": {"asm": False}, "bound": {"bound": True}, "no bound": {"bound": False},
           "none": {"skip": False, "asm": False, "vwords": False, "qk_int8": False, "bound": False}}


def timed(fn, args_per_layer, reps, device):
    """Median microseconds per call. On the GPU the calls over all layers are captured once in a CUDA
    graph and the graph is replayed (launch overhead out, as in launch/bench.py's decode step; the GPU
    stays busy, so the events time the kernels, not the host); on the CPU, wall time per call."""
    for a in args_per_layer[:3]:
        fn(*a)
    if device.type != "cuda":
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(*args_per_layer[i % len(args_per_layer)])
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    from kernels.w4a16.bench import graph_time   # the kernel bench's CUDA-graph timer (imports only, no build)

    return graph_time([lambda a=a: fn(*a) for a in args_per_layer], reps=max(5, reps // len(args_per_layer)))


def copy_rate(device):
    """GB/s of a device-to-device copy (bytes read + written), by the kernel bench's measurement."""
    if device.type != "cuda":
        return float("nan")
    from kernels.w4a16.bench import copy_bandwidth

    return copy_bandwidth() * 1000


def count_prefill(chunk: int | None = None) -> list[tuple[str, int]]:
    """Aten calls per decoder layer of one prefill (2 rows, tiny LLaVA, a 22-token prompt), 16-bit vs
    int8 cache; with `chunk`, also the same prefill in chunks of that many tokens per row."""
    import transformers

    from benchmarks.count_host_ops import Tally
    from grace_ds.export.arch import bench_config, make_prompt
    from grace_ds.export.decode import StaticDecoder

    cfg = bench_config("tiny-llava")
    torch.manual_seed(0)
    model = getattr(transformers, cfg.architectures[0])._from_config(cfg, dtype=torch.float32).eval()
    inputs = make_prompt(cfg, 2, 6, 16, dtype=torch.float32)
    layers = cfg.text_config.num_hidden_layers
    rows = []
    for c in ([None] if chunk is None else [None, chunk]):
        for kv_int8 in (False, True):
            dec = StaticDecoder(model, cfg, 2, inputs["input_ids"].shape[1] + 8, "cpu", kv_int8=kv_int8)
            with torch.no_grad():
                dec.prefill(inputs, chunk=c)              # warm: lazy allocations out of the count
                with Tally() as tally:
                    dec.prefill(inputs, chunk=c)
            rows.append((("int8" if kv_int8 else "16-bit") + ("" if c is None else f", chunks of {c}"),
                         sum(tally.ops.values())))
    print(f"| cache | aten calls per prefill ({layers} layers, prompt {inputs['input_ids'].shape[1]}) | "
          f"extra per layer over 16-bit unchunked |\n|---|---|---|")
    for name, n in rows:
        print(f"| {name} | {n} | {(n - rows[0][1]) / layers:.0f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--length", type=int, default=896, help="static cache length (640-token prompt + 256 new)")
    p.add_argument("--filled", type=int, default=768, help="positions attended (the mean over the 256 decode steps)")
    p.add_argument("--layers", type=int, default=8, help="cache copies cycled through (defeats L2)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shapes, no Triton")
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--chunk", type=int, default=None, help="with --count-prefill: also count a prefill in chunks of N")
    p.add_argument("--count-prefill", action="store_true",
                   help="instead: aten calls of one tiny-LLaVA prefill, 16-bit vs int8 cache (CPU)")
    p.add_argument("--sweep", action="store_true",
                   help="also time the Triton kernel for every launch configuration (block, warps, stages, programs)")
    p.add_argument("--bound-ab", action="store_true",
                   help="also time both Triton kernels (kernel16, kv8) with their splits sharing the attended positions "
                        "(\"spread\"), their walks bounded at the last attended position of fixed slices (\"bound\") "
                        "and walking the whole cache (neither), and the default walk with the splits merged by a second "
                        "kernel (\"no fold\"), in the same run; the default \"auto\" picks by the "
                        "splits and the cache length: kv8_triton.spreads and bounded")
    args = p.parse_args(argv)
    if args.count_prefill:
        return count_prefill(args.chunk)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    shapes = {a: SHAPES[a] for a in args.arch}
    if args.small:
        shapes = {"tiny-mha": (4, 4, 32), "tiny-gqa": (4, 2, 32)}
        args.length, args.filled, args.layers, args.reps, args.batch = 96, 80, 2, 5, [1, 2]
    compiled = (lambda f: torch.compile(f, dynamic=False)) if device.type == "cuda" else (lambda f: f)
    methods = {"sdpa16": sdpa, "kv8-portable": compiled(portable)}
    if kv8_triton.triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        methods["kernel16"] = compiled(kernel16)
        methods["kv8"] = compiled(registered)
        methods["kv8-triton"] = triton_op
    gbps_copy = copy_rate(device)
    sweep_lines = []
    torch.manual_seed(0)
    lines = [f"- card: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `python benchmarks/bench_kv8_attention.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- cache length {args.length}, {args.filled} attended (\"cache MB read\" and the rates count the whole "
             f"cache; the Triton kernels' walks stop at the last attended position where \"bound\", "
             f"kv8_triton.bounded); {args.layers} layer copies cycled; median of {args.reps} calls; "
             f"device copy rate {gbps_copy:.0f} GB/s",
             "",
             "| model | batch | method | us | cache MB read | GB/s | % of copy | rel err (norm) vs float64 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (H, Hk, D) in shapes.items():
        for B in args.batch:
            scaling = D ** -0.5
            mask = torch.zeros(B, 1, 1, args.length, dtype=torch.bool, device=device)
            mask[..., :args.filled] = True
            per_layer = {m: [] for m in methods}
            ref_inputs = None
            for layer in range(args.layers):
                q = torch.randn(B, H, 1, D, device=device, dtype=torch.bfloat16)
                k16 = torch.randn(B, Hk, args.length, D, device=device, dtype=torch.bfloat16)
                v16 = torch.randn(B, Hk, args.length, D, device=device, dtype=torch.bfloat16)
                k8, v8 = kv8.quantize_kv(k16), kv8.quantize_kv(v16)
                for m in methods:
                    per_layer[m].append((q, k16, v16, mask, scaling) if m in SIXTEEN else (q, k8, v8, mask, scaling))
                if layer == 0:
                    ref_inputs = (q, k16, v16, kv8.dequantize_kv(k8), kv8.dequantize_kv(v8))
            q, k16, v16, kd, vd = ref_inputs
            def row(label, fn, layers, ref):
                out = fn(*layers[0]).double()
                err = ((out - ref).norm() / ref.norm()).item()
                if err > 2e-2:
                    raise SystemExit(f"{name} batch {B} {label}: relative error {err:.2e} against float64 (> 2e-2)")
                us = timed(fn, layers, args.reps, device)
                nbytes = (layers[0][1].numel() + layers[0][2].numel()) * layers[0][1].element_size()
                gbps = nbytes / (us * 1e-6) / 1e9
                return us, f"| {name} | {B} | {label} | {us:.1f} | {nbytes / 1e6:.1f} | {gbps:.0f} | " \
                           f"{100 * gbps / gbps_copy:.0f}% | {err:.1e} |"

            ref16, ref8 = (kv8.reference_attention(q, kk, vv, mask, scaling).transpose(1, 2) for kk, vv in
                           ((k16, v16), (kd, vd)))
            for m, fn in methods.items():
                lines.append(row(m, fn, per_layer[m], ref16 if m in SIXTEEN else ref8)[1])
            for m, table in (("kernel16", kv8_triton.LAUNCH16), ("kv8", kv8_triton.LAUNCH)):
                if args.bound_ab and m in methods:   # the same kernel spread, bounded, and reading the masked tail too
                    default = dict(table)
                    try:
                        for label, walk in (("spread", {"spread": True, "bound": True}),
                                            ("bound", {"spread": False, "bound": True}),
                                            ("no bound", {"spread": False, "bound": False}),
                                            ("no fold", {"fold": False})):   # the defaults, merged by a 2nd kernel
                            table.update(default, **walk)
                            lines.append(row(f"{m}, {label}", methods[m], per_layer[m],
                                             ref16 if m in SIXTEEN else ref8)[1])
                    finally:
                        table.update(default)
            def sweep(method, table, grid, ref):
                """Time `method` under every launch in `grid` (kv8_triton.LAUNCH or LAUNCH16 is `table`,
                restored after); returns (us, row, launch), fastest first."""
                default, found = dict(table), []
                try:
                    for block, warps, stages, programs in itertools.product(*(SWEEP_SMALL if args.small else grid)):
                        launch = dict(block=block, num_warps=warps, num_stages=stages, programs=programs)
                        table.update(default, **launch)
                        label = f"{method} b{block} w{warps} s{stages} p{programs}"
                        found.append((*row(label, methods[method], per_layer[method], ref), launch))
                finally:
                    table.update(default)
                return sorted(found, key=lambda f: f[0])

            if args.sweep and "kernel16" in methods:   # the 16-bit kernel's launch (LAUNCH16)
                sweep_lines.extend(r for _, r, _ in sweep("kernel16", kv8_triton.LAUNCH16, SWEEP16, ref16)[:3])
            if args.sweep and "kv8" in methods:
                found = sweep("kv8", kv8_triton.LAUNCH, SWEEP, ref8)
                sweep_lines.extend(r for _, r, _ in found[:6])
                default = dict(kv8_triton.LAUNCH)
                for name_off, off in OPTIONS.items():   # the options, at the fastest launch
                    kv8_triton.LAUNCH.update(default, **found[0][2], **off)
                    sweep_lines.append(row(f"{found[0][1].split(' | ')[2]}, {name_off}", methods["kv8"],
                                           per_layer["kv8"], ref8)[1])
                kv8_triton.LAUNCH.update(default)
            del per_layer, ref_inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if sweep_lines:
        lines += ["", "Sweep of the Triton kernels' launch configurations (per model and batch: the 16-bit kernel's 3 "
                      "fastest, the int8 kernel's 6 fastest), then the int8 kernel's options (kv8_triton.LAUNCH) switched "
                      "one at a time at its fastest:", "",
                  "| model | batch | configuration | us | cache MB read | GB/s | % of copy | rel err (norm) vs float64 |",
                  "|---|---|---|---|---|---|---|---|"] + sweep_lines
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
