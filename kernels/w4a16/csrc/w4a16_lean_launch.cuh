// Host-side launcher of the lean register kernel (w4a16_lean.cuh), shared by its per-dtype units.
#pragma once
#include "w4a16_api.h"
#include "w4a16_lean.cuh"

namespace grace_w4a16 {

// The kernel of a lean config (PS > 0: the cp.async ring) and its dynamic shared memory.
template <typename T, int MT, int TN, int WN, int WK, int P, int PS>
constexpr auto lean_kernel() {
  if constexpr (PS > 0) return w4a16_lean_cp_kernel<T, MT, TN, WN, WK, PS>;
  else return w4a16_lean_kernel<T, MT, TN, WN, WK, P>;
}
constexpr size_t lean_smem_bytes(int MT, int TN, int WN, int WK, int PS) {
  return PS > 0 ? lean_cp_smem_bytes(MT, TN, WN, WK, PS) : tc_red_bytes(MT, TN, WN, WK);
}

// One CTA per group of WN*TN n16 tiles (grid.y), token chunks of MT*8 along grid.x: the classic
// kernel's default launch (its persistent mode measured no faster and is not offered here).
template <typename T, int MT, int TN, int WN, int WK, int P, int PS>
cudaError_t launch_lean_t(const void* x, const void* qw, const void* sc, void* out, int M, int N, int K,
                          cudaStream_t stream) {
  constexpr int threads = WN * WK * 32;
  constexpr size_t smem = lean_smem_bytes(MT, TN, WN, WK, PS);
  static_assert(PS > 0 || smem <= 48 * 1024, "lean: reduction buffer > 48 KB");
  constexpr auto kern = lean_kernel<T, MT, TN, WN, WK, P, PS>();
  if (const cudaError_t e = raise_smem_limit_once<kern>(smem); e != cudaSuccess) return e;
  const int nt = N / kNTile;
  dim3 grid((M + MT * 8 - 1) / (MT * 8), (nt + WN * TN - 1) / (WN * TN));
  return launch_kernel(kern, grid, dim3(threads), smem, stream, true, static_cast<const T*>(x),
                       static_cast<const uint4*>(qw), static_cast<const uint32_t*>(sc), static_cast<T*>(out), M, N, K);
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

}  // namespace grace_w4a16
