// Host-side launcher of the lean register kernel (w4a16_lean.cuh), shared by its per-dtype units.
#pragma once
#include <algorithm>

#include "w4a16_api.h"
#include "w4a16_lean.cuh"

namespace grace_w4a16 {

// The kernel of a lean config (PS > 0: the cp.async ring) and its dynamic shared memory.
template <typename T, int MT, int TN, int WN, int WK, int P, int PS, bool GLU = false, bool NORM = false>
constexpr auto lean_kernel() {
  static_assert(!NORM || PS > 0, "lean: the RMSNorm fold is built for the cp.async-ring configs only");
  if constexpr (PS > 0) return w4a16_lean_cp_kernel<T, MT, TN, WN, WK, PS, GLU, NORM>;
  else return w4a16_lean_kernel<T, MT, TN, WN, WK, P, GLU>;
}
constexpr size_t lean_smem_bytes(int MT, int TN, int WN, int WK, int PS) {
  return PS > 0 ? lean_cp_smem_bytes(MT, TN, WN, WK, PS) : tc_red_bytes(MT, TN, WN, WK);
}

// One CTA per group of WN*TN n16 tiles (grid.y), token chunks of MT*8 along grid.x: the classic
// kernel's default launch (its persistent mode measured no faster and is not offered here).
// GLU: out is (M, N/2) = silu(gate) * up of the fused [gate; up] weight (NOTES.md v15); the grid has
// the same CTAs (each warp still streams TN tiles: TN/2 pairs).
// NORM: out = the GEMM of RMSNorm(x) with weight gamma (K values of T) and eps (w4a16_lean_cp_kernel).
template <typename T, int MT, int TN, int WN, int WK, int P, int PS, bool GLU = false, bool NORM = false>
cudaError_t launch_lean_t(const void* x, const void* qw, const void* sc, void* out, int M, int N, int K,
                          cudaStream_t stream, const void* gamma = nullptr, float eps = 0.f) {
  constexpr int threads = WN * WK * 32;
  constexpr size_t smem = lean_smem_bytes(MT, TN, WN, WK, PS);
  static_assert(PS > 0 || smem <= 48 * 1024, "lean: reduction buffer > 48 KB");
  constexpr auto kern = lean_kernel<T, MT, TN, WN, WK, P, PS, GLU, NORM>();
  if (const cudaError_t e = raise_smem_limit_once<kern>(smem); e != cudaSuccess) return e;
  constexpr int tw = GLU ? TN / 2 : TN;
  const int nt = N / kNTile / (GLU ? 2 : 1);
  dim3 grid((M + MT * 8 - 1) / (MT * 8), (nt + WN * tw - 1) / (WN * tw));
  return launch_kernel(kern, grid, dim3(threads), smem, stream, true, static_cast<const T*>(x),
                       static_cast<const uint4*>(qw), static_cast<const uint32_t*>(sc), static_cast<T*>(out), M, N, K,
                       static_cast<const T*>(gamma), eps);
}

// Resident-CTA slots (SMs x CTAs per SM) of a lean config, from the split-K launchers' resident_slots
// (w4a16_sk.cuh); 0 if the occupancy query fails.
template <typename T, int MT, int TN, int WN, int WK, int P, int PS>
int lean_slots_t() {
  int slots = 0;
  const cudaError_t e = resident_slots(lean_kernel<T, MT, TN, WN, WK, P, PS>(), WN * WK * 32,
                                       (int)lean_smem_bytes(MT, TN, WN, WK, PS), &slots);
  return e == cudaSuccess ? slots : 0;
}

template <typename T>
cudaError_t launch_lean_dispatch(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                                 int K, cudaStream_t stream) {
  switch (cfg) {
#define GRACE_CASE(id, mt, tn, wn, wk, p, ps) \
  case id:                                    \
    return launch_lean_t<T, mt, tn, wn, wk, p, ps>(x, qw, sc, out, M, N, K, stream);
    GRACE_W4A16_LEAN_CONFIGS(GRACE_CASE)
#undef GRACE_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

// The GLU variant exists for the cp.async-ring configs with an even TN (lean_glu_ok): the ones the op
// picks for gate/up weights at <= 16 tokens; the others would double the lean units' build for nothing.
template <typename T>
cudaError_t launch_lean_glu_dispatch(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                                     int K, cudaStream_t stream) {
  switch (cfg) {
#define GRACE_CASE(id, mt, tn, wn, wk, p, ps)                                                 \
  case id:                                                                                    \
    if constexpr (tn % 2 == 0 && ps > 0)                                                      \
      return launch_lean_t<T, mt, tn, wn, wk, p, ps, true>(x, qw, sc, out, M, N, K, stream); \
    else                                                                                      \
      return cudaErrorInvalidValue;
    GRACE_W4A16_LEAN_CONFIGS(GRACE_CASE)
#undef GRACE_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

// The RMSNorm fold (NOTES.md v21) exists for the cp.async-ring configs (lean_norm_ok), with the GLU epilogue too
// where that exists (even TN).
template <typename T>
cudaError_t launch_lean_norm_dispatch(int cfg, bool glu, const void* x, const void* qw, const void* sc,
                                      const void* gamma, float eps, void* out, int M, int N, int K, cudaStream_t stream) {
  switch (cfg) {
#define GRACE_CASE(id, mt, tn, wn, wk, p, ps)                                                                   \
  case id:                                                                                                      \
    if constexpr (ps > 0) {                                                                                     \
      if (!glu) return launch_lean_t<T, mt, tn, wn, wk, p, ps, false, true>(x, qw, sc, out, M, N, K, stream,    \
                                                                            gamma, eps);                        \
      if constexpr (tn % 2 == 0)                                                                                \
        return launch_lean_t<T, mt, tn, wn, wk, p, ps, true, true>(x, qw, sc, out, M, N, K, stream, gamma, eps); \
    }                                                                                                           \
    return cudaErrorInvalidValue;
    GRACE_W4A16_LEAN_CONFIGS(GRACE_CASE)
#undef GRACE_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

// out (M, I) = silu(y[:, :I]) * y[:, I:] for a (M, 2I) GEMM output: the activation when w4a16_gemm_glu's
// choice has no GLU epilogue (wgmma, split-K, dequant + cuBLAS, odd-TN lean configs). One kernel, where
// at::silu and mul would be two; reads after the PDL wait (y is the previous kernel's output).
template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ y, T* __restrict__ out, int M, int I) {
  pdl_wait();
  const long long total = (long long)M * I, step = (long long)gridDim.x * blockDim.x;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const long long m = idx / I, i = idx - m * I;
    const T* row = y + m * 2 * I;
    const float gate = to_float(row[i]), up = to_float(row[I + i]);
    out[idx] = from_float<T>(silu_mul(gate, up));
  }
}

template <typename T>
cudaError_t launch_silu_mul(const void* y, void* out, int M, int I, cudaStream_t stream) {
  const long long total = (long long)M * I;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = (int)std::min<long long>((total + threads - 1) / threads, 132LL * 16);
  return launch_kernel(silu_mul_kernel<T>, dim3(blocks), dim3(threads), 0, stream, true, static_cast<const T*>(y),
                       static_cast<T*>(out), M, I);
}

}  // namespace grace_w4a16
