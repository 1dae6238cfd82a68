"""W4A16 (int4 weights, bf16/fp16 activations, group size 128) GEMM for GRACE-DS.

Public API:
    reference_w4a16(x, codes, scales, group_size=128)  # pure PyTorch oracle (CPU ok)
    pack_weights(codes, scales, group_size=128, dtype=None) -> {"qweight", "scales"}
    unpack_weights(packed) -> (codes, scales)
    w4a16_gemm(x, packed, group_size=128) -> (..., N)   # torch.ops.grace.w4a16_gemm on CUDA
    w4a16_gemm_glu(x, packed, group_size=128) -> (..., N/2)  # silu(gate) * up of a fused [gate; up] weight
    w4a16_gemm_norm(x, packed, gamma, eps, glu=False)   # rms_norm(x) then the GEMM (or GLU), one kernel at decode
    set_pdl(on=True)                                    # programmatic dependent launch (opt-in)
    set_lean(on=True)                                   # lean decode kernel in the op's choice (default on)
"""
from .op import load_extension, set_lean, set_pdl, w4a16_gemm, w4a16_gemm_glu, w4a16_gemm_norm
from .pack import pack_weights, packed_shape, unpack_weights
from .reference import dequantize, reference_w4a16

__all__ = ["reference_w4a16", "dequantize", "pack_weights", "unpack_weights", "packed_shape", "w4a16_gemm", "w4a16_gemm_glu",
           "w4a16_gemm_norm", "load_extension", "set_lean", "set_pdl"]
