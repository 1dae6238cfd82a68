// bf16 instantiations of the split-K / shared-memory-x kernel (see w4a16_sk.cuh).
#include "w4a16_sk_launch.cuh"

namespace grace_w4a16 {

bool sk_config(int cfg, SkConfig* out) {
  switch (cfg) {
#define GRACE_SK_CFG(id, mt, tn, wn, kc, ns, p, mb) \
  case id:                                          \
    *out = SkConfig{mt, tn, wn, kc, ns, p, mb};     \
    return true;
    GRACE_W4A16_SK_CONFIGS(GRACE_SK_CFG)
#undef GRACE_SK_CFG
    default:
      return false;
  }
}

int sk_auto_splits_fp16(int cfg, int M, int N, int K);  // w4a16_sk_fp16.cu

int sk_auto_splits(int cfg, int M, int N, int K, int dtype) {
  return dtype == 0 ? sk_auto_splits_t<__nv_bfloat16>(cfg, M, N, K) : sk_auto_splits_fp16(cfg, M, N, K);
}

cudaError_t sk_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M,
                           int N, int K, int splits, cudaStream_t stream) {
  return sk_launch_t<__nv_bfloat16>(cfg, x, qw, sc, out, ws, M, N, K, splits, stream);
}

}  // namespace grace_w4a16
