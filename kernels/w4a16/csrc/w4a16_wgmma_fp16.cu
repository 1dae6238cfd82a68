// fp16 instantiations of the Hopper wgmma kernel (see w4a16_wgmma.cuh).
#include "w4a16_wgmma.cuh"

namespace grace_w4a16 {

int wg_auto_splits_fp16(int cfg, int M, int N, int K) { return wg_auto_splits_t<__half>(cfg, M, N, K); }

cudaError_t wg_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M,
                           int N, int K, int splits, cudaStream_t stream) {
  return wg_launch_t<__half>(cfg, x, qw, sc, out, ws, M, N, K, splits, stream);
}

}  // namespace grace_w4a16
