// "Lean" register kernel for decode (M <= 16): the swap-AB tensor-core kernel of w4a16_kernel.cuh
// with about half the instructions per weight (kernels/NOTES.md v9). Same packed layout, same
// CTA shape (WN x WK warps, TN n16 tiles per warp, intra-CTA split-K), same epilogue.
//
// Why: at M = 1 the classic kernel issues ~209 instructions per KB of weights per warp (NOTES.md
// v8). 64 of them are the dequantisation's HSUB2 + HMUL2 ((128+v) - 136, then * scale, per pair of
// weights) and ~30 are register copies made by its prefetch ring. Issue is a co-limiter there.
//
// What changes:
// 1. The A fragments are the RAW magic codes 128+v (bf16) / 1024+v (fp16): one LOP3 per register, no
//    HSUB2, no HMUL2. They go into a per-group fp32 accumulator accg. A second mma per k16 step with
//    an all-ones A gives xs = the sum of the group's activations per token (shared by every tile).
//    At the end of each group (2 k64 blocks) the warp folds it into the output accumulator:
//        acc += s * (accg - B * xs)        B = 136 (bf16) / 1032 (fp16) = magic + 8
//    which is exactly sum_k s * (v - 8) * x_k up to fp32 rounding. The products (128+v) * x are exact
//    in fp32 and the tensor core accumulates in fp32. The subtraction cancels about B/|v-8| ~ 2^5
//    (bf16) / 2^8 (fp16) of magnitude, i.e. 5-8 of fp32's 24 bits, far below bf16 output precision.
//    Unlike the classic kernel, the weight is never rounded to 16 bits: the result is closer to the
//    float64 reference than the classic kernel's.
// 2. Each ring slot is refilled AFTER its block is consumed (the classic kernel copies the slot out
//    first, then refills it), so the ring costs no register copies. P-1 blocks stay in flight while
//    a block is computed.
// 3. Warps split K in whole groups (the fold is at a compile-time slot: P is even, slot parity =
//    block parity). Scales are loaded once per group, activations two blocks ahead.
#pragma once
#include "w4a16_kernel.cuh"
#include "w4a16_sk.cuh"  // cp.async helpers

namespace grace_w4a16 {

template <typename T> struct LeanTraits;
template <> struct LeanTraits<__nv_bfloat16> {
  static constexpr uint32_t kOne = 0x3f803f80u;  // bf16 1.0 in both halves
  static constexpr float kBias = 136.f;          // 128 (magic) + 8 (code offset)
  // fp32 of the two halves of a (s[g], s[g+8]) scale word
  static __device__ __forceinline__ float lo(uint32_t s2) { return __uint_as_float(s2 << 16); }
  static __device__ __forceinline__ float hi(uint32_t s2) { return __uint_as_float(s2 & 0xffff0000u); }
};
template <> struct LeanTraits<__half> {
  static constexpr uint32_t kOne = 0x3c003c00u;  // fp16 1.0 in both halves
  static constexpr float kBias = 1032.f;         // 1024 (magic) + 8
  static __device__ __forceinline__ float lo(uint32_t s2) {
    return __half2float(__ushort_as_half((unsigned short)(s2 & 0xffffu)));
  }
  static __device__ __forceinline__ float hi(uint32_t s2) {
    return __half2float(__ushort_as_half((unsigned short)(s2 >> 16)));
  }
};

// One packed word -> the 4 A registers of one k16 step, as raw magic codes (magic + v).
template <typename T>
__device__ __forceinline__ void raw_word(uint32_t q, uint32_t a[4]) {
  constexpr uint32_t kMask = 0x000f000fu;
  constexpr uint32_t kEx = Traits<T>::kEx;
  a[0] = and_or(q, kMask, kEx);
  a[1] = and_or(q >> 4, kMask, kEx);
  a[2] = and_or(q >> 8, kMask, kEx);
  a[3] = and_or(q >> 12, kMask, kEx);
}

// d = a * b (no accumulator input: the first k16 step of a group)
template <typename T>
__device__ __forceinline__ void mma16816_z(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  d[0] = d[1] = d[2] = d[3] = 0.f;
  mma16816<T>(d, a, b0, b1);
}

// Two 16-bit products in one register (the RMSNorm weight times the activations, NORM below).
template <typename T>
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  using T2 = typename Traits<T>::T2;
  const T2 r = __hmul2(*reinterpret_cast<const T2*>(&a), *reinterpret_cast<const T2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// One k64 block: 4 k16 steps of raw-code mma into accg (FIRST: the group's first block, which starts
// accg and xs from zero) and of all-ones mma into xs.
// NORM (RMSNorm folded in, kernels/NOTES.md v21): gb holds the norm weight for the block's 16 values of this lane
// (the same positions as xb[mt]); each step first adds the raw activations' squares into dsq with one more mma
// whose A is the lane's own B registers (A row g and B column g hold the same (token g, k) values in m16n8k16's
// fragment layouts, so D[g][g] is token g's sum of squares over the step), then scales the B registers by the
// weight (rounded to 16 bits, as the unfused norm's output is) for the ones-mma and the weight mma.
template <typename T, int MT, int TN, bool FIRST, bool NORM = false>
__device__ __forceinline__ void lean_block(const uint4 (&w)[TN], const uint4 (&xb)[MT][2], float (&accg)[TN][MT][4],
                                           float (&xs)[MT][4], const uint4* gb = nullptr, float (*dsq)[4] = nullptr) {
  const uint32_t ones[4] = {LeanTraits<T>::kOne, LeanTraits<T>::kOne, LeanTraits<T>::kOne, LeanTraits<T>::kOne};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const uint4& v = xb[mt][s >> 1];
      uint32_t b0 = (s & 1) ? v.z : v.x, b1 = (s & 1) ? v.w : v.y;
      if constexpr (NORM) {
        const uint32_t sq[4] = {b0, 0u, b1, 0u};
        mma16816<T>(dsq[mt], sq, b0, b1);
        const uint4& gv = gb[s >> 1];
        b0 = hmul2<T>(b0, (s & 1) ? gv.z : gv.x);
        b1 = hmul2<T>(b1, (s & 1) ? gv.w : gv.y);
      }
      if (FIRST && s == 0) mma16816_z<T>(xs[mt], ones, b0, b1);
      else mma16816<T>(xs[mt], ones, b0, b1);
#pragma unroll
      for (int tn = 0; tn < TN; ++tn) {
        const uint32_t q = s == 0 ? w[tn].x : s == 1 ? w[tn].y : s == 2 ? w[tn].z : w[tn].w;
        uint32_t a[4];
        raw_word<T>(q, a);
        if (FIRST && s == 0) mma16816_z<T>(accg[tn][mt], a, b0, b1);
        else mma16816<T>(accg[tn][mt], a, b0, b1);
      }
    }
  }
}

// End of a group: acc += s * (accg - bias * xs); rows g (r 0,1) and g+8 (r 2,3). s2: (s[g], s[g+8]).
template <typename T, int MT, int TN>
__device__ __forceinline__ void lean_fold(float (&acc)[TN][MT][4], const float (&accg)[TN][MT][4],
                                          const float (&xs)[MT][4], const uint32_t (&s2)[TN]) {
  float nb[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) nb[mt][r] = -LeanTraits<T>::kBias * xs[mt][r];
#pragma unroll
  for (int tn = 0; tn < TN; ++tn) {
    const float slo = LeanTraits<T>::lo(s2[tn]), shi = LeanTraits<T>::hi(s2[tn]);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[tn][mt][0] = fmaf(slo, accg[tn][mt][0] + nb[mt][0], acc[tn][mt][0]);
      acc[tn][mt][1] = fmaf(slo, accg[tn][mt][1] + nb[mt][1], acc[tn][mt][1]);
      acc[tn][mt][2] = fmaf(shi, accg[tn][mt][2] + nb[mt][2], acc[tn][mt][2]);
      acc[tn][mt][3] = fmaf(shi, accg[tn][mt][3] + nb[mt][3], acc[tn][mt][3]);
    }
  }
}

// The k64 blocks of warp wk out of WK along K, in whole groups (both ends even).
__device__ __forceinline__ void lean_warp_blocks(int G, int wk, int WK, int& kb_begin, int& kb_end) {
  kb_begin = 2 * (int)(((long long)G * wk) / WK);
  kb_end = 2 * (int)(((long long)G * (wk + 1)) / WK);
}

// The activations' two-block register ring of the lean kernels (block kb in xbuf[(kb - kb_begin) % 2]):
// the first two blocks, then xnext pointing at block kb_begin + 2 for lean_x_refill.
template <typename T, int MT>
__device__ __forceinline__ void lean_x_start(const T* const (&xrow)[MT], int kb_begin, int kb_end,
                                             uint4 (&xbuf)[2][MT][2], const uint4* (&xnext)[MT]) {
#pragma unroll
  for (int j = 0; j < 2; ++j)
    if (kb_begin + j < kb_end)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4* p = reinterpret_cast<const uint4*>(xrow[mt] + (size_t)(kb_begin + j) * kKBlock);
        xbuf[j][mt][0] = __ldg(p);
        xbuf[j][mt][1] = __ldg(p + 1);
      }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) xnext[mt] = reinterpret_cast<const uint4*>(xrow[mt] + (size_t)(kb_begin + 2) * kKBlock);
}

// Refill a consumed slot of that ring with the block two ahead.
template <int MT>
__device__ __forceinline__ void lean_x_refill(uint4 (&xb)[MT][2], const uint4* (&xnext)[MT]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    xb[mt][0] = __ldg(xnext[mt]);
    xb[mt][1] = __ldg(xnext[mt] + 1);
    xnext[mt] += kKBlock / 8;
  }
}

template <typename T, int MT, int TN, int WN, int WK, int P, bool GLU = false>
__global__ void __launch_bounds__(WN * WK * 32)
    w4a16_lean_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const uint32_t* __restrict__ sc,
                      T* __restrict__ out, int M, int N, int K, const T* __restrict__ /*gamma: NORM is cp-only*/,
                      float /*eps*/) {
  static_assert(P % 2 == 0 && P >= 2, "lean kernel: P must be even (a group is 2 k64 blocks)");
  static_assert(!GLU || TN % 2 == 0, "lean GLU: tiles pair up (gate, up)");
  extern __shared__ float red[];  // [WK-1][WN][TN*MT*4][32], as the classic kernel
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int G = K / kGroup, NT = N / kNTile;
  const int m0 = blockIdx.x * (MT * 8);
  int kb_begin, kb_end;
  lean_warp_blocks(G, wk, WK, kb_begin, kb_end);
  constexpr int TW = GLU ? TN / 2 : TN;  // output tiles per warp (GLU: gate / up tile pairs)
  const int NTW = GLU ? NT / 2 : NT;
  const int n_groups = (NTW + WN * TW - 1) / (WN * TW);
  for (int grp = blockIdx.y; grp < n_groups; grp += gridDim.y) {
  const int tile0 = (grp * WN + wn) * TW;
  const bool active = tile0 < NTW;

  float acc[TN][MT][4];
  tc_zero<MT, TN>(acc);

  if (active) {
    const T* xrow[MT];
    const uint4* wp[TN];
    const uint32_t* sp[TN];
    tc_lane_pointers<T, MT, TN, GLU>(x, qw, sc, M, K, NT, m0, tile0, lane, xrow, wp, sp);

    // Ring: P blocks of weights, P/2 groups of scales, 2 blocks of activations. Block kb lives in
    // slot (kb - kb_begin) % P (its group's scales in slot / 2, its activations in kb % 2).
    uint4 wbuf[P][TN];
    uint32_t sbuf[P / 2][TN];
    uint4 xbuf[2][MT][2];
#pragma unroll
    for (int j = 0; j < P; ++j)
      if (kb_begin + j < kb_end) {
#pragma unroll
        for (int tn = 0; tn < TN; ++tn) {
          wbuf[j][tn] = ld_stream(wp[tn] + (size_t)(kb_begin + j) * 32);
          if (j % 2 == 0) sbuf[j / 2][tn] = __ldg(sp[tn] + ((kb_begin + j) >> 1) * 8);
        }
      }
    pdl_wait();  // as the classic kernel: weights in flight, activations after the wait
    const uint4* xnext[MT];
    lean_x_start<T, MT>(xrow, kb_begin, kb_end, xbuf, xnext);

    // Running pointers of the next refills (64-bit adds instead of recomputed addresses).
    const uint4* wnext[TN];
    const uint32_t* snext[TN];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
      wnext[tn] = wp[tn] + (size_t)(kb_begin + P) * 32;
      snext[tn] = sp[tn] + ((kb_begin + P) >> 1) * 8;
    }
    float accg[TN][MT][4];
    float xs[MT][4];
    for (int base = kb_begin; base < kb_end; base += P) {
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const int kb = base + j;
        if (kb < kb_end) {  // kb even => kb + 1 < kb_end too (whole groups)
          if (j % 2 == 0) lean_block<T, MT, TN, true>(wbuf[j], xbuf[j & 1], accg, xs);
          else lean_block<T, MT, TN, false>(wbuf[j], xbuf[j & 1], accg, xs);
          // refill the consumed slots: weights P blocks ahead, activations 2 blocks ahead
          if (kb + P < kb_end)
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
              wbuf[j][tn] = ld_stream(wnext[tn]);
              wnext[tn] += 32;
            }
          if (kb + 2 < kb_end) lean_x_refill<MT>(xbuf[j & 1], xnext);
          if (j % 2 == 1) {
            lean_fold<T, MT, TN>(acc, accg, xs, sbuf[j / 2]);   // end of group kb/2
            if (kb + P < kb_end)   // block kb - 1 + P starts group (kb + P) / 2
#pragma unroll
              for (int tn = 0; tn < TN; ++tn) {
                sbuf[j / 2][tn] = __ldg(snext[tn]);
                snext[tn] += 8;
              }
          }
        }
      }
    }
  }

  pdl_launch_dependents();
  tc_epilogue<T, MT, TN, WN, WK, GLU>(acc, red, wn, wk, lane, active, tile0, NT, m0, M, N, out);
  if (WK > 1 && grp + (int)gridDim.y < n_groups) __syncthreads();  // red[] is reused next group
  }  // for grp
}

// ---------------------------------------------------------------------------------------------
// Lean kernel with its weight ring in SHARED memory (NOTES.md v10): same math as above, but each
// warp streams its (tile, block) pieces with 16-byte cp.async into a private PS-stage ring, so the
// bytes in flight no longer cost registers. Why: ncu on the register ring (H200, 2026-11-29) showed
// 25% theoretical occupancy (registers), ~13 warps per SM, DRAM at 35-53% and 43% of stall cycles
// waiting on L1TEX: too few bytes in flight. Each lane reads back only the 16 B (and the 4-byte
// scale word) it copied itself, so cp.async.wait_group alone orders the copy and the read: no
// barrier. Stage st of warp w: weights at ring[w][st][tn][lane] (uint4), scales at
// sring[w][st][tn][lane] (uint32). The split-K reduction buffer follows the rings.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

__host__ __device__ constexpr size_t lean_cp_smem_bytes(int MT, int TN, int WN, int WK, int PS) {
  return (size_t)WN * WK * PS * TN * 32 * (16 + 4) + tc_red_bytes(MT, TN, WN, WK);
}

// NORM (kernels/NOTES.md v21): out = rsqrt(mean(x^2) + eps) * (gamma * x) @ W^T per token, i.e. the GEMM of an
// RMSNorm's output, from the raw x: the squares are summed on the tensor cores as x is consumed (lean_block), the
// warps along K add their partial sums through shared memory, and the fp32 accumulators are scaled per token
// before the epilogue (before GLU's activation too: gate and up both come from the normalised x).
template <typename T, int MT, int TN, int WN, int WK, int PS, bool GLU = false, bool NORM = false>
__global__ void __launch_bounds__(WN * WK * 32)
    w4a16_lean_cp_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const uint32_t* __restrict__ sc,
                         T* __restrict__ out, int M, int N, int K, const T* __restrict__ gamma, float eps) {
  static_assert(PS >= 2, "lean cp kernel: at least 2 stages");
  static_assert(!GLU || TN % 2 == 0, "lean GLU: tiles pair up (gate, up)");
  constexpr int W = WN * WK;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint4* wring = reinterpret_cast<uint4*>(smem_raw) + (size_t)warp * PS * TN * 32 + lane;
  uint32_t* sring = reinterpret_cast<uint32_t*>(smem_raw + (size_t)W * PS * TN * 32 * 16) + (size_t)warp * PS * TN * 32 + lane;
  float* red = reinterpret_cast<float*>(smem_raw + (size_t)W * PS * TN * 32 * 20);
  const int wn = warp % WN, wk = warp / WN;
  const int G = K / kGroup, NT = N / kNTile;
  const int m0 = blockIdx.x * (MT * 8);
  int kb_begin, kb_end;
  lean_warp_blocks(G, wk, WK, kb_begin, kb_end);
  constexpr int TW = GLU ? TN / 2 : TN;  // output tiles per warp (GLU: gate / up tile pairs)
  const int NTW = GLU ? NT / 2 : NT;
  const int n_groups = (NTW + WN * TW - 1) / (WN * TW);
  for (int grp = blockIdx.y; grp < n_groups; grp += gridDim.y) {
  const int tile0 = (grp * WN + wn) * TW;
  const bool active = tile0 < NTW;

  float acc[TN][MT][4];
  tc_zero<MT, TN>(acc);
  float dsq[MT][4];  // NORM: the squares' mma accumulators (token g's sum of squares at [mt][g & 1] of lane 4g + g/2)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) dsq[mt][0] = dsq[mt][1] = dsq[mt][2] = dsq[mt][3] = 0.f;

  if (active) {
    const T* xrow[MT];
    const uint4* wp[TN];
    const uint32_t* sp[TN];
    tc_lane_pointers<T, MT, TN, GLU>(x, qw, sc, M, K, NT, m0, tile0, lane, xrow, wp, sp);
    // NORM: the norm weight of block b, read when the block is (a constant, L1-resident after the CTA's first
    // pass over it: a ring like the activations' cost 16 registers a thread and occupancy, ptxas -v)
    const uint4* gnext = nullptr;
    if constexpr (NORM) gnext = reinterpret_cast<const uint4*>(gamma + (lane & 3) * 16 + (size_t)kb_begin * kKBlock);
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {  // from block kb_begin and its group on
      wp[tn] += (size_t)kb_begin * 32;
      sp[tn] += (size_t)(kb_begin >> 1) * 8;
    }
    // issue block kb_begin + i (pointers advance by one block per issue) into stage st
    int issued = 0;
    auto issue = [&](int st) {
#pragma unroll
      for (int tn = 0; tn < TN; ++tn) {
        cp_async16_zfill(wring + (st * TN + tn) * 32, wp[tn] + (size_t)issued * 32, true);
        cp_async4(sring + (st * TN + tn) * 32, sp[tn] + (size_t)(issued >> 1) * 8);
      }
      ++issued;
    };
#pragma unroll
    for (int st = 0; st < PS - 1; ++st) {  // one commit group per stage, empty ones included
      if (kb_begin + st < kb_end) issue(st);
      cp_async_commit();
    }
    pdl_wait();
    uint4 xbuf[2][MT][2];
    const uint4* xnext[MT];
    lean_x_start<T, MT>(xrow, kb_begin, kb_end, xbuf, xnext);

    float accg[TN][MT][4];
    float xs[MT][4];
    int stage = 0;
    for (int kb = kb_begin; kb < kb_end; kb += 2) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int b = kb + h;
        cp_async_wait<PS - 2>();  // this thread's copies of block b have landed
        // refill the stage block b-1 used (read into registers last iteration) with block b+PS-1
        if (b + PS - 1 < kb_end) issue(stage == 0 ? PS - 1 : stage - 1);
        cp_async_commit();
        uint4 w[TN];
        uint32_t s2[TN];
#pragma unroll
        for (int tn = 0; tn < TN; ++tn) {
          w[tn] = wring[(stage * TN + tn) * 32];
          if (h == 1) s2[tn] = sring[(stage * TN + tn) * 32];
        }
        // NORM: block b's norm weight, read here, after the ring (requested before the wait instead, it took
        // c58 / c61 from 128 to 138 registers, past two CTAs per SM; ptxas -v, 2026-11-30)
        uint4 gb[2];
        if constexpr (NORM) {
          gb[0] = __ldg(gnext);
          gb[1] = __ldg(gnext + 1);
          gnext += kKBlock / 8;
        }
        if (h == 0) lean_block<T, MT, TN, true, NORM>(w, xbuf[0], accg, xs, gb, dsq);
        else lean_block<T, MT, TN, false, NORM>(w, xbuf[1], accg, xs, gb, dsq);
        if (b + 2 < kb_end) lean_x_refill<MT>(xbuf[h], xnext);
        if (h == 1) lean_fold<T, MT, TN>(acc, accg, xs, s2);
        stage = stage + 1 == PS ? 0 : stage + 1;
      }
    }
    cp_async_wait_all();  // no copy may still target the ring when it is reused (next grp)
  }

  if constexpr (NORM) {  // every warp: the barrier below (warps wn = 0 are always active: tile0 < NTW)
    __shared__ float nsq[WK][MT * 8];  // per warp along K, per token of the CTA: its partial sum of squares
    const int g = lane >> 2, c = lane & 3;
    if (wn == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float part = c == (g >> 1) ? dsq[mt][g & 1] : 0.f;  // D[g][g]: lane 4g + g/2, register g & 1
        part += __shfl_xor_sync(0xffffffffu, part, 1);
        part += __shfl_xor_sync(0xffffffffu, part, 2);
        if (c == 0) nsq[wk][mt * 8 + g] = part;
      }
    }
    __syncthreads();
    const float inv_k = 1.f / (float)K;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {  // this lane's accumulators hold tokens 2c (registers 0, 2) and 2c + 1 (1, 3)
      float s0 = 0.f, s1 = 0.f;
#pragma unroll
      for (int w = 0; w < WK; ++w) {
        s0 += nsq[w][mt * 8 + 2 * c];
        s1 += nsq[w][mt * 8 + 2 * c + 1];
      }
      const float r0 = rsqrtf(s0 * inv_k + eps), r1 = rsqrtf(s1 * inv_k + eps);
#pragma unroll
      for (int tn = 0; tn < TN; ++tn) {
        acc[tn][mt][0] *= r0;
        acc[tn][mt][1] *= r1;
        acc[tn][mt][2] *= r0;
        acc[tn][mt][3] *= r1;
      }
    }
  }

  pdl_launch_dependents();
  tc_epilogue<T, MT, TN, WN, WK, GLU>(acc, red, wn, wk, lane, active, tile0, NT, m0, M, N, out);
  if ((WK > 1 || NORM) && grp + (int)gridDim.y < n_groups) __syncthreads();  // red[] / nsq[] are reused next group
  }  // for grp
}

}  // namespace grace_w4a16
