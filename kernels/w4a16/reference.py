"""Pure-PyTorch W4A16 reference: the oracle of the CUDA kernel (runs on CPU)."""
from __future__ import annotations

import torch

GROUP_SIZE = 128


def check_codes_scales(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[int, int]:
    """Validate (codes, scales) and return (N, K). Errors name the offending value."""
    if group_size != GROUP_SIZE:
        raise ValueError(f"w4a16: group_size must be {GROUP_SIZE}, got {group_size}")
    if codes.dim() != 2:
        raise ValueError(f"w4a16: codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    N, K = codes.shape
    if K % group_size != 0:
        raise ValueError(f"w4a16: K={K} is not a multiple of the group size {group_size}")
    if codes.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"w4a16: codes must be an integer tensor, got {codes.dtype}")
    if scales.dim() != 2 or tuple(scales.shape) != (N, K // group_size):
        raise ValueError(f"w4a16: scales must have shape (N, K/{group_size}) = {(N, K // group_size)}, "
                         f"got {tuple(scales.shape)}")
    if not scales.is_floating_point():
        raise TypeError(f"w4a16: scales must be floating point, got {scales.dtype}")
    return N, K


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (N, K) = codes * scales broadcast over groups of `group_size` along K."""
    check_codes_scales(codes, scales, group_size)
    w = codes.to(dtype) * scales.to(dtype).repeat_interleave(group_size, dim=1)
    return w


def reference_w4a16(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                    group_size: int = GROUP_SIZE) -> torch.Tensor:
    """out (..., N) = x (..., K) @ W.T with W = codes (int8 in [-8, 7]) * scales, computed in fp32
    and cast to x.dtype. Runs on any device."""
    N, K = check_codes_scales(codes, scales, group_size)
    if x.shape[-1] != K:
        raise ValueError(f"w4a16: x has K={x.shape[-1]} but the weight has K={K}")
    w = dequantize(codes.to(x.device), scales.to(x.device), group_size, torch.float32)
    out = x.to(torch.float32) @ w.t()
    return out.to(x.dtype)
