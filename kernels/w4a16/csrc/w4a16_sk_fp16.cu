// fp16 instantiations of the split-K / shared-memory-x kernel (see w4a16_sk.cuh).
#include "w4a16_sk_launch.cuh"

namespace grace_w4a16 {

int sk_auto_splits_fp16(int cfg, int M, int N, int K) { return sk_auto_splits_t<__half>(cfg, M, N, K); }

cudaError_t sk_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M,
                           int N, int K, int splits, cudaStream_t stream) {
  return sk_launch_t<__half>(cfg, x, qw, sc, out, ws, M, N, K, splits, stream);
}

}  // namespace grace_w4a16
