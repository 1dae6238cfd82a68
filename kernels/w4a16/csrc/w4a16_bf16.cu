// bf16 instantiations of the W4A16 kernels (see w4a16_kernel.cuh for the design).
#include "w4a16_launch.cuh"

namespace grace_w4a16 {

int& persistent_flag() {
  static int flag = 0;  // off until measured on the device (kernels/NOTES.md)
  return flag;
}
void set_persistent(int on) { persistent_flag() = on; }

int& pdl_flag() {
  static int flag = 0;  // off until measured on the device
  return flag;
}
void set_pdl(int on) { pdl_flag() = on; }
int& pdl_suppressed() {
  thread_local int depth = 0;
  return depth;
}

bool tc_config(int cfg, TcConfig* out) {
  switch (cfg) {
#define GRACE_CFG(id, mt, tn, wn, wk, xr, p) \
  case id:                                   \
    *out = TcConfig{mt, tn, wn, wk, xr, p};  \
    return true;
    GRACE_W4A16_CONFIGS(GRACE_CFG)
#undef GRACE_CFG
    default:
      return false;
  }
}

cudaError_t tc_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                           int K, cudaStream_t stream) {
  return launch_tc_dispatch<__nv_bfloat16>(cfg, x, qw, sc, out, M, N, K, stream);
}
cudaError_t dequant_launch_bf16(const void* qw, const void* sc, void* w, int N, int K, cudaStream_t stream) {
  return launch_dequant_t<__nv_bfloat16>(qw, sc, w, N, K, stream);
}

}  // namespace grace_w4a16
