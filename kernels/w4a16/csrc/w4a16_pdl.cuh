// Programmatic dependent launch (PDL, sm_90): opt-in, off by default (set_pdl / GRACE_W4A16_PDL=1).
//
// A kernel launched with the programmatic-stream-serialization attribute may be scheduled while
// the kernel before it in the stream is still finishing; it must execute `griddepcontrol.wait`
// (pdl_wait) before it reads anything that kernel wrote. The tensor-core kernels stream their
// first weight blocks BEFORE that wait: the weights are not written by the kernel launched just
// before a GEMM while serving, so the DRAM latency of the first loads overlaps the previous
// kernel's tail. That is the contract of set_pdl(1): enable it after the weights are loaded (a
// kernel that writes packed weights, e.g. the load-time packing, must not be the one launched
// right before a GEMM of those weights). The activations, the output and every workspace are
// touched only after the wait. With the flag off, launches are plain <<<>>> launches and the wait
// is a no-op.
#pragma once
#include <cuda_runtime.h>

namespace grace_w4a16 {

int& pdl_flag();  // defined in w4a16_bf16.cu
// Per thread, > 0: this thread's launches are plain ones whatever pdl_flag says (a tuned-table entry with
// "pdl": 0 - a shape where PDL measured slower - holds it for its launch; the binding's NoPdl).
int& pdl_suppressed();

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next PDL-launched kernel start its own prologue (it still waits for this grid's
// completion before reading what this grid wrote).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// <<<grid, block, smem, stream>>>(args...), or cudaLaunchKernelEx with the PDL attribute when
// pdl_flag() is set, this thread does not suppress it, and the caller allows it (no memset or other
// non-kernel node just before).
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool allow_pdl, Args... args) {
  if (!(allow_pdl && pdl_flag() && pdl_suppressed() == 0)) {
    kern<<<grid, block, smem, stream>>>(static_cast<KArgs>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kern, static_cast<KArgs>(args)...);
}

}  // namespace grace_w4a16
