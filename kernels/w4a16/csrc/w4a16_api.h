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

// Split-K configs with the activations staged in shared memory (w4a16_sk.cuh): ids continue after
// the register-only ones. (MT token tiles of 8, TN n16 tiles per warp, WN warps per CTA (all share
// the staged x), KC k64 blocks per x stage, NS x stages in shared memory, P k64 blocks of weights
// in flight per warp, MB minimum CTAs per SM for the register allocator).
#define GRACE_W4A16_SK_CONFIGS(X) \
  X(19, 1, 1, 8, 8, 2, 8, 1)      \
  X(20, 1, 2, 4, 8, 2, 4, 1)      \
  X(21, 1, 2, 8, 8, 2, 4, 1)      \
  X(22, 2, 2, 4, 8, 2, 4, 1)      \
  X(23, 2, 2, 8, 4, 3, 4, 1)      \
  X(24, 4, 2, 4, 4, 2, 4, 1)      \
  X(25, 4, 2, 8, 4, 3, 4, 1)      \
  X(26, 8, 2, 4, 2, 3, 4, 1)      \
  X(27, 8, 2, 8, 2, 3, 4, 1)      \
  X(28, 8, 2, 4, 4, 2, 2, 1)      \
  X(29, 8, 1, 8, 4, 2, 8, 1)      \
  X(30, 2, 4, 4, 4, 2, 2, 1)      \
  X(31, 16, 1, 8, 2, 3, 4, 1)     \
  X(32, 1, 1, 4, 16, 2, 8, 1)     \
  X(33, 1, 2, 4, 8, 2, 8, 1)      \
  X(34, 8, 2, 4, 2, 3, 4, 3)      \
  X(35, 8, 2, 8, 2, 3, 2, 1)      \
  X(36, 2, 2, 4, 8, 3, 4, 4)      \
  X(37, 8, 2, 4, 2, 2, 4, 1)      \
  X(38, 8, 2, 8, 4, 2, 2, 1)      \
  X(39, 4, 2, 8, 2, 3, 2, 2)      \
  X(40, 4, 2, 8, 4, 2, 4, 2)

constexpr int kFirstSk = 19;
constexpr int kNumSkConfigs = 22;

// Lean configs (w4a16_lean.cuh, kernels/NOTES.md v9: raw codes into a per-group fp32 accumulator,
// scale and offset applied once per group, no ring copies): ids continue after the sk ones.
// Columns: (id, MT token tiles of 8, TN n16 tiles per warp, WN x WK warps per CTA, P k64 blocks of
// weights in flight per warp (even), PS: 0 = the ring in registers, > 0 = a PS-stage cp.async ring
// in shared memory per warp (v10; then P = PS)).
#define GRACE_W4A16_LEAN_CONFIGS(X) \
  X(41, 1, 2, 1, 4, 4, 0)    \
  X(42, 1, 2, 1, 4, 6, 0)    \
  X(43, 1, 1, 1, 8, 8, 0)    \
  X(44, 1, 2, 1, 8, 4, 0)    \
  X(45, 1, 1, 1, 4, 8, 0)    \
  X(46, 1, 4, 1, 4, 2, 0)    \
  X(47, 2, 2, 1, 4, 4, 0)    \
  X(48, 2, 1, 1, 8, 8, 0)    \
  X(49, 2, 4, 1, 4, 2, 0)    \
  X(50, 2, 2, 1, 8, 4, 0)    \
  X(51, 1, 3, 1, 4, 2, 0)    \
  X(52, 1, 4, 1, 8, 2, 0)    \
  X(53, 1, 4, 1, 4, 4, 0)    \
  X(54, 1, 8, 1, 4, 2, 0)    \
  X(55, 2, 4, 1, 8, 2, 0)    \
  X(56, 2, 3, 1, 4, 2, 0)    \
  X(57, 1, 2, 1, 4, 8, 8)    \
  X(58, 1, 4, 1, 4, 6, 6)    \
  X(59, 1, 1, 1, 8, 8, 8)    \
  X(60, 1, 2, 1, 4, 12, 12)  \
  X(61, 1, 4, 1, 8, 4, 4)    \
  X(62, 2, 2, 1, 4, 8, 8)    \
  X(63, 2, 2, 2, 4, 8, 8)    \
  X(64, 2, 2, 4, 2, 8, 8)    \
  X(65, 2, 2, 4, 4, 6, 6)    \
  X(66, 2, 4, 2, 2, 6, 6)    \
  X(67, 2, 1, 4, 2, 8, 8)    \
  X(68, 2, 2, 2, 2, 8, 8)    \
  X(69, 4, 1, 4, 2, 6, 6)    \
  X(70, 4, 2, 2, 2, 6, 6)    \
  X(71, 2, 4, 2, 4, 6, 6)    \
  X(72, 2, 4, 4, 1, 6, 6)    \
  X(73, 2, 3, 2, 2, 8, 8)    \
  X(74, 2, 4, 2, 2, 8, 8)    \
  X(75, 2, 4, 1, 4, 6, 6)

constexpr int kFirstLean = kFirstSk + kNumSkConfigs;
constexpr int kNumLeanConfigs = 35;
constexpr int kNumAllConfigs = kFirstLean + kNumLeanConfigs;

struct SkConfig {
  int mt, tn, wn, kc, ns, p, mb;
};
bool sk_config(int cfg, SkConfig* out);

// Splits S (CTAs along K) an sk config uses for (M, N, K) when none is forced: the count whose
// CTAs fill whole waves of resident CTAs best (w4a16_sk_launch.cuh), each split >= one x stage. Returns 0 for a non-sk id.
int sk_auto_splits(int cfg, int M, int N, int K, int dtype);
// k64 blocks per split for a requested split count (>= 1); the launch uses ceil(KB / this) CTAs.
inline int sk_kb_per_split(int K, int splits) {
  const int KB = K / 64;
  if (splits < 1) splits = 1;
  if (splits > KB) splits = KB;
  return (KB + splits - 1) / splits;
}
// out (M,N) = x @ W^T with an sk config and `splits` CTAs along K (effective count
// ceil(KB / sk_kb_per_split)). splits > 1 needs ws: float, ((M+1)/2)*N*2 elements; it is zeroed
// here (cudaMemsetAsync), atomically accumulated, then cast into out by a second kernel.
cudaError_t sk_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M,
                           int N, int K, int splits, cudaStream_t stream);
cudaError_t sk_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M,
                           int N, int K, int splits, cudaStream_t stream);

// Hopper wgmma configs (w4a16_wgmma.cuh; kernels/NOTES.md v5, v13). The op uses them for 48 <= M <= 384
// on sm_90 when N % 64 == 0 (choose_wgmma in the binding; GRACE_W4A16_WGMMA=1: every M >= 48; =0: never).
// Own id space 0..kNumWgConfigs-1 (pybind: wgmma_gemm / wgmma_info). Columns: (id, X tokens per
// CTA = wgmma N, WGS warpgroups per CTA, NS shared x stages, P (register ring: k64 blocks of weights in
// flight per warp; shared ring: k-loop unroll), MB min CTAs per SM for the register allocator, PW
// stages of the per-warp shared-memory weight ring (0 = register ring), T64 n64 tiles per warpgroup).
// 0-5: v5 (register ring). 6-19: v13, the shared ring (NOTES.md v13), token tiles 16-128.
#define GRACE_W4A16_WG_CONFIGS(X) \
  X(0, 64, 2, 6, 4, 1, 0, 1)      \
  X(1, 64, 1, 6, 8, 2, 0, 1)      \
  X(2, 128, 2, 5, 4, 1, 0, 1)     \
  X(3, 128, 1, 5, 4, 2, 0, 1)     \
  X(4, 256, 2, 4, 2, 1, 0, 1)     \
  X(5, 256, 1, 3, 2, 2, 0, 1)     \
  X(6, 64, 2, 4, 2, 2, 8, 1)      \
  X(7, 64, 2, 8, 2, 2, 8, 1)      \
  X(8, 64, 1, 8, 2, 2, 8, 2)      \
  X(9, 64, 2, 12, 2, 1, 12, 1)    \
  X(10, 32, 1, 8, 2, 3, 8, 2)     \
  X(11, 32, 1, 12, 2, 2, 12, 2)   \
  X(12, 16, 1, 4, 2, 3, 12, 2)    \
  X(13, 16, 1, 8, 2, 3, 8, 2)     \
  X(14, 16, 1, 12, 2, 2, 12, 2)   \
  X(15, 16, 2, 12, 2, 1, 12, 2)   \
  X(16, 16, 1, 16, 2, 3, 16, 1)   \
  X(17, 128, 2, 6, 2, 1, 8, 1)    \
  X(18, 64, 1, 4, 2, 4, 8, 1)     \
  X(19, 64, 1, 3, 2, 5, 6, 1)

constexpr int kNumWgConfigs = 20;

struct WgConfig {
  int x, wgs, ns, p, mb, pw, t64;
};
bool wg_config(int cfg, WgConfig* out);
// Automatic split count along K (same wave rule as the sk configs); 0 for an unknown id.
int wg_auto_splits(int cfg, int M, int N, int K, int dtype);
// out (M,N) = x @ W^T with a wg config. Needs N % 64 == 0, K % 128 == 0 and an sm_90 device
// (the binding checks). splits > 1 needs ws as for sk_launch_*.
cudaError_t wg_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M,
                           int N, int K, int splits, cudaStream_t stream);
cudaError_t wg_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M,
                           int N, int K, int splits, cudaStream_t stream);

struct TcConfig {
  int mt, tn, wn, wk, xr, p;
};

// Launch the tensor-core kernel as one wave of grid-stride CTAs (1) or one CTA per
// tile group (0, default: the measured path). Process-wide; for benchmarking.
void set_persistent(int on);

// Programmatic dependent launch for the tensor-core and split-K kernels (w4a16_pdl.cuh): 1 = on
// (enable after the weights are loaded), 0 = off (default). Process-wide.
void set_pdl(int on);
int& pdl_flag();
int& pdl_suppressed();  // per thread, > 0: plain launches (w4a16_pdl.cuh; a tuned entry's "pdl": 0)

// Returns false for an unknown id.
bool tc_config(int cfg, TcConfig* out);
// Lean configs as (MT, TN, WN, WK, XR = 0, P); false for an id that is not one.
bool lean_config(int cfg, TcConfig* out);
// Resident-CTA slots (SMs x CTAs per SM, occupancy API) of a lean config's bf16 kernel on the current
// device, cached per process; 0 for an unknown id.
int lean_resident_slots(int cfg);
// out (M,N) = x @ W^T with a lean config (any M; built for M <= 16).
cudaError_t lean_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                             int K, cudaStream_t stream);
cudaError_t lean_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                             int K, cudaStream_t stream);
// Gated-MLP variant (NOTES.md v15): qw / sc pack a fused [gate; up] weight of N = 2I rows (I % 16 == 0) and
// out (M, I) = silu(x @ gate^T) * (x @ up^T), from the fp32 accumulators, rounded once. Only the
// cp.async-ring configs with an even TN have it (lean_glu_ok); cudaErrorInvalidValue for the others.
inline bool lean_glu_ok(int cfg) {
  switch (cfg) {
#define GRACE_LEAN_GLU_OK(id, mt, tn, wn, wk, p, ps) \
  case id:                                          \
    return tn % 2 == 0 && ps > 0;
    GRACE_W4A16_LEAN_CONFIGS(GRACE_LEAN_GLU_OK)
#undef GRACE_LEAN_GLU_OK
    default:
      return false;
  }
}
cudaError_t lean_glu_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                                 int K, cudaStream_t stream);
cudaError_t lean_glu_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                                 int K, cudaStream_t stream);
// RMSNorm folded in (NOTES.md v21): out = rsqrt(mean(x^2) + eps) * (gamma * x) @ W^T per token (glu: then
// silu(gate) * up, as lean_glu_launch_*), gamma K values of x's dtype. The cp.async-ring configs have it
// (lean_norm_ok; with glu, an even TN too); cudaErrorInvalidValue for the others.
inline bool lean_norm_ok(int cfg, bool glu) {
  switch (cfg) {
#define GRACE_LEAN_NORM_OK(id, mt, tn, wn, wk, p, ps) \
  case id:                                           \
    return ps > 0 && (!glu || tn % 2 == 0);
    GRACE_W4A16_LEAN_CONFIGS(GRACE_LEAN_NORM_OK)
#undef GRACE_LEAN_NORM_OK
    default:
      return false;
  }
}
cudaError_t lean_norm_launch_bf16(int cfg, bool glu, const void* x, const void* qw, const void* sc, const void* gamma,
                                  float eps, void* out, int M, int N, int K, cudaStream_t stream);
cudaError_t lean_norm_launch_fp16(int cfg, bool glu, const void* x, const void* qw, const void* sc, const void* gamma,
                                  float eps, void* out, int M, int N, int K, cudaStream_t stream);
// out (M, I) = silu(y[:, :I]) * y[:, I:] for y (M, 2I): the activation after a GEMM without the GLU epilogue.
cudaError_t silu_mul_launch_bf16(const void* y, void* out, int M, int I, cudaStream_t stream);
cudaError_t silu_mul_launch_fp16(const void* y, void* out, int M, int I, cudaStream_t stream);

// out (M,N) = x (M,K) @ dequant(qw, sc)^T. dtype 0 = bf16, 1 = fp16. Returns the launch error.
cudaError_t tc_launch_bf16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                           int K, cudaStream_t stream);
cudaError_t tc_launch_fp16(int cfg, const void* x, const void* qw, const void* sc, void* out, int M, int N,
                           int K, cudaStream_t stream);
// w (N,K) row-major = dequant(qw, sc)
cudaError_t dequant_launch_bf16(const void* qw, const void* sc, void* w, int N, int K, cudaStream_t stream);
cudaError_t dequant_launch_fp16(const void* qw, const void* sc, void* w, int N, int K, cudaStream_t stream);

}  // namespace grace_w4a16
