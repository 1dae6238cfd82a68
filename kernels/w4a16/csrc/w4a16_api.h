// Plain C++ entry points of the W4A16 kernels (no torch types), used by w4a16_binding.cpp.
#pragma once
#include <cuda_runtime.h>

namespace grace_w4a16 {

// Tensor-core configurations: (MT token tiles of 8, TN n16 tiles per warp, WN x WK warps per CTA,
// XR: 1 = activations prefetched deep in the register ring, 0 = one block ahead; P: k64 blocks of
// weights in flight per warp).
// Kept in one table so the binding, the benchmark and the heuristic agree on ids.
#define GRACE_W4A16_CONFIGS(X) \
  X(0, 1, 1, 1, 8, 0, 8)       \
  X(1, 1, 1, 1, 8, 0, 16)      \
  X(2, 1, 2, 1, 4, 0, 4)       \
  X(3, 1, 2, 1, 4, 0, 8)       \
  X(4, 1, 1, 1, 4, 0, 8)       \
  X(5, 1, 1, 1, 4, 0, 16)      \
  X(6, 1, 2, 1, 8, 0, 4)       \
  X(7, 2, 1, 1, 8, 0, 8)       \
  X(8, 2, 1, 1, 8, 0, 16)      \
  X(9, 2, 2, 1, 4, 0, 4)       \
  X(10, 2, 2, 1, 4, 0, 8)      \
  X(11, 2, 1, 1, 4, 0, 8)      \
  X(12, 4, 1, 2, 4, 0, 8)      \
  X(13, 4, 2, 1, 4, 0, 4)      \
  X(14, 8, 1, 2, 4, 0, 8)      \
  X(15, 8, 2, 1, 4, 0, 4)      \
  X(16, 8, 2, 2, 2, 0, 4)  \
  X(17, 4, 4, 1, 4, 0, 2)  \
  X(18, 2, 4, 1, 4, 0, 2)

constexpr int kNumConfigs = 19;

struct TcConfig {
  int mt, tn, wn, wk, xr, p;
};

// Launch the tensor-core kernel as one wave of grid-stride CTAs (1) or one CTA per
// tile group (0, default: the measured path). Process-wide; for benchmarking.
void set_persistent(int on);

// Returns false for an unknown id.
bool tc_config(int cfg, TcConfig* out);

// out (M,N) = x (M,K) @ dequant(qw, sc)^T. dtype 0 = bf16, 1 = fp16. Returns the launch error.
cudaError_t tc_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                           int K, cudaStream_t stream);
cudaError_t tc_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                           int K, cudaStream_t stream);
// w (N,K) row-major = dequant(qw, sc)
cudaError_t dequant_launch_bf16(const void* qw, const void* sc, void* w, int N, int K, cudaStream_t stream);
cudaError_t dequant_launch_fp16(const void* qw, const void* sc, void* w, int N, int K, cudaStream_t stream);

}  // namespace grace_w4a16
