// W4A16 GEMM kernels for GRACE-DS: out (M,N) = x (M,K) @ W^T, W = int4 codes * per-group scales.
//
// No torch headers here: this file (and w4a16_kernel.cu) compile with plain nvcc, which is what
// CI checks (-gencode=arch=compute_90a,code=sm_90a -c).
//
// ---------------------------------------------------------------------------------------------
// Why "swap AB": the mma.sync.m16n8k16 instruction multiplies a 16x16 A tile by a 16x8 B tile.
// At small M (decode), the token count is 1..64, so we put the WEIGHTS in the A operand (16 output
// features x 16 k) and the TOKENS in the B operand (8 tokens x 16 k): out^T = W @ x^T. One token
// tile of 8 wastes at most 7 columns at M=1, and each dequantised weight fragment is reused for
// every token tile (M/8 mma's), so the weights are read from DRAM and dequantised exactly once.
//
// ---------------------------------------------------------------------------------------------
// Packed weight layout (made by kernels/w4a16/pack.py, see its docstring for the same table):
//   qweight: int32 [N/16][K/64][32 lanes][4 words]       (512 contiguous bytes per (n16, k64))
//   A warp streams one (n16 tile, k64 block) with ONE coalesced 16-byte load per lane; word s of
//   lane L holds the 8 int4 codes (stored as code+8 in [0,15]) that lane L needs as its A fragment
//   for k16 step s of the block.  With g = L/4, c = L%4, nibble i of word s holds
//        reg = i % 4, half = i / 4
//        row = 16*tile + g + 8*(reg % 2)
//        k   = 64*kb + 16*c + 4*s + 2*(reg / 2) + half
//   i.e. the K order inside a 64-block is PERMUTED (the dot product does not care, as long as the
//   activations use the same permutation): the mma "k" positions {2c,2c+1,2c+8,2c+9} of step s map
//   to the 4 consecutive physical k = 16c+4s+{0,1,2,3}. So the 16 activation values lane L needs
//   for a whole k64 block (4 steps) are 16 CONSECUTIVE elements x[t][64kb+16c .. +15]: two 16-byte
//   loads per token tile per block, no shuffles.
//   The nibble order matches the lop3 dequant below: (q & 0x000f000f) gives nibbles {0,4} = the
//   two halves of A register 0; q>>4 -> {1,5} = register 1; q>>8 -> {2,6}; q>>12 -> {3,7}.
//
//   scales: T [N/16][K/128][8][2] (T = activation dtype): (s[row g], s[row g+8]) of tile and group,
//   so lane L loads one 32-bit word (index g) per group: the scales of both rows it touches.
//
// int4 -> bf16/fp16 (FasterTransformer / Marlin trick): OR-ing a nibble v into the mantissa of
// 128.0 (bf16 0x4300) or 1024.0 (fp16 0x6400) gives exactly 128+v / 1024+v; subtracting 136 / 1032
// gives v-8 exactly; one multiply by the scale rounds once (same as dequantising in that dtype).
// ---------------------------------------------------------------------------------------------
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "w4a16_pdl.cuh"

namespace grace_w4a16 {

constexpr int kGroup = 128;   // quantisation group along K (the only one supported)
constexpr int kKBlock = 64;   // K per packed block (4 mma k16 steps)
constexpr int kNTile = 16;    // output features per packed tile (mma M dimension)

template <typename T> struct Traits;
template <> struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kEx = 0x43004300u;    // bf16 128.0 in both halves
  static constexpr uint32_t kBias = 0x43084308u;  // bf16 136.0 = 128 + 8 (code offset)
};
template <> struct Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kEx = 0x64006400u;    // fp16 1024.0
  static constexpr uint32_t kBias = 0x64086408u;  // fp16 1032.0
};

template <int lut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm volatile("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(lut));
  return r;
}

// (a & b) | c as one LOP3
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  return lop3<(0xf0 & 0xcc) | 0xaa>(a, b, c);
}

template <typename T>
__device__ __forceinline__ uint32_t dq2(uint32_t v, uint32_t s2) {
  using T2 = typename Traits<T>::T2;
  uint32_t bias = Traits<T>::kBias;
  T2 r = __hmul2(__hsub2(*reinterpret_cast<T2*>(&v), *reinterpret_cast<T2*>(&bias)),
                 *reinterpret_cast<T2*>(&s2));
  return *reinterpret_cast<uint32_t*>(&r);
}

// One packed word -> the 4 A-fragment registers of one m16n8k16 step.
// s_lo = scale of row g in both halves, s_hi = scale of row g+8 in both halves.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t q, uint32_t s_lo, uint32_t s_hi, uint32_t a[4]) {
  constexpr uint32_t kMask = 0x000f000fu;
  constexpr uint32_t kEx = Traits<T>::kEx;
  a[0] = dq2<T>(and_or(q, kMask, kEx), s_lo);        // nibbles 0,4: row g,   k +0,+1
  a[1] = dq2<T>(and_or(q >> 4, kMask, kEx), s_hi);   // nibbles 1,5: row g+8, k +0,+1
  a[2] = dq2<T>(and_or(q >> 8, kMask, kEx), s_lo);   // nibbles 2,6: row g,   k +2,+3
  a[3] = dq2<T>(and_or(q >> 12, kMask, kEx), s_hi);  // nibbles 3,7: row g+8, k +2,+3
}

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Streaming 16-byte load of packed weights: read once, keep them out of L1.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// fp32 pair atomic add into the split-K workspace: one vector atomic on sm_90, two scalar ones
// before (the float2 overload exists from sm_90 on; Ampere builds still compile and run).
__device__ __forceinline__ void atomic_add2(float2* p, float a, float b) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  atomicAdd(p, make_float2(a, b));
#else
  atomicAdd(&p->x, a);
  atomicAdd(&p->y, b);
#endif
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
// Explicit 16-bit -> fp32 (torch builds extensions with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__).
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Shared memory of the register kernels' intra-CTA split-K reduction (tc_epilogue's `red`).
__host__ __device__ constexpr size_t tc_red_bytes(int MT, int TN, int WN, int WK) {
  return (size_t)(WK - 1) * WN * TN * MT * 4 * 32 * sizeof(float);
}

// Raises Kern's dynamic shared-memory limit to smem when that is above the 48 KB default, once per
// kernel (the attribute stays with the function for the process).
template <auto Kern>
inline cudaError_t raise_smem_limit_once(size_t smem) {
  static bool done = false;
  if (smem <= 48 * 1024 || done) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(Kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  done = e == cudaSuccess;
  return e;
}

// Stores one m16n8 accumulator tile of a lane into out (row stride W): c0, c1 = (feature n, tokens t, t+1),
// c2, c3 = (feature n + 8, the same tokens); tokens past M are not stored.
template <typename T>
__device__ __forceinline__ void tc_store_tile(T* __restrict__ out, int W, int n, int t, int M, float c0, float c1,
                                              float c2, float c3) {
  if (t < M) {
    out[(size_t)t * W + n] = from_float<T>(c0);
    out[(size_t)t * W + n + 8] = from_float<T>(c2);
  }
  if (t + 1 < M) {
    out[(size_t)(t + 1) * W + n] = from_float<T>(c1);
    out[(size_t)(t + 1) * W + n + 8] = from_float<T>(c3);
  }
}

// SiLU(gate) * up in fp32, the gated MLP's activation (GLU epilogue below).
__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.f + __expf(-gate)) * up; }

// Epilogue shared by the register kernels (this one and w4a16_lean.cuh): the WK warps along K of
// each wn add their partial sums through shared memory (warp wk>0 -> warp wk=0), and warp wk=0
// stores its TN tiles x MT token tiles. Every warp of the CTA must call it (it holds a barrier).
// GLU (lean kernels, NOTES.md v15): the weight is a fused [gate; up] projection of N = 2I rows and
// the warp's tiles pair up (tc_lane_pointers<..., true>): tile tn < TN/2 is gate tile tile0 + tn, tile
// tn + TN/2 the up tile of the same rows. The warp stores silu(gate) * up, rounded once, into out of
// width I = N / 2; tile0 and the tile bound then count the I / 16 tile pairs.
template <typename T, int MT, int TN, int WN, int WK, bool GLU = false>
__device__ __forceinline__ void tc_epilogue(float (&acc)[TN][MT][4], float* red, int wn, int wk, int lane,
                                            bool active, int tile0, int NT, int m0, int M, int N,
                                            T* __restrict__ out) {
  const int g = lane >> 2, c = lane & 3;
  if (WK > 1) {
    constexpr int R = TN * MT * 4;
    if (wk > 0) {
      float* dst = red + ((size_t)((wk - 1) * WN + wn) * R) * 32 + lane;
#pragma unroll
      for (int i = 0; i < TN; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) dst[((i * MT + j) * 4 + r) * 32] = acc[i][j][r];
    }
    __syncthreads();
    if (wk == 0) {
      for (int w = 1; w < WK; ++w) {
        const float* src = red + ((size_t)((w - 1) * WN + wn) * R) * 32 + lane;
#pragma unroll
        for (int i = 0; i < TN; ++i)
#pragma unroll
          for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] += src[((i * MT + j) * 4 + r) * 32];
      }
    }
  }

  if constexpr (GLU) {
    if (wk == 0 && active) {
      constexpr int TH = TN / 2;
      const int NO = N / 2, NTO = NT / 2;  // output width and its tile pairs
#pragma unroll
      for (int tn = 0; tn < TH; ++tn) {
        if (tile0 + tn >= NTO) continue;
        const int n = (tile0 + tn) * kNTile + g;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const float(&a)[4] = acc[tn][mt];
          const float(&b)[4] = acc[tn + TH][mt];
          tc_store_tile(out, NO, n, m0 + mt * 8 + c * 2, M, silu_mul(a[0], b[0]), silu_mul(a[1], b[1]),
                        silu_mul(a[2], b[2]), silu_mul(a[3], b[3]));
        }
      }
    }
    return;
  }
  if (wk == 0 && active) {
    // Accumulator of m16n8 tile: c0,c1 = (row g, tokens 2c, 2c+1), c2,c3 = (row g+8, same tokens);
    // "row" is the output feature n, the token is the output row.
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
      if (tile0 + tn >= NT) continue;
      const int n = (tile0 + tn) * kNTile + g;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        tc_store_tile(out, N, n, m0 + mt * 8 + c * 2, M, acc[tn][mt][0], acc[tn][mt][1], acc[tn][mt][2],
                      acc[tn][mt][3]);
    }
  }
}

// Zeroes a warp's output accumulators.
template <int MT, int TN>
__device__ __forceinline__ void tc_zero(float (&acc)[TN][MT][4]) {
#pragma unroll
  for (int i = 0; i < TN; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
}

// A lane's pointers, shared by the register kernels: its activation rows (token tile mt, row g = lane/4,
// the 16 consecutive k of c = lane%4; tokens past M clamped to M-1: valid memory, results never
// stored) and, per n16 tile, its packed weights (block 0) and its scale word (group 0). Tiles past
// N are clamped to the last one (stores are guarded). GLU: tile0 counts tile pairs (tc_epilogue);
// tiles tn < TN/2 are gate tiles tile0 + tn, the others the up tiles NT/2 + tile0 + tn - TN/2.
template <typename T, int MT, int TN, bool GLU = false>
__device__ __forceinline__ void tc_lane_pointers(const T* __restrict__ x, const uint4* __restrict__ qw,
                                                 const uint32_t* __restrict__ sc, int M, int K, int NT, int m0,
                                                 int tile0, int lane, const T* (&xrow)[MT], const uint4* (&wp)[TN],
                                                 const uint32_t* (&sp)[TN]) {
  const int g = lane >> 2, c = lane & 3, KB = K / kKBlock, G = K / kGroup;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    int t = m0 + mt * 8 + g;
    t = t < M ? t : M - 1;
    xrow[mt] = x + (size_t)t * K + c * 16;
  }
#pragma unroll
  for (int tn = 0; tn < TN; ++tn) {
    int tile;
    if constexpr (GLU) {
      const int NTO = NT / 2, j = tn < TN / 2 ? tn : tn - TN / 2;
      tile = (tn < TN / 2 ? 0 : NTO) + (tile0 + j < NTO ? tile0 + j : NTO - 1);
    } else {
      tile = tile0 + tn < NT ? tile0 + tn : NT - 1;
    }
    wp[tn] = qw + (size_t)tile * KB * 32 + lane;
    sp[tn] = sc + (size_t)tile * G * 8 + g;
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (swap AB).
//   CTA = WN x WK warps. Warp (wn, wk) owns TN consecutive n16 tiles and the wk-th contiguous slice
//   of the K blocks (intra-CTA split-K: enough warps to fill 132 SMs even for N=4096, and no
//   cross-CTA reduction); the WK partial sums are added through shared memory at the end.
//   grid.x = token chunks of MT*8 (fastest, so the CTAs that share a weight tile run together and
//   the 2nd..nth chunk read it from L2), grid.y = groups of WN*TN n16 tiles.
//   Pipelining: P k64 blocks of weights (P*TN*512 B per warp) are in flight in registers:
//   the block kb+P is requested before block kb is dequantised and multiplied, so each SM keeps
//   ~32-64 KB of loads outstanding (~3-4.8 TB/s x ~1-1.5 us of DRAM latency over 132 SMs).
//   The scales ride in the same ring; the activations (tiny, L2/L1-resident, shared by every CTA)
//   are prefetched PX blocks ahead (XR=0: 1 block; XR=1: P at MT=1, P/2 at MT=2). Deeper x
//   prefetch costs registers and occupancy; which wins depends on the shape (see NOTES.md).
// ---------------------------------------------------------------------------------------------
template <typename T, int MT, int TN, int WN, int WK, int XR, int P>
__global__ void __launch_bounds__(WN * WK * 32)
    w4a16_tc_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const uint32_t* __restrict__ sc,
                    T* __restrict__ out, int M, int N, int K) {
  extern __shared__ float red[];  // [WK-1][WN][TN*MT*4][32] partial sums, lane fastest (no conflicts)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int g = lane >> 2, c = lane & 3;
  const int KB = K / kKBlock, G = K / kGroup, NT = N / kNTile;
  const int m0 = blockIdx.x * (MT * 8);
  const int kb_begin = (int)(((long long)KB * wk) / WK), kb_end = (int)(((long long)KB * (wk + 1)) / WK);
  const int n_groups = (NT + WN * TN - 1) / (WN * TN);
  // Grid-stride over groups of WN*TN tiles: the launcher may size grid.y to one full wave of
  // resident CTAs (persistent mode, off by default: measured no faster, NOTES.md); else it is one
  // CTA per group and this loop runs once.
  for (int grp = blockIdx.y; grp < n_groups; grp += gridDim.y) {
  const int tile0 = (grp * WN + wn) * TN;
  const bool active = tile0 < NT;  // warp-uniform; inactive warps still join the barrier

  float acc[TN][MT][4];
  tc_zero<MT, TN>(acc);

  if (active) {
    // Row pointers of the activations this lane reads (token tile mt, row g); tokens past M are
    // clamped to M-1 (valid memory; their results are never stored). Written out here rather than
    // with tc_lane_pointers: through the helper, ptxas recomputed addresses in this kernel's main
    // loop (836 -> 1033 instructions for config 2, sm_90a), which the lean kernels do not suffer.
    const T* xrow[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      int t = m0 + mt * 8 + g;
      t = t < M ? t : M - 1;
      xrow[mt] = x + (size_t)t * K + c * 16;
    }
    const uint4* wp[TN];
    const uint32_t* sp[TN];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
      int tile = tile0 + tn < NT ? tile0 + tn : NT - 1;  // clamp (stores are guarded)
      wp[tn] = qw + (size_t)tile * KB * 32 + lane;
      sp[tn] = sc + (size_t)tile * G * 8 + g;
    }

    // Register ring of P k64 blocks in flight: weights + their scales, and the activations PX
    // blocks ahead (XR=0: 1; XR=1: P for MT=1, P/2 for MT=2; registers limit it for larger MT). Block kb lives in slot (kb - kb_begin) % P; the loop below is
    // unrolled by P so every slot index is a compile-time constant (no local memory).
    constexpr int PX = XR == 0 ? 1 : (MT == 1 ? P : (MT == 2 ? (P / 2 > 1 ? P / 2 : 1) : 1));
    uint4 wbuf[P][TN];
    uint32_t sbuf[P][TN];
    uint4 xbuf[PX][MT][2];
#pragma unroll
    for (int j = 0; j < P; ++j)
      if (kb_begin + j < kb_end) {
#pragma unroll
        for (int tn = 0; tn < TN; ++tn) {
          wbuf[j][tn] = ld_stream(wp[tn] + (size_t)(kb_begin + j) * 32);
          sbuf[j][tn] = __ldg(sp[tn] + ((kb_begin + j) >> 1) * 8);
        }
      }
    // PDL: the weight ring above is in flight; the activations come from the previous kernel.
    pdl_wait();
#pragma unroll
    for (int j = 0; j < PX; ++j)
      if (kb_begin + j < kb_end)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint4* p = reinterpret_cast<const uint4*>(xrow[mt] + (size_t)(kb_begin + j) * kKBlock);
          xbuf[j][mt][0] = __ldg(p);
          xbuf[j][mt][1] = __ldg(p + 1);
        }

    for (int base = kb_begin; base < kb_end; base += P) {
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const int kb = base + j;
        if (kb < kb_end) {
          uint4 wcur[TN];
          uint32_t scur[TN];
#pragma unroll
          for (int tn = 0; tn < TN; ++tn) { wcur[tn] = wbuf[j][tn]; scur[tn] = sbuf[j][tn]; }
          if (kb + P < kb_end)
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
              wbuf[j][tn] = ld_stream(wp[tn] + (size_t)(kb + P) * 32);
              sbuf[j][tn] = __ldg(sp[tn] + ((kb + P) >> 1) * 8);  // (s[g], s[g+8]) of group kb/2
            }
          uint4 xc[MT][2];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) { xc[mt][0] = xbuf[j % PX][mt][0]; xc[mt][1] = xbuf[j % PX][mt][1]; }
          if (kb + PX < kb_end)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              const uint4* p = reinterpret_cast<const uint4*>(xrow[mt] + (size_t)(kb + PX) * kKBlock);
              xbuf[j % PX][mt][0] = __ldg(p);
              xbuf[j % PX][mt][1] = __ldg(p + 1);
            }
          uint32_t s_lo[TN], s_hi[TN];
#pragma unroll
          for (int tn = 0; tn < TN; ++tn) {
            const uint32_t s2 = scur[tn];
            s_lo[tn] = __byte_perm(s2, s2, 0x1010);     // s[g]   in both halves
            s_hi[tn] = __byte_perm(s2, s2, 0x3232);     // s[g+8] in both halves
          }
#pragma unroll
          for (int s = 0; s < 4; ++s) {
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
              uint32_t q = s == 0 ? wcur[tn].x : s == 1 ? wcur[tn].y : s == 2 ? wcur[tn].z : wcur[tn].w;
              uint32_t a[4];
              dequant_word<T>(q, s_lo[tn], s_hi[tn], a);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                // 16 consecutive activations: step s uses elements 4s..4s+3 = word 2s, 2s+1
                const uint4& v = xc[mt][s >> 1];
                uint32_t b0 = (s & 1) ? v.z : v.x;
                uint32_t b1 = (s & 1) ? v.w : v.y;
                mma16816<T>(acc[tn][mt], a, b0, b1);
              }
            }
          }
        }
      }
    }
  }

  pdl_launch_dependents();
  tc_epilogue<T, MT, TN, WN, WK>(acc, red, wn, wk, lane, active, tile0, NT, m0, M, N, out);
  if (WK > 1 && grp + (int)gridDim.y < n_groups) __syncthreads();  // red[] is reused next group
  }  // for grp
}

// ---------------------------------------------------------------------------------------------
// Dequantise the packed layout back to a row-major (N,K) weight in the activation dtype (the
// large-M path: dequantise + cuBLAS). One thread per (tile, kb, lane): it owns rows g and g+8 and
// the 16 consecutive k = 64kb+16c..+15 of each (see the layout above), so it writes 2 x 32 B.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void w4a16_dequant_kernel(const uint4* __restrict__ qw, const uint32_t* __restrict__ sc,
                                     T* __restrict__ w, int N, int K) {
  const int KB = K / kKBlock, G = K / kGroup;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long total = (long long)(N / kNTile) * KB * 32;
  if (idx >= total) return;
  const int lane = (int)(idx & 31);
  const long long tk = idx >> 5;
  const int kb = (int)(tk % KB);
  const int tile = (int)(tk / KB);
  const int g = lane >> 2, c = lane & 3;
  uint4 q4 = ld_stream(qw + idx);
  uint32_t s2 = __ldg(sc + ((size_t)tile * G + (kb >> 1)) * 8 + g);
  uint32_t s_lo = __byte_perm(s2, s2, 0x1010), s_hi = __byte_perm(s2, s2, 0x3232);
  uint32_t lo[8], hi[8];  // row g / row g+8: 16 consecutive k as 8 pairs
  uint32_t qs[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    uint32_t a[4];
    dequant_word<T>(qs[s], s_lo, s_hi, a);
    lo[2 * s] = a[0];
    lo[2 * s + 1] = a[2];
    hi[2 * s] = a[1];
    hi[2 * s + 1] = a[3];
  }
  const int row = tile * kNTile + g;
  uint4* d0 = reinterpret_cast<uint4*>(w + (size_t)row * K + kb * kKBlock + c * 16);
  uint4* d1 = reinterpret_cast<uint4*>(w + (size_t)(row + 8) * K + kb * kKBlock + c * 16);
  d0[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  d0[1] = make_uint4(lo[4], lo[5], lo[6], lo[7]);
  d1[0] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
  d1[1] = make_uint4(hi[4], hi[5], hi[6], hi[7]);
}

}  // namespace grace_w4a16
