// fp16 instantiations of the lean register kernel (see w4a16_lean.cuh).
#include "w4a16_lean_launch.cuh"

namespace grace_w4a16 {

cudaError_t lean_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                             int K, cudaStream_t stream) {
  return launch_lean_dispatch<__half>(cfg, x, qw, sc, out, M, N, K, stream);
}

cudaError_t lean_glu_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                                 int K, cudaStream_t stream) {
  return launch_lean_glu_dispatch<__half>(cfg, x, qw, sc, out, M, N, K, stream);
}

cudaError_t lean_norm_launch_fp16(int cfg, bool glu, const void* x, const void* qw, const void* sc, const void* gamma,
                                  float eps, void* out, int M, int N, int K, cudaStream_t stream) {
  return launch_lean_norm_dispatch<__half>(cfg, glu, x, qw, sc, gamma, eps, out, M, N, K, stream);
}

cudaError_t silu_mul_launch_fp16(const void* y, void* out, int M, int I, cudaStream_t stream) {
  return launch_silu_mul<__half>(y, out, M, I, stream);
}

}  // namespace grace_w4a16
