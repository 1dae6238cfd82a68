"""End-to-end generation benchmark: bf16 vs INT4 (W4A16 kernel) for 7B-class VLM students (issue 5).

    python launch/bench.py                                    # LLaVA-1.5-7B + Qwen2-VL-7B, bf16 + int4, batch 1 and 16
    python launch/bench.py --arch qwen2-vl-7b --batch 1 --variants int4
    python launch/bench.py --checkpoint runs/demo/final       # the trained demo student (its own config)
    python launch/bench.py --smoke                            # tiny configs on the CPU, 8 new tokens (CI check)
    python launch/bench.py --arch qwen2-vl-7b --int4-lm-head  # INT4 lm_head too (serving option, RTN)
    python launch/bench.py --serving                          # the fastest serving setup measured (every option)

What one measurement is (per architecture x variant x batch):
- prompt: one image (576 visual tokens: LLaVA 336 px CLIP; Qwen2-VL a 48x48-patch grid merged 2x2)
  + 64 random text tokens per row; random weights (no weights can be downloaded), greedy decoding,
  256 new tokens, EOS ignored so every run decodes the same number of steps;
- static KV cache (transformers StaticCache) for both variants, of exactly the prompt + the new tokens
  unless `--cache-len N` sizes it as a server would (for its longest request); the decode step (language model +
  lm_head + argmax on one token) is captured once as a CUDA graph and replayed (`--mode graph`, the
  default; `--mode compile` inductor-compiles the step, then graphs it, `--mode eager` neither); if
  capture fails the run falls back to eager and the table says so. The first 8 tokens of the replayed
  step are checked against 8 eager steps; where they differ, the note names the rows and the first
  differing token, and how far apart the eager top-2 logits were there, in steps of the logits' dtype
  (random weights give flat logits: a gap of a few steps is a near-tie that rounding can flip);
- time to first token = one prefill (vision tower + projector + LLM over the prompt + first token):
  the median of 3, after a warm-up prefill (until 2026-11-29: one prefill right after emptying the
  allocator cache, so its cudaMalloc calls were timed too); decode tokens/s = batch * steps / decode time;
- peak GPU memory = torch.cuda.max_memory_allocated / max_memory_reserved from just before the
  prefill to the end of decoding (model weights included, build-time temporaries excluded);
- bf16: the HF model with parameters on the meta device, then every parameter allocated and filled
  at random directly on the GPU in bf16; int4: the same, except that every decoder linear
  (QuantConfig's default include/exclude) is first replaced by a W4A16Linear holding random codes +
  scales packed for the kernel - no bf16 copy of those weights is ever allocated. lm_head stays
  bf16 (QAT does not train it) unless `--int4-lm-head` rounds it too (RTN, after the build);
- `--kv-int8`: the int4 variant keeps its KV cache in int8 (grace_ds.export.kv8: per-vector scales);
  on the GPU its decode attention is one Triton kernel over the int8 cache (grace_ds.export.kv8_triton);
- `--kv-int8-min-batch B`: with `--kv-int8`, the int8 cache only from batch B on (smaller batches keep
  the 16-bit cache, with `--attn16-kernel` its kernel): at LLaVA batch 1 the int8 cache's
  quantise-on-write kernels cost more than its smaller reads save (H200, 2026-11-29);
- `--kv-int8-auto`: the int8 cache only for the batches whose 16-bit cache would exceed half the INT4
  model's bytes (KV_INT8_AUTO_FRACTION; LLaVA-1.5-7B at batch 16, never Qwen2-VL-7B's 4 kv heads);
- `--serving`: every option of the fastest setup measured (H200, docs/export.md) in one flag:
  `--mode compile --int4-lm-head --int8-embed --int8-vision --fuse-proj --attn16-kernel --pdl
  --expandable-segments --triton-pdl --kv-int8-auto --prefill-tokens 2048` (explicit `--mode`,
  `--triton-pdl WHICH`, `--kv-int8` or a prefill option win);
- `--kv8-portable`: with `--kv-int8`, the portable multiply + reduce attention instead of the kernel
  (sets GRACE_KV8_TRITON=0; fused by `--mode compile`, slow eagerly); `--kv8-triton`, the kernel,
  is the default and stays accepted;
- `--int8-embed`: the int4 variant's token embeddings in int8, one scale per row
  (grace_ds.export.load.quantize_embeddings_; a memory option);
- `--int8-vision`: the int4 variant's vision encoder and projector linears in int8, one scale per
  output row, dequantised at each call (grace_ds.export.load.quantize_vision_; a memory option);
- `--attn16-kernel`: both variants decode over their 16-bit caches with the Triton split-K kernel
  (GQA-aware) instead of transformers' SDPA path, which repeats the kv heads at every step: the
  baseline then gets the same attention as the int8 cache's;
- `--profile-steps N`: also profile N decode steps and 2 prefills and report their kernel time by
  kind (W4A16 GEMM, attention, bf16 GEMM, inductor-fused, copies) and their top kernels;
- `--expandable-segments`: both variants' workers run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  (peak reserved memory nearer peak allocated);
- `--pdl`: the int4 variant's W4A16 kernels use programmatic dependent launch (Hopper);
- `--triton-pdl [all|inductor|attention]`: both variants' Triton kernels use it too: inductor's
  (`triton.enable_pdl`, `--mode compile`) and the attention, merge and int8 cache-write kernels
  (kv8_triton.set_pdl). H200, 2026-11-29: LLaVA-1.5-7B's INT4 batch-1 step 2.30 -> 1.93-1.96 ms, its
  bf16 step 4.52 -> 4.24 ms (docs/benchmarks.md);
- `--prefill-chunk N`: both variants run the prompt through the language model N tokens at a time
  (less activation memory at batch 16; the vision tower still sees every image at once);
- `--prefill-tokens N`: a token budget per prompt pass over the batch instead: one pass where the
  batch's prompts fit in N tokens, chunks of N // batch tokens per row where they do not;
- `--fuse-proj`: q/k/v and gate/up of every decoder layer become one GEMM each
  (grace_ds.export.fuse), in both variants, so the baseline gets the same launch savings;
Each (architecture, variant) runs in its own subprocess, so one failure (OOM, kernel build) does not
stop the others and memory numbers do not leak between variants. Output: a markdown table (card,
date, command) on stdout and in --out, raw numbers in --json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from grace_ds.export.io import atomic_write_text  # noqa: E402

DEFAULT_ARCHS = ("llava-1.5-7b", "qwen2-vl-7b")
SMOKE_ARCHS = ("tiny-llava", "tiny-qwen2vl")
TTFT_REPS = 3


# ============================================================================ model construction

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _random_fill_(model, device, dtype, seed=0):
    """Materialise every parameter still on meta with benchmark-grade random values (norm weights 1,
    biases 0, matrices N(0, 0.02)) directly on `device`."""
    from torch import nn

    g = torch.Generator(device=device).manual_seed(seed)
    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            lname = f"{mname}.{pname}".lower()
            if pname == "bias":
                t.zero_()
            elif p.dim() == 1 and ("norm" in lname or "ln" in lname):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)


def build_bf16(config, device, dtype, checkpoint=None):
    """bf16 model on `device`: a trained checkpoint, or random weights allocated directly on the device
    (meta construction + fill, the same path and the same weight statistics as the INT4 model)."""
    from grace_ds.export.load import build_empty_model, finish_model, model_class

    if checkpoint is not None:
        cls = model_class(config)
        # no device_map: it may need accelerate, which the GPU image lacks; demo students are small
        return cls.from_pretrained(str(checkpoint), dtype=dtype).to(device).eval()
    model = build_empty_model(config, dtype)
    _random_fill_(model, device, dtype)
    return finish_model(model, device)


def build_int4(config, device, dtype, seed=0):
    """Random INT4 student: no 16-bit weight of a quantised linear is ever allocated."""
    from tqdm.auto import tqdm

    from grace_ds.export.load import build_empty_model, finish_model, quantized_linear, replace_module, select_quant_layers

    model = build_empty_model(config, dtype)
    layers = select_quant_layers(model)
    if not layers:
        raise RuntimeError(f"no quantisable linears found in {config.model_type} (QuantConfig default include)")
    g = torch.Generator(device=device).manual_seed(seed)
    for name in tqdm(layers, desc="int4 layers", unit="layer", mininterval=5):
        lin = model.get_submodule(name)
        n, k = lin.out_features, lin.in_features
        codes = torch.randint(-8, 8, (n, k), generator=g, device=device, dtype=torch.int8)
        # uniform codes have std ~4.6: scales ~0.02/4.6 keep the weight scale of HF's init
        scales = torch.empty(n, k // 128, device=device, dtype=torch.float32).uniform_(0.003, 0.006, generator=g)
        bias = torch.zeros(n, device=device, dtype=dtype) if lin.bias is not None else None
        replace_module(model, name, quantized_linear(codes, scales, 4, 128, bias, dtype))
        del codes, scales
    _random_fill_(model, device, dtype, seed)
    return finish_model(model, device)


def build_packed(directory, device, dtype):
    from grace_ds.export.load import load_packed_model

    return load_packed_model(directory, device=device, dtype=dtype)


# ============================================================================ generation

# what each decode-step kernel is, by name (first match wins): the rows of --profile-steps' breakdown
KERNEL_KINDS = (
    # inductor names a fused kernel after the ops it absorbed: "..._rsqrt_view_w4a16_gemm_12" is an RMSNorm
    # feeding the GEMM, "..._cos_decode_attention_..." rotary + the query's int8 split before the attention
    ("inductor-fused (norms, rotary, cache writes, ...)", r"^triton_(poi|red|per)_"),
    ("W4A16 GEMM (kernels.w4a16)", r"w4a16|sk_finalize"),
    ("attention, int8 cache (Triton)", r"_kv8_decode_kernel"),
    ("attention, 16-bit cache (Triton)", r"_kv16_decode_kernel"),
    ("attention, split merge (Triton, either cache)", r"_kv8_merge_kernel"),
    ("attention (SDPA / flash / cuDNN)", r"fmha|flash|attention|sdpa|softmax|efficient"),
    ("bf16 GEMM (cuBLAS / CUTLASS)", r"gemm|gemv|sm90_xmma|cutlass|cublas|nvjet|splitKreduce"),
    ("copies and fills", r"copy|memcpy|memset|fill|cat|index"),
)


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profile_kernels(fn, n: int, is_cuda: bool) -> dict:
    """Time per call of fn (n calls, after one warm call) by kernel kind (KERNEL_KINDS) and the top
    kernels, from torch.profiler: device kernels on CUDA (as CUPTI traces them, inside CUDA graphs
    too), aten self times on the CPU. Sums of kernel times: the gaps between kernels are not in it
    (compare total_us with the call's wall time). On an H200 (2026-11-29) CUPTI traced every kernel
    of a replayed decode step; where a breakdown comes back empty (total 0), --mode eager profiles the
    same kernels launched one by one."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    fn()                                               # warm: nothing first-call in the window
    _sync("cuda" if is_cuda else "cpu")
    with profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        _sync("cuda" if is_cuda else "cpu")
    per_name: dict[str, list[float]] = {}
    for evt in prof.events():
        if is_cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA or not evt.device_time_total:
                continue
            t = evt.device_time_total
        else:
            if not evt.name.startswith("aten::") or not evt.self_cpu_time_total:
                continue
            t = evt.self_cpu_time_total
        c = per_name.setdefault(evt.name, [0, 0.0])
        c[0] += 1
        c[1] += t
    kinds: dict[str, float] = {}
    for name, (_, t) in per_name.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t / n
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:12]
    return dict(calls=n, device=is_cuda, total_us=sum(kinds.values()),
                kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
                top=[dict(name=name[:90], calls=c / n, us=t / n) for name, (c, t) in top])


def logit_steps(gap: float, top: float, dtype) -> float:
    """A logit gap in units of the logits' own resolution (the spacing of dtype's values at the top
    logit's magnitude): 0 or 1 is a tie as far as the model's dtype can tell."""
    if gap == 0 or not math.isfinite(top):
        return 0.0
    return gap / (math.ulp(abs(top)) * 2.0 ** 52 * torch.finfo(dtype).eps)   # eps = 2^-mantissa bits


def mismatch_info(differ: torch.Tensor, margins: torch.Tensor | None, dtype) -> dict | None:
    """None when no token differs, else {rows, first_step} and, where the eager steps recorded their logits'
    margins ((steps, rows, [top, gap]), StaticDecoder.margins), the widest top-2 gap among the rows that
    split first (eager_top, eager_gap, gap_steps). differ: (rows, tokens) bool, replayed != eager."""
    if not bool(differ.any()):
        return None
    mm = dict(rows=int(differ.any(1).sum()), first_step=int(differ.any(0).nonzero()[0]))
    k = mm["first_step"]
    if margins is not None and 1 <= k <= margins.shape[0]:
        # token k comes from decode step k; until then both runs fed the same tokens, so the eager logits there
        # say whether the two argmaxes split a near-tie (a few 16-bit steps apart) or something is wrong
        top, gap = margins[k - 1, differ[:, k].nonzero().flatten()].unbind(-1)
        i = int(gap.argmax())
        mm.update(eager_top=float(top[i]), eager_gap=float(gap[i]), gap_steps=logit_steps(float(gap[i]), float(top[i]), dtype))
    return mm


def tie_note(mm: dict) -> str:
    """The mismatch note's verdict on the eager logits where the tokens first split (bench's mismatch dict)."""
    if "eager_gap" not in mm:
        return ""
    steps = mm["gap_steps"]
    verdict = "a near-tie, which rounding differences between the compiled and the eager step can flip" if steps <= 8 \
        else "wider than rounding usually moves a logit: worth checking"
    return (f"; eager top-2 logits {mm['eager_gap']:.3g} apart at {mm['eager_top']:.3g}, {steps:.0f} "
            f"{'step' if round(steps) == 1 else 'steps'} of the logits' dtype: {verdict}")


def cache16_bytes(config, batch: int, length: int, dtype) -> int:
    """Bytes of a 16-bit static KV cache (keys and values, every layer) for `batch` rows of `length` positions."""
    tc = config.get_text_config()
    heads = tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return 2 * tc.num_hidden_layers * batch * kv_heads * head_dim * length * torch.finfo(dtype).bits // 8


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (packed INT4 weights are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


# the on/off options --serving turns on (with --mode compile, --triton-pdl all, --kv-int8-auto and
# --prefill-tokens 2048)
SERVING_FLAGS = ("int4_lm_head", "int8_embed", "int8_vision", "fuse_proj", "attn16_kernel", "pdl", "expandable_segments")

# --kv-int8-auto: the int8 cache where the 16-bit one would exceed this fraction of the INT4 model's bytes.
# H200, 2026-11-29: LLaVA-1.5-7B at batch 16 (a 16-bit cache of 1.9x its INT4 model) needs the int8 cache to
# save 60% of peak memory; Qwen2-VL-7B at batch 16 (0.19x) saves 60-61% over the 16-bit cache and decodes
# faster there (1.76x against 1.45x); at batch 1 (0.01-0.12x) the int8 cache's writes cost more than they save
KV_INT8_AUTO_FRACTION = 0.5


def use_kv_int8(args, model, config, batch: int, length: int, dtype) -> bool:
    """Whether this (variant, batch) decodes over the int8 cache: --kv-int8 (from --kv-int8-min-batch on) or
    --kv-int8-auto (by the 16-bit cache's size against the model's); the int4 variant only."""
    if args.variant != "int4":
        return False
    if args.kv_int8:
        return batch >= args.kv_int8_min_batch
    return bool(args.kv_int8_auto) and cache16_bytes(config, batch, length, dtype) > KV_INT8_AUTO_FRACTION * model_bytes(model)


def cache_length(args, prompt_len: int) -> int:
    """The static KV cache's positions: --cache-len, or exactly the prompt and the new tokens (full at the
    last step). A --cache-len the generation does not fit in is refused, naming both."""
    need = prompt_len + args.new_tokens
    if args.cache_len is None:
        return need
    if args.cache_len < need:
        raise ValueError(f"--cache-len {args.cache_len}: the prompt ({prompt_len} tokens) and --new-tokens "
                         f"{args.new_tokens} need {need} positions; give --cache-len >= {need} or fewer --new-tokens")
    return args.cache_len


@torch.no_grad()
def bench_batch(model, config, batch, args, device, dtype) -> dict:
    from grace_ds.export.arch import make_prompt
    from grace_ds.export.decode import StaticDecoder, chunk_for_budget

    inputs = make_prompt(config, batch, args.text_tokens, args.visual_tokens, device=device, dtype=dtype)
    prompt_len = inputs["input_ids"].shape[1]
    n_visual = int((inputs["input_ids"] == (config.image_token_index if config.model_type == "llava"
                                             else config.image_token_id)).sum()) // batch
    steps = args.new_tokens - 1  # the first new token comes from the prefill
    cache_len = cache_length(args, prompt_len)
    kv_int8 = use_kv_int8(args, model, config, batch, cache_len, dtype)
    kernel16 = bool(args.attn16_kernel and not kv_int8)
    dec = StaticDecoder(model, config, batch, cache_len, device, kv_int8=kv_int8, decode_kernel16=kernel16)
    is_cuda = torch.device(device).type == "cuda"

    chunk = args.prefill_chunk or chunk_for_budget(batch, prompt_len, args.prefill_tokens)

    def prefill():
        dec.prefill(inputs, chunk=chunk)

    prefill()  # warm-up: allocates the cache, autotunes, loads the kernel extension
    _sync(device)
    check = min(8, steps)
    dec.margins = []      # how close each eager argmax was, for a mismatch's note
    dec.run_steps(check)  # eager reference tokens for the graph check
    eager_tokens = dec.out[:, : check + 1].clone()
    margins = torch.stack(dec.margins).cpu() if dec.margins else None   # (steps, rows, [top, gap])
    dec.margins = None

    # time to first token: the median of TTFT_REPS prefills on warm allocator caches (a single
    # prefill right after empty_cache would time cudaMalloc calls and one-off hiccups too)
    ttfts = []
    for _ in range(TTFT_REPS):
        _sync(device)
        t0 = time.perf_counter()
        prefill()
        _sync(device)
        ttfts.append(time.perf_counter() - t0)
    ttft = statistics.median(ttfts)
    # peak memory: from an emptied cache, through one more prefill and the whole decode
    if is_cuda:
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private, so only where it exists
        if clear is not None:
            torch.cuda.synchronize()
            clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated()   # what the peak starts from: weights, and anything left over
    prefill()
    _sync(device)

    mode, note = args.mode if is_cuda else "eager", ""
    try:
        if mode == "graph":
            dec.capture()
        elif mode == "compile":
            dec.compile(pdl=args.triton_pdl in ("all", "inductor"))
            dec.capture()
    except Exception as exc:  # noqa: BLE001 - report, then measure the next mode down
        failed = f"{mode} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        print(f"[bench] {failed}", file=sys.stderr)
        traceback.print_exc()
        tried, dec.graph, dec.compiled, mode = mode, None, None, "eager"
        prefill()
        if tried == "compile":   # a failed compile still leaves the eager step to graph
            try:
                dec.capture()
                mode = "graph"
            except Exception as exc2:  # noqa: BLE001
                print(f"[bench] graph failed too ({type(exc2).__name__}: {exc2})", file=sys.stderr)
                dec.graph = None
                prefill()
        note = f"{failed}, {mode} used"
    _sync(device)
    t0 = time.perf_counter()
    dec.run_steps(steps)
    _sync(device)
    t_dec = time.perf_counter() - t0
    tokens = dec.out[:, : args.new_tokens]
    mismatch = mismatch_info((tokens[:, : check + 1] != eager_tokens).cpu(), margins, dtype)
    same = mismatch is None
    kernel_where = _kv8_attention(model, device)
    res = dict(batch=batch, prompt_len=prompt_len, visual_tokens=n_visual, new_tokens=args.new_tokens, cache_len=cache_len,
               ttft_s=ttft, decode_s=t_dec, decode_steps=steps, decode_tok_s=batch * steps / t_dec,
               ms_per_step=1000 * t_dec / steps, mode=mode, graph_matches_eager=same, mismatch=mismatch, note=note,
               prefill_chunk=chunk,
               kv_cache="int8" if kv_int8 else "16-bit",
               # what attended over the int8 cache, or over the 16-bit one (the kernel runs where Triton does)
               kv8_attention=kernel_where if kv_int8 else None,
               decode_attention=None if kv_int8 else "triton16" if kernel16 and kernel_where == "triton" else "sdpa")
    if is_cuda:
        res.update(peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30, start_alloc_gib=start_alloc / 2**30)
    # after the memory figures: a profiled window is not what is measured
    n_prof = min(args.profile_steps, steps - 1)   # + 1 warm step: the cache holds new_tokens positions past the prompt
    if n_prof > 0:
        try:   # a profiler failure costs the breakdown, not the measured row
            prefill()
            res["profile"] = profile_kernels(lambda: dec.run_steps(1), n_prof, is_cuda)
            res["profile_prefill"] = profile_kernels(prefill, 2, is_cuda)
        except Exception as exc:  # noqa: BLE001
            res["profile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            print(f"[bench] --profile-steps failed: {res['profile_error']}", file=sys.stderr)
    release(dec, is_cuda)
    return res


def release(dec, is_cuda: bool) -> None:
    """Let the decoder of a finished batch go before the next batch is measured: its CUDA graph, compiled step
    (and torch.compile's caches of it) and KV cache, so that the next batch's peak memory holds only its own.
    Why: on an H200 (2026-11-29 22:31) LLaVA-1.5-7B INT4 at batch 16 peaked at 8.50 GiB after batch 1 in the
    same worker and at 8.00 GiB alone (batch 1's 16-bit cache is 0.47 GB). What stayed allocated is not
    established (on the CPU a dropped decoder's cache is freed, compiled or not), nor whether this closes the
    gap: measure `--batch 1 16` against `--batch 16`. On an H200 (2026-11-30 00:10, tiny LLaVA, graph mode)
    a batch after another still peaked 32 MiB higher: a cuBLAS workspace for the capture's warm-up stream
    (now one stream per device, grace_ds.export.decode). cuBLAS's workspaces are cleared in bench_batch, right
    before each batch's peak is reset, not here."""
    import gc

    dec.graph = dec.compiled = None
    dec.cache = None
    torch._dynamo.reset()
    gc.collect()
    if is_cuda:
        torch.cuda.empty_cache()


def worker(args) -> None:
    """One (architecture, variant): build the model once, measure every batch size, write JSON."""
    import transformers

    from grace_ds.export.arch import bench_config
    from grace_ds.export.load import quantized_backends

    device = args.device
    dtype = getattr(torch, args.dtype)
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    result = dict(arch=args.arch, variant=args.variant, dtype=args.dtype, device=device, runs=[], error=None)
    try:
        t0 = time.perf_counter()
        if args.arch.startswith("checkpoint:"):
            ckpt = Path(args.arch.split(":", 1)[1])
            config = transformers.AutoConfig.from_pretrained(str(ckpt))
            if args.variant == "bf16":
                model = build_bf16(config, device, dtype, checkpoint=ckpt)
            else:
                packed = ckpt if "grace_packed" in json.loads((ckpt / "config.json").read_text()) else None
                if packed is None:  # pack the final export dir on the fly (verification included)
                    from grace_ds.export.convert import convert_checkpoint

                    packed = Path(tempfile.mkdtemp(prefix="grace_bench_packed_"))
                    convert_checkpoint(ckpt, packed, "grace", allow_dequant=True, progress=False,
                                       log=lambda s: print(s, file=sys.stderr))
                model = build_packed(packed, device, dtype)
        else:
            config = bench_config(args.arch)
            model = build_bf16(config, device, dtype) if args.variant == "bf16" else build_int4(config, device, dtype)
        if args.fuse_proj:
            from grace_ds.export.fuse import fuse_projections_

            result["fused_groups"] = fuse_projections_(model, glu=args.glu)
            result["glu_mlps"] = sum("fused gate/up + SiLU" in type(m).__qualname__ for m in model.modules())
            if args.fuse_norm and args.variant == "int4":
                from grace_ds.export.fuse import fold_norms_

                result["folded_norms"] = fold_norms_(model)
        if args.variant == "int4" and args.int4_lm_head:
            from grace_ds.export.load import quantize_lm_head_

            quantize_lm_head_(model)
            result["lm_head"] = "int4 (RTN)"
        if args.variant == "int4" and args.int8_embed:
            from grace_ds.export.load import quantize_embeddings_

            quantize_embeddings_(model)
            result["embed_tokens"] = "int8"
        if args.variant == "int4" and args.int8_vision:
            from grace_ds.export.load import quantize_vision_

            result["vision"] = f"int8 ({quantize_vision_(model)} linears)"
        if args.triton_pdl in ("all", "attention") and torch.device(device).type == "cuda":
            from grace_ds.export import kv8_triton

            kv8_triton.set_pdl(True)
            result["triton_pdl"] = args.triton_pdl
        if args.variant == "int4" and args.pdl and torch.device(device).type == "cuda":
            import kernels.w4a16 as kw

            kw.set_pdl(True)   # after the build, fusion and the head: every weight is in place
            result["pdl"] = True
        if args.variant == "int4" and torch.device(device).type == "cuda":
            import kernels.w4a16.op as kop

            kop.load_extension()
            result["w4a16_tuned"] = kop.TUNED   # measured per-shape choices (tuned/<card>.json), if any
        _sync(device)
        result["build_s"] = time.perf_counter() - t0
        result["backends"] = quantized_backends(model)
        if is_cuda:
            torch.cuda.empty_cache()
            result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
            result["build_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for b in args.batch:
            try:
                r = bench_batch(model, config, b, args, device, dtype)
            except torch.cuda.OutOfMemoryError as exc:
                r = dict(batch=b, error=f"OOM: {str(exc).splitlines()[0][:200]}")
                torch.cuda.empty_cache()
            print(f"[bench] {args.arch} {args.variant} batch {b}: {json.dumps(r)}", file=sys.stderr)
            result["runs"].append(r)
            # each finished batch is on disk at once: a worker the parent kills for time keeps its rows
            unfinished = args.batch[len(result["runs"]):]
            atomic_write_text(Path(args.json_out), json.dumps(dict(result, unfinished=unfinished), indent=2))
    except Exception as exc:  # noqa: BLE001 - the parent prints it in the table
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    atomic_write_text(Path(args.json_out), json.dumps(result, indent=2))


# ============================================================================ orchestration + report

def after_timeout(out: Path, arch: str, variant: str, args) -> dict:
    """The result of a worker stopped for time: the batches it finished (it writes its JSON after
    each one) and an error row for each batch it did not."""
    res = json.loads(out.read_text()) if out.exists() else dict(arch=arch, variant=variant, runs=[])
    todo = res.pop("unfinished", args.batch)
    res["runs"] += [dict(batch=b, error=f"timed out: the worker was stopped (--timeout {args.timeout} / --budget); "
                                        f"run it alone with a longer --timeout") for b in todo]
    if not any("error" not in r for r in res["runs"]):
        res["error"] = "timed out (--timeout / --budget)"
    return res


KV8_NAMES = {"triton": "one Triton kernel (grace_ds.export.kv8_triton)",
             "portable": "the portable multiply + reduce form (no GPU or Triton, or --kv8-portable)"}
DECODE16_NAMES = {"triton16": "the Triton split-K kernel (--attn16-kernel)", "sdpa": "transformers' SDPA (no GPU or Triton)"}


def _attention_used(results: list[dict], key: str, names: dict[str, str]) -> str:
    """What the runs' `key` field says attended (names: its values' descriptions), for the table's header."""
    kinds = sorted({run[key] for r in results for run in r.get("runs", []) if run.get(key)})
    return " / ".join(names[k] for k in kinds) or "-"


def _kv8_attention(model, device) -> str:
    """Which decode attention reads the int8 cache in this worker: "triton" or "portable"."""
    from grace_ds.export import kv8_triton

    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return "triton" if kv8_triton.available(torch.empty(1, 1, 1, head_dim, device=device)) else "portable"


def _card(device) -> str:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _caches_chosen(results: list[dict]) -> str:
    """'arch batch b: int8, ...' for the int4 runs (the cache --kv-int8-auto chose)."""
    got = [f"{res['arch']} batch {r['batch']}: {r['kv_cache']}" for res in results if res.get("variant") == "int4"
           for r in res.get("runs", []) if "kv_cache" in r]
    return ", ".join(got) or "no run finished"


def render(results: list[dict], args, command: str) -> str:
    lines = ["## End-to-end generation: bf16 vs INT4 (W4A16)",
             "",
             f"- card: {_card(args.device)}; torch {torch.__version__}; date {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `{command}`",
             f"- prompt: 1 image + {args.text_tokens} text tokens; {args.new_tokens} new tokens, greedy; static KV cache"
             + (f" of {args.cache_len} positions (--cache-len)" if args.cache_len else "") + "; "
             f"decode step mode requested: {args.mode}; random weights"
             + ("; int4 variant: lm_head rounded to INT4 too (--int4-lm-head)" if args.int4_lm_head else "")
             + ("; int4 variant: token embeddings in int8 (--int8-embed)" if args.int8_embed else "")
             + ("; int4 variant: vision encoder and projector linears in int8 (--int8-vision)" if args.int8_vision else "")
             + ("; q/k/v and gate/up fused into one GEMM each, both variants (--fuse-proj)" if args.fuse_proj else "")
             + ("; int4 variant: KV cache in int8 (--kv-int8)" if args.kv_int8 else "")
             + (f" from batch {args.kv_int8_min_batch} on, 16-bit below (--kv-int8-min-batch)"
                if args.kv_int8 and args.kv_int8_min_batch > 1 else "")
             + (f", its decode attention: {_attention_used(results, 'kv8_attention', KV8_NAMES)}" if args.kv_int8 else "")
             + (f"; int4 variant: KV cache by size (--kv-int8-auto): {_caches_chosen(results)}" if args.kv_int8_auto else "")
             + (f"; decode attention over 16-bit caches: {_attention_used(results, 'decode_attention', DECODE16_NAMES)}"
                if args.attn16_kernel else "")
             + (f"; prefill in chunks of {args.prefill_chunk} tokens, both variants" if args.prefill_chunk else "")
             + (f"; prefill in passes of at most {args.prefill_tokens} tokens over the batch (--prefill-tokens), both "
                f"variants" if args.prefill_tokens else "")
             + ("; int4 variant: programmatic dependent launch (--pdl)" if args.pdl else "")
             + (f"; both variants: programmatic dependent launch for the Triton kernels (--triton-pdl {args.triton_pdl})"
                if args.triton_pdl else "")
             + "".join(sorted({f"; int4 variant: W4A16 configs from the card's tuned table ({Path(t[0]).name}, "
                               f"{t[1]} shapes; kernels/w4a16/sweep_decode.py)" for res in results
                               if (t := res.get("w4a16_tuned"))}))
             + ("; both variants: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (--expandable-segments)"
                if args.expandable_segments else ""),
             "",
             "| model | variant | batch | prompt (visual) | TTFT ms | decode tok/s | ms/step | peak alloc GiB | peak reserved GiB | weights GiB | mode | linears | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        backends = ", ".join(f"{k}: {v}" for k, v in (res.get("backends") or {}).items()) or "bf16"
        if res.get("error") and not res.get("runs"):
            lines.append(f"| {res['arch']} | {res['variant']} | - | - | - | - | - | - | - | - | - | - | FAILED: {res['error']} |")
            continue
        for r in res["runs"]:
            if "error" in r:
                lines.append(f"| {res['arch']} | {res['variant']} | {r['batch']} | - | - | - | - | - | - | - | - | - | {r['error']} |")
                continue
            note = r.get("note", "")
            if not r.get("graph_matches_eager", True):
                mm = r.get("mismatch") or {}
                note = (note + "; " if note else "") + "replayed tokens != eager tokens" + (
                    f" ({mm['rows']} of {r['batch']} rows, from token {mm['first_step']}{tie_note(mm)})" if mm else "")
            lines.append(
                f"| {res['arch']} | {res['variant']} | {r['batch']} | {r['prompt_len']} ({r['visual_tokens']}) | "
                f"{1000 * r['ttft_s']:.1f} | {r['decode_tok_s']:.1f} | {r['ms_per_step']:.2f} | "
                f"{_fmt(r.get('peak_alloc_gib'), '.2f')} | {_fmt(r.get('peak_reserved_gib'), '.2f')} | "
                f"{_fmt(res.get('weights_gib'), '.2f')} | {r['mode']} | {backends} | {note} |")
    # speed-ups of int4 over bf16 for the same model and batch
    by = {(res["arch"], res["variant"], r["batch"]): r for res in results for r in res.get("runs", []) if "error" not in r}
    rows = []
    for (arch, variant, b), r in sorted(by.items()):
        base = by.get((arch, "bf16", b))
        if variant == "bf16" or base is None:
            continue
        mem = "-"
        if r.get("peak_reserved_gib") and base.get("peak_reserved_gib"):
            mem = f"{100 * (1 - r['peak_reserved_gib'] / base['peak_reserved_gib']):.0f}% / " \
                  f"{100 * (1 - r['peak_alloc_gib'] / base['peak_alloc_gib']):.0f}%"
        target = {1: "3.2x", 16: "2.5x"}.get(b, "-")
        rows.append(f"| {arch} | {variant} | {b} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x (target {target}) | "
                    f"{base['ttft_s'] / r['ttft_s']:.2f}x | {mem} (target >= 60%) |")
    if rows:
        lines += ["", "| model | variant | batch | decode speed-up vs bf16 | TTFT speed-up | peak memory saved (reserved / alloc) |",
                  "|---|---|---|---|---|---|"] + rows
    profiled = [(res, r, key) for res in results for r in res.get("runs", []) for key in ("profile", "profile_prefill")
                if r.get(key)]
    for res, r, key in profiled:
        prof = r[key]
        what = "kernel time on the GPU" if prof["device"] else "aten self time on the CPU"
        unit, wall = ("decode step", f"step {1000 * r['ms_per_step']:.0f} us") if key == "profile" else \
            ("prefill", f"TTFT {1e6 * r['ttft_s']:.0f} us")
        lines += ["", f"{unit.capitalize()} of {res['arch']} {res['variant']} batch {r['batch']}: {what} by kind, per "
                      f"{unit} (torch.profiler over {prof['calls']}; sum {prof['total_us']:.0f} us, {wall})", "",
                  f"| kind | us per {unit} | % of the sum |", "|---|---|---|"]
        lines += [f"| {k} | {t:.1f} | {100 * t / max(prof['total_us'], 1e-9):.0f}% |" for k, t in prof["kinds"].items()]
        lines += ["", f"| top kernels | calls per {unit} | us per {unit} |", "|---|---|---|"]
        lines += [f"| `{t['name']}` | {t['calls']:.0f} | {t['us']:.1f} |" for t in prof["top"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=None,
                   help=f"architectures (default {' '.join(DEFAULT_ARCHS)}; smoke: {' '.join(SMOKE_ARCHS)}; "
                        f"none when only --checkpoint is given)")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="also benchmark a trained student: a final export dir (packed on the fly) or a packed dir")
    p.add_argument("--variants", nargs="+", default=["bf16", "int4"], choices=["bf16", "int4"])
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 16; smoke: 1 2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="activation / 16-bit dtype")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 256; smoke: 8)")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--cache-len", type=int, default=None, metavar="N",
                   help="static KV cache of N positions, both variants (default: the prompt + --new-tokens, full at the "
                        "last step). A server sizes its cache for its longest request; the decode attention kernels then "
                        "read only the decoded positions where kv8_triton.bounded says so")
    p.add_argument("--visual-tokens", type=int, default=576, help="visual tokens per image (Qwen: grid chosen to match)")
    p.add_argument("--mode", default=None, choices=["graph", "compile", "eager"],
                   help="decode-step execution (default graph; compile with --serving)")
    p.add_argument("--device", default=None, help="default cuda if available (smoke: cpu)")
    p.add_argument("--timeout", type=int, default=400, help="seconds per (architecture, variant) subprocess")
    p.add_argument("--budget", type=int, default=560,
                   help="seconds for the whole run: jobs that would not fit are skipped (and listed), so the "
                        "table is always printed inside a 10-minute command limit")
    p.add_argument("--int4-lm-head", action="store_true",
                   help="int4 variant: also round lm_head to INT4 (RTN, group 128; not trained by QAT, so its "
                        "accuracy cost is the user's to check). It is read in full at every decode step")
    p.add_argument("--int8-embed", action="store_true",
                   help="int4 variant: token embeddings in int8 with one scale per row (memory: Qwen2-VL-7B's "
                        "table is 1.09 GB in bf16; not trained by QAT, rounding error <= row absmax / 254)")
    p.add_argument("--int8-vision", action="store_true",
                   help="int4 variant: vision encoder and projector linears in int8 with one scale per output row "
                        "(memory: Qwen2-VL-7B's vision tower is 1.3 GB in bf16; not trained by QAT, rounding "
                        "error <= row absmax / 254)")
    p.add_argument("--fuse-proj", action="store_true",
                   help="both variants: fuse each layer's q/k/v and gate/up projections into one GEMM each "
                        "(grace_ds.export.fuse)")
    p.add_argument("--glu", action="store_true",
                   help="with --fuse-proj: gated SiLU MLPs call w4a16_gemm_glu (the activation in the gate/up GEMM's "
                        "epilogue at decode; kernels/NOTES.md v15) instead of the GEMM, then the activation as a "
                        "separate kernel. Both variants (bf16: same math as without). Opt-in: 1-2.5%% faster at batch 1 "
                        "on an H200 with the tuned per-shape PDL bit, within noise")
    p.add_argument("--fuse-norm", action="store_true",
                   help="int4 variant, with --fuse-proj: each decoder layer's RMSNorms move into the fused q/k/v and "
                        "gate/up GEMMs after them (grace_ds.export.fuse.fold_norms_; one kernel at decode where the "
                        "op's config has the fold, kernels/NOTES.md v21). Opt-in: built 2026-11-30, not yet measured")
    p.add_argument("--pdl", action="store_true",
                   help="int4 variant on CUDA: programmatic dependent launch for the W4A16 decode kernels "
                        "(kernels.w4a16.set_pdl)")
    p.add_argument("--triton-pdl", nargs="?", const="all", default=None, choices=["all", "inductor", "attention"],
                   help="both variants on a Hopper GPU: programmatic dependent launch for the Triton kernels too - "
                        "inductor's (triton.enable_pdl, with --mode compile) and the attention, merge and int8 "
                        "cache-write kernels (kv8_triton.set_pdl); `inductor` or `attention`: only those")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="both variants: prompt tokens per language-model pass at prefill (chunked prefill)")
    p.add_argument("--prefill-tokens", type=int, default=None, metavar="N",
                   help="both variants: at most N prompt tokens per language-model pass over the whole batch (a token "
                        "budget, as serving engines chunk prefills): batch 1 x 640 tokens runs in one pass at N=2048, "
                        "batch 16 in chunks of N // 16 tokens per row")
    p.add_argument("--kv-int8", action="store_true",
                   help="int4 variant: KV cache in int8 with per-vector scales (grace_ds.export.kv8); its decode "
                        "attention is the Triton kernel where Triton runs, else the portable form, which wants "
                        "--mode compile (it fuses the int8 reads into the attention reductions)")
    p.add_argument("--kv-int8-auto", action="store_true",
                   help="int4 variant: the int8 KV cache for the batches whose 16-bit cache would exceed half the INT4 "
                        "model's bytes, the 16-bit cache for the others (measured: LLaVA-1.5-7B gets it at batch 16 only, "
                        "Qwen2-VL-7B never)")
    p.add_argument("--serving", action="store_true",
                   help="the fastest serving setup measured (H200, 2026-11-29; docs/export.md): --mode compile "
                        + " ".join("--" + n.replace("_", "-") for n in SERVING_FLAGS)
                        + " --triton-pdl --kv-int8-auto and, unless a prefill option is given, --prefill-tokens 2048")
    p.add_argument("--kv-int8-min-batch", type=int, default=1, metavar="B",
                   help="with --kv-int8: the int8 cache only for batches of at least B; smaller ones keep the 16-bit "
                        "cache (and, with --attn16-kernel, its kernel). Default 1: every batch")
    p.add_argument("--attn16-kernel", action="store_true",
                   help="both variants: decode steps over a 16-bit KV cache use the Triton split-K kernel "
                        "(grace_ds.export.kv8.enable_decode16; each kv head read once for its query heads) instead "
                        "of transformers' SDPA path, which repeats the kv heads (GQA) at every step when given a mask")
    p.add_argument("--kv8-portable", action="store_true",
                   help="with --kv-int8: the portable decode attention instead of the Triton kernel "
                        "(sets GRACE_KV8_TRITON=0 for the workers)")
    p.add_argument("--kv8-triton", action="store_true",
                   help="with --kv-int8: the Triton decode attention (the default; kept for recorded commands)")
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="also profile N decode steps and 2 prefills (torch.profiler) and report their kernel time by "
                        "kind (W4A16, attention, bf16 GEMM, inductor-fused, copies) and their top kernels")
    p.add_argument("--expandable-segments", action="store_true",
                   help="both variants: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the workers, so the "
                        "caching allocator can grow segments in place instead of keeping freed blocks it cannot reuse "
                        "(peak reserved memory sat 2-4 GiB above allocated for INT4 on an H200)")
    p.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, 8 new tokens, eager")
    p.add_argument("--in-process", action="store_true", help="run the workers in this process (debugging, tests)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--json", default=None, help="also write the raw results here")
    # internal: one worker
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode is None:
        args.mode = "compile" if args.serving else "graph"
    if args.serving:
        for name in SERVING_FLAGS:
            setattr(args, name, True)
        if not args.kv_int8:
            args.kv_int8_auto = True
        if args.triton_pdl is None:
            args.triton_pdl = "all"
        if args.prefill_tokens is None and args.prefill_chunk is None:
            args.prefill_tokens = 2048
    if args.smoke:
        args.arch = args.arch if args.arch is not None else ([] if args.checkpoint else list(SMOKE_ARCHS))
        args.batch = args.batch or [1, 2]
        args.new_tokens = args.new_tokens or 8
        args.device = args.device or "cpu"
        args.visual_tokens = min(args.visual_tokens, 16)
        args.text_tokens = min(args.text_tokens, 8)
        if args.device == "cpu":
            args.dtype = "bfloat16"
    args.arch = args.arch if args.arch is not None else ([] if args.checkpoint else list(DEFAULT_ARCHS))
    args.batch = args.batch or [1, 16]
    args.new_tokens = args.new_tokens or 256
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.new_tokens < 2:
        p.error(f"--new-tokens {args.new_tokens}: need at least 2 (one from the prefill, one decoded)")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        p.error(f"--prefill-chunk {args.prefill_chunk}: must be a positive number of tokens (e.g. 128)")
    if args.prefill_tokens is not None and args.prefill_tokens < 1:
        p.error(f"--prefill-tokens {args.prefill_tokens}: must be a positive number of tokens (e.g. 2048)")
    if args.kv_int8_min_batch < 1:
        p.error(f"--kv-int8-min-batch {args.kv_int8_min_batch}: must be a batch size >= 1 (e.g. 16)")
    if args.kv_int8 and args.kv_int8_auto:
        p.error("--kv-int8 and --kv-int8-auto: choose one (every batch from --kv-int8-min-batch on, or by cache size)")
    if args.kv_int8_min_batch > 1 and not args.kv_int8:
        p.error(f"--kv-int8-min-batch {args.kv_int8_min_batch}: only means something with --kv-int8")
    if args.prefill_tokens and args.prefill_chunk:
        p.error("--prefill-chunk and --prefill-tokens: choose one (a fixed chunk per row, or a token budget per pass)")
    if args.fuse_norm and not args.fuse_proj:
        p.error("--fuse-norm moves the RMSNorms into the fused q/k/v and gate/up GEMMs: add --fuse-proj (or --serving)")
    return args


# options the parent hands to every worker as given (a flag when set, or the flag and its value)
FORWARDED = ("int4_lm_head", "int8_embed", "int8_vision", "attn16_kernel", "profile_steps", "fuse_proj", "glu", "kv_int8",
             "kv_int8_auto", "kv_int8_min_batch", "pdl", "triton_pdl", "prefill_chunk", "prefill_tokens", "cache_len",
             "fuse_norm")


def _forwarded(args) -> list[str]:
    out = []
    for name in FORWARDED:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (None, False, 0):
            out += [flag, str(value)]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kv8_portable and args.kv8_triton:
        raise SystemExit("--kv8-portable and --kv8-triton: choose one decode attention for the int8 cache")
    if args.kv8_portable or args.kv8_triton:   # read by kv8_triton.available(), here and in the workers
        os.environ["GRACE_KV8_TRITON"] = "0" if args.kv8_portable else "1"
    if args.worker:
        args.arch = args.arch[0]
        worker(args)
        return 0
    t_start = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    command = "python launch/bench.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.expandable_segments:   # read by each worker's CUDA caching allocator at its first allocation
        conf = [c for c in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").split(",") if c and "expandable_segments" not in c]
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(conf + ["expandable_segments:True"])
    if torch.device(args.device).type == "cuda" and "int4" in args.variants:
        # build the kernel extension once, up front (cached), so no worker pays for it inside its timeout
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-c", "import kernels.w4a16 as k; k.load_extension(verbose=False)"],
                               cwd=ROOT, timeout=max(30, int(left() / 2)),
                               env=dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"))
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"[bench] kernel extension build/load: rc {rc}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    jobs = [(a, v) for a in args.arch for v in args.variants] + \
           [(f"checkpoint:{Path(c).resolve()}", v) for c in args.checkpoint for v in args.variants]
    results = []
    with tempfile.TemporaryDirectory(prefix="grace_bench_") as tmp:
        for i, (arch, variant) in enumerate(jobs):
            out = Path(tmp) / f"{i}.json"
            wargs = ["--worker", "--arch", arch, "--variant", variant, "--json-out", str(out),
                     "--batch", *map(str, args.batch), "--dtype", args.dtype, "--new-tokens", str(args.new_tokens),
                     "--text-tokens", str(args.text_tokens), "--visual-tokens", str(args.visual_tokens),
                     "--mode", args.mode, "--device", args.device] + _forwarded(args)
            print(f"[bench] {arch} {variant} ... ({left():.0f} s of the budget left)", file=sys.stderr, flush=True)
            if left() < 45:
                results.append(dict(arch=arch, variant=variant, runs=[],
                                    error=f"skipped: --budget {args.budget} s spent; run it alone (--arch {arch})"))
                continue
            if args.in_process:
                wa = parse_args(wargs)
                wa.arch = arch
                worker(wa)
            else:
                try:
                    subprocess.run([sys.executable, str(Path(__file__).resolve()), *wargs], cwd=ROOT,
                                   timeout=int(min(args.timeout, left() - 10)),
                                   env=dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"))
                except subprocess.TimeoutExpired:
                    atomic_write_text(out, json.dumps(after_timeout(out, arch, variant, args)))
            if out.exists():
                results.append(json.loads(out.read_text()))
            else:
                results.append(dict(arch=arch, variant=variant, runs=[], error="worker died without a result (see stderr)"))
    table = render(results, args, command)
    print(table)
    if args.out:
        atomic_write_text(Path(args.out), table)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(dict(command=command, card=_card(args.device), results=results), indent=2))
    failed = [r for r in results if r.get("error") or any("error" in x for x in r.get("runs", []))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
