// Hopper (sm_90a) wgmma W4A16 kernel for M >= 48 tokens ("wg" configs). Written without a device;
// its first H100 run (kernels/w4a16/wgmma_check.py, 2026-11-28) passed 271/271 checks. v13 (2026-11-29,
// H200): weights through a per-warp shared-memory cp.async ring (PW > 0), token tiles of 16 and 32, two
// n64 tiles per warpgroup (T64); the op's choice for 48 <= M <= 192 (kernels/NOTES.md v13).
//
// Same problem and the same packed layout as w4a16_kernel.cuh (read its header first); swap AB as
// there: y^T (N x M) = W (N x K) . x^T, computed with
//   wgmma.mma_async.sync.aligned.m64nXk16.f32.{bf16,f16} with A = 64 rows of W x 16 k FROM REGISTERS
//   and B = X tokens x 16 k from shared memory (descriptor), fp32 accumulators in registers.
//
// A operand (registers). The wgmma m64k16 register fragment of A is, per warp w of the warpgroup
// (rows 16w..16w+15), exactly the mma.m16n8k16 A fragment (CUTLASS: ALayout_64x16 ==
// CLayout_64x16): a0 = (row g, k 2c,2c+1), a1 = (row g+8, same k), a2 = (row g, k 2c+8,2c+9),
// a3 = (row g+8, k 2c+8,2c+9). Word s of a packed (n16 tile, k64 block) gives those 4 registers
// after dequant_word() for k16 step s; so warp w of a warpgroup streams n16 tile 4*n64 + w with
// one 16-byte load per lane per k64 block, through a P-deep register ring (as the other kernels) or,
// with PW > 0, a PW-stage cp.async ring in shared memory (see the kernel's template comment).
//
// The K permutation. Packed word s of lane (g, c) holds the PHYSICAL k = 16c + 4s + {0,1} (a0/a1)
// and 16c + 4s + {2,3} (a2/a3) of its 64-block, i.e. wgmma step s, mma-k position p in 0..15
// (p = 8*hh + 2*c + j, hh = 0 for a0/a1 and 1 for a2/a3, j = element in the register) reads
// physical k = 16*c + 4*s + 2*hh + j. The B tile in shared memory must therefore hold, at logical
// column 16*s + p of token row r, x[r][64*kb + 16*c + 4*s + 2*hh + j]: a permutation at 4-byte
// (k pair) granularity. No 16-byte copy can do that, so x is staged with 4-byte cp.async:
// lane L of a warp copies k pair L (physical k = 2L, 2L+1) of one token row: L = 8c + 2s + hh,
// destination = logical 16-byte chunk 2s + hh, word c. One warp instruction = one 128-byte
// contiguous global row segment -> one 128-byte shared row (all 32 banks, conflict-free).
//
// B operand (shared memory): per stage, X token rows x 64 k (128 bytes per row), K-major,
// 128-byte swizzle (the TMA SWIZZLE_128B pattern: 16-byte chunk ch of row r is stored at chunk
// ch ^ (r % 8)), stage base 1024-byte aligned. Descriptor (cute::GmmaDescriptor): start address >> 4
// in bits 0-13, LBO = 1 (unused for swizzled K-major), SBO = 1024 B (8 rows x 128 B) >> 4 = 64 in
// bits 32-45, base offset 0, layout type 1 (SWIZZLE_128B) in bits 62-63; k16 step s = +32 bytes on
// the start address (as CUTLASS's descriptor iterator and the public "fast.cu" kernels do).
//
// Pipeline (no warp specialisation; every thread copies x and computes):
//   NS shared stages, prefetch distance NS-2. Iteration r (k64 block r of this CTA's K range):
//     cp.async.wait_group(NS-3)       -> this thread's copies of stage r have landed
//     fence.proxy.async.shared::cta   -> ... and are visible to the async proxy (wgmma)
//     __syncthreads                   -> everyone's copies; and every warpgroup has finished the
//                                        wgmma of block r-2 (its wait_group<1> at iteration r-1)
//     cp.async stage r+NS-2 into slot (r+NS-2)%NS = (r-2)%NS (free: see above); commit
//     dequantise block r into A registers set r%2 (set (r-2)%2 was last read by wgmma r-2: done)
//     wgmma.fence; 4 x wgmma (k16 steps); commit_group; wait_group<1> (block r-1 done)
//   The wgmma of block r runs while the next iteration dequantises block r+1.
//   CTA = WGS warpgroups, each owning T64 x 64 rows of W (WGS*T64*64 rows per CTA), all sharing the x
//   stages. grid = (token tiles of X, N / (64*WGS*T64), splits along K). Token rows >= M are zero-filled
//   (cp.async src-size 0) and never stored. Split K > 1: float2 atomics into the token-pair fp32
//   workspace of the sk kernel, then sk_finalize_kernel (same as w4a16_sk.cuh).
//
// Requirements: K % 128 == 0, N % 64 == 0 (the binding checks), sm_90a.
#pragma once
#include "w4a16_api.h"
#include "w4a16_sk.cuh"

namespace grace_w4a16 {

template <typename T, int N>
struct WgmmaRS;

// One wgmma.mma_async m64nNk16 (A from registers, B by descriptor, fp32 accumulators) per token tile N, written
// once per N and instantiated for both 16-bit types (their PTX type name is the only difference). One wrapper
// serves every tile: PRED is the scale-d predicate's operand, DREGS the accumulators' register list, AB the A
// registers and the B descriptor, the variadic part the accumulators' output operands (inline-asm operand
// lists cannot be generated, so each tile below spells its own).
#define GRACE_WGMMA_RS(TY, PT, N, PRED, DREGS, AB, ...)                                                        \
  template <>                                                                                                 \
  struct WgmmaRS<TY, N> {                                                                                     \
    static __device__ __forceinline__ void mma(float* d, const uint32_t* a, uint64_t desc) {                  \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                                          \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PT "." PT " " DREGS ", " AB ", p, 1, 1, 0;\n}\n" \
                   : __VA_ARGS__                                                                              \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                          \
    }                                                                                                         \
  };

#define GRACE_WGMMA_RS_N16(TY, PT) GRACE_WGMMA_RS(TY, PT, 16, "%13", "{%0, %1, %2, %3, %4, %5, %6, %7}", "{%8, %9, %10, %11}, %12", \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]))

#define GRACE_WGMMA_RS_N32(TY, PT) GRACE_WGMMA_RS(TY, PT, 32, "%21", "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}", "{%16, %17, %18, %19}, %20", \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]))

#define GRACE_WGMMA_RS_N64(TY, PT) GRACE_WGMMA_RS(TY, PT, 64, "%37", "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}", "{%32, %33, %34, %35}, %36", \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]))

#define GRACE_WGMMA_RS_N128(TY, PT) GRACE_WGMMA_RS(TY, PT, 128, "%69", "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}", "{%64, %65, %66, %67}, %68", \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]))

#define GRACE_WGMMA_RS_N256(TY, PT) GRACE_WGMMA_RS(TY, PT, 256, "%133", "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}", "{%128, %129, %130, %131}, %132", \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]))

GRACE_WGMMA_RS_N16(__nv_bfloat16, "bf16")
GRACE_WGMMA_RS_N16(__half, "f16")
GRACE_WGMMA_RS_N32(__nv_bfloat16, "bf16")
GRACE_WGMMA_RS_N32(__half, "f16")
GRACE_WGMMA_RS_N64(__nv_bfloat16, "bf16")
GRACE_WGMMA_RS_N64(__half, "f16")
GRACE_WGMMA_RS_N128(__nv_bfloat16, "bf16")
GRACE_WGMMA_RS_N128(__half, "f16")
GRACE_WGMMA_RS_N256(__nv_bfloat16, "bf16")
GRACE_WGMMA_RS_N256(__half, "f16")
#undef GRACE_WGMMA_RS_N16
#undef GRACE_WGMMA_RS_N32
#undef GRACE_WGMMA_RS_N64
#undef GRACE_WGMMA_RS_N128
#undef GRACE_WGMMA_RS_N256

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accesses of accumulator registers across wgmma boundaries
// (CUTLASS warpgroup_fence_operand).
__device__ __forceinline__ void wg_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void wg_fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// 4-byte cp.async (L1-allocating .ca: the only variant below 16 bytes); src-size 0 zero-fills.
__device__ __forceinline__ void cp_async4(uint32_t saddr, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(saddr), "l"(gmem));
}
__device__ __forceinline__ void cp_async4_zfill(uint32_t saddr, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(saddr), "l"(gmem), "r"(valid ? 4 : 0));
}

// Shared-memory matrix descriptor, K-major, 128-byte swizzle (see the header comment).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {
  uint64_t d = (uint64_t)((saddr & 0x3FFFFu) >> 4);
  d |= (uint64_t)1 << 16;            // leading byte offset (unused with swizzle; 1 by convention)
  d |= (uint64_t)(1024 >> 4) << 32;  // stride byte offset: 8 rows x 128 B
  d |= (uint64_t)1 << 62;            // SWIZZLE_128B
  return d;
}

// Dynamic shared memory of one CTA: the x stages (+1 KB to align them to 1024 bytes), then, with the
// shared-memory weight ring (PW > 0), per warp PW stages of T64 tiles x 32 lanes x (16 B of codes + one
// 4-byte scale word).
__host__ __device__ constexpr int wg_smem_bytes(int X, int NS, int WGS = 1, int PW = 0, int T64 = 1) {
  return NS * X * 128 + 1024 + WGS * 4 * PW * T64 * 32 * 20;
}

__device__ __forceinline__ void cp_async16(uint32_t saddr, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(gmem));
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t saddr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(saddr));
  return v;
}
__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t saddr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(saddr));
  return v;
}

// X: tokens per CTA (wgmma N: 16, 32, 64, 128, 256); WGS: warpgroups per CTA; NS: shared x stages
// (>= 3; prefetch distance NS-2); P: with the register ring (PW = 0) the k64 blocks of weights in
// flight per warp, with the shared ring the unroll of the k loop (even either way: the A registers are
// double-buffered by block parity); MB: min CTAs per SM (launch bounds).
// PW = 0: weights + scales stream through the P-deep register ring (v5). PW > 0 (v13): each warp
// streams its pieces with cp.async into a private PW-stage ring in shared memory (PW - 1 blocks in
// flight, no registers spent on them) and each lane reads back only the 16 B and the scale word it
// copied itself, as in the lean cp kernel; block b's copies go into the commit group of iteration
// b - PW + 1, which the wait of iteration b covers when PW >= NS - 1. T64: n64 tiles per warpgroup
// (2 halves the x traffic per row of W; shared ring only).
template <typename T, int X, int WGS, int NS, int P, int MB, int PW, int T64>
__global__ void __launch_bounds__(WGS * 128, MB)
    w4a16_wgmma_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const uint32_t* __restrict__ sc,
                       T* __restrict__ out, float2* __restrict__ ws, int M, int N, int K, int kb_per_split) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900)
  __trap();  // wgmma needs sm_90; the host dispatch launches this kernel on sm_90 only
#else
  static_assert(X == 16 || X == 32 || X == 64 || X == 128 || X == 256, "token tile must be 16, 32, 64, 128 or 256");
  static_assert(NS >= 3, "need >= 3 stages (prefetch distance NS-2)");
  static_assert(P % 2 == 0, "P must be even (A registers double-buffered by block parity)");
  static_assert(PW == 0 || PW >= NS - 1, "the shared weight ring must be >= NS-1 stages deep");
  static_assert(T64 == 1 || (T64 == 2 && PW > 0), "two n64 tiles per warpgroup need the shared weight ring");
  constexpr int NWARP = WGS * 4;
  constexpr int STAGE = X * 128;  // bytes
  extern __shared__ uint8_t wg_smem[];
  const uint32_t sbase = (static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem)) + 1023u) & ~1023u;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wq = warp & 3, wgi = warp >> 2;  // warp rank in its warpgroup, warpgroup index
  const int g = lane >> 2, c = lane & 3;
  const int KB = K / kKBlock, G = K / kGroup, NT64 = N / 64;
  const int m0 = blockIdx.x * X;
  // Warpgroup wgi owns the n64 tiles (blockIdx.y * WGS + wgi) * T64 + t. Tiles past N are clamped to
  // the last one (warpgroup-uniform: computed, never stored), so every barrier stays uniform.
  int n64[T64];
  bool active[T64];
  const uint4* wp[T64];
  const uint32_t* sp[T64];
#pragma unroll
  for (int t = 0; t < T64; ++t) {
    n64[t] = (blockIdx.y * WGS + wgi) * T64 + t;
    active[t] = n64[t] < NT64;
    const int tile16 = (active[t] ? n64[t] : NT64 - 1) * 4 + wq;
    wp[t] = qw + (size_t)tile16 * KB * 32 + lane;
    sp[t] = sc + (size_t)tile16 * G * 8 + g;
  }
  const int kb_begin = blockIdx.z * kb_per_split;
  const int kb_end = min(KB, kb_begin + kb_per_split);
  const int nkb = kb_end - kb_begin;  // > 0 (the launcher sizes grid.z so)

  // x stage copy: the first CW warps each copy RPW consecutive token rows of the stage (a multiple of
  // 8), one row per instruction; lane = k pair (see header). The swizzle term (row % 8) of unrolled row
  // i is the constant i % 8. The row pointer advances through an opaque register (asm) so the compiler
  // cannot hoist RPW 64-bit row addresses out of the k loop.
  constexpr int CW = (X / 8 < NWARP) ? X / 8 : NWARP;
  constexpr int RPW = X / CW;
  static_assert(X % CW == 0 && RPW % 8 == 0, "rows per copying warp must be a multiple of 8");
  const bool copier = warp < CW;  // warp-uniform
  const int row0 = warp * RPW;
  const int rows_valid = M - m0 - row0;  // rows i < rows_valid are real tokens
  const uint32_t dst_lane = (uint32_t)(row0 * 128 + 4 * (lane >> 3));  // + word c of the chunk
  const int chunk = 2 * ((lane >> 1) & 3) + (lane & 1);                 // logical chunk 2s + hh
  const unsigned long long xw =
      reinterpret_cast<unsigned long long>(x) + ((size_t)(rows_valid > 0 ? m0 + row0 : 0) * K + 2 * lane) * sizeof(T);
  const unsigned long long row_bytes = (unsigned long long)K * sizeof(T);
  auto load_stage = [&](int kbi, int slot) {
    if (!copier) return;
    const uint32_t st = sbase + (uint32_t)(slot * STAGE) + dst_lane;
    unsigned long long p = xw + (unsigned long long)(kb_begin + kbi) * (kKBlock * sizeof(T));
    if (rows_valid >= RPW) {
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        cp_async4(st + (uint32_t)(i * 128 + ((chunk ^ (i & 7)) << 4)), reinterpret_cast<const void*>(p));
        p += row_bytes;
        asm volatile("" : "+l"(p));
      }
    } else {
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const bool v = i < rows_valid;
        cp_async4_zfill(st + (uint32_t)(i * 128 + ((chunk ^ (i & 7)) << 4)),
                        v ? reinterpret_cast<const void*>(p) : static_cast<const void*>(x), v);
        if (v) p += row_bytes;  // stays inside x
        asm volatile("" : "+l"(p));
      }
    }
  };

  // Shared weight ring (PW > 0) of this warp: stage st, tile t at wring + (st * T64 + t) * 512 (the
  // lane's 16 B at + 16 * lane), its scale words at sring + (st * T64 + t) * 128 (+ 4 * lane).
  const uint32_t wring = sbase + (uint32_t)(NS * STAGE) + (uint32_t)(warp * PW * T64 * 512) + 16u * lane;
  const uint32_t sring = sbase + (uint32_t)(NS * STAGE) + (uint32_t)(NWARP * PW * T64 * 512) +
                         (uint32_t)(warp * PW * T64 * 128) + 4u * lane;
  auto issue_w = [&](int b, int st) {  // block b of this CTA's range into stage st
#pragma unroll
    for (int t = 0; t < T64; ++t) {
      cp_async16(wring + (uint32_t)((st * T64 + t) * 512), wp[t] + (size_t)(kb_begin + b) * 32);
      cp_async4(sring + (uint32_t)((st * T64 + t) * 128), sp[t] + ((kb_begin + b) >> 1) * 8);
    }
  };
  // Register ring (PW == 0, T64 == 1): block r lives in slot r % P.
  uint4 wbuf[PW == 0 ? P : 1];
  uint32_t sbuf[PW == 0 ? P : 1];
  if constexpr (PW > 0) {
#pragma unroll
    for (int j = 0; j < PW - 1; ++j)  // into the first commit group
      if (j < nkb) issue_w(j, j);
  } else {
#pragma unroll
    for (int j = 0; j < P; ++j)
      if (j < nkb) {
        wbuf[j] = ld_stream(wp[0] + (size_t)(kb_begin + j) * 32);
        sbuf[j] = __ldg(sp[0] + ((kb_begin + j) >> 1) * 8);
      }
  }
#pragma unroll
  for (int st = 0; st < NS - 2; ++st) {  // one commit group per stage, empty ones included
    if (st < nkb) load_stage(st, st);
    cp_async_commit();
  }

  float acc[T64][X / 2];
#pragma unroll
  for (int t = 0; t < T64; ++t)
#pragma unroll
    for (int i = 0; i < X / 2; ++i) acc[t][i] = 0.f;
  uint32_t afrag[2][T64][4][4];
  int wslot = 0;  // shared ring stage of block r

  for (int base = 0; base < nkb; base += P) {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int r = base + j;
      if (r < nkb) {  // CTA-uniform
        cp_async_wait<NS - 3>();  // this thread's x copies of stage r and weight copies of block r landed
        fence_proxy_async_smem();
        __syncthreads();
        if (r + NS - 2 < nkb) load_stage(r + NS - 2, (r + NS - 2) % NS);

        uint4 wcur[T64];
        uint32_t scur[T64];
        if constexpr (PW > 0) {
          // refill the stage block r-1 used (read into registers and dequantised last iteration)
          if (r + PW - 1 < nkb) issue_w(r + PW - 1, wslot == 0 ? PW - 1 : wslot - 1);
          cp_async_commit();
#pragma unroll
          for (int t = 0; t < T64; ++t) {
            wcur[t] = ld_shared_v4(wring + (uint32_t)((wslot * T64 + t) * 512));
            scur[t] = ld_shared_u32(sring + (uint32_t)((wslot * T64 + t) * 128));
          }
          wslot = wslot + 1 == PW ? 0 : wslot + 1;
        } else {
          cp_async_commit();
          wcur[0] = wbuf[j];
          scur[0] = sbuf[j];
          if (r + P < nkb) {
            wbuf[j] = ld_stream(wp[0] + (size_t)(kb_begin + r + P) * 32);
            sbuf[j] = __ldg(sp[0] + ((kb_begin + r + P) >> 1) * 8);
          }
        }
        uint32_t(&a)[T64][4][4] = afrag[j & 1];
#pragma unroll
        for (int t = 0; t < T64; ++t) {
          const uint32_t s_lo = __byte_perm(scur[t], scur[t], 0x1010);  // s[g]   in both halves
          const uint32_t s_hi = __byte_perm(scur[t], scur[t], 0x3232);  // s[g+8] in both halves
          dequant_word<T>(wcur[t].x, s_lo, s_hi, a[t][0]);
          dequant_word<T>(wcur[t].y, s_lo, s_hi, a[t][1]);
          dequant_word<T>(wcur[t].z, s_lo, s_hi, a[t][2]);
          dequant_word<T>(wcur[t].w, s_lo, s_hi, a[t][3]);
        }

        const uint32_t st = sbase + (uint32_t)((r % NS) * STAGE);
#pragma unroll
        for (int t = 0; t < T64; ++t)
#pragma unroll
          for (int i = 0; i < X / 2; ++i) wg_fence_operand(acc[t][i]);
        wg_fence();
#pragma unroll
        for (int t = 0; t < T64; ++t)
#pragma unroll
          for (int s = 0; s < 4; ++s) WgmmaRS<T, X>::mma(acc[t], a[t][s], desc_sw128(st + 32u * s));
        wg_commit();
        wg_wait<1>();
#pragma unroll
        for (int t = 0; t < T64; ++t)
#pragma unroll
          for (int i = 0; i < X / 2; ++i) wg_fence_operand(acc[t][i]);
      }
    }
  }
  wg_wait<0>();
#pragma unroll
  for (int t = 0; t < T64; ++t)
#pragma unroll
    for (int i = 0; i < X / 2; ++i) wg_fence_operand(acc[t][i]);
  cp_async_wait<0>();  // (only empty groups can be left; keep the exit clean)

  // Accumulator (CLayout_64xX): acc[4j + v], v bit0 = token +1, bit1 = row +8; token 8j + 2c.
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int t = 0; t < T64; ++t) {
    if (!active[t]) continue;
    const int n = n64[t] * 64 + wq * 16 + g;
#pragma unroll
    for (int jj = 0; jj < X / 8; ++jj) {
      const int tok = m0 + 8 * jj + 2 * c;
      if (split) {
        if (tok < M) {  // workspace rows are padded to an even token count
          float2* w0 = ws + (size_t)(tok >> 1) * N + n;
          atomic_add2(w0, acc[t][4 * jj], acc[t][4 * jj + 1]);
          atomic_add2(w0 + 8, acc[t][4 * jj + 2], acc[t][4 * jj + 3]);
        }
      } else {
        if (tok < M) {
          out[(size_t)tok * N + n] = from_float<T>(acc[t][4 * jj]);
          out[(size_t)tok * N + n + 8] = from_float<T>(acc[t][4 * jj + 2]);
        }
        if (tok + 1 < M) {
          out[(size_t)(tok + 1) * N + n] = from_float<T>(acc[t][4 * jj + 1]);
          out[(size_t)(tok + 1) * N + n + 8] = from_float<T>(acc[t][4 * jj + 3]);
        }
      }
    }
  }
#endif  // __CUDA_ARCH__ >= 900
}

// ---------------------------------------------------------------------------------------------
// Host side.
template <typename T, int X, int WGS, int NS, int P, int MB, int PW, int T64>
struct WgLaunch {
  static constexpr int kThreads = WGS * 128;
  static constexpr int kRows = WGS * T64 * 64;  // rows of W per CTA
  static constexpr int kSmem = wg_smem_bytes(X, NS, WGS, PW, T64);
  static_assert(kSmem <= 227 * 1024, "wg config: more shared memory than an sm_90 CTA may have");
  static decltype(&w4a16_wgmma_kernel<T, X, WGS, NS, P, MB, PW, T64>) kern() {
    return w4a16_wgmma_kernel<T, X, WGS, NS, P, MB, PW, T64>;
  }

  // Raise the dynamic shared-memory limit once; resident CTAs per SM x SMs (cached).
  static cudaError_t prepare(int* slots_out) {
    static int slots = 0;
    static cudaError_t err = cudaSuccess;
    if (slots == 0 && err == cudaSuccess) err = resident_slots(kern(), kThreads, kSmem, &slots);
    *slots_out = slots;
    return err;
  }

  // Same wave-quantisation rule as the sk kernel (NOTES.md v4); each split >= 4 k64 blocks.
  static int auto_splits(int M, int N, int K) {
    int slots = 0;
    if (prepare(&slots) != cudaSuccess) return 1;
    const long long base = (long long)((M + X - 1) / X) * ((N + kRows - 1) / kRows);
    return wave_splits(base, slots, (K / kKBlock) / 4);
  }

  static cudaError_t launch(const void* x, const void* qw, const void* sc, void* out, float* ws, int M, int N, int K,
                            int splits, cudaStream_t stream) {
    int slots = 0;
    cudaError_t e = prepare(&slots);
    if (e != cudaSuccess) return e;
    if (N % 64 != 0 || K % kGroup != 0) return cudaErrorInvalidValue;
    const int KB = K / kKBlock;
    const int kbps = sk_kb_per_split(K, splits);
    const int S = (KB + kbps - 1) / kbps;
    if (S > 1 && ws == nullptr) return cudaErrorInvalidValue;
    const long long pairs = (long long)((M + 1) / 2) * N;
    if (S > 1) {
      e = cudaMemsetAsync(ws, 0, (size_t)pairs * 2 * sizeof(float), stream);
      if (e != cudaSuccess) return e;
    }
    dim3 grid((M + X - 1) / X, (N + kRows - 1) / kRows, S);
    kern()<<<grid, kThreads, kSmem, stream>>>(static_cast<const T*>(x), static_cast<const uint4*>(qw),
                                              static_cast<const uint32_t*>(sc), static_cast<T*>(out),
                                              reinterpret_cast<float2*>(ws), M, N, K, kbps);
    e = cudaGetLastError();
    if (e != cudaSuccess || S == 1) return e;
    return launch_sk_finalize<T>(ws, out, M, N, stream);
  }
};

template <typename T>
int wg_auto_splits_t(int cfg, int M, int N, int K) {
  switch (cfg) {
#define GRACE_WG_CASE(id, xt, wgs, ns, p, mb, pw, t64) \
  case id:                                             \
    return WgLaunch<T, xt, wgs, ns, p, mb, pw, t64>::auto_splits(M, N, K);
    GRACE_W4A16_WG_CONFIGS(GRACE_WG_CASE)
#undef GRACE_WG_CASE
    default:
      return 0;
  }
}

template <typename T>
cudaError_t wg_launch_t(int cfg, const void* x, const void* qw, const void* sc, void* out, float* ws, int M, int N,
                        int K, int splits, cudaStream_t stream) {
  switch (cfg) {
#define GRACE_WG_CASE(id, xt, wgs, ns, p, mb, pw, t64) \
  case id:                                             \
    return WgLaunch<T, xt, wgs, ns, p, mb, pw, t64>::launch(x, qw, sc, out, ws, M, N, K, splits, stream);
    GRACE_W4A16_WG_CONFIGS(GRACE_WG_CASE)
#undef GRACE_WG_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace grace_w4a16
