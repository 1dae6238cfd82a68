"""Symmetric int8 rounding with one fp32 scale per vector, and its dequantisation: shared by the
INT8 KV cache (kv8.py, one scale per cached head vector) and the int8 token embeddings (load.py,
one scale per row)."""
from __future__ import annotations

import torch


def round_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) float -> (codes (..., D) int8 in [-127, 127], scale (..., 1) fp32 = absmax / 127);
    an all-zero vector keeps a tiny scale (1e-12 / 127) so that its codes are 0."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in `dtype`: the fp32 product rounded once, by one multiply with an `out` of the
    target dtype, so on the GPU the int8 -> fp32 promotion and the rounding happen inside the kernel
    and no fp32 copy exists (at batch 16 a prefill dequantises LLaVA-7B's whole KV cache for every
    layer: 235 MB per fp32 copy of keys or values, on top of the 117 MB bf16 result)."""
    return torch.mul(codes, scale, out=torch.empty(codes.shape, dtype=dtype, device=codes.device))
