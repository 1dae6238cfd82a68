// Split-K W4A16 kernel with the activations staged in shared memory ("sk" configs).
//
// Same packed weight layout and the same swap-AB mma.sync m16n8k16 as w4a16_kernel.cuh (weights
// are the A operand, tokens the B operand). What differs:
//   * The activation tile x[m0 .. m0+MT*8) x [K stage] is copied ONCE per CTA into shared memory
//     with 16-byte cp.async (NS-buffered stages of KC k64 blocks, one __syncthreads per stage; the
//     copy of stage st+NS-1 is issued when stage st starts),
//     and every warp of the CTA reads its B fragments from there (LDS.128). The old kernel had each
//     warp re-read x from L1/L2: at M=64 that was ~8x the weight bytes (NOTES.md).
//     Rows are padded by 16 bytes (pitch = 128*KC + 16 B): the 8 lanes of one LDS.128 phase
//     (g in {0,1}, c in 0..3) hit byte offsets 16g + 32c (mod 128): all 32 banks, no conflict.
//     Token rows past M are zero-filled (cp.async src-size 0): no traffic, no garbage.
//   * Split-K ACROSS CTAs: grid = (token chunks of MT*8, groups of WN*TN n16 tiles, splits S).
//     Each CTA owns a contiguous range of k64 blocks. S == 1: the CTA stores bf16/fp16 directly.
//     S > 1: fp32 partials are added with vector atomics (float2, sm_90) into a zeroed workspace
//     ws[M_pad/2][N][2] (token pairs interleaved: one lane's (2c, 2c+1) accumulator pair is one
//     8-byte atomic), then sk_finalize_kernel casts to the output. Summation order varies from
//     run to run (fp32 atomics): results are not bitwise reproducible, well inside 1e-2.
//   * Weights and scales stream through the same P-deep register ring as the old kernel
//     (ld.global.nc.L1::no_allocate, 16 B per lane per (tile, k64 block)).
// Every warp of a CTA runs the same k loop (warps whose tiles fall past N are clamped to the last
// tile, compute redundantly and do not store), so the per-stage barriers are uniform.
#pragma once
#include "w4a16_kernel.cuh"

namespace grace_w4a16 {

__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Shared-memory bytes of one CTA of an sk config.
__host__ __device__ constexpr int sk_smem_bytes(int MT, int KC, int NS) { return NS * MT * 8 * (KC * 8 + 1) * 16; }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// MB: minimum resident CTAs per SM asked of the register allocator (1 = no constraint).
template <typename T, int MT, int TN, int WN, int KC, int NS, int P, int MB>
__global__ void __launch_bounds__(WN * 32, MB)
    w4a16_sk_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const uint32_t* __restrict__ sc,
                    T* __restrict__ out, float2* __restrict__ ws, int M, int N, int K, int kb_per_split) {
  extern __shared__ uint4 xs[];  // [NS stages][MT*8 rows][KC*8 + 1 uint4]
  constexpr int ROWU = KC * 8 + 1;
  constexpr int STAGE_U = MT * 8 * ROWU;
  constexpr int NTHR = WN * 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int KB = K / kKBlock, G = K / kGroup, NT = N / kNTile;
  const int m0 = blockIdx.x * (MT * 8);
  const int tile0 = (blockIdx.y * WN + warp) * TN;
  const int kb_begin = blockIdx.z * kb_per_split;
  const int kb_end = min(KB, kb_begin + kb_per_split);
  const int nkb = kb_end - kb_begin;  // > 0 (the launcher sizes grid.z so)

  // x stage loader: all threads, 16 B each; stage st = k64 blocks [kb_begin + st*KC, +KC).
  auto load_stage = [&](int st, int buf) {
    const int kbs = kb_begin + st * KC;
    for (int i = threadIdx.x; i < MT * 8 * KC * 8; i += NTHR) {
      const int r = i / (KC * 8), cu = i % (KC * 8);
      const int kb = kbs + cu / 8;
      const int t = m0 + r;
      const bool valid = t < M && kb < kb_end;
      const T* src = x + (size_t)(valid ? t : 0) * K + (size_t)(valid ? kb : 0) * kKBlock + (cu % 8) * 8;
      cp_async16_zfill(xs + buf * STAGE_U + r * ROWU + cu, src, valid);
    }
  };

  const uint4* wp[TN];
  const uint32_t* sp[TN];
#pragma unroll
  for (int tn = 0; tn < TN; ++tn) {
    const int tile = tile0 + tn < NT ? tile0 + tn : NT - 1;  // clamp (stores are guarded)
    wp[tn] = qw + (size_t)tile * KB * 32 + lane;
    sp[tn] = sc + (size_t)tile * G * 8 + g;
  }

  float acc[TN][MT][4];
  tc_zero<MT, TN>(acc);

  uint4 wbuf[P][TN];
  uint32_t sbuf[P][TN];
#pragma unroll
  for (int j = 0; j < P; ++j)
    if (j < nkb) {
#pragma unroll
      for (int tn = 0; tn < TN; ++tn) {
        wbuf[j][tn] = ld_stream(wp[tn] + (size_t)(kb_begin + j) * 32);
        sbuf[j][tn] = __ldg(sp[tn] + ((kb_begin + j) >> 1) * 8);
      }
    }
  // PDL: the weight ring above is in flight; x and the split-K workspace belong to the previous
  // kernels in the stream.
  pdl_wait();
#pragma unroll
  for (int st = 0; st < NS - 1; ++st) {  // one commit group per stage, empty ones included
    if (st * KC < nkb) load_stage(st, st);
    cp_async_commit();
  }

  // This lane's B-fragment base in a stage: row g of token tile mt, 32 bytes at 32c.
  const uint4* xl = xs + g * ROWU + 2 * c;

  for (int base = 0; base < nkb; base += P) {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int r = base + j;
      if (r < nkb) {  // uniform over the CTA: the barrier below is safe
        const int kst = r % KC;
        if (kst == 0) {
          cp_async_wait<NS - 2>();  // stage r/KC has landed (this thread's copies)
          __syncthreads();  // ... and everyone's; everyone is done with stage r/KC - 1's buffer
          const int st = r / KC;
          if ((st + NS - 1) * KC < nkb) load_stage(st + NS - 1, (st + NS - 1) % NS);
          cp_async_commit();
        }
        const int kb = kb_begin + r;
        uint4 wcur[TN];
        uint32_t scur[TN];
#pragma unroll
        for (int tn = 0; tn < TN; ++tn) { wcur[tn] = wbuf[j][tn]; scur[tn] = sbuf[j][tn]; }
        if (r + P < nkb)
#pragma unroll
          for (int tn = 0; tn < TN; ++tn) {
            wbuf[j][tn] = ld_stream(wp[tn] + (size_t)(kb + P) * 32);
            sbuf[j][tn] = __ldg(sp[tn] + ((kb + P) >> 1) * 8);
          }
        uint32_t s_lo[TN], s_hi[TN];
#pragma unroll
        for (int tn = 0; tn < TN; ++tn) {
          s_lo[tn] = __byte_perm(scur[tn], scur[tn], 0x1010);
          s_hi[tn] = __byte_perm(scur[tn], scur[tn], 0x3232);
        }
        const uint4* xb = xl + ((r / KC) % NS) * STAGE_U + kst * 8;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // k16 steps 2h, 2h+1 use x elements 8h..8h+7 of the lane's 16
          uint32_t a[TN][2][4];
#pragma unroll
          for (int tn = 0; tn < TN; ++tn) {
            const uint32_t q0 = h == 0 ? wcur[tn].x : wcur[tn].z;
            const uint32_t q1 = h == 0 ? wcur[tn].y : wcur[tn].w;
            dequant_word<T>(q0, s_lo[tn], s_hi[tn], a[tn][0]);
            dequant_word<T>(q1, s_lo[tn], s_hi[tn], a[tn][1]);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4 v = xb[mt * 8 * ROWU + h];  // LDS.128 (plain load: ordered by the barriers)
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
              mma16816<T>(acc[tn][mt], a[tn][0], v.x, v.y);
              mma16816<T>(acc[tn][mt], a[tn][1], v.z, v.w);
            }
          }
        }
      }
    }
  }

  // Accumulator of m16n8 tile: c0,c1 = (feature g, tokens 2c, 2c+1), c2,c3 = (feature g+8, same).
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int tn = 0; tn < TN; ++tn) {
    if (tile0 + tn >= NT) continue;
    const int n = (tile0 + tn) * kNTile + g;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int t = m0 + mt * 8 + c * 2;
      if (split) {
        if (t < M) {  // ws rows are padded to an even token count: t+1 is in bounds
          float2* w0 = ws + (size_t)(t >> 1) * N + n;
          atomic_add2(w0, acc[tn][mt][0], acc[tn][mt][1]);
          atomic_add2(w0 + 8, acc[tn][mt][2], acc[tn][mt][3]);
        }
      } else {
        tc_store_tile(out, N, n, t, M, acc[tn][mt][0], acc[tn][mt][1], acc[tn][mt][2], acc[tn][mt][3]);
      }
    }
  }
}

// ws[Mp/2][N] float2 (token pair) -> out (M, N) in T.
template <typename T>
__global__ void sk_finalize_kernel(const float2* __restrict__ ws, T* __restrict__ out, int M, int N) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long total = (long long)((M + 1) / 2) * N;
  if (idx >= total) return;
  const int tp = (int)(idx / N), n = (int)(idx % N);
  const float2 v = ws[idx];
  const int t = 2 * tp;
  out[(size_t)t * N + n] = from_float<T>(v.x);
  if (t + 1 < M) out[(size_t)(t + 1) * N + n] = from_float<T>(v.y);
}

// ---- host helpers shared by the split-K launchers (SkLaunch here, WgLaunch in w4a16_wgmma.cuh) ----

// Resident CTAs per SM x SMs for kernel k, after raising its dynamic shared-memory limit above 48 KB.
template <typename Kern>
inline cudaError_t resident_slots(Kern k, int threads, int smem, int* slots) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  int dev = 0, sms = 0, per_sm = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, threads, smem);
  *slots = sms * (per_sm > 0 ? per_sm : 1);
  return e;
}

// Split count by wave quantisation (fits the first H100 sweep, NOTES.md v4): time ~ waves(S) / S,
// waves(S) = ceil(base*S / slots) for `base` CTAs per split; ties and near-ties go to fewer splits
// (each split adds atomics, a zeroed workspace and a finalize pass). At most min(max_s, 32) splits.
inline int wave_splits(long long base, int slots, int max_s) {
  if (max_s > 32) max_s = 32;
  int best = 1;
  double best_t = 1e30;
  for (int s = 1; s <= max_s; ++s) {
    const long long waves = (base * s + slots - 1) / slots;
    const double t = (double)waves / s * (1.0 + 0.02 * (s - 1));
    if (t < best_t) { best_t = t; best = s; }
  }
  return best;
}

// The cast pass after a split-K kernel: ws (zeroed before it, float2 per token pair) -> out.
template <typename T>
inline cudaError_t launch_sk_finalize(const float* ws, void* out, int M, int N, cudaStream_t stream) {
  const long long pairs = (long long)((M + 1) / 2) * N;
  const int thr = 256;
  sk_finalize_kernel<T><<<(unsigned)((pairs + thr - 1) / thr), thr, 0, stream>>>(
      reinterpret_cast<const float2*>(ws), static_cast<T*>(out), M, N);
  return cudaGetLastError();
}

}  // namespace grace_w4a16
