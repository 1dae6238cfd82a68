"""Packing int4 codes + per-group scales into the W4A16 kernel layout (pure PyTorch, CPU ok).

Layout (also documented next to the kernel code in csrc/w4a16_kernel.cuh):

* ``qweight``: int32 ``(N/16, K/64, 128)`` = ``[tile][k64 block][lane 0..31][word s 0..3]``.
  A warp streams one (16-row tile, 64-wide K block) with one coalesced 16-byte load per lane; word
  ``s`` of lane ``L`` is the A fragment of mma.m16n8k16 step ``s`` for that lane. With
  ``g = L // 4, c = L % 4``, nibble ``i`` (bits ``4i..4i+3``) of word ``s`` holds ``code + 8`` of::

      reg  = i % 4, half = i // 4
      row  = 16*tile + g + 8*(reg % 2)
      k    = 64*kb + 16*c + 4*s + 2*(reg // 2) + half

  (the K order inside a 64-block is permuted so that each lane's activations for a whole block are
  16 consecutive elements).
* ``scales``: ``(N/16, K/128, 16)`` in the activation dtype (bf16 by default, fp16 for fp16
  activations): ``[tile][group][g][h] = scale[16*tile + g + 8*h, group]``.

N must be a multiple of 16 and K a multiple of 128 (group size 128 only).
"""
from __future__ import annotations

import torch

from .reference import GROUP_SIZE, check_codes_scales

N_TILE = 16
K_BLOCK = 64


def _index_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, k) offsets inside a (16, 64) tile for [lane][word s][nibble i]."""
    lane = torch.arange(32).view(32, 1, 1)
    s = torch.arange(4).view(1, 4, 1)
    i = torch.arange(8).view(1, 1, 8)
    g, c = lane // 4, lane % 4
    reg, half = i % 4, i // 4
    row = g + 8 * (reg % 2) + 0 * s
    k = 16 * c + 4 * s + 2 * (reg // 2) + half
    return row.expand(32, 4, 8).contiguous(), k.expand(32, 4, 8).contiguous()


def _check_packable(N: int, K: int) -> None:
    if N % N_TILE != 0:
        raise ValueError(f"w4a16: N={N} is not a multiple of the kernel tile {N_TILE}")
    if K % GROUP_SIZE != 0:
        raise ValueError(f"w4a16: K={K} is not a multiple of the group size {GROUP_SIZE}")


def pack_weights(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Pack int8 codes (N, K) in [-8, 7] and scales (N, K/group) into the kernel layout.

    ``dtype``: dtype of the packed scales = the activation dtype the kernel will see
    (default: the scales' dtype if bf16/fp16, else bf16). ``w4a16_gemm`` converts on the fly if
    the activations come in the other 16-bit dtype (an extra small kernel: pack for the dtype you
    serve in). Returns ``{"qweight": int32 (N/16, K/64, 128), "scales": (N/16, K/128, 16)}`` on the
    codes' device.
    """
    N, K = check_codes_scales(codes, scales, group_size)
    _check_packable(N, K)
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError(f"w4a16: codes must be in [-8, 7], got range [{int(codes.min())}, {int(codes.max())}]")
    if dtype is None:
        dtype = scales.dtype if scales.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"w4a16: packed scales dtype must be bfloat16 or float16, got {dtype}")
    T, KB, G = N // N_TILE, K // K_BLOCK, K // GROUP_SIZE
    u = (codes.to(torch.int64) + 8).view(T, N_TILE, KB, K_BLOCK)
    row, k = _index_tables()
    row, k = row.to(codes.device), k.to(codes.device)
    # advanced indexing on dims 1 and 3 -> (32, 4, 8, T, KB)
    nib = u[:, row, :, k].permute(3, 4, 0, 1, 2)  # (T, KB, 32, 4, 8)
    shifts = (4 * torch.arange(8, device=codes.device, dtype=torch.int64))
    words = (nib << shifts).sum(dim=-1)  # (T, KB, 32, 4), values < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    qweight = words.reshape(T, KB, 128).contiguous()
    sp = scales.to(dtype).view(T, 2, 8, G).permute(0, 3, 2, 1).reshape(T, G, 16).contiguous()
    return {"qweight": qweight, "scales": sp}


def packed_shape(packed: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(N, K) of a packed weight."""
    qw = packed["qweight"]
    return qw.shape[0] * N_TILE, qw.shape[1] * K_BLOCK


def unpack_weights(packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_weights: (codes int8 (N, K), scales (N, K/128) in the packed dtype)."""
    qw, sp = packed["qweight"], packed["scales"]
    N, K = packed_shape(packed)
    T, KB, G = N // N_TILE, K // K_BLOCK, K // GROUP_SIZE
    words = qw.to(torch.int64).view(T, KB, 32, 4) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=qw.device, dtype=torch.int64)
    nib = (words.unsqueeze(-1) >> shifts) & 0xF  # (T, KB, 32, 4, 8)
    row, k = _index_tables()
    row, k = row.to(qw.device), k.to(qw.device)
    u = torch.empty(T, N_TILE, KB, K_BLOCK, dtype=torch.int64, device=qw.device)
    u[:, row, :, k] = nib.permute(2, 3, 4, 0, 1)
    codes = (u.view(N, K) - 8).to(torch.int8)
    scales = sp.view(T, G, 8, 2).permute(0, 3, 2, 1).reshape(N, G)
    return codes, scales
