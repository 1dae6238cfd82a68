// bf16 instantiations of the lean register kernel (see w4a16_lean.cuh).
#include "w4a16_lean_launch.cuh"

namespace grace_w4a16 {

bool lean_config(int cfg, TcConfig* out) {
  switch (cfg) {
#define GRACE_LEAN_CFG(id, mt, tn, wn, wk, p, ps) \
  case id:                                    \
    *out = TcConfig{mt, tn, wn, wk, 0, p};    \
    return true;
    GRACE_W4A16_LEAN_CONFIGS(GRACE_LEAN_CFG)
#undef GRACE_LEAN_CFG
    default:
      return false;
  }
}

int lean_resident_slots(int cfg) {
  static int cache[kNumLeanConfigs] = {0};  // per process: one device kind is assumed (as the tuned table)
  const int i = cfg - kFirstLean;
  if (i < 0 || i >= kNumLeanConfigs) return 0;
  if (cache[i] > 0) return cache[i];
  int v = 0;
  switch (cfg) {
#define GRACE_LEAN_OCC(id, mt, tn, wn, wk, p, ps) \
  case id:                                       \
    v = lean_slots_t<__nv_bfloat16, mt, tn, wn, wk, p, ps>(); \
    break;
    GRACE_W4A16_LEAN_CONFIGS(GRACE_LEAN_OCC)
#undef GRACE_LEAN_OCC
    default:
      break;
  }
  cache[i] = v;
  return v;
}

cudaError_t lean_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                             int K, cudaStream_t stream) {
  return launch_lean_dispatch<__nv_bfloat16>(cfg, x, qw, sc, out, M, N, K, stream);
}

cudaError_t lean_glu_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                                 int K, cudaStream_t stream) {
  return launch_lean_glu_dispatch<__nv_bfloat16>(cfg, x, qw, sc, out, M, N, K, stream);
}

cudaError_t lean_norm_launch_bf16(int cfg, bool glu, const void* x, const void* qw, const void* sc, const void* gamma,
                                  float eps, void* out, int M, int N, int K, cudaStream_t stream) {
  return launch_lean_norm_dispatch<__nv_bfloat16>(cfg, glu, x, qw, sc, gamma, eps, out, M, N, K, stream);
}

cudaError_t silu_mul_launch_bf16(const void* y, void* out, int M, int I, cudaStream_t stream) {
  return launch_silu_mul<__nv_bfloat16>(y, out, M, I, stream);
}

}  // namespace grace_w4a16
