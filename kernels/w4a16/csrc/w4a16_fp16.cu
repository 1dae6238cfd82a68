// fp16 instantiations of the W4A16 kernels (see w4a16_kernel.cuh for the design).
#include "w4a16_launch.cuh"

namespace grace_w4a16 {

cudaError_t tc_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                           int K, cudaStream_t stream) {
  return launch_tc_dispatch<__half>(cfg, x, qw, sc, out, M, N, K, stream);
}
cudaError_t dequant_launch_fp16(const void* qw, const void* sc, void* w, int N, int K, cudaStream_t stream) {
  return launch_dequant_t<__half>(qw, sc, w, N, K, stream);
}

}  // namespace grace_w4a16
