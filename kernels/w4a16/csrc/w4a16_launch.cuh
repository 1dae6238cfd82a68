// Host-side launchers shared by the per-dtype translation units (split so ninja builds them in
// parallel). No torch headers.
#pragma once
#include "w4a16_api.h"
#include "w4a16_kernel.cuh"

namespace grace_w4a16 {

// Persistent (one-wave, grid-stride) launch of the tensor-core kernel; defined in w4a16_bf16.cu.
int& persistent_flag();
inline bool persistent_mode() { return persistent_flag() != 0; }

template <typename T, int MT, int TN, int WN, int WK, int XR, int P>
cudaError_t launch_tc_t(const void* x, const void* qw, const void* sc, void* out, int M, int N, int K,
                        cudaStream_t stream) {
  constexpr int threads = WN * WK * 32;
  constexpr size_t smem = tc_red_bytes(MT, TN, WN, WK);
  constexpr auto kern = w4a16_tc_kernel<T, MT, TN, WN, WK, XR, P>;
  if (const cudaError_t e = raise_smem_limit_once<kern>(smem); e != cudaSuccess) return e;
  const int nt = N / kNTile;
  const int m_chunks = (M + MT * 8 - 1) / (MT * 8);
  int groups = (nt + WN * TN - 1) / (WN * TN);
  if (persistent_mode()) {
    // One wave: resident CTAs per SM (occupancy API, cached per instantiation) x SMs.
    static int slots = 0;
    if (slots == 0) {
      int dev = 0, sms = 0, per_sm = 0;
      cudaGetDevice(&dev);
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, threads, smem);
      slots = sms * (per_sm > 0 ? per_sm : 1);
    }
    const int g1 = (slots + m_chunks - 1) / m_chunks;
    if (groups > g1) groups = g1;
  }
  dim3 grid(m_chunks, groups);
  return launch_kernel(kern, grid, dim3(threads), smem, stream, true, static_cast<const T*>(x),
                       static_cast<const uint4*>(qw), static_cast<const uint32_t*>(sc), static_cast<T*>(out), M, N, K);
}

template <typename T>
cudaError_t launch_tc_dispatch(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                               int K, cudaStream_t stream) {
  switch (cfg) {
#define GRACE_CASE(id, mt, tn, wn, wk, xr, p) \
  case id:                                    \
    return launch_tc_t<T, mt, tn, wn, wk, xr, p>(x, qw, sc, out, M, N, K, stream);
    GRACE_W4A16_CONFIGS(GRACE_CASE)
#undef GRACE_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_dequant_t(const void* qw, const void* sc, void* w, int N, int K, cudaStream_t stream) {
  const long long total = (long long)(N / kNTile) * (K / kKBlock) * 32;
  const int threads = 256;
  const long long blocks = (total + threads - 1) / threads;
  w4a16_dequant_kernel<T><<<(unsigned)blocks, threads, 0, stream>>>(
      static_cast<const uint4*>(qw), static_cast<const uint32_t*>(sc), static_cast<T*>(w), N, K);
  return cudaGetLastError();
}

}  // namespace grace_w4a16
