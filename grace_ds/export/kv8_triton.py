"""Decode attention over the packed int8 KV cache as one Triton kernel (split-K flash decoding).

`grace_ds.export.kv8` stores, per (row, kv head), the cached vectors as rows of head_dim int8 codes
followed by one contiguous array of their fp32 scales. Its portable decode attention (multiply + reduce,
fused by inductor) is correct but slow on the GPU: on an H200 it doubled LLaVA-1.5-7B's batch-16
step (docs/benchmarks.md). This kernel reads the cache once, at one byte per value
(on an H200, one layer of LLaVA-1.5-7B at batch 16: 75 us against 187 us for the portable form and
66 us for SDPA over the bf16 cache; benchmarks/bench_kv8_attention.py):

- grid (batch x kv heads, splits): each program takes the G = H / H_kv query heads of one kv head
  (GQA) and one slice of the positions, and walks it in blocks of LAUNCH["block"] positions;
- per block: the block's key and value codes and scales are loaded first (all in flight at once),
  then codes -> fp16 (exact for |code| <= 127), scores = (q / |q|max . codes) on tensor cores
  (`tl.dot`; the query heads are padded to 16 rows), times |q|max, the key scale and the softmax
  scaling, plus the mask bias; online softmax; out += (p * v_scale / block max) . v_codes, again
  with `tl.dot`, times the block's max scale. Every fp16 operand lies in [-127, 127], so no
  model's range is lost, and fp16 keeps 3 more mantissa bits than bf16;
- each program writes its running max, sum and unnormalised output; a second small kernel merges
  the splits (one program per row and head) and writes the result in the query's dtype.

The probabilities are rounded to fp16 before the value product, as in flash attention; the result
matches a float64 reference to 16-bit accuracy (tests/test_kv8_triton.py, run on the CPU with
Triton's interpreter and on the GPU).
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
# Launch parameters (benchmarks/bench_kv8_attention.py --sweep times the alternatives): positions per
# block, warps and pipeline stages per program, and the number of programs the splits aim at.
# Defaults: the fastest on an H200 for LLaVA-1.5-7B and Qwen2-VL-7B at batch 16 (docs/benchmarks.md).
LAUNCH = {"block": 128, "num_warps": 4, "num_stages": 2, "programs": 264}


def takes_head_dim(d: int) -> bool:
    """The kernel's head dims: powers of two >= 16 (tl.arange sizes and tl.dot's smallest K)."""
    return d >= 16 and not d & (d - 1)


def available(query: torch.Tensor) -> bool:
    """Whether the kernel runs for this query: Triton importable and a CUDA tensor (or Triton's
    interpreter, TRITON_INTERPRET=1, for tests), unless GRACE_KV8_TRITON=0 (`launch/bench.py
    --kv8-portable` sets it). On by default since its H200 measurement: twice as fast as the portable
    attention (docs/benchmarks.md). Head dims the kernel does not take (not a power of two >= 16,
    e.g. 80 or 96) keep the portable attention."""
    if triton is None or os.environ.get("GRACE_KV8_TRITON", "1") == "0":
        return False
    if not takes_head_dim(query.shape[-1]):
        return False
    return query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _kv8_decode_kernel(Q, K, V, Bias, M_out, L_out, Acc_out,
                           sq_b, sq_h, sq_d, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sb_b,
                           H, Hk, L, n_splits, per_split, scaling,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                           HAS_BIAS: tl.constexpr, VIA_FP32: tl.constexpr):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // Hk
        hk = pid_bh % Hk
        g = tl.arange(0, GP)
        gmask = g < G
        d = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + (hk * G + g)[:, None] * sq_h + d[None, :] * sq_d, mask=gmask[:, None], other=0.0)
        q = q.to(tl.float32)
        # fp16 tensor-core operands, each scaled into [-1, 1] so no range is lost: the query by its
        # absmax (folded back into the scores), the codes are exact, p * v_scale by the block's max scale
        qmax = tl.max(tl.abs(q), 1)
        qmax = tl.where(qmax > 0, qmax, 1.0)
        qn = (q / qmax[:, None]).to(tl.float16)
        qs = qmax * scaling
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        k_scales = (k_base + L * sk_l).to(tl.pointer_type(tl.float32))     # the fp32 scales after the L code rows
        v_scales = (v_base + L * sv_l).to(tl.pointer_type(tl.float32))
        start = pid_s * per_split
        for off in range(0, per_split, BLOCK):
            pos = start + off + tl.arange(0, BLOCK)
            pmask = pos < L
            # keys and values are loaded before any use, so that both are in flight at once (a program at
            # batch 1 walks a single block, and a value load placed after the softmax would wait for it)
            kc = tl.load(k_base + pos[:, None] * sk_l + d[None, :], mask=pmask[:, None], other=0)
            ks = tl.load(k_scales + pos, mask=pmask, other=0.0)
            vc = tl.load(v_base + pos[:, None] * sv_l + d[None, :], mask=pmask[:, None], other=0)
            vs = tl.load(v_scales + pos, mask=pmask, other=0.0)
            # int8 -> fp16 is exact for |code| <= 127 (through fp32 in Triton's interpreter, whose direct cast is wrong)
            kc = kc.to(tl.float32).to(tl.float16) if VIA_FP32 else kc.to(tl.float16)
            s = tl.dot(qn, tl.trans(kc)) * qs[:, None] * ks[None, :]                                # (GP, BLOCK)
            if HAS_BIAS:
                s += tl.load(Bias + b * sb_b + pos, mask=pmask, other=float("-inf"))[None, :]
            s = tl.where(pmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # a block with nothing to attend
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vc = vc.to(tl.float32).to(tl.float16) if VIA_FP32 else vc.to(tl.float16)
            vmax = tl.max(vs, 0)
            vmax = tl.where(vmax > 0, vmax, 1.0)
            pv = (p * (vs / vmax)[None, :]).to(tl.float16)
            acc = acc * alpha[:, None] + tl.dot(pv, vc) * vmax
            m_i = m_new
        row = (b * H + hk * G + g) * n_splits + pid_s
        tl.store(M_out + row, m_i, mask=gmask)
        tl.store(L_out + row, l_i, mask=gmask)
        tl.store(Acc_out + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])

    @triton.jit
    def _kv8_merge_kernel(M_in, L_in, Acc_in, Out, n_splits, SP: tl.constexpr, D: tl.constexpr):
        """One (row, head): combine the splits' (max, sum, unnormalised output)."""
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


def n_splits_for(batch_kv_heads: int, length: int, target_programs: int | None = None) -> int:
    """Splits along the positions so the grid has about target_programs programs (LAUNCH["programs"]
    by default), at least one block of positions each."""
    target_programs = LAUNCH["programs"] if target_programs is None else target_programs
    blocks = max(1, math.ceil(length / LAUNCH["block"]))
    return max(1, min(blocks, math.ceil(target_programs / max(1, batch_kv_heads))))


def _cache_length(rows: int, head_dim: int) -> int:
    from grace_ds.export.kv8 import cache_length   # kv8 imports this module

    return cache_length(rows, head_dim)


def kv8_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                         scaling: float) -> torch.Tensor:
    """query (B, H, 1, D) float (read as fp32); key/value (B, Hk, L + R, D) packed int8 (kv8's layout: L rows of
    codes, then the L fp32 scales); bias (B, L) fp32 additive (0 or -inf), or None. Returns (B, H, 1, D) in the
    query's dtype (accumulated in fp32, rounded once by the merge kernel: no separate conversion kernel).

    The kernel runs inside the custom op `torch.ops.grace_kv8.decode_attention`: torch.compile and
    CUDA graphs see one opaque call with a known output shape (as for the W4A16 GEMM), instead of
    tracing the Triton launch and its workspace."""
    B, H, q_len, D = query.shape
    Hk = key.shape[1]
    if not query.is_floating_point():
        raise ValueError(f"kv8 triton decode: the query must be floating point, got {query.dtype}")
    if q_len != 1 or H % Hk or not takes_head_dim(D):
        raise ValueError(f"kv8 triton decode: needs one query token, H % H_kv == 0 and a power-of-two head_dim >= 16; "
                         f"got q_len={q_len}, H={H}, H_kv={Hk}, head_dim={D}")
    if key.dtype != torch.int8 or key.shape != value.shape or key.shape[-1] != D or any(
            t.stride(-1) != 1 or t.stride(-2) != D for t in (key, value)):
        raise ValueError(f"kv8 triton decode: key/value must be kv8's packed (B, H_kv, L + R, head_dim) int8 tensors with "
                         f"contiguous rows; got {tuple(key.shape)} {key.dtype} strides {key.stride()}")
    length = _cache_length(key.shape[2], D)
    if bias is not None:
        bias = bias.to(torch.float32).expand(B, length).contiguous()
    return torch.ops.grace_kv8.decode_attention(query, key, value, bias, float(scaling))


if triton is not None:

    @torch.library.custom_op("grace_kv8::decode_attention", mutates_args=())
    def _decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                          scaling: float) -> torch.Tensor:
        B, H, _, D = query.shape
        Hk = key.shape[1]
        L = _cache_length(key.shape[2], D)
        G = H // Hk
        GP = max(MIN_ROWS, triton.next_power_of_2(G))
        block = LAUNCH["block"]
        S = n_splits_for(B * Hk, L)
        per_split = math.ceil(math.ceil(L / S) / block) * block
        S = math.ceil(L / per_split)
        dev = query.device
        m = torch.empty(B, H, S, device=dev, dtype=torch.float32)
        lsum = torch.empty(B, H, S, device=dev, dtype=torch.float32)
        acc = torch.empty(B, H, S, D, device=dev, dtype=torch.float32)
        q = query[:, :, 0]
        has_bias = bias is not None
        _kv8_decode_kernel[(B * Hk, S)](
            q, key, value, bias if has_bias else m, m, lsum, acc,
            q.stride(0), q.stride(1), q.stride(2), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), bias.stride(0) if has_bias else 0,
            H, Hk, L, S, per_split, scaling,
            G=G, GP=GP, D=D, BLOCK=block, HAS_BIAS=has_bias, VIA_FP32=os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"])
        out = torch.empty(B, H, 1, D, device=dev, dtype=query.dtype)   # the merge writes the query's dtype
        _kv8_merge_kernel[(B * H,)](m, lsum, acc, out, S, SP=max(2, triton.next_power_of_2(S)), D=D)
        return out

    @_decode_attention.register_fake
    def _(query, key, value, bias, scaling):
        return query.new_empty(query.shape)
