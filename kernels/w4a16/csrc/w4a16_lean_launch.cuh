// Host-side launcher of the lean register kernel (w4a16_lean.cuh), shared by its per-dtype units.
#pragma once
#include "w4a16_api.h"
#include "w4a16_lean.cuh"

namespace grace_w4a16 {

// One CTA per group of WN*TN n16 tiles (grid.y), token chunks of MT*8 along grid.x: the classic
// kernel's default launch (its persistent mode measured no faster and is not offered here).
template <typename T, int MT, int TN, int WN, int WK, int P, int PS>
cudaError_t launch_lean_t(const void* x, const void* qw, const void* sc, void* out, int M, int N, int K,
                          cudaStream_t stream) {
  constexpr int threads = WN * WK * 32;
  const int nt = N / kNTile;
  dim3 grid((M + MT * 8 - 1) / (MT * 8), (nt + WN * TN - 1) / (WN * TN));
  if constexpr (PS > 0) {
    constexpr size_t smem = lean_cp_smem_bytes(MT, TN, WN, WK, PS);
    auto kern = w4a16_lean_cp_kernel<T, MT, TN, WN, WK, PS>;
    if (smem > 48 * 1024) {
      static bool done = false;  // raising the dynamic limit once per instantiation is enough
      if (!done) {
        cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return e;
        done = true;
      }
    }
    return launch_kernel(kern, grid, dim3(threads), smem, stream, true, static_cast<const T*>(x),
                         static_cast<const uint4*>(qw), static_cast<const uint32_t*>(sc), static_cast<T*>(out), M, N, K);
  } else {
    const size_t smem = (size_t)(WK - 1) * WN * TN * MT * 4 * 32 * sizeof(float);
    static_assert((WK - 1) * WN * TN * MT * 4 * 32 * sizeof(float) <= 48 * 1024, "lean: reduction buffer > 48 KB");
    auto kern = w4a16_lean_kernel<T, MT, TN, WN, WK, P>;
    return launch_kernel(kern, grid, dim3(threads), smem, stream, true, static_cast<const T*>(x),
                         static_cast<const uint4*>(qw), static_cast<const uint32_t*>(sc), static_cast<T*>(out), M, N, K);
  }
}

template <typename T, int MT, int TN, int WN, int WK, int P, int PS>
int lean_occupancy_t() {
  constexpr int threads = WN * WK * 32;
  int per_sm = 0;
  cudaError_t e;
  if constexpr (PS > 0) {
    constexpr size_t smem = lean_cp_smem_bytes(MT, TN, WN, WK, PS);
    auto kern = w4a16_lean_cp_kernel<T, MT, TN, WN, WK, PS>;
    if (smem > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, threads, smem);
  } else {
    const size_t smem = (size_t)(WK - 1) * WN * TN * MT * 4 * 32 * sizeof(float);
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, w4a16_lean_kernel<T, MT, TN, WN, WK, P>, threads, smem);
  }
  return e == cudaSuccess ? per_sm : 0;
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

}  // namespace grace_w4a16
