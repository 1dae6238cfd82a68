"""Decode attention over the packed int8 KV cache as one Triton kernel (split-K flash decoding).

`grace_ds.export.kv8` stores, per (row, kv head), the cached vectors as rows of head_dim int8 codes
followed by one contiguous array of their fp32 scales. Its portable decode attention (multiply + reduce,
fused by inductor) is correct but slow on the GPU: on an H200 it tripled the attention time of
LLaVA-1.5-7B at batch 16 (docs/benchmarks.md). This kernel reads the cache once, at one byte per
value (on an H200, one layer of LLaVA-1.5-7B at batch 16: 52 us against 187 us for the portable form
and 65 us for SDPA over the bf16 cache; benchmarks/bench_kv8_attention.py):

- grid (batch x kv heads, splits): each program takes the G = H / H_kv query heads of one kv head
  (GQA) and one slice of the positions, and walks it in blocks of LAUNCH["block"] positions;
- scores: the query (padded to 16 rows for tl.dot) is split into two int8 parts, q * 127 / |q|max
  ~ hi + lo / 254, and multiplied with the key codes as stored on int8 tensor cores (exact int32
  sums), then times |q|max / 127, the key scale, the softmax scaling, plus the mask bias (SageAttention
  uses int8 scores the same way; the second part keeps the query finer than fp16);
- online softmax; out += (p * v_scale / block max) . v_codes on fp16 tensor cores, times the block's
  max scale. The value codes are loaded as int32 words and turned into fp16 in registers by byte
  arithmetic (exact for |code| <= 127; inline PTX, five instructions per four codes), before tl.dot's
  layout change: as int8, Triton read them back from shared memory one byte at a time;
- a block's keys and values are loaded before either is used, so both are in flight at once;
- each program writes its running max, sum and unnormalised output; a second small kernel merges
  the splits (one program per row and head) and writes the result in the query's dtype. With one split
  per (row, kv head) the program writes its normalised output itself and the merge kernel does not run
  (LAUNCH["fold"]);
- the slices: fixed over the cache's positions, each walk stopped after its slice's last attended position
  (LAUNCH["bound"]), or, over long caches with several splits, cut from the row's attended positions
  (LAUNCH["spread"]), so that a static cache sized for long requests costs its decoded length.

The same module holds the cache's write kernel (`write_kv`): one program per new (key or value, row, kv
head, position) vector computes round_int8's codes and scale and stores them into the packed cache.

The probabilities are rounded to fp16 before the value product, as in flash attention; the result
matches a float64 reference to 16-bit accuracy (tests/test_kv8_triton.py, run on the CPU with
Triton's interpreter and on the GPU). Every option in LAUNCH can be switched off, back to plain
int8 -> fp16 casts and fp16 dots (the kernel as first measured).
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: kv8 keeps its portable attention
    triton = None

MIN_ROWS = 16          # tl.dot's smallest M
# Launch parameters and kernel options (benchmarks/bench_kv8_attention.py --sweep times the alternatives):
# positions per block, warps and pipeline stages per program, the number of programs the splits aim at;
# skip: masked positions' codes are not loaded (slower on an H200: the loads wait for the mask);
# bound: a program's walk ends after the last position of its slice that the bias does not mask (-inf), so a
# static cache is read up to the decoded length, not to its capacity (its bias is searched first; "auto": where
# that can pay, see bounded);
# spread: the splits share the row's attended positions instead of the cache's capacity (the whole row's bias is
# searched first; "auto": several splits and a long cache, see spreads; it takes precedence over bound);
# fold: with one split per (row, kv head) the attention kernel normalises and writes the output itself, and no merge
# kernel runs (_finish; "fold" False: always the merge kernel);
# asm: int8 -> fp16 by byte arithmetic in inline PTX, not one I2F per value; vwords: the value codes
# loaded as int32 words and converted before tl.dot's transposed layout (fp16 takes ldmatrix.trans;
# int8 came back from shared memory one byte per load); qk_int8: scores by int8 tensor-core dots
# (a two-part int8 query; no conversion of the keys). Defaults: the fastest on an
# H200 for LLaVA-1.5-7B at batch 16 and within 0.3 us of it for the other cases (2026-11-29 10:58 UTC,
# docs/benchmarks.md).
LAUNCH = {"block": 128, "num_warps": 4, "num_stages": 3, "programs": 264, "skip": False, "asm": True, "vwords": True,
          "qk_int8": True, "bound": "auto", "spread": "auto", "fold": True}
# The 16-bit kernel's (decode_attention16): the fastest of the sweep's 24 launches on an H200 for both
# models at batch 16 (LLaVA-1.5-7B 60.9 us = 95% of the copy rate; Qwen2-VL-7B 16.1 us) and within 0.2 us
# of it at batch 1 (2026-11-29 12:45 UTC, docs/benchmarks.md).
LAUNCH16 = {"block": 32, "num_warps": 4, "num_stages": 3, "programs": 264, "bound": "auto", "spread": "auto",
            "fold": True}
if os.environ.get("GRACE_KV8_FOLD") == "0":   # A/B runs (launch/bench.py workers inherit it): the merge kernel again
    LAUNCH["fold"] = LAUNCH16["fold"] = False
# Programmatic dependent launch for every kernel of this module (set_pdl; Hopper, off by default): each is
# launched with Triton's launch_pdl and waits (gdc_wait) before it reads anything, so it may be scheduled
# while the kernel before it finishes. None of them lets the next kernel launch early
# (gdc_launch_dependents): the kernel after the merge may be one that does not wait for it (a library
# GEMM), and an early trigger in the merge measured no faster (H200, 2026-11-29: LLaVA-1.5-7B INT4 batch 1
# 1.93-1.96 ms a step with it, 1.95 without; docs/benchmarks.md).
_PDL = {"on": False}


def set_pdl(on: bool = True) -> None:
    """Programmatic dependent launch for the attention, merge and cache-write kernels (Hopper, Triton with
    launch_pdl and tl.extra.cuda.gdc_wait); process-wide, off by default. Results are unchanged: every
    kernel waits for the one before it before its first load."""
    if on:
        if triton is None or not hasattr(tl.extra.cuda, "gdc_wait"):
            raise ValueError("kv8_triton.set_pdl: this Triton has no tl.extra.cuda.gdc_wait (needs Triton >= 3.4); "
                             "leave it off")
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
            raise ValueError(f"kv8_triton.set_pdl: programmatic dependent launch needs a Hopper GPU (sm_90+), this is "
                             f"{torch.cuda.get_device_name()}; leave it off")
    _PDL["on"] = bool(on)


def _pdl_launch() -> dict:
    """The PDL constexpr and launch option of this module's kernels (none in Triton's interpreter)."""
    on = _PDL["on"] and os.environ.get("TRITON_INTERPRET") != "1"
    return dict(PDL=True, launch_pdl=True) if on else {}


def takes_head_dim(d: int) -> bool:
    """The kernel's head dims: powers of two >= 16 (tl.arange sizes and tl.dot's smallest K)."""
    return d >= 16 and not d & (d - 1)


def available(query: torch.Tensor) -> bool:
    """Whether the kernel runs for this query: Triton importable and a CUDA tensor (or Triton's
    interpreter, TRITON_INTERPRET=1, for tests), unless GRACE_KV8_TRITON=0 (`launch/bench.py
    --kv8-portable` sets it). On by default since its H200 measurement: 3.6x as fast as the portable
    attention (docs/benchmarks.md). Head dims the kernel does not take (not a power of two >= 16,
    e.g. 80 or 96) keep the portable attention."""
    if triton is None or os.environ.get("GRACE_KV8_TRITON", "1") == "0":
        return False
    if not takes_head_dim(query.shape[-1]):
        return False
    return query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _i8_to_f16(x, VIA_FP32: tl.constexpr, ASM: tl.constexpr = True):
        """int8 codes -> fp16, exact. On the GPU four at a time from one 32-bit register: the bytes are
        offset to c + 128 (xor 0x80), placed under the fp16 exponent of 1024 (prmt with 0x64: the half
        0x64XX is 1024 + XX), and 1152 is subtracted (sub.f16x2) - five instructions per four values,
        where a plain cast is one I2F per value at a quarter of the ALU rate (and the SASS showed it
        reading the codes from shared memory byte by byte). Triton's interpreter runs no PTX: there,
        through fp32 (its direct int8 -> fp16 cast is wrong)."""
        if VIA_FP32:
            return x.to(tl.float32).to(tl.float16)
        if not ASM:
            return x.to(tl.float16)
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, m;
            xor.b32 t, $2, 0x80808080;
            mov.b32 m, 0x64806480;
            prmt.b32 $0, t, 0x64646464, 0x4140;
            prmt.b32 $1, t, 0x64646464, 0x4342;
            sub.f16x2 $0, $0, m;
            sub.f16x2 $1, $1, m;
            }""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _words_to_f16(w, BLOCK: tl.constexpr, D: tl.constexpr, VIA_FP32: tl.constexpr, ASM: tl.constexpr):
        """(BLOCK, D // 4) int32 words, four int8 codes each (little-endian) -> (BLOCK, D) fp16, exact,
        converted where they were loaded (a blocked layout). Loaded as int8 and cast, the value codes
        go to shared memory as bytes and come back one byte per load in the transposed order tl.dot
        wants (the positions are the reduction axis); as fp16 they take ldmatrix. Same arithmetic as
        _i8_to_f16: each byte offset by 128 (xor) under the exponent of 1024 (0x64XX = 1024 + XX),
        minus 1152."""
        if VIA_FP32 or not ASM:   # integer arithmetic and bitcasts (Triton's interpreter runs no PTX)
            e0 = ((w & 0xFF) ^ 0x6480).to(tl.int16).to(tl.float16, bitcast=True)   # (x ^ 0x80) | 0x6400 for a byte x
            e1 = (((w >> 8) & 0xFF) ^ 0x6480).to(tl.int16).to(tl.float16, bitcast=True)
            e2 = (((w >> 16) & 0xFF) ^ 0x6480).to(tl.int16).to(tl.float16, bitcast=True)
            e3 = (((w >> 24) & 0xFF) ^ 0x6480).to(tl.int16).to(tl.float16, bitcast=True)
            return tl.join(tl.join(e0, e2), tl.join(e1, e3)).reshape(BLOCK, D) - 1152.0
        e0, e1, e2, e3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, m, lo, hi;
            xor.b32 t, $4, 0x80808080;
            mov.b32 m, 0x64806480;
            prmt.b32 lo, t, 0x64646464, 0x4140;
            prmt.b32 hi, t, 0x64646464, 0x4342;
            sub.f16x2 lo, lo, m;
            sub.f16x2 hi, hi, m;
            mov.b32 {$0, $1}, lo;
            mov.b32 {$2, $3}, hi;
            }""",
            constraints="=h,=h,=h,=h,r", args=[w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=1)
        return tl.join(tl.join(e0, e2), tl.join(e1, e3)).reshape(BLOCK, D)

    @triton.jit
    def _program_query(Q, sq_b, sq_h, sq_d, Hk, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
        """This program's (row b, kv head hk), its G query heads padded to GP rows (g, gmask), the
        head-dim range d, and the query (GP, D) as stored (padding rows 0)."""
        pid_bh = tl.program_id(0)
        b = pid_bh // Hk
        hk = pid_bh % Hk
        g = tl.arange(0, GP)
        gmask = g < G
        d = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + (hk * G + g)[:, None] * sq_h + d[None, :] * sq_d, mask=gmask[:, None], other=0.0)
        return b, hk, g, gmask, d, q

    @triton.jit
    def _online_softmax(m_i, l_i, s):
        """One block's scores s (GP, BLOCK) into the running max m_i and sum l_i: returns (new max, the
        factor alpha for the old accumulator, the block's unnormalised probabilities p, new sum)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # a block with nothing to attend
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _attended_end(bias_row, hi, SCAN: tl.constexpr):
        """1 + the last position in [0, hi) of a slice whose bias (bias_row: the slice's first position) is not
        -inf, or 0: every position after it is masked, so the walk may stop there (bound). A static cache's
        positions past the decoded length are such a tail."""
        end = hi * 0
        for s0 in range(0, hi, SCAN):
            i = s0 + tl.arange(0, SCAN)
            bb = tl.load(bias_row + i, mask=i < hi, other=float("-inf"))
            end = tl.maximum(end, tl.max(tl.where(bb > float("-inf"), i + 1, 0), 0))
        return end

    @triton.jit
    def _program_slice(bias_row, L, n_splits, per_split, pid_s, HAS_BIAS: tl.constexpr, BOUND: tl.constexpr,
                       SPREAD: tl.constexpr, SCAN: tl.constexpr, BLOCK: tl.constexpr):
        """(first position, positions to walk) of split pid_s of a row whose bias starts at bias_row.
        - default: the host's fixed slices of per_split positions over the cache's L (the last may end at L);
        - BOUND: the same slice, its walk stopped after its last attended position (_attended_end);
        - SPREAD: the row's attended positions [0, end) (end: 1 + its last attended position, from one search of
          the whole row's bias) cut into n_splits slices of whole blocks, so the splits share the decoded length,
          not the cache's capacity: with a fixed slicing, a 4096-position cache at position 768 had two of nine
          splits walking 455 positions each while seven found nothing. A slice past `end` walks nothing and
          stores (-inf, 0, 0), which the merge weighs to zero."""
        if SPREAD and HAS_BIAS:
            end = _attended_end(bias_row, L, SCAN)
            per = tl.cdiv(tl.cdiv(tl.maximum(end, 1), n_splits), BLOCK) * BLOCK
            start = pid_s * per
            hi = tl.minimum(per, end - start)
        else:
            start = pid_s * per_split
            hi = tl.minimum(per_split, L - start)          # the last split may end at L
            if BOUND and HAS_BIAS:                         # ... and the walk at the slice's last attended position
                hi = _attended_end(bias_row + start, hi, SCAN)
        return start, hi

    @triton.jit
    def _store_split(M_out, L_out, Acc_out, m_i, l_i, acc, b, hk, g, gmask, d, H, G: tl.constexpr, D: tl.constexpr,
                     n_splits, pid_s):
        """This split's running max, sum and unnormalised output, for the merge kernel."""
        row = (b * H + hk * G + g) * n_splits + pid_s
        tl.store(M_out + row, m_i, mask=gmask)
        tl.store(L_out + row, l_i, mask=gmask)
        tl.store(Acc_out + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])

    @triton.jit
    def _finish(M_out, L_out, Acc_out, Out, m_i, l_i, acc, b, hk, g, gmask, d, H, G: tl.constexpr, D: tl.constexpr,
                n_splits, pid_s, FOLD: tl.constexpr):
        """The end of a program: its split's partials for _kv8_merge_kernel, or with FOLD (one split per row and kv
        head, the host's choice) its normalised output in the query's dtype, so no merge kernel runs."""
        if FOLD:
            tl.store(Out + (b * H + hk * G + g)[:, None] * D + d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
                     mask=gmask[:, None])
        else:
            _store_split(M_out, L_out, Acc_out, m_i, l_i, acc, b, hk, g, gmask, d, H, G, D, n_splits, pid_s)

    @triton.jit
    def _kv8_decode_kernel(Q, K, V, Bias, M_out, L_out, Acc_out, Out,
                           sq_b, sq_h, sq_d, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sb_b,
                           H, Hk, L, n_splits, per_split, scaling,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                           HAS_BIAS: tl.constexpr, VIA_FP32: tl.constexpr, EVEN: tl.constexpr = False,
                           SKIP: tl.constexpr = False, ASM: tl.constexpr = True,
                           VWORDS: tl.constexpr = False, QK_INT8: tl.constexpr = False,
                           BOUND: tl.constexpr = False, SCAN: tl.constexpr = 16, PDL: tl.constexpr = False,
                           SPREAD: tl.constexpr = False, FOLD: tl.constexpr = False):
        if PDL:
            tl.extra.cuda.gdc_wait()
        pid_s = tl.program_id(1)
        b, hk, g, gmask, d, q = _program_query(Q, sq_b, sq_h, sq_d, Hk, G, GP, D)
        q = q.to(tl.float32)
        # fp16 tensor-core operands, each scaled into [-1, 1] so no range is lost: the query by its
        # absmax (folded back into the scores), the codes are exact, p * v_scale by the block's max scale
        qmax = tl.max(tl.abs(q), 1)
        qmax = tl.where(qmax > 0, qmax, 1.0)
        if QK_INT8:
            # the query as two int8 parts, x = q * 127 / |q|max ~ hi + lo / 254 (error <= 1 / 508 of a step:
            # finer than fp16), so the scores are two int8 x int8 dots (IMMA, exact in int32) with the key
            # codes as they are stored: no conversion of the keys. One part alone costs ~1% of the output
            # (tests/test_kv8_triton.py)
            x = q * (127.0 / qmax[:, None])
            qn = (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)
            r = (x - qn.to(tl.float32)) * 254.0
            qlo = (r + tl.where(r >= 0, 0.5, -0.5)).to(tl.int8)
            qs = qmax * (scaling / 127.0)
        else:
            qn = (q / qmax[:, None]).to(tl.float16)
            qs = qmax * scaling
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start, hi = _program_slice(Bias + b * sb_b, L, n_splits, per_split, pid_s, HAS_BIAS, BOUND, SPREAD, SCAN, BLOCK)
        offs = start + tl.arange(0, BLOCK)
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        # pointers advanced by one block per iteration (not recomputed from the positions)
        k_ptrs = k_base + offs[:, None] * sk_l + d[None, :]
        if VWORDS:   # the value codes as int32 words (4 codes each; rows are 16-byte aligned)
            v_ptrs = v_base.to(tl.pointer_type(tl.int32)) + offs[:, None] * (sv_l // 4) + tl.arange(0, D // 4)[None, :]
        else:
            v_ptrs = v_base + offs[:, None] * sv_l + d[None, :]
        ks_ptrs = (k_base + L * sk_l).to(tl.pointer_type(tl.float32)) + offs   # the fp32 scales after the L code rows
        vs_ptrs = (v_base + L * sv_l).to(tl.pointer_type(tl.float32)) + offs
        b_ptrs = Bias + b * sb_b + offs
        for off in range(0, hi, BLOCK):
            pos = offs + off
            # EVEN (L a multiple of BLOCK): every block the loop reaches is whole, no bounds masks
            pmask = (pos < L) | EVEN
            if HAS_BIAS:
                bias = tl.load(b_ptrs, mask=pmask, other=float("-inf"))
            # SKIP: the codes of masked positions (not written yet, or padding) are not read at all
            live = (pmask & (bias > float("-inf"))) if SKIP and HAS_BIAS else pmask
            # keys and values are loaded before any use, so that both are in flight at once (a program at
            # batch 1 walks a single block, and a value load placed after the softmax would wait for it)
            if EVEN and not (SKIP and HAS_BIAS):
                kc = tl.load(k_ptrs)
                ks = tl.load(ks_ptrs)
                vc = tl.load(v_ptrs)
                vs = tl.load(vs_ptrs)
            else:
                kc = tl.load(k_ptrs, mask=live[:, None], other=0)
                ks = tl.load(ks_ptrs, mask=live, other=0.0)
                vc = tl.load(v_ptrs, mask=live[:, None], other=0)
                vs = tl.load(vs_ptrs, mask=live, other=0.0)
            if QK_INT8:
                kt = tl.trans(kc)
                s = tl.dot(qn, kt, out_dtype=tl.int32).to(tl.float32) + \
                    tl.dot(qlo, kt, out_dtype=tl.int32).to(tl.float32) * (1.0 / 254.0)
            else:
                s = tl.dot(qn, tl.trans(_i8_to_f16(kc, VIA_FP32, ASM)))
            s = s * qs[:, None] * ks[None, :]                                                      # (GP, BLOCK)
            if HAS_BIAS:
                s += bias[None, :]
            if not EVEN:
                s = tl.where(pmask[None, :], s, float("-inf"))
            m_new, alpha, p, l_i = _online_softmax(m_i, l_i, s)
            if VWORDS:
                vc = _words_to_f16(vc, BLOCK, D, VIA_FP32, ASM)
            else:
                vc = _i8_to_f16(vc, VIA_FP32, ASM)
            vmax = tl.max(vs, 0)
            vmax = tl.where(vmax > 0, vmax, 1.0)
            pv = (p * (vs / vmax)[None, :]).to(tl.float16)
            acc = acc * alpha[:, None] + tl.dot(pv, vc) * vmax
            m_i = m_new
            k_ptrs += BLOCK * sk_l
            v_ptrs += BLOCK * sv_l // 4 if VWORDS else BLOCK * sv_l
            ks_ptrs += BLOCK
            vs_ptrs += BLOCK
            b_ptrs += BLOCK
        _finish(M_out, L_out, Acc_out, Out, m_i, l_i, acc, b, hk, g, gmask, d, H, G, D, n_splits, pid_s, FOLD)

    @triton.jit
    def _kv16_decode_kernel(Q, K, V, Bias, M_out, L_out, Acc_out, Out,
                            sq_b, sq_h, sq_d, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sb_b,
                            H, Hk, L, n_splits, per_split, scaling,
                            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                            HAS_BIAS: tl.constexpr, VIA_FP32: tl.constexpr, EVEN: tl.constexpr,
                            BOUND: tl.constexpr = False, SCAN: tl.constexpr = 16, PDL: tl.constexpr = False,
                            SPREAD: tl.constexpr = False, FOLD: tl.constexpr = False):
        """_kv8_decode_kernel over a 16-bit cache (transformers' StaticCache: (B, H_kv, L, D) bf16 or fp16):
        the same split-K walk and GQA grouping, the dots on 16-bit tensor cores with no conversion
        (VIA_FP32: in fp32, for Triton's interpreter, whose bf16 dot is wrong)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        pid_s = tl.program_id(1)
        b, hk, g, gmask, d, q = _program_query(Q, sq_b, sq_h, sq_d, Hk, G, GP, D)
        q = q.to(tl.float32).to(K.dtype.element_ty) if not VIA_FP32 else q.to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start, hi = _program_slice(Bias + b * sb_b, L, n_splits, per_split, pid_s, HAS_BIAS, BOUND, SPREAD, SCAN, BLOCK)
        offs = start + tl.arange(0, BLOCK)
        k_ptrs = K + b * sk_b + hk * sk_h + offs[:, None] * sk_l + d[None, :]
        v_ptrs = V + b * sv_b + hk * sv_h + offs[:, None] * sv_l + d[None, :]
        b_ptrs = Bias + b * sb_b + offs
        for off in range(0, hi, BLOCK):
            pos = offs + off
            pmask = (pos < L) | EVEN
            if EVEN:
                kb = tl.load(k_ptrs)
                vb = tl.load(v_ptrs)
            else:
                kb = tl.load(k_ptrs, mask=pmask[:, None], other=0.0)
                vb = tl.load(v_ptrs, mask=pmask[:, None], other=0.0)
            if VIA_FP32:
                kb = kb.to(tl.float32)
                vb = vb.to(tl.float32)
            s = tl.dot(q, tl.trans(kb)) * scaling                                                    # (GP, BLOCK)
            if HAS_BIAS:
                s += tl.load(b_ptrs, mask=pmask, other=float("-inf"))[None, :]
            if not EVEN:
                s = tl.where(pmask[None, :], s, float("-inf"))
            m_new, alpha, p, l_i = _online_softmax(m_i, l_i, s)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
            m_i = m_new
            k_ptrs += BLOCK * sk_l
            v_ptrs += BLOCK * sv_l
            b_ptrs += BLOCK
        _finish(M_out, L_out, Acc_out, Out, m_i, l_i, acc, b, hk, g, gmask, d, H, G, D, n_splits, pid_s, FOLD)

    @triton.jit
    def _kv8_merge_kernel(M_in, L_in, Acc_in, Out, n_splits, SP: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr = False):
        """One (row, head): combine the splits' (max, sum, unnormalised output)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        r = tl.program_id(0)
        sp = tl.arange(0, SP)
        smask = sp < n_splits
        d = tl.arange(0, D)
        m = tl.load(M_in + r * n_splits + sp, mask=smask, other=float("-inf"))
        mx = tl.max(m, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp(m - mx)
        l = tl.sum(tl.load(L_in + r * n_splits + sp, mask=smask, other=0.0) * w, 0)
        acc = tl.load(Acc_in + (r * n_splits + sp)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        tl.store(Out + r * D + d, (tl.sum(acc * w[:, None], 0) / l).to(Out.dtype.element_ty))


if triton is not None:

    @triton.jit
    def _kv8_write_kernel(PK, PV, SK, SV, Pos, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, pk_b, pk_h, pv_b, pv_h, Hk, T, L,
                          D: tl.constexpr, PDL: tl.constexpr = False):
        """One program per (key or value, row b, kv head h, new token t): the vector's absmax, its int8 codes
        (round half to even, as torch.round) written to row pos of its packed cache and its fp32 scale to
        the scale array after the L code rows - kv8.Int8StaticLayer.update's quantise-and-write in one
        launch for keys and values. The divisions are IEEE (div_rn), so the codes equal round_int8's."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        n = pid // 2
        t = n % T
        h = (n // T) % Hk
        b = n // (T * Hk)
        d = tl.arange(0, D)
        if pid % 2 == 0:
            x = tl.load(SK + b * sk_b + h * sk_h + t * sk_t + d).to(tl.float32)
            base = PK + b * pk_b + h * pk_h
        else:
            x = tl.load(SV + b * sv_b + h * sv_h + t * sv_t + d).to(tl.float32)
            base = PV + b * pv_b + h * pv_h
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 0), 1e-12), 127.0)
        r = tl.math.div_rn(x, scale)
        r = (r + 12582912.0) - 12582912.0          # 1.5 * 2^23: round half to even (|r| <= 127)
        codes = tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)
        pos = tl.load(Pos + t)
        pd = pos + d * 0                 # the position per lane: a position past the cache is not written
        tl.store(base + pos * D + d, codes, mask=(pd >= 0) & (pd < L))   # (it would land in the scale rows)
        tl.store((base + L * D).to(tl.pointer_type(tl.float32)) + pos, scale, mask=(pos >= 0) & (pos < L))


def write_kv(packed_k: torch.Tensor, packed_v: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
             cache_position: torch.Tensor) -> None:
    """Quantise (B, H_kv, T, D) keys and values to int8 (kv8.round_int8's codes and scales) and write them at
    `cache_position` (T,) into kv8's packed (B, H_kv, L + R, D) caches, in place (kv8.write_packed's result, for
    the states `available` accepts): one kernel launch (the custom
    op `torch.ops.grace_kv8.write_kv`, which torch.compile and CUDA graphs see as one opaque mutating call).
    On an H200 inductor's own fusion of the same update took 4-18 us a layer at batch 16 (docs/benchmarks.md).
    Positions outside [0, L) are not written (the kernel cannot raise without a host sync; transformers'
    static cache is sized for the whole generation, as the torch update's index_copy_ requires too)."""
    D = key_states.shape[-1]
    for t, name in ((packed_k, "packed_k"), (packed_v, "packed_v")):
        if t.dtype != torch.int8 or t.dim() != 4 or t.shape[-1] != D or t.stride(-1) != 1 or t.stride(-2) != D:
            raise ValueError(f"kv8 write: {name} must be kv8's packed (B, H_kv, L + R, {D}) int8 tensor with contiguous "
                             f"rows; got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    if key_states.shape != value_states.shape or not takes_head_dim(D):
        raise ValueError(f"kv8 write: keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} must have one "
                         "shape with a power-of-two head_dim >= 16")
    torch.ops.grace_kv8.write_kv(packed_k, packed_v, key_states, value_states, cache_position)


if triton is not None:

    @torch.library.custom_op("grace_kv8::write_kv", mutates_args=("packed_k", "packed_v"))
    def _write_kv(packed_k: torch.Tensor, packed_v: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                  cache_position: torch.Tensor) -> None:
        B, Hk, T, D = key_states.shape
        if T == 0:
            return
        L = _cache_length(packed_k.shape[2], D)
        sk = key_states if key_states.stride(-1) == 1 else key_states.contiguous()
        sv = value_states if value_states.stride(-1) == 1 else value_states.contiguous()
        pos = cache_position.to(device=packed_k.device, dtype=torch.int64)
        _kv8_write_kernel[(2 * B * Hk * T,)](packed_k, packed_v, sk, sv, pos, sk.stride(0), sk.stride(1), sk.stride(2),
                                             sv.stride(0), sv.stride(1), sv.stride(2), packed_k.stride(0),
                                             packed_k.stride(1), packed_v.stride(0), packed_v.stride(1), Hk, T, L, D=D,
                                             num_warps=1, **_pdl_launch())

    @_write_kv.register_fake
    def _(packed_k, packed_v, key_states, value_states, cache_position):
        return None


def n_splits_for(batch_kv_heads: int, length: int, launch: dict | None = None) -> int:
    """Splits along the positions so the grid has about launch["programs"] programs (launch: LAUNCH, the
    default, or LAUNCH16), at least one block of positions each."""
    launch = LAUNCH if launch is None else launch
    blocks = max(1, math.ceil(length / launch["block"]))
    return max(1, min(blocks, math.ceil(launch["programs"] / max(1, batch_kv_heads))))


# "auto" bounds the walks from this cache length on (and wherever there is one split per row and kv head)
BOUND_AUTO_LENGTH = 2048


def bounded(launch: dict, n_splits: int, length: int) -> bool:
    """Whether the attention kernels' walks stop at the last attended position of their slices, by
    launch["bound"]: True, False, or "auto" - one split per (row, kv head), where a walk is the kernel's whole
    critical path, or a cache of at least BOUND_AUTO_LENGTH positions. Elsewhere the search (one dependent
    load before the walk) costs ~0.2-0.6 us and saves nothing: the splits before the decoded length keep their
    whole slices. H200, 2026-11-29 (benchmarks/bench_kv8_attention.py --bound-ab; docs/benchmarks.md), one layer:
    - a cache of 896 positions, 768 attended: LLaVA-1.5-7B at batch 16 (one split) 54.4 against 61.6 us over
      the 16-bit cache, 51.6 against 52.0 over the int8 one; at batch 1 (7 splits) 11.7 / 11.1 against
      11.3 / 10.9 us; Qwen2-VL-7B (9 and 5 splits) 0.1-0.6 us slower;
    - a cache of 4096 positions, 768 attended (LLaVA): batch 16 55.7 against 246.7 us (16-bit) and 53.9
      against 191.8 (int8); batch 1 19.8 against 24.8 and 16.9 against 21.1."""
    b = launch.get("bound", False)
    if b == "auto":
        return n_splits == 1 or length >= BOUND_AUTO_LENGTH
    return bool(b)


def spreads(launch: dict, n_splits: int, length: int) -> bool:
    """Whether the splits share the attended positions of their row (found by one search of its bias) rather than
    fixed slices of the cache, by launch["spread"]: True, False, or "auto" - several splits over a cache of at
    least BOUND_AUTO_LENGTH positions. A static cache sized for long requests leaves most fixed slices past the
    decoded length: at position 768 of 4096, two of nine splits walked 455 positions each (bound or not) while
    the others had nothing to do. With one split there is nothing to share (bound does it); over a cache about
    as long as the generation the fixed slices are already about even."""
    s = launch.get("spread", False)
    if s == "auto":
        return n_splits > 1 and length >= BOUND_AUTO_LENGTH
    return bool(s) and n_splits > 1


def spread_scan_width(length: int) -> int:
    """Positions of bias per load in spread's search of a whole row: the row in one load up to 4096 positions
    (16 KB of fp32, 32 registers a thread at 4 warps, before the walk needs them)."""
    return max(16, min(4096, 1 << max(0, length - 1).bit_length()))


def scan_width(per_split: int) -> int:
    """Positions of bias per load when a program looks for the end of its slice's attended positions (bound):
    the slice in one load up to 1024 positions (4 KB of fp32)."""
    return max(16, min(1024, 1 << max(0, per_split - 1).bit_length()))


def _cache_length(rows: int, head_dim: int) -> int:
    from grace_ds.export.kv8 import cache_length   # kv8 imports this module

    return cache_length(rows, head_dim)


def _call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, scaling: float,
          length: int, what: str) -> torch.Tensor:
    """The checks both cache layouts share, the bias broadcast to (B, length) fp32, then the custom op."""
    B, H, q_len, D = query.shape
    Hk = key.shape[1]
    if not query.is_floating_point():
        raise ValueError(f"{what}: the query must be floating point, got {query.dtype}")
    if q_len != 1 or H % Hk or not takes_head_dim(D):
        raise ValueError(f"{what}: needs one query token, H % H_kv == 0 and a power-of-two head_dim >= 16; "
                         f"got q_len={q_len}, H={H}, H_kv={Hk}, head_dim={D}")
    if bias is not None:
        bias = bias.to(torch.float32).expand(B, length).contiguous()
    return torch.ops.grace_kv8.decode_attention(query, key, value, bias, float(scaling))


def _rows_ok(key: torch.Tensor, value: torch.Tensor, head_dim: int) -> bool:
    return key.shape == value.shape and key.dtype == value.dtype and key.shape[-1] == head_dim and all(
        t.stride(-1) == 1 and t.stride(-2) == head_dim for t in (key, value))


def decode_attention16(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                       scaling: float) -> torch.Tensor:
    """The same split-K decode attention over a 16-bit cache: key/value (B, H_kv, L, D) bf16 or fp16 with
    contiguous rows (transformers' StaticCache), each kv head read once for its H / H_kv query heads.
    transformers' SDPA path, given a mask (every static-cache decode step has one), first repeats the
    kv heads to H (`repeat_kv`): 7x the cache's bytes for Qwen2-VL-7B. Returns (B, H, 1, D) in the
    query's dtype."""
    if key.dtype not in (torch.bfloat16, torch.float16) or not _rows_ok(key, value, query.shape[-1]):
        raise ValueError(f"triton decode attention: key/value must be (B, H_kv, L, head_dim) bf16/fp16 tensors with "
                         f"contiguous rows; got {tuple(key.shape)} {key.dtype} strides {key.stride()}")
    return _call(query, key, value, bias, scaling, key.shape[2], "triton decode attention")


def kv8_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                         scaling: float) -> torch.Tensor:
    """query (B, H, 1, D) float (read as fp32); key/value (B, Hk, L + R, D) packed int8 (kv8's layout: L rows of
    codes, then the L fp32 scales); bias (B, L) fp32 additive (0 or -inf), or None. Returns (B, H, 1, D) in the
    query's dtype (accumulated in fp32, rounded once by the merge kernel: no separate conversion kernel).

    The kernel runs inside the custom op `torch.ops.grace_kv8.decode_attention`: torch.compile and
    CUDA graphs see one opaque call with a known output shape (as for the W4A16 GEMM), instead of
    tracing the Triton launch and its workspace."""
    if key.dtype != torch.int8 or not _rows_ok(key, value, query.shape[-1]):
        raise ValueError(f"kv8 triton decode: key/value must be kv8's packed (B, H_kv, L + R, head_dim) int8 tensors with "
                         f"contiguous rows; got {tuple(key.shape)} {key.dtype} strides {key.stride()}")
    return _call(query, key, value, bias, scaling, _cache_length(key.shape[2], query.shape[-1]), "kv8 triton decode")


if triton is not None:

    @torch.library.custom_op("grace_kv8::decode_attention", mutates_args=())
    def _decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                          scaling: float) -> torch.Tensor:
        B, H, _, D = query.shape
        Hk = key.shape[1]
        packed = key.dtype == torch.int8          # kv8's packed cache, or a 16-bit one (decode_attention16)
        L = _cache_length(key.shape[2], D) if packed else key.shape[2]
        G = H // Hk
        GP = max(MIN_ROWS, triton.next_power_of_2(G))
        launch = LAUNCH if packed else LAUNCH16
        block = launch["block"]
        S = n_splits_for(B * Hk, L, launch=launch)
        per_split = math.ceil(math.ceil(L / S) / block) * block
        S = math.ceil(L / per_split)
        dev = query.device
        m = torch.empty(B, H, S, device=dev, dtype=torch.float32)
        lsum = torch.empty(B, H, S, device=dev, dtype=torch.float32)
        acc = torch.empty(B, H, S, D, device=dev, dtype=torch.float32)
        q = query[:, :, 0]
        has_bias = bias is not None
        out = torch.empty(B, H, 1, D, device=dev, dtype=query.dtype)   # in the query dtype: merge or fold writes it
        fold = bool(launch.get("fold", False)) and S == 1
        args = (q, key, value, bias if has_bias else m, m, lsum, acc, out,
                q.stride(0), q.stride(1), q.stride(2), key.stride(0), key.stride(1), key.stride(2),
                value.stride(0), value.stride(1), value.stride(2), bias.stride(0) if has_bias else 0,
                H, Hk, L, S, per_split, scaling)
        spread = has_bias and spreads(launch, S, L)
        bound = has_bias and not spread and bounded(launch, S, L)
        # SCAN only where it is used: one compiled kernel otherwise
        scan = spread_scan_width(L) if spread else scan_width(per_split) if bound else 16
        common = dict(G=G, GP=GP, D=D, BLOCK=block, HAS_BIAS=has_bias, VIA_FP32=os.environ.get("TRITON_INTERPRET") == "1",
                      EVEN=L % block == 0, num_warps=launch["num_warps"], num_stages=launch["num_stages"],
                      BOUND=bound, SPREAD=spread, SCAN=scan, FOLD=fold, **_pdl_launch())
        if packed:
            _kv8_decode_kernel[(B * Hk, S)](*args, **common, SKIP=LAUNCH["skip"], ASM=LAUNCH["asm"],
                                            VWORDS=LAUNCH["vwords"], QK_INT8=LAUNCH["qk_int8"] and D >= 32)
        else:
            _kv16_decode_kernel[(B * Hk, S)](*args, **common)
        if not fold:
            _kv8_merge_kernel[(B * H,)](m, lsum, acc, out, S, SP=max(2, triton.next_power_of_2(S)), D=D,
                                        **_pdl_launch())
        return out

    @_decode_attention.register_fake
    def _(query, key, value, bias, scaling):
        return query.new_empty(query.shape)
