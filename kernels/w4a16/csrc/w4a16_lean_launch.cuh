// Host-side launcher of the lean register kernel (w4a16_lean.cuh), shared by its per-dtype units.
#pragma once
#include "w4a16_api.h"
#include "w4a16_lean.cuh"

namespace grace_w4a16 {

// One CTA per group of WN*TN n16 tiles (grid.y), token chunks of MT*8 along grid.x: the classic
// kernel's default launch (its persistent mode measured no faster and is not offered here).
template <typename T, int MT, int TN, int WN, int WK, int P>
cudaError_t launch_lean_t(const void* x, const void* qw, const void* sc, void* out, int M, int N, int K,
                          cudaStream_t stream) {
  constexpr int threads = WN * WK * 32;
  const size_t smem = (size_t)(WK - 1) * WN * TN * MT * 4 * 32 * sizeof(float);
  static_assert((WK - 1) * WN * TN * MT * 4 * 32 * sizeof(float) <= 48 * 1024, "lean: reduction buffer > 48 KB");
  auto kern = w4a16_lean_kernel<T, MT, TN, WN, WK, P>;
  const int nt = N / kNTile;
  dim3 grid((M + MT * 8 - 1) / (MT * 8), (nt + WN * TN - 1) / (WN * TN));
  return launch_kernel(kern, grid, dim3(threads), smem, stream, true, static_cast<const T*>(x),
                       static_cast<const uint4*>(qw), static_cast<const uint32_t*>(sc), static_cast<T*>(out), M, N, K);
}

template <typename T, int MT, int TN, int WN, int WK, int P>
int lean_occupancy_t() {
  constexpr int threads = WN * WK * 32;
  const size_t smem = (size_t)(WK - 1) * WN * TN * MT * 4 * 32 * sizeof(float);
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, w4a16_lean_kernel<T, MT, TN, WN, WK, P>, threads, smem) !=
      cudaSuccess)
    return 0;
  return per_sm;
}

template <typename T>
cudaError_t launch_lean_dispatch(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                                 int K, cudaStream_t stream) {
  switch (cfg) {
#define GRACE_CASE(id, mt, tn, wn, wk, p) \
  case id:                                \
    return launch_lean_t<T, mt, tn, wn, wk, p>(x, qw, sc, out, M, N, K, stream);
    GRACE_W4A16_LEAN_CONFIGS(GRACE_CASE)
#undef GRACE_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace grace_w4a16
