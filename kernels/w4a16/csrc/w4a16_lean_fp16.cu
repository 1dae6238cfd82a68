// fp16 instantiations of the lean register kernel (see w4a16_lean.cuh).
#include "w4a16_lean_launch.cuh"

namespace grace_w4a16 {

cudaError_t lean_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                             int K, cudaStream_t stream) {
  return launch_lean_dispatch<__half>(cfg, x, qw, sc, out, M, N, K, stream);
}

}  // namespace grace_w4a16
