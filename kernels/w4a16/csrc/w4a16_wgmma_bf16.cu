// bf16 instantiations of the Hopper wgmma kernel (see w4a16_wgmma.cuh).
#include "w4a16_wgmma.cuh"

namespace grace_w4a16 {

bool wg_config(int cfg, WgConfig* out) {
  switch (cfg) {
#define GRACE_WG_CFG(id, xt, wgs, ns, p, mb, pw, t64) \
  case id:                                            \
    *out = WgConfig{xt, wgs, ns, p, mb, pw, t64};     \
    return true;
    GRACE_W4A16_WG_CONFIGS(GRACE_WG_CFG)
#undef GRACE_WG_CFG
    default:
      return false;
  }
}

int wg_auto_splits_fp16(int cfg, int M, int N, int K);  // w4a16_wgmma_fp16.cu

int wg_auto_splits(int cfg, int M, int N, int K, int dtype) {
  return dtype == 0 ? wg_auto_splits_t<__nv_bfloat16>(cfg, M, N, K) : wg_auto_splits_fp16(cfg, M, N, K);
}

cudaError_t wg_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M,
                           int N, int K, int splits, cudaStream_t stream) {
  return wg_launch_t<__nv_bfloat16>(cfg, x, qw, sc, out, ws, M, N, K, splits, stream);
}

}  // namespace grace_w4a16
