"""Loader throughput: samples/s through the whole pipeline (tar read, shuffle buffer, PNG decode,
the family's HF processor, labels, collate) for 1 and N DataLoader workers and image sizes 224-672.

    python benchmarks/bench_loader.py [--family qwen2_vl] [--samples 256] [--workers 1 2]
                                      [--sizes 224 448 672] [--batch 4] [--real-resolution]

Data: the synthetic benchmark rendered at each size (generated into a temp dir first, not timed).
--real-resolution lifts the tiny preset's 112 px cap so a Qwen image processor keeps Qwen2-VL's
real pixel budget (672 px -> 576 visual tokens), which is what a real run pays per sample.
Prints a markdown table with the command and the machine. Timings are reported, never asserted;
the first batch (worker start-up) is excluded from the rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grace_ds.data import DataConfig, build_train_loader, write_shards  # noqa: E402
from grace_ds.data.synthetic import GeneratorConfig, make_sample  # noqa: E402


def _dataset(root: Path, size: int, n: int) -> Path:
    d = root / f"px{size}"
    cfg = GeneratorConfig(seed=0, difficulty="medium", image_size=size)
    write_shards((make_sample(cfg, "train", i) for i in range(n)), d, "train", max(1, n // 8))
    return d


def _measure(d: Path, proc, family: str, workers: int, batch: int) -> tuple[float, float, int]:
    cfg = DataConfig(train_dirs=[str(d)], micro_batch_size=batch, num_workers=workers, shuffle_buffer=32,
                     max_length=8192, pin_memory=False)
    loader = build_train_loader(cfg, proc, family, 0, 1)
    t0 = time.perf_counter()
    t_first, n_after, tokens = None, 0, 0
    for batch_ in loader:
        if t_first is None:
            t_first = time.perf_counter()
            continue
        n_after += batch_["input_ids"].shape[0]
        tokens += int(batch_["attention_mask"].sum())
    t1 = time.perf_counter()
    return n_after / max(t1 - t_first, 1e-9), t_first - t0, tokens // max(n_after, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 672])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--real-resolution", action="store_true")
    args = ap.parse_args()
    from grace_ds.models.processors import build_processor

    proc = build_processor(args.family)
    if args.real_resolution:
        ip = proc.image_processor
        if hasattr(ip, "max_pixels") or "longest_edge" in (getattr(ip, "size", None) or {}):
            ip.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}   # Qwen2-VL's defaults
            for k, v in (("min_pixels", 56 * 56), ("max_pixels", 28 * 28 * 1280)):
                if hasattr(ip, k):
                    setattr(ip, k, v)
        else:
            print("--real-resolution: only Qwen image processors have a pixel budget; ignored", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            d = _dataset(Path(tmp), size, args.samples)
            for w in args.workers:
                rate, startup, toks = _measure(d, proc, args.family, w, args.batch)
                rows.append((size, w, rate, startup, toks))
                print(f"{size}px workers={w}: {rate:.1f} samples/s", file=sys.stderr)
    import torch
    print(f"\nCommand: `python {' '.join(shlex.quote(a) for a in sys.argv)}`  ")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}; family {args.family}, "
          f"batch {args.batch}, {args.samples} samples per size{', real resolution' if args.real_resolution else ''}\n")
    print("| image px | workers | samples/s | first batch (s) | tokens/sample |")
    print("|---:|---:|---:|---:|---:|")
    for size, w, rate, startup, toks in rows:
        print(f"| {size} | {w} | {rate:.1f} | {startup:.2f} | {toks} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
