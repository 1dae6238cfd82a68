"""Packing trained integer weights: our packed safetensors layout and AutoAWQ's GEMM layout.

Input everywhere is what `grace_ds.quant.export_int_weights` produces per layer: `codes` int8 (N, K)
on the symmetric grid [-2^(b-1), 2^(b-1)-1] and `scales` fp32 (N, K / g), so W_hat = codes * s
(grace-method.md section 4). Nothing here quantises: packing is a lossless re-arrangement of codes,
and every function has an exact inverse that the tests check bit for bit.

Layouts
- grace, 4-bit: `qweight` uint8 (N, K/2); byte j of row n holds column 2j in its low nibble and
  column 2j+1 in its high nibble, each as the offset code q + 8 in [0, 15]. `scales` fp32 (N, K/g).
- grace, 8-bit: `qweight` int8 (N, K) (the codes themselves), `scales` fp32 (N, K/g).
- awq (AutoAWQ WQLinear_GEMM, 4-bit only): `qweight` int32 (K, N/8): eight output columns per word,
  nibble i (bits 4i..4i+3) holds column 8c + AWQ_ORDER[i] with AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7];
  `qzeros` int32 (K/g, N/8) packed the same way, every zero = 8; `scales` fp16 (K/g, N).
  The symmetric grid maps onto AWQ's asymmetric one exactly: q_awq = q + 8, z = 8, so
  (q_awq - z) * s == q * s (grace-method.md section 5). Only the scales change: AWQ stores fp16.
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a packed int32 holds column AWQ_ORDER[i]
AWQ_ZERO_4BIT = 8  # zero point that turns the symmetric grid [-8, 7] into AWQ's [0, 15]
KERNEL_GROUP_SIZE = 128  # the CUDA W4A16 kernel's only group size (issue 5)


class PackError(ValueError):
    """A layer cannot be packed in the requested layout; the message names the layer and the fix."""


def _qrange(bits: int) -> tuple[int, int]:
    if bits not in (4, 8):
        raise PackError(f"bits={bits}: only 4- and 8-bit symmetric codes are supported")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, name: str = "layer") -> None:
    """Validate one layer's codes/scales pair (shapes, dtypes, code range, finite positive scales)."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise PackError(f"{name}: codes must be an int8 (out, in) matrix, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    if group_size <= 0 or k % group_size:
        raise PackError(f"{name}: group_size {group_size} does not divide in_features {k} (shape {n}x{k})")
    if tuple(scales.shape) != (n, k // group_size):
        raise PackError(
            f"{name}: scales shape {tuple(scales.shape)} != (out, in/group_size) = {(n, k // group_size)} "
            f"for codes {n}x{k}, group_size {group_size}"
        )
    lo, hi = _qrange(bits)
    cmin, cmax = int(codes.min()), int(codes.max())
    if cmin < lo or cmax > hi:
        raise PackError(f"{name}: codes span [{cmin}, {cmax}], outside the {bits}-bit grid [{lo}, {hi}]")
    s = scales.float()
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise PackError(f"{name}: scales must be finite and > 0 (min {float(s.min()):.3g}, max {float(s.max()):.3g})")


# ----------------------------------------------------------------------------- grace layout

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) in [-8, 7] -> uint8 (N, K/2), two offset codes (q + 8) per byte, low nibble first."""
    if codes.shape[-1] % 2:
        raise PackError(f"in_features {codes.shape[-1]} is odd: 4-bit packing puts two columns in a byte")
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 (N, K/2) -> int8 codes (N, K)."""
    if packed.dtype != torch.uint8:
        raise PackError(f"packed 4-bit weights must be uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_grace(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, name: str = "layer") -> dict:
    """One layer in our packed safetensors layout: {"qweight", "scales"} (see module docstring)."""
    check_codes(codes, scales, bits, group_size, name)
    qweight = pack_int4(codes) if bits == 4 else codes.contiguous()
    return {"qweight": qweight, "scales": scales.to(torch.float32).contiguous()}


def unpack_grace(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_grace`: -> (codes int8 (N, K), scales fp32 (N, G))."""
    if bits == 4:
        return unpack_int4(qweight), scales.to(torch.float32)
    if qweight.dtype != torch.int8:
        raise PackError(f"packed 8-bit weights must be int8, got {qweight.dtype}")
    return qweight, scales.to(torch.float32)


# ----------------------------------------------------------------------------- AWQ GEMM layout

def _awq_pack_cols(v: torch.Tensor) -> torch.Tensor:
    """(R, C) values in [0, 15] -> int32 (R, C/8), AutoAWQ's interleaved nibble order."""
    r, c = v.shape
    v = v.to(torch.int64).reshape(r, c // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=v.device)
    word = (v << shifts).sum(dim=-1)  # nibbles do not overlap: sum == bitwise or, < 2^32
    # reinterpret the unsigned 32-bit word as int32 (AutoAWQ's `|=` on int32 wraps the same way)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _awq_unpack_cols(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `_awq_pack_cols`: int32 (R, C/8) -> int16 (R, C) in [0, 15]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    nib = ((w[..., None] >> shifts) & 0xF).to(torch.int16)  # nibble i -> column AWQ_ORDER[i]
    out = torch.empty_like(nib)
    out[..., list(AWQ_ORDER)] = nib
    return out.reshape(w.shape[0], w.shape[1] * 8)


def to_awq(codes: torch.Tensor, scales: torch.Tensor, group_size: int = 128, name: str = "layer"):
    """4-bit codes (N, K) + scales (N, K/g) -> AutoAWQ GEMM (qweight int32 (K, N/8), qzeros int32 (K/g, N/8),
    scales fp16 (K/g, N)). Codes are exact; scales are rounded to fp16 (AWQ's storage type)."""
    check_codes(codes, scales, 4, group_size, name)
    n, k = codes.shape
    if n % 8:
        raise PackError(f"{name}: out_features {n} (shape {n}x{k}) is not a multiple of 8, which AWQ GEMM packing needs")
    s16 = scales.to(torch.float16)
    if not torch.isfinite(s16).all() or (s16 == 0).any():
        bad = scales[~torch.isfinite(s16) | (s16 == 0)]
        raise PackError(
            f"{name}: {bad.numel()} scales leave the fp16 range (e.g. {float(bad[0]):.3g}); AWQ stores fp16 scales, "
            f"use --format grace (fp32 scales) for this checkpoint"
        )
    qweight = _awq_pack_cols((codes.to(torch.int16) + AWQ_ZERO_4BIT).t().contiguous())
    zeros = torch.full((k // group_size, n), AWQ_ZERO_4BIT, dtype=torch.int16, device=codes.device)
    qzeros = _awq_pack_cols(zeros)
    return qweight.contiguous(), qzeros.contiguous(), s16.t().contiguous()


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int = 128):
    """AutoAWQ GEMM tensors -> (codes int8 (N, K), scales fp16 (N, K/g)); the zero point is subtracted per
    group, so any AWQ checkpoint whose q_awq - z stays within [-8, 7] comes back as symmetric codes."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise PackError(f"AWQ qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    q = _awq_unpack_cols(qweight)  # (K, N)
    z = _awq_unpack_cols(qzeros)  # (K/g, N)
    k, n = q.shape
    if tuple(z.shape) != (k // group_size, n) or tuple(scales.shape) != (k // group_size, n):
        raise PackError(
            f"AWQ shapes disagree: qweight -> {k}x{n}, qzeros -> {tuple(z.shape)}, scales {tuple(scales.shape)}, "
            f"group_size {group_size}"
        )
    codes = q - z.repeat_interleave(group_size, dim=0)
    if int(codes.min()) < -8 or int(codes.max()) > 7:
        raise PackError(f"AWQ codes minus zero points span [{int(codes.min())}, {int(codes.max())}], outside [-8, 7]")
    return codes.to(torch.int8).t().contiguous(), scales.t().contiguous()


# ----------------------------------------------------------------------------- kernel constraints

def kernel_rejection(bits: int, group_size: int, shape: tuple[int, int]) -> str | None:
    """Why the CUDA W4A16 kernel cannot take this layer, or None if it can. 8-bit layers never use it."""
    n, k = shape
    if bits != 4:
        return f"{bits}-bit weights run on the dequantise path (the kernel is W4A16)"
    if group_size != KERNEL_GROUP_SIZE:
        return f"group_size {group_size} != {KERNEL_GROUP_SIZE}, the kernel's only group size"
    if k % KERNEL_GROUP_SIZE:
        return f"in_features {k} is not a multiple of {KERNEL_GROUP_SIZE}"
    n_tile = 16  # kernels/w4a16/pack.py N_TILE: rows per tensor-core tile
    try:
        from kernels.w4a16.pack import N_TILE as n_tile  # type: ignore  # noqa: N811
    except Exception:  # noqa: BLE001 - kernel package absent: its documented constant
        pass
    if n % n_tile:
        return f"out_features {n} is not a multiple of the kernel tile {n_tile}"
    return None
