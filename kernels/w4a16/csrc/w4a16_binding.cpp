// PyTorch binding of the W4A16 kernels: implements the CUDA kernel of the operator
// grace::w4a16_gemm (schema and fake/meta kernel are defined in kernels/w4a16/op.py, so the op
// exists, and torch.compile can trace it, before this extension is built), plus pybind helpers
// used by the benchmark (run one tensor-core config, dequantise).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "w4a16_api.h"

namespace {

using grace_w4a16::TcConfig;

void check_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size) {
  TORCH_CHECK(group_size == 128, "w4a16_gemm: group_size must be 128, got ", group_size);
  TORCH_CHECK(x.is_cuda() && qweight.is_cuda() && scales.is_cuda(), "w4a16_gemm: all tensors must be on CUDA");
  TORCH_CHECK(x.dim() == 2, "w4a16_gemm: x must be 2-D (M,K), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w4a16_gemm: x must be bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(scales.scalar_type() == x.scalar_type(), "w4a16_gemm: scales dtype ", scales.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 3 && qweight.size(2) == 128,
              "w4a16_gemm: qweight must be int32 (N/16, K/64, 128) from pack_weights");
  const int64_t N = qweight.size(0) * 16, K = qweight.size(1) * 64;
  TORCH_CHECK(x.size(1) == K, "w4a16_gemm: x has K=", x.size(1), " but the packed weight has K=", K);
  TORCH_CHECK(K % 128 == 0, "w4a16_gemm: K=", K, " is not a multiple of 128");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == N / 16 && scales.size(1) == K / 128 && scales.size(2) == 16,
              "w4a16_gemm: scales must be (N/16, K/128, 16) from pack_weights");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "w4a16_gemm: packed tensors must be contiguous");
  TORCH_CHECK(x.device() == qweight.device() && x.device() == scales.device(),
              "w4a16_gemm: tensors on different devices");
}

at::Tensor contiguous_aligned(const at::Tensor& x) {
  // The kernel reads activations with 16-byte loads: rows must be contiguous and 16-byte aligned.
  if (x.is_contiguous() && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0) return x;
  return x.contiguous().clone();
}

// ---- Hopper wgmma kernel (w4a16_wgmma.cuh). Verified on an H100 (kernels/NOTES.md v5: 271 checks, worst
// rel err 2.2e-3) and, with the shared weight ring (v13), on an H200. Dispatch flag: 0 = auto (default: the
// op uses it where it measured faster than the other paths, 48 <= M <= 384 on sm_90 with N % 64 == 0),
// 1 = every M >= 48 (GRACE_W4A16_WGMMA=1), -1 = never (GRACE_W4A16_WGMMA=0).
bool device_is_sm90(int device) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return major == 9;
}
bool device_is_sm90(const at::Tensor& t) { return device_is_sm90(t.get_device()); }

int& wgmma_dispatch_flag() {
  static int flag = [] {
    const char* e = std::getenv("GRACE_W4A16_WGMMA");
    if (e == nullptr || e[0] == '\0') return 0;
    return e[0] == '1' ? 1 : (e[0] == '0' ? -1 : 0);
  }();
  return flag;
}

// Which wg config the dispatch uses. H200 sweep of 2026-11-29 19:08 UTC (kernels/NOTES.md v13, the five
// issue shapes): the shared-ring c6 (64 tokens per CTA) was the fastest at M = 48-96 and 192, c17 (128
// tokens) at M = 128, the register-ring c4 (256 tokens) at M = 256.
int choose_wgmma(int64_t M) { return M <= 64 ? 6 : (M <= 128 ? 17 : (M <= 192 ? 6 : 4)); }

// Auto range. 48 <= M <= 128: c6 / c17 measured 1.03-1.36x faster than the split-K kernels on the five
// issue shapes (H200, v13); M = 192: c6 1.13-1.63x faster than v5's choice there (c2); 193-384: c4 (v5, H100:
// 1.24-1.90x faster than split-K / dequantise + cuBLAS at M = 256). Below M = 48 the mma.sync kernels win
// (M = 32: the best wg config 0.9-1.0x of them); at M >= 1024 dequantise + cuBLAS does.
bool use_wgmma(int64_t M, int64_t N, int device) {
  const int flag = wgmma_dispatch_flag();
  if (flag < 0 || N % 64 != 0) return false;
  const bool in_range = flag > 0 ? M >= 48 : (M >= 48 && M <= 384);
  return in_range && device_is_sm90(device);
}
bool use_wgmma(int64_t M, int64_t N, const at::Tensor& x) { return use_wgmma(M, N, x.get_device()); }

// splits: 0 = the config's automatic choice.
void run_wg(int cfg, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, at::Tensor& out,
            int64_t splits) {
  const int M = (int)x.size(0), N = (int)out.size(1), K = (int)x.size(1);
  TORCH_CHECK(N % 64 == 0, "w4a16 wgmma: N=", N, " is not a multiple of 64 (use the default op)");
  TORCH_CHECK(device_is_sm90(x), "w4a16 wgmma: needs an sm_90 (Hopper) GPU");
  grace_w4a16::WgConfig wc;
  TORCH_CHECK(grace_w4a16::wg_config(cfg, &wc), "w4a16 wgmma: unknown config ", cfg);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int s = splits > 0 ? (int)splits : grace_w4a16::wg_auto_splits(cfg, M, N, K, bf16 ? 0 : 1);
  const int kbps = grace_w4a16::sk_kb_per_split(K, s);
  const int S = (K / 64 + kbps - 1) / kbps;
  at::Tensor ws;
  float* wsp = nullptr;
  if (S > 1) {  // fp32 token-pair workspace, zeroed by the launcher
    ws = at::empty({(int64_t)((M + 1) / 2) * N * 2}, x.options().dtype(at::kFloat));
    wsp = ws.data_ptr<float>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t e = bf16 ? grace_w4a16::wg_launch_bf16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                                     out.data_ptr(), wsp, M, N, K, s, stream)
                       : grace_w4a16::wg_launch_fp16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                                     out.data_ptr(), wsp, M, N, K, s, stream);
  TORCH_CHECK(e == cudaSuccess, "w4a16 wgmma: kernel launch failed (config ", cfg, "): ", cudaGetErrorString(e));
}

// splits: sk configs only; 0 = the config's automatic choice (sk_auto_splits).
void run_tc(int cfg, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, at::Tensor& out,
            int64_t splits = 0) {
  const int M = (int)x.size(0), N = (int)out.size(1), K = (int)x.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  cudaError_t e;
  if (cfg >= grace_w4a16::kFirstLean) {
    e = bf16 ? grace_w4a16::lean_launch_bf16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                             out.data_ptr(), M, N, K, stream)
             : grace_w4a16::lean_launch_fp16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                             out.data_ptr(), M, N, K, stream);
  } else if (cfg >= grace_w4a16::kFirstSk) {
    int s = splits > 0 ? (int)splits : grace_w4a16::sk_auto_splits(cfg, M, N, K, bf16 ? 0 : 1);
    const int kbps = grace_w4a16::sk_kb_per_split(K, s);
    const int S = (K / 64 + kbps - 1) / kbps;
    at::Tensor ws;
    float* wsp = nullptr;
    if (S > 1) {  // fp32 token-pair workspace, zeroed by the launcher (memset inside the stream)
      ws = at::empty({(int64_t)((M + 1) / 2) * N * 2}, x.options().dtype(at::kFloat));
      wsp = ws.data_ptr<float>();
    }
    e = bf16 ? grace_w4a16::sk_launch_bf16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(),
                                           wsp, M, N, K, s, stream)
             : grace_w4a16::sk_launch_fp16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(),
                                           wsp, M, N, K, s, stream);
  } else {
    e = bf16 ? grace_w4a16::tc_launch_bf16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(),
                                           M, N, K, stream)
             : grace_w4a16::tc_launch_fp16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(),
                                           M, N, K, stream);
  }
  TORCH_CHECK(e == cudaSuccess, "w4a16_gemm: kernel launch failed (config ", cfg, "): ", cudaGetErrorString(e));
}

bool valid_config(int64_t cfg) {
  TcConfig c;
  grace_w4a16::SkConfig k;
  return grace_w4a16::tc_config((int)cfg, &c) || grace_w4a16::sk_config((int)cfg, &k) ||
         grace_w4a16::lean_config((int)cfg, &c);
}

// Dequantise packed rows [n0, n0+nrows) (n0, nrows multiples of 16) into w (nrows, K), row-major.
void dequant_rows(const at::Tensor& qweight, const at::Tensor& scales, int64_t n0, int64_t nrows, at::Tensor& w) {
  const int64_t K = qweight.size(1) * 64;
  const int64_t t0 = n0 / 16;
  const void* qw = static_cast<const int32_t*>(qweight.data_ptr()) + t0 * qweight.size(1) * 128;
  const void* sc = static_cast<const char*>(scales.data_ptr()) + t0 * scales.size(1) * 16 * scales.element_size();
  auto stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t e = scales.scalar_type() == at::kBFloat16
                      ? grace_w4a16::dequant_launch_bf16(qw, sc, w.data_ptr(), (int)nrows, (int)K, stream)
                      : grace_w4a16::dequant_launch_fp16(qw, sc, w.data_ptr(), (int)nrows, (int)K, stream);
  TORCH_CHECK(e == cudaSuccess, "w4a16 dequant: kernel launch failed: ", cudaGetErrorString(e));
}

at::Tensor dequant(const at::Tensor& qweight, const at::Tensor& scales) {
  const int64_t N = qweight.size(0) * 16, K = qweight.size(1) * 64;
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor w = at::empty({N, K}, scales.options());
  dequant_rows(qweight, scales, 0, N, w);
  return w;
}

// Large-M path: dequantise chunk_bytes worth of weight rows into ONE reused workspace and run
// cuBLAS on that chunk, chunk after chunk. The workspace stays resident in L2 (50 MB on H100), so
// the dequantised bf16 tile is written to and read back from L2 instead of DRAM: DRAM sees the
// int4 weights once plus cuBLAS's own traffic. chunk_bytes <= 0: one chunk (full dequant).
void dequant_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, at::Tensor& out,
                  int64_t chunk_bytes) {
  const int64_t N = qweight.size(0) * 16, K = qweight.size(1) * 64;
  int64_t rows = chunk_bytes > 0 ? (chunk_bytes / (K * 2)) / 256 * 256 : N;
  if (rows < 256) rows = 256;
  if (rows > N) rows = N;
  at::Tensor ws = at::empty({rows, K}, scales.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nc = std::min(rows, N - n0);
    at::Tensor wc = ws.narrow(0, 0, nc);
    dequant_rows(qweight, scales, n0, nc, wc);
    at::Tensor oc = out.narrow(1, n0, nc);  // strided (ld = N) output: cuBLAS writes it in place
    at::mm_out(oc, x, wc.t());
  }
}

// Chunked dequant measured slower than one full dequant on H100 (NOTES.md): 0 = one chunk.
constexpr int64_t kChunkBytes = 0;

// Heuristic config choice, from the sweeps of `python -m kernels.w4a16.bench --configs` and
// `python -m kernels.w4a16.sweep_sk` on H100 and H200 (kernels/NOTES.md; config ids in
// w4a16_api.h). Returns -1 when dequantise + cuBLAS is the faster path.
struct Choice {
  int cfg;      // config id; -1 = dequantise + cuBLAS
  int splits;   // sk configs: CTAs along K (0 = the config's automatic choice)
  int pdl = 1;  // 0: never launched with PDL (a tuned entry's "pdl": 0); 1: as set_pdl says
};

// Holds this thread's launches to plain ones for its lifetime when on (a choice with pdl = 0).
struct NoPdl {
  bool on;
  explicit NoPdl(bool o) : on(o) {
    if (on) ++grace_w4a16::pdl_suppressed();
  }
  ~NoPdl() {
    if (on) --grace_w4a16::pdl_suppressed();
  }
  NoPdl(const NoPdl&) = delete;
  NoPdl& operator=(const NoPdl&) = delete;
};

// The register-only kernel's table (v3), kept as the fallback and for comparison.
int choose_config_v3(int64_t M, int64_t N, int64_t K) {
  const bool wide = N >= 8192;      // enough n16 tiles to give each warp 2 of them
  const bool deep = K >= 16384;     // long K: more warps along K per CTA
  if (M <= 8) return deep ? (wide ? 6 : 1) : (N >= 11008 ? 2 : 0);
  if (M <= 16) return wide ? (deep ? 11 : 9) : 7;
  if (M <= 128) return (wide && deep) ? 17 : 13;
  return -1;
}

// Lean register kernel (w4a16_lean.cuh, NOTES.md v9) in the rules: 1 = on (default, from the H200
// sweep of 2026-11-29 14:09 UTC), 0 = the classic register kernel's rules, and tuned-table entries
// that name a lean config are skipped too (GRACE_W4A16_LEAN=0; for A/B runs).
int& lean_dispatch_flag() {
  static int flag = [] {
    const char* e = std::getenv("GRACE_W4A16_LEAN");
    return (e != nullptr && e[0] == '0') ? 0 : 1;
  }();
  return flag;
}

bool is_lean(int cfg) { return cfg >= grace_w4a16::kFirstLean; }

// Fraction of the resident-CTA slots a launch of `ctas` CTAs keeps busy over its waves (1 = no
// half-empty last wave). slots = SMs x resident CTAs per SM of the config.
double wave_fill(int64_t ctas, int64_t slots) {
  if (ctas <= 0 || slots <= 0) return 0.0;
  const int64_t waves = (ctas + slots - 1) / slots;
  return (double)ctas / (double)(waves * slots);
}

// M <= 8 with the lean kernels (H200 sweeps of 14:09, 14:14 and 14:40 UTC, M=1 on the and
// the 7B decoders' weights; kernels/NOTES.md v9, v10). Long K: 4 tiles per warp, 8 warps along K and
// the cp.async ring for N >= 8192 (8192x28672: 36.3 us against 48.7 for the register-ring c44), 1
// tile for narrower weights (3584x18944: c59, 17.6 against 21.3). Narrow weights (N < 8192): 1 tile,
// 8 warps along K, the cp.async ring from K = 8192 on (4096x11008: 12.0 against 13.5) and the
// register ring below (4096x4096: 5.8 against 6.5). Wide weights: the wave fill decides. At one
// token a warp's work is fixed by its tiles, so the config whose CTAs fill the resident slots best
// wins; among configs within 0.05 of the best fill the first listed is taken. Against the 14:40
// sweep this is the measured winner or within 3% of it on all 7 wide cases (22016x4096: c58, fill
// 0.87, 17.2 us, against c61, fill 0.65, 18.0; 12288x4096: c61, 12.0 against 12.2 for c58, fill
// 0.48; 32064x4096: c61 23.6 against the best c46 22.9).
int choose_lean_m8(int64_t N, int64_t K) {
  if (K >= 16384) return N >= 8192 ? 61 : 59;
  if (N < 8192) return K >= 8192 ? 59 : 43;
  // (TN, WK, ring) = (4, 4, smem), (4, 8, smem), (4, 4, regs), (3, 4, regs), (4, 8, regs), (2, 4, regs):
  // at equal fill the cp.async ring first (more bytes in flight), then more tiles per warp, then 4
  // warps along K before 8 (37888x3584: c58 25.1 us against c61 27.2, both fill 0.75)
  const int cands[] = {58, 61, 46, 51, 52, 41};
  constexpr int kC = sizeof(cands) / sizeof(cands[0]);
  const int64_t nt = N / 16;
  int best = 41;
  double best_fill = -1.0, fills[kC];
  for (int i = 0; i < kC; ++i) {
    TcConfig c;
    grace_w4a16::lean_config(cands[i], &c);
    const int64_t ctas = (nt + c.tn * c.wn - 1) / (c.tn * c.wn);
    fills[i] = wave_fill(ctas, grace_w4a16::lean_resident_slots(cands[i]));
    if (fills[i] > best_fill) best_fill = fills[i];
  }
  for (int i = 0; i < kC; ++i)
    if (fills[i] >= best_fill - 0.05) {
      best = cands[i];
      break;
    }
  return best;
}

// Measured choices for exact (M, N, K), ahead of the rules below: a tuned table per card
// (kernels/w4a16/tuned/*.json, written from `python -m kernels.w4a16.sweep_decode` and loaded by
// op.load_extension; `set_choice` / `clear_choices` from Python). Read at launch, so a CUDA graph
// keeps the choice it was captured with.
using ChoiceKey = std::tuple<int64_t, int64_t, int64_t>;
std::map<ChoiceKey, Choice>& choice_table() {
  static std::map<ChoiceKey, Choice> table;
  return table;
}
std::mutex& choice_mutex() {
  static std::mutex m;
  return m;
}

// v4 (two H100 sweeps of sweep_sk, NOTES.md "v4"): the register-only kernel stays ahead at
// M <= 8 (the lean one since v9) and, for the smaller weights, at M <= 16; the split-K shared-memory-x kernel wins at
// 9..16 tokens on the largest weights (config 30), 17..32 (config 39) and 33..128 (config 38),
// always with its automatic (wave-quantised) split count.
// A tuned-table entry for (M, N, K), when there is one, comes first.
Choice choose(int64_t M, int64_t N, int64_t K) {
  {
    std::lock_guard<std::mutex> lock(choice_mutex());
    const auto& t = choice_table();
    if (!t.empty()) {
      auto it = t.find(ChoiceKey{M, N, K});
      if (it != t.end() && (lean_dispatch_flag() || !is_lean(it->second.cfg))) return it->second;
    }
  }
  const bool lean = lean_dispatch_flag() != 0;
  if (M <= 8) return {lean ? choose_lean_m8(N, K) : choose_config_v3(M, N, K), 0};
  if (M <= 16) {
    // lean, 2 token tiles, cp.async ring, for wide weights with K < 16384 (14:40 sweep at 16 tokens:
    // 28672x8192 50.6 us against 55.9 for split-K c30; 22016x4096 23.8 against 25.7; 12288x4096 14.1
    // against 15.9 for c9). Long K stays split-K (8192x28672: c30 53.6 against 55.6). From N = 28672
    // on, 4 tiles per warp and 2 warps along N sharing the activations through L1 (c66; 15:31 sweep:
    // 152064x3584 97.2 us against 116.5 for c62, 32064x4096 27.8 against 31.9, 28672x8192 49.4
    // against 51.0, 37888x3584 32.8 against 34.3; c62 stays ahead below, e.g. 11008x4096 14.0 / 17.5).
    if (lean && N >= 8192 && K < 16384) return {N >= 28672 ? 66 : 62, 0};
    if (N * K >= 100000000LL) return {30, 0};
    return {choose_config_v3(M, N, K), 0};
  }
  if (M <= 32) return {39, 0};
  if (M <= 128) return {38, 0};
  return {-1, 0};
}

int choose_config(int64_t M, int64_t N, int64_t K) { return choose(M, N, K).cfg; }

// The kernel the op runs for (M, N, K) on the current device, as a label for benchmark records:
// "wg<id>" (Hopper wgmma), "c<id>" (register, split-K or lean config) or "dequant" (dequantise + cuBLAS).
std::string op_kernel(int64_t M, int64_t N, int64_t K) {
  int dev = 0;
  cudaGetDevice(&dev);
  if (use_wgmma(M, N, dev)) return "wg" + std::to_string(choose_wgmma(M));
  const int cfg = choose(M, N, K).cfg;
  return cfg >= 0 ? "c" + std::to_string(cfg) : std::string("dequant");
}

// Returns false (and changes nothing) for a shape the kernels cannot take, an unknown config or negative
// splits; the Python callers raise with the file and entry (an exception thrown from this helper crashed
// the process on the H200 machine, 2026-11-29).
bool set_choice(int64_t M, int64_t N, int64_t K, int64_t cfg, int64_t splits, int64_t pdl) {
  if (M <= 0 || N <= 0 || N % 16 != 0 || K <= 0 || K % 128 != 0) return false;
  if (cfg != -1 && !valid_config(cfg)) return false;
  if (splits < 0 || (pdl != 0 && pdl != 1)) return false;
  std::lock_guard<std::mutex> lock(choice_mutex());
  choice_table()[ChoiceKey{M, N, K}] = Choice{(int)cfg, (int)splits, (int)pdl};
  return true;
}

void clear_choices() {
  std::lock_guard<std::mutex> lock(choice_mutex());
  choice_table().clear();
}

at::Tensor w4a16_gemm_cuda(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                           int64_t group_size) {
  check_inputs(x_in, qweight, scales, group_size);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), N = qweight.size(0) * 16;
  at::Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0) return out;
  at::Tensor x = contiguous_aligned(x_in);
  if (use_wgmma(M, N, x)) {
    run_wg(choose_wgmma(M), x, qweight, scales, out, 0);
    return out;
  }
  const Choice ch = choose(M, N, x.size(1));
  const NoPdl no_pdl(ch.pdl == 0);
  if (ch.cfg >= 0) {
    run_tc(ch.cfg, x, qweight, scales, out, ch.splits);
  } else {
    dequant_gemm(x, qweight, scales, out, kChunkBytes);
  }
  return out;
}

// ---- gated MLP: out (M, I) = silu(x @ gate^T) * (x @ up^T) for a fused [gate; up] weight (NOTES.md v15) ----
// The plain op's choice for (M, N, K) when it is a lean config with the GLU epilogue (lean_glu_ok); cfg -1
// otherwise (the op then runs the plain GEMM and the activation as two kernels).
Choice glu_choice(int64_t M, int64_t N, int64_t K, int device) {
  if (N % 32 != 0 || use_wgmma(M, N, device)) return {-1, 0};
  const Choice ch = choose(M, N, K);
  return is_lean(ch.cfg) && grace_w4a16::lean_glu_ok(ch.cfg) ? ch : Choice{-1, 0};
}

void run_lean_glu(int cfg, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, at::Tensor& out) {
  const int M = (int)x.size(0), N = (int)qweight.size(0) * 16, K = (int)x.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const cudaError_t e =
      bf16 ? grace_w4a16::lean_glu_launch_bf16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(),
                                               M, N, K, stream)
           : grace_w4a16::lean_glu_launch_fp16(cfg, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(),
                                               M, N, K, stream);
  TORCH_CHECK(e == cudaSuccess, "w4a16_gemm_glu: kernel launch failed (config ", cfg, "): ", cudaGetErrorString(e));
}

void check_glu(const at::Tensor& qweight) {
  TORCH_CHECK(qweight.size(0) % 2 == 0, "w4a16_gemm_glu: the fused [gate; up] weight has N=", qweight.size(0) * 16,
              " rows; it must be 2 x I with I a multiple of 16 (pack gate and up separately, then concatenate)");
}

at::Tensor w4a16_gemm_glu_cuda(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                               int64_t group_size) {
  check_inputs(x_in, qweight, scales, group_size);
  check_glu(qweight);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), N = qweight.size(0) * 16;
  at::Tensor x = contiguous_aligned(x_in);
  const Choice ch = glu_choice(M, N, x.size(1), x.get_device());
  at::Tensor out = at::empty({M, N / 2}, x.options());
  if (M == 0) return out;
  if (ch.cfg >= 0) {
    const NoPdl no_pdl(ch.pdl == 0);
    run_lean_glu(ch.cfg, x, qweight, scales, out);
    return out;
  }
  // two kernels: the op's GEMM, then silu(gate) * up
  const at::Tensor y = w4a16_gemm_cuda(x, qweight, scales, group_size);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t e = x.scalar_type() == at::kBFloat16
                            ? grace_w4a16::silu_mul_launch_bf16(y.data_ptr(), out.data_ptr(), (int)M, (int)(N / 2), stream)
                            : grace_w4a16::silu_mul_launch_fp16(y.data_ptr(), out.data_ptr(), (int)M, (int)(N / 2), stream);
  TORCH_CHECK(e == cudaSuccess, "w4a16_gemm_glu: activation launch failed: ", cudaGetErrorString(e));
  return out;
}

// ---- RMSNorm + projection: out = rms_norm(x; gamma, eps) @ W^T (glu: silu(gate) * up of it), NOTES.md v21 ----
// The lean config the op would run for (M, N, K) (glu: glu_choice's) when it has the norm folded in; cfg -1 else.
Choice norm_choice(int64_t M, int64_t N, int64_t K, bool glu, int device) {
  const Choice ch = glu ? glu_choice(M, N, K, device) : use_wgmma(M, N, device) ? Choice{-1, 0} : choose(M, N, K);
  return ch.cfg >= 0 && is_lean(ch.cfg) && grace_w4a16::lean_norm_ok(ch.cfg, glu) ? ch : Choice{-1, 0};
}

void check_gamma(const at::Tensor& x, const at::Tensor& gamma, double eps) {
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == x.size(1), "w4a16 norm: gamma must have shape (", x.size(1),
              ",), got ", gamma.sizes());
  TORCH_CHECK(gamma.scalar_type() == x.scalar_type() && gamma.device() == x.device(), "w4a16 norm: gamma must be ",
              x.scalar_type(), " on ", x.device(), ", got ", gamma.scalar_type(), " on ", gamma.device());
  TORCH_CHECK(eps >= 0.0, "w4a16 norm: eps must be >= 0, got ", eps);
}

void run_lean_norm(int cfg, bool glu, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& gamma, double eps, at::Tensor& out) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = x.scalar_type() == at::kBFloat16 ? grace_w4a16::lean_norm_launch_bf16
                                                       : grace_w4a16::lean_norm_launch_fp16;
  const cudaError_t e = launch(cfg, glu, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), gamma.data_ptr(),
                               (float)eps, out.data_ptr(), (int)x.size(0), (int)(qweight.size(0) * 16),
                               (int)x.size(1), stream);
  TORCH_CHECK(e == cudaSuccess, "w4a16 norm: kernel launch failed (config ", cfg, "): ", cudaGetErrorString(e));
}

at::Tensor w4a16_gemm_norm_cuda(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& gamma_in, double eps, int64_t group_size, bool glu) {
  check_inputs(x_in, qweight, scales, group_size);
  if (glu) check_glu(qweight);
  check_gamma(x_in, gamma_in, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), N = qweight.size(0) * 16;
  at::Tensor x = contiguous_aligned(x_in);
  const Choice ch = norm_choice(M, N, x.size(1), glu, x.get_device());
  if (ch.cfg < 0 || M == 0) {   // the norm as transformers' RMSNorm computes it, then the op
    const at::Tensor xf = x.to(at::kFloat);
    const at::Tensor xn = (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type()) * gamma_in;
    return glu ? w4a16_gemm_glu_cuda(xn, qweight, scales, group_size) : w4a16_gemm_cuda(xn, qweight, scales, group_size);
  }
  at::Tensor gamma = contiguous_aligned(gamma_in);
  at::Tensor out = at::empty({M, glu ? N / 2 : N}, x.options());
  const NoPdl no_pdl(ch.pdl == 0);
  run_lean_norm(ch.cfg, glu, x, qweight, scales, gamma, eps, out);
  return out;
}

// ---- pybind helpers (benchmark / tests) ----
// An explicit GLU config (lean_glu_ok), for tests and benchmarks.
at::Tensor lean_glu_gemm(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales, int64_t cfg) {
  check_inputs(x_in, qweight, scales, 128);
  check_glu(qweight);
  TORCH_CHECK(is_lean((int)cfg) && grace_w4a16::lean_glu_ok((int)cfg), "w4a16: config ", cfg,
              " has no GLU epilogue (lean cp.async configs with an even TN only)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = contiguous_aligned(x_in);
  at::Tensor out = at::empty({x.size(0), qweight.size(0) * 8}, x.options());
  if (x.size(0) > 0) run_lean_glu((int)cfg, x, qweight, scales, out);
  return out;
}

// An explicit lean config with the RMSNorm fold (NOTES.md v21): out = rsqrt(mean(x^2) + eps) * (gamma * x) @ W^T
// per row of x (glu: then silu(gate) * up of a fused [gate; up] weight). For tests and the kernel A/B (the op,
// w4a16_gemm_norm, runs the config it chooses).
at::Tensor lean_norm_gemm(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& gamma_in, double eps, int64_t cfg, bool glu) {
  check_inputs(x_in, qweight, scales, 128);
  if (glu) check_glu(qweight);
  TORCH_CHECK(is_lean((int)cfg) && grace_w4a16::lean_norm_ok((int)cfg, glu), "w4a16: config ", cfg,
              " has no RMSNorm fold", glu ? " with the GLU epilogue (lean cp.async configs with an even TN only)"
                                          : " (lean cp.async configs only)");
  check_gamma(x_in, gamma_in, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = contiguous_aligned(x_in);
  at::Tensor gamma = contiguous_aligned(gamma_in);
  const int64_t N = qweight.size(0) * 16;
  at::Tensor out = at::empty({x.size(0), glu ? N / 2 : N}, x.options());
  if (x.size(0) > 0) run_lean_norm((int)cfg, glu, x, qweight, scales, gamma, eps, out);
  return out;
}

at::Tensor tc_gemm(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales, int64_t cfg,
                   int64_t splits) {
  check_inputs(x_in, qweight, scales, 128);
  TORCH_CHECK(valid_config(cfg), "w4a16: unknown config ", cfg);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = contiguous_aligned(x_in);
  at::Tensor out = at::empty({x.size(0), qweight.size(0) * 16}, x.options());
  if (x.size(0) > 0) run_tc((int)cfg, x, qweight, scales, out, splits);
  return out;
}

at::Tensor tc_gemm_out(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t cfg,
                       at::Tensor out, int64_t splits) {
  check_inputs(x, qweight, scales, 128);
  TORCH_CHECK(valid_config(cfg), "w4a16: unknown config ", cfg);
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.size(0) == x.size(0) &&
                  out.size(1) == qweight.size(0) * 16 && out.scalar_type() == x.scalar_type(),
              "w4a16: bad out");
  const c10::cuda::CUDAGuard guard(x.device());
  run_tc((int)cfg, x, qweight, scales, out, splits);
  return out;
}

at::Tensor deq_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t chunk_bytes) {
  check_inputs(x, qweight, scales, 128);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), qweight.size(0) * 16}, x.options());
  dequant_gemm(x.contiguous(), qweight, scales, out, chunk_bytes);
  return out;
}

// (MT, TN, WN, WK, XR, P) for register-only configs, lean ones included (XR = 0); (MT, TN, WN, 1, 0, P)
// for sk configs (their stage depth KC: sk_info).
std::vector<int64_t> config_info(int64_t cfg) {
  TcConfig c;
  grace_w4a16::SkConfig k;
  if (grace_w4a16::sk_config((int)cfg, &k)) return {k.mt, k.tn, k.wn, 1, 0, k.p};
  if (grace_w4a16::lean_config((int)cfg, &c)) return {c.mt, c.tn, c.wn, c.wk, c.xr, c.p};
  TORCH_CHECK(grace_w4a16::tc_config((int)cfg, &c), "w4a16: unknown config ", cfg);
  return {c.mt, c.tn, c.wn, c.wk, c.xr, c.p};
}

// (MT, TN, WN, KC, NS, P, MB) of an sk config.
std::vector<int64_t> sk_info(int64_t cfg) {
  grace_w4a16::SkConfig k;
  TORCH_CHECK(grace_w4a16::sk_config((int)cfg, &k), "w4a16: not an sk config ", cfg);
  return {k.mt, k.tn, k.wn, k.kc, k.ns, k.p, k.mb};
}

// Effective number of CTAs along K that run_tc uses for (cfg, M, N, K, requested splits; 0 = auto).
int64_t sk_splits(int64_t cfg, int64_t M, int64_t N, int64_t K, int64_t splits, int64_t fp16) {
  int s = splits > 0 ? (int)splits : grace_w4a16::sk_auto_splits((int)cfg, (int)M, (int)N, (int)K, (int)fp16);
  const int kbps = grace_w4a16::sk_kb_per_split((int)K, s);
  return (K / 64 + kbps - 1) / kbps;
}

at::Tensor wgmma_gemm(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales, int64_t cfg,
                      int64_t splits) {
  check_inputs(x_in, qweight, scales, 128);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = contiguous_aligned(x_in);
  at::Tensor out = at::empty({x.size(0), qweight.size(0) * 16}, x.options());
  if (x.size(0) > 0) run_wg((int)cfg, x, qweight, scales, out, splits);
  return out;
}

at::Tensor wgmma_gemm_out(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t cfg,
                          at::Tensor out, int64_t splits) {
  check_inputs(x, qweight, scales, 128);
  TORCH_CHECK(x.is_contiguous() && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && out.is_contiguous() &&
                  out.size(0) == x.size(0) && out.size(1) == qweight.size(0) * 16 &&
                  out.scalar_type() == x.scalar_type(),
              "w4a16 wgmma: bad x/out");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.size(0) > 0) run_wg((int)cfg, x, qweight, scales, out, splits);
  return out;
}

// (X, WGS, NS, P, MB, PW, T64) of a wg config.
std::vector<int64_t> wgmma_info(int64_t cfg) {
  grace_w4a16::WgConfig w;
  TORCH_CHECK(grace_w4a16::wg_config((int)cfg, &w), "w4a16 wgmma: unknown config ", cfg);
  return {w.x, w.wgs, w.ns, w.p, w.mb, w.pw, w.t64};
}

// Effective CTAs along K of a wg config for (M, N, K, requested splits; 0 = auto).
int64_t wgmma_splits(int64_t cfg, int64_t M, int64_t N, int64_t K, int64_t splits, int64_t fp16) {
  int s = splits > 0 ? (int)splits : grace_w4a16::wg_auto_splits((int)cfg, (int)M, (int)N, (int)K, (int)fp16);
  const int kbps = grace_w4a16::sk_kb_per_split((int)K, s);
  return (K / 64 + kbps - 1) / kbps;
}

}  // namespace

TORCH_LIBRARY_IMPL(grace, CUDA, m) {
  m.impl("w4a16_gemm", &w4a16_gemm_cuda);
  m.impl("w4a16_gemm_glu", &w4a16_gemm_glu_cuda);
  m.impl("w4a16_gemm_norm", &w4a16_gemm_norm_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tc_gemm", &tc_gemm, "tensor-core W4A16 GEMM with an explicit config id (splits: sk configs, 0 = auto)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("cfg"), py::arg("splits") = 0);
  m.def("tc_gemm_out", &tc_gemm_out, "same, into a preallocated output", py::arg("x"), py::arg("qweight"),
        py::arg("scales"), py::arg("cfg"), py::arg("out"), py::arg("splits") = 0);
  m.def("sk_info", &sk_info, "(MT, TN, WN, KC, NS, P, MB) of a split-K shared-memory-x config");
  m.def("sk_splits", &sk_splits, "effective CTAs along K of an sk config (cfg, M, N, K, splits, fp16)");
  m.attr("first_sk") = grace_w4a16::kFirstSk;
  m.attr("first_lean") = grace_w4a16::kFirstLean;   // lean register configs: first_lean .. num_configs-1
  m.def("dequant", &dequant, "packed int4 -> (N,K) weight in the scales dtype");
  m.def("deq_gemm", &deq_gemm, "dequantise (in chunks of chunk_bytes, <=0: all) + cuBLAS");
  m.def("set_persistent", [](int64_t on) { grace_w4a16::set_persistent((int)on); },
        "1: tensor-core kernel launched as one wave of grid-stride CTAs; 0 (default): one CTA per tile group");
  m.def("set_pdl", [](int64_t on) { grace_w4a16::set_pdl((int)on); },
        "1: programmatic dependent launch for the tensor-core / split-K kernels (enable after the weights "
        "are loaded); 0 (default): plain launches");
  m.def("pdl_enabled", []() { return (int64_t)grace_w4a16::pdl_flag(); }, "current PDL flag");
  m.def("config_info", &config_info, "(MT, TN, WN, WK, XR, P) of a config id");
  m.def("choose_config", &choose_config, "config id the op uses for (M,N,K); -1 = dequant + cuBLAS");
  m.def("op_kernel", &op_kernel, "label of the kernel the op runs for (M,N,K) here: wg<id>, c<id> or dequant");
  m.def("glu_kernel", [](int64_t M, int64_t N, int64_t K) {
        int dev = 0;
        cudaGetDevice(&dev);
        const int cfg = glu_choice(M, N, K, dev).cfg;
        return cfg >= 0 ? "c" + std::to_string(cfg) + "+glu" : op_kernel(M, N, K) + ",silu*mul";
      }, "label of what w4a16_gemm_glu runs for a fused [gate; up] weight (M, N = 2I, K): c<id>+glu (one kernel) or "
         "the op's kernel then the activation");
  m.def("lean_glu_gemm", &lean_glu_gemm, "silu(gate) * up of a fused [gate; up] weight with an explicit lean config",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("cfg"));
  m.def("lean_glu_ok", [](int64_t cfg) { return grace_w4a16::lean_glu_ok((int)cfg); },
        "whether a lean config has the GLU epilogue");
  m.def("lean_norm_gemm", &lean_norm_gemm, "the GEMM of RMSNorm(x) (weight gamma, eps) with an explicit lean config, "
        "folded into the kernel (glu: then silu(gate) * up)", py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("gamma"), py::arg("eps"), py::arg("cfg"), py::arg("glu") = false);
  m.def("norm_kernel", [](int64_t M, int64_t N, int64_t K, bool glu) {
        int dev = 0;
        cudaGetDevice(&dev);
        const int cfg = norm_choice(M, N, K, glu, dev).cfg;
        return cfg >= 0 ? "c" + std::to_string(cfg) + "+norm" + (glu ? "+glu" : "")
                        : "rms_norm," + (glu ? std::string("glu") : op_kernel(M, N, K));
      }, "label of what w4a16_gemm_norm runs for (M, N, K): c<id>+norm[+glu] (one kernel) or the norm then the op",
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("glu") = false);
  m.def("lean_norm_ok", [](int64_t cfg, bool glu) { return grace_w4a16::lean_norm_ok((int)cfg, glu); },
        "whether a lean config has the RMSNorm fold (glu: with the GLU epilogue)", py::arg("cfg"), py::arg("glu") = false);
  m.def("choose_splits", [](int64_t M, int64_t N, int64_t K) { return (int64_t)choose(M, N, K).splits; },
        "requested splits of the op's choice (0 = automatic; see sk_splits for the effective count)");
  m.def("set_choice", &set_choice, "measured config (and splits, 0 = auto; pdl 0 = never launched with PDL) for an "
        "exact (M, N, K), ahead of the rules; false if invalid",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("cfg"), py::arg("splits") = 0, py::arg("pdl") = 1);
  m.def("choose_pdl", [](int64_t M, int64_t N, int64_t K) { return (int64_t)choose(M, N, K).pdl; },
        "0 if a tuned entry keeps (M, N, K)'s launches off PDL, else 1 (then set_pdl decides)");
  m.def("pdl_suppressed", []() { return (int64_t)grace_w4a16::pdl_suppressed(); },
        "this thread's count of held plain launches (0 between calls; for tests)");
  m.def("clear_choices", &clear_choices, "forget every set_choice entry (back to the rules)");
  m.def("lean_blocks_per_sm", [](int64_t cfg) {
        int dev = 0, sms = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        return (int64_t)(sms > 0 ? grace_w4a16::lean_resident_slots((int)cfg) / sms : 0);
      }, "resident CTAs per SM of a lean config (occupancy API; the wave-fill rule uses them times the SMs)");
  m.def("set_lean_dispatch", [](int64_t on) { lean_dispatch_flag() = on ? 1 : 0; },
        "1 (default): the rules and tuned entries may pick the lean register kernel; 0: never (GRACE_W4A16_LEAN=0)");
  m.def("lean_dispatch", []() { return (int64_t)lean_dispatch_flag(); }, "current lean dispatch flag");
  m.def("choose_config_v3", &choose_config_v3, "the register-only kernel's config table (before sk)");
  m.attr("num_configs") = grace_w4a16::kNumAllConfigs;
  // Hopper wgmma kernel (own config ids 0..num_wgmma_configs-1)
  m.def("wgmma_gemm", &wgmma_gemm, "Hopper wgmma W4A16 GEMM with an explicit wg config id (splits: 0 = auto)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("cfg"), py::arg("splits") = 0);
  m.def("wgmma_gemm_out", &wgmma_gemm_out, "same, into a preallocated output", py::arg("x"), py::arg("qweight"),
        py::arg("scales"), py::arg("cfg"), py::arg("out"), py::arg("splits") = 0);
  m.def("wgmma_info", &wgmma_info, "(X, WGS, NS, P, MB, PW, T64) of a wg config");
  m.def("wgmma_splits", &wgmma_splits, "effective CTAs along K of a wg config (cfg, M, N, K, splits, fp16)");
  m.def("choose_wgmma", &choose_wgmma, "wg config the opt-in dispatch uses for M");
  m.def("set_wgmma_dispatch", [](int64_t on) { wgmma_dispatch_flag() = (int)on; },
        "0: auto (129 <= M <= 384 on sm_90, N % 64 == 0), 1: every M >= 64, -1: never");
  m.def("wgmma_dispatch", []() { return (int64_t)wgmma_dispatch_flag(); }, "current opt-in dispatch flag");
  m.attr("num_wgmma_configs") = grace_w4a16::kNumWgConfigs;
}
