"""Fused vs materialised GRACE loss: forward + backward time and peak memory (not a test).

Three ways to get (CE, gated DKD) for T tokens from the final hidden states of a student
(H_s) and a teacher (H_t) with a V-token vocabulary, bf16 weights:

  fused   grace_ds.distill.fused_gdkd_ce: logits chunk by chunk at supervised positions only,
          recomputed in backward; never holds (T x V) logits.
  plain   lm_head(hidden) for both models (bf16 (T x V) logits materialised), then F.cross_entropy
          + grace_ds.distill.gated_dkd_loss (chunked over tokens, recomputing in backward).
  naive   plain logits and a one-shot fp32 autograd formula over all tokens (what a straightforward
          implementation, such as a Trainer compute_loss override, does).

Peak memory is the CUDA allocator peak above what the inputs (hidden states, weights) already hold.
Default shape: 4096 tokens x 152064 vocab, H_s 1536 / H_t 3584 (Qwen2-VL 7B -> 2B heads).

    python benchmarks/bench_loss.py                 # GPU, full shape; prints a markdown table
    python benchmarks/bench_loss.py --small         # CPU smoke run of the same code (tiny shape)
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grace_ds.distill import fused_gdkd_ce, gated_dkd_loss  # noqa: E402


def naive_loss(hs, ws, ht, wt, labels, T=2.0, alpha=1.0, beta_dkd=4.0):
    """One-shot autograd CE + gated DKD over all tokens in fp32 (for comparison only)."""
    ls = F.linear(hs, ws)[:, :-1].float()
    lt = F.linear(ht, wt)[:, :-1].float().detach()
    y = labels[:, 1:]
    keep = y != -100
    ls, lt, y = ls[keep], lt[keep], y[keep]
    ce = F.cross_entropy(ls, y)
    V = ls.shape[-1]
    ps, pt = torch.softmax(ls / T, -1), torch.softmax(lt / T, -1)
    idx = y[:, None]
    bs = torch.cat([ps.gather(1, idx), 1 - ps.gather(1, idx)], 1)
    bt = torch.cat([pt.gather(1, idx), 1 - pt.gather(1, idx)], 1)
    kl = lambda p, q: (p * (p.clamp_min(1e-8).log() - q.clamp_min(1e-8).log())).sum(-1)  # noqa: E731
    mask = F.one_hot(y, V).bool()
    neg = torch.finfo(torch.float32).min
    nckd = kl(torch.softmax((lt / T).masked_fill(mask, neg), -1), torch.softmax((ls / T).masked_fill(mask, neg), -1))
    dkd = (alpha * kl(bt, bs) + beta_dkd * nckd) * T * T
    with torch.no_grad():
        p1 = torch.softmax(lt, -1)
        g = torch.exp((p1 * p1.clamp_min(1e-8).log()).sum(-1) / math.log(V))
    return ce, (g * dkd).sum() / g.sum()


def plain_loss(hs, ws, ht, wt, labels, chunk):
    ls = F.linear(hs, ws)
    with torch.no_grad():
        lt = F.linear(ht, wt)
    ce = F.cross_entropy(ls[:, :-1].reshape(-1, ls.shape[-1]).float(), labels[:, 1:].reshape(-1))
    return ce, gated_dkd_loss(ls, lt, labels, chunk_size=chunk)


def fused_loss(hs, ws, ht, wt, labels, chunk):
    out = fused_gdkd_ce(hs, ws, ht, wt, labels, chunk_size=chunk)
    return out.ce, out.gdkd


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(name, fn, inputs, dev, repeats, warmup):
    hs, ws = inputs[0], inputs[1]
    times, vals = [], None
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    try:
        for i in range(warmup + repeats):
            hs.grad = ws.grad = None
            if dev.type == "cuda" and i == warmup:
                torch.cuda.reset_peak_memory_stats()
            sync(dev)
            t0 = time.perf_counter()
            ce, kd = fn()
            (ce + kd).backward()
            sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            vals = (ce.item(), kd.item())
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else float("nan")
        return dict(name=name, ms=1e3 * statistics.median(times), peak=peak, ce=vals[0], kd=vals[1], err="")
    except torch.OutOfMemoryError:
        return dict(name=name, ms=float("nan"), peak=float("nan"), ce=float("nan"), kd=float("nan"), err="OOM")
    finally:
        hs.grad = ws.grad = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--hs", type=int, default=1536, help="student hidden size")
    ap.add_argument("--ht", type=int, default=3584, help="teacher hidden size")
    ap.add_argument("--batch", type=int, default=1, help="sequences (tokens are split evenly)")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per chunk")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of variants to skip (fused,plain,naive)")
    ap.add_argument("--small", action="store_true", help="tiny CPU-sized shape (smoke test of this script)")
    a = ap.parse_args(argv)
    if a.small:
        a.tokens, a.vocab, a.hs, a.ht, a.chunk, a.repeats, a.warmup = 256, 8192, 64, 96, 100, 2, 1
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    gen = torch.Generator(device=dev).manual_seed(0)
    S = a.tokens // a.batch
    hs = torch.randn(a.batch, S, a.hs, device=dev, generator=gen).to(dtype).requires_grad_(True)
    ws = (torch.randn(a.vocab, a.hs, device=dev, generator=gen) / math.sqrt(a.hs) * 4).to(dtype).requires_grad_(True)
    ht = torch.randn(a.batch, S, a.ht, device=dev, generator=gen).to(dtype)
    wt = (torch.randn(a.vocab, a.ht, device=dev, generator=gen) / math.sqrt(a.ht) * 4).to(dtype)
    labels = torch.randint(0, a.vocab, (a.batch, S), device=dev, generator=gen)
    labels[:, : S // 8] = -100  # a prompt part, as in real batches
    inputs = (hs, ws, ht, wt, labels)
    variants = {
        "fused": lambda: fused_loss(hs, ws, ht, wt, labels, a.chunk),
        "plain": lambda: plain_loss(hs, ws, ht, wt, labels, a.chunk),
        "naive": lambda: naive_loss(hs, ws, ht, wt, labels),
    }
    skip = {s for s in a.skip.split(",") if s}
    rows = [measure(n, f, inputs, dev, a.repeats, a.warmup) for n, f in variants.items() if n not in skip]
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (no CUDA)"
    print(f"### Fused GRACE loss: {a.tokens} tokens x {a.vocab} vocab, H_s {a.hs} / H_t {a.ht}, {a.dtype}, "
          f"chunk {a.chunk}\n")
    print(f"- card: {card}; torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- median of {a.repeats} forward+backward runs after {a.warmup} warm-up; peak = allocator peak above "
          f"the inputs\n")
    print("| variant | fwd+bwd ms | peak GiB | CE | GDKD |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["err"]:
            print(f"| {r['name']} | {r['err']} | {r['err']} | | |")
        else:
            print(f"| {r['name']} | {r['ms']:.1f} | {r['peak']:.2f} | {r['ce']:.5f} | {r['kd']:.5f} |")
    ok = [r for r in rows if not r["err"]]
    if len(ok) > 1:
        worst = max(abs(r["kd"] - ok[0]["kd"]) / max(abs(ok[0]["kd"]), 1e-12) for r in ok)
        print(f"\nmax relative GDKD difference between variants: {worst:.2e}")


if __name__ == "__main__":
    main()
