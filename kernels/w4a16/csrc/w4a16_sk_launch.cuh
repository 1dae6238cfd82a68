// Host-side launchers of the split-K / shared-memory-x kernel (w4a16_sk.cuh). No torch headers.
#pragma once
#include "w4a16_api.h"
#include "w4a16_sk.cuh"

namespace grace_w4a16 {

template <typename T, int MT, int TN, int WN, int KC, int NS, int P, int MB>
struct SkLaunch {
  static constexpr int kThreads = WN * 32;
  static constexpr int kSmem = sk_smem_bytes(MT, KC, NS);
  static decltype(&w4a16_sk_kernel<T, MT, TN, WN, KC, NS, P, MB>) kern() {
    return w4a16_sk_kernel<T, MT, TN, WN, KC, NS, P, MB>;
  }

  // Raise the dynamic shared-memory limit once; resident CTAs per SM x SMs (cached).
  static cudaError_t prepare(int* slots_out) {
    static int slots = 0;
    static cudaError_t err = cudaSuccess;
    if (slots == 0 && err == cudaSuccess) err = resident_slots(kern(), kThreads, kSmem, &slots);
    *slots_out = slots;
    return err;
  }

  static int auto_splits(int M, int N, int K) {
    int slots = 0;
    if (prepare(&slots) != cudaSuccess) return 1;
    const int m_chunks = (M + MT * 8 - 1) / (MT * 8);
    const int groups = (N / kNTile + WN * TN - 1) / (WN * TN);
    const long long base = (long long)m_chunks * groups;
    return wave_splits(base, slots, (K / kKBlock) / KC);  // each split >= one x stage
  }

  static cudaError_t launch(const void* x, const void* qw, const void* sc, void* out, float* ws, int M, int N,
                            int K, int splits, cudaStream_t stream) {
    int slots = 0;
    cudaError_t e = prepare(&slots);
    if (e != cudaSuccess) return e;
    const int KB = K / kKBlock;
    const int kbps = sk_kb_per_split(K, splits);
    const int S = (KB + kbps - 1) / kbps;
    if (S > 1 && ws == nullptr) return cudaErrorInvalidValue;
    const int m_chunks = (M + MT * 8 - 1) / (MT * 8);
    const int groups = (N / kNTile + WN * TN - 1) / (WN * TN);
    const long long pairs = (long long)((M + 1) / 2) * N;
    if (S > 1) {
      e = cudaMemsetAsync(ws, 0, (size_t)pairs * 2 * sizeof(float), stream);
      if (e != cudaSuccess) return e;
    }
    dim3 grid(m_chunks, groups, S);
    // PDL only when the kernel follows another kernel directly (S > 1 puts a memset before it)
    e = launch_kernel(kern(), grid, dim3(kThreads), kSmem, stream, S == 1, static_cast<const T*>(x),
                      static_cast<const uint4*>(qw), static_cast<const uint32_t*>(sc), static_cast<T*>(out),
                      reinterpret_cast<float2*>(ws), M, N, K, kbps);
    if (e != cudaSuccess || S == 1) return e;
    return launch_sk_finalize<T>(ws, out, M, N, stream);
  }
};

template <typename T>
int sk_auto_splits_t(int cfg, int M, int N, int K) {
  switch (cfg) {
#define GRACE_SK_CASE(id, mt, tn, wn, kc, ns, p, mb) \
  case id:                                   \
    return SkLaunch<T, mt, tn, wn, kc, ns, p, mb>::auto_splits(M, N, K);
    GRACE_W4A16_SK_CONFIGS(GRACE_SK_CASE)
#undef GRACE_SK_CASE
    default:
      return 0;
  }
}

template <typename T>
cudaError_t sk_launch_t(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M, int N,
                        int K, int splits, cudaStream_t stream) {
  switch (cfg) {
#define GRACE_SK_CASE(id, mt, tn, wn, kc, ns, p, mb) \
  case id:                                   \
    return SkLaunch<T, mt, tn, wn, kc, ns, p, mb>::launch(x, qw, sc, out, ws, M, N, K, splits, stream);
    GRACE_W4A16_SK_CONFIGS(GRACE_SK_CASE)
#undef GRACE_SK_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace grace_w4a16
