"""Build and registration of the CUDA W4A16 operator ``torch.ops.grace.w4a16_gemm``.

* The schema, a fake (meta) kernel and a CPU kernel (the reference) are registered here at import,
  so torch.compile / CUDA-graph capture can trace the op before the extension exists.
* The CUDA kernel is implemented in csrc/w4a16_binding.cpp (TORCH_LIBRARY_IMPL(grace, CUDA)) and
  is registered when that extension is loaded: built on first CUDA use with
  torch.utils.cpp_extension.load into a cached directory (``$GRACE_DS_KERNEL_CACHE`` or
  ``~/.cache/grace_ds/kernels``), or ahead of time by ``python -m kernels.w4a16.build``.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .pack import K_BLOCK, N_TILE, packed_shape, unpack_weights
from .reference import GROUP_SIZE, reference_w4a16

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["w4a16_binding.cpp", "w4a16_bf16.cu", "w4a16_fp16.cu", "w4a16_sk_bf16.cu", "w4a16_sk_fp16.cu",
           "w4a16_wgmma_bf16.cu", "w4a16_wgmma_fp16.cu", "w4a16_lean_bf16.cu", "w4a16_lean_fp16.cu"]
EXT_NAME = "grace_w4a16_ext"

_lib = torch.library.Library("grace", "DEF")
_lib.define("w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, int group_size) -> Tensor")


@torch.library.register_fake("grace::w4a16_gemm")
def _w4a16_gemm_fake(x, qweight, scales, group_size):
    torch._check(x.dim() == 2, lambda: f"w4a16_gemm: x must be 2-D, got {x.dim()} dims")
    return x.new_empty((x.shape[0], qweight.shape[0] * N_TILE))


def _w4a16_gemm_cpu(x, qweight, scales, group_size):
    codes, sc = unpack_weights({"qweight": qweight, "scales": scales})
    return reference_w4a16(x, codes, sc, group_size)


_lib.impl("w4a16_gemm", _w4a16_gemm_cpu, "CPU")

# The gated MLP's first half in one call: out (M, I) = silu(x @ gate^T) * (x @ up^T) for a fused [gate; up]
# weight of N = 2I rows (kernels/NOTES.md v15). On CUDA one lean kernel with the activation in its epilogue
# where the op's choice has one (decode, <= 16 tokens), else the op's GEMM and the activation.
_lib.define("w4a16_gemm_glu(Tensor x, Tensor qweight, Tensor scales, int group_size) -> Tensor")


@torch.library.register_fake("grace::w4a16_gemm_glu")
def _w4a16_gemm_glu_fake(x, qweight, scales, group_size):
    torch._check(x.dim() == 2, lambda: f"w4a16_gemm_glu: x must be 2-D, got {x.dim()} dims")
    return x.new_empty((x.shape[0], qweight.shape[0] * N_TILE // 2))


def _w4a16_gemm_glu_cpu(x, qweight, scales, group_size):
    y = _w4a16_gemm_cpu(x, qweight, scales, group_size)
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


_lib.impl("w4a16_gemm_glu", _w4a16_gemm_glu_cpu, "CPU")

# The GEMM of an RMSNorm's output from the raw x (kernels/NOTES.md v21): out = (gamma * x / rms(x)) @ W^T per row
# (glu: then silu(gate) * up). On CUDA one lean kernel with the norm folded in where the op's choice has it, else
# the norm (as transformers' Llama / Qwen2 RMSNorm computes it) and then the op.
_lib.define("w4a16_gemm_norm(Tensor x, Tensor qweight, Tensor scales, Tensor gamma, float eps, int group_size, "
            "bool glu) -> Tensor")


@torch.library.register_fake("grace::w4a16_gemm_norm")
def _w4a16_gemm_norm_fake(x, qweight, scales, gamma, eps, group_size, glu):
    torch._check(x.dim() == 2, lambda: f"w4a16_gemm_norm: x must be 2-D, got {x.dim()} dims")
    return x.new_empty((x.shape[0], qweight.shape[0] * N_TILE // (2 if glu else 1)))


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen2RMSNorm: gamma * (x / sqrt(mean(x^2) + eps)) computed in fp32, the
    normalised x rounded to x's dtype before the weight multiplies it."""
    xf = x.float()
    return gamma * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _w4a16_gemm_norm_cpu(x, qweight, scales, gamma, eps, group_size, glu):
    xn = rms_norm(x, gamma, eps)
    return (_w4a16_gemm_glu_cpu if glu else _w4a16_gemm_cpu)(xn, qweight, scales, group_size)


_lib.impl("w4a16_gemm_norm", _w4a16_gemm_norm_cpu, "CPU")

_ext = None
_lock = threading.Lock()
TUNED = None   # (file, entries) of the tuned-choice table load_extension loaded, if any


def build_dir() -> Path:
    d = Path(os.environ.get("GRACE_DS_KERNEL_CACHE", Path.home() / ".cache" / "grace_ds" / "kernels"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_extension(verbose: bool = False):
    """Build (cached) and load the CUDA extension; registers the CUDA kernel of the op."""
    global _ext, TUNED
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        from torch.utils.cpp_extension import load

        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Hopper first: sm_90a (the kernel uses nothing sm_90a-only yet, but this is the target).
            major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}" + ("a" if major == 9 else "")
        os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))
        _ext = load(
            name=EXT_NAME,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
            build_directory=str(build_dir()),
            verbose=verbose,
        )
        if os.environ.get("GRACE_W4A16_PDL", "0") not in ("", "0"):
            set_pdl(True)
        tuned = os.environ.get("GRACE_W4A16_TUNED", "1")
        if tuned not in ("", "0") and torch.cuda.is_available():
            path = Path(tuned) if tuned != "1" else tuned_path()
            if tuned != "1" or path.exists():
                TUNED = (str(path), load_tuned(path, _ext))
    return _ext


TUNED_DIR = Path(__file__).resolve().parent / "tuned"


def tuned_path(device_name: str | None = None) -> Path:
    """The tuned-choice file of a card: tuned/<device name, lower case, non-alphanumerics as _>.json."""
    name = device_name if device_name is not None else torch.cuda.get_device_name()
    return TUNED_DIR / ("".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") + ".json")


def load_tuned(path, ext=None, device_name: str | None = None) -> int:
    """Load measured config choices for exact (M, N, K) into the op (ahead of its rules); returns how
    many. The file ({"card", "command", "date", "choices": [{"M", "N", "K", "cfg", "splits", ...}]})
    is written by ``python -m kernels.w4a16.sweep_decode --write-tuned``; an entry's optional "pdl": 0
    (written by ``python -m kernels.w4a16.pdl_ab --mark``) keeps that shape's launches off programmatic
    dependent launch where it measured slower with it. A file measured on another
    card is refused: its choices would be guesses there. Loaded automatically by load_extension from
    tuned/<card>.json; GRACE_W4A16_TUNED=0 turns that off, GRACE_W4A16_TUNED=FILE loads FILE instead."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        choices = data["choices"]
        card = data["card"]
    except FileNotFoundError:
        raise FileNotFoundError(f"GRACE_W4A16_TUNED / load_tuned: {path} does not exist; write one with "
                                "`python -m kernels.w4a16.sweep_decode --write-tuned FILE`, or set GRACE_W4A16_TUNED=0")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"load_tuned: {path} is not a tuned-choice file ({type(exc).__name__}: {exc}); "
                         "rewrite it with `python -m kernels.w4a16.sweep_decode --write-tuned FILE`") from exc
    here = device_name if device_name is not None else torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if here is not None and card != here:
        raise ValueError(f"load_tuned: {path} was measured on {card!r}, this is {here!r}; measure this card with "
                         "`python -m kernels.w4a16.sweep_decode --write-tuned FILE` or set GRACE_W4A16_TUNED=0")
    ext = ext if ext is not None else load_extension()
    for c in choices:
        if not ext.set_choice(int(c["M"]), int(c["N"]), int(c["K"]), int(c["cfg"]), int(c.get("splits", 0)),
                              int(c.get("pdl", 1))):
            ext.clear_choices()   # none of a refused file: not its entries before the bad one either
            raise ValueError(f"load_tuned: {path}: entry {c} is not a valid choice for this build (config ids of "
                             "csrc/w4a16_api.h, N a multiple of 16, K of 128, splits >= 0, pdl 0 or 1); re-measure "
                             "with `python -m kernels.w4a16.sweep_decode --write-tuned FILE` or set GRACE_W4A16_TUNED=0")
    return len(choices)


def set_pdl(on: bool = True) -> None:
    """Programmatic dependent launch for the decode kernels (csrc/w4a16_pdl.cuh; Hopper), off by
    default, process-wide; `GRACE_W4A16_PDL=1` turns it on when the extension loads.

    With it on, a GEMM may start streaming its weights while the kernel before it is still finishing:
    enable it after the weights are loaded, and never launch a kernel that writes packed weights
    directly before a GEMM that reads them. The device is synchronised here, so everything queued
    before the call (weight packing included) has finished.
    """
    ext = load_extension()
    if on and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
        raise ValueError(f"set_pdl: programmatic dependent launch needs a Hopper GPU (sm_90+), this is "
                         f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}); "
                         "leave it off")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ext.set_pdl(1 if on else 0)


def set_lean(on: bool = True) -> None:
    """Whether the op may pick the lean register kernel (csrc/w4a16_lean.cuh, kernels/NOTES.md v9) at
    M <= 16: on by default, process-wide; `GRACE_W4A16_LEAN=0` turns it off when the extension loads.
    Off, the op uses the classic kernels' rules and skips tuned-table entries that name a lean config
    (for A/B runs). A CUDA graph keeps the kernels it was captured with."""
    load_extension().set_lean_dispatch(1 if on else 0)


def w4a16_gemm(x: torch.Tensor, packed: dict[str, torch.Tensor], group_size: int = GROUP_SIZE) -> torch.Tensor:
    """out (..., N) = x (..., K) @ W.T for a weight packed by ``pack_weights``.

    CUDA: ``torch.ops.grace.w4a16_gemm`` (mma.sync kernels up to M = 47, on Hopper the wgmma kernel for
    48..384 when N % 64 == 0 (mma.sync up to 128 elsewhere), dequantise + cuBLAS above). Elsewhere: the pure-PyTorch reference. x: bf16 or fp16 on CUDA; the packed scales are
    converted to x's dtype if they differ (pack for the serving dtype to avoid that).
    """
    return _call(torch.ops.grace.w4a16_gemm, "w4a16_gemm", x, packed, group_size, 1)


def w4a16_gemm_glu(x: torch.Tensor, packed: dict[str, torch.Tensor], group_size: int = GROUP_SIZE) -> torch.Tensor:
    """out (..., I) = silu(x @ gate.T) * (x @ up.T) for a fused [gate; up] weight of N = 2I rows packed by
    ``pack_weights`` (gate rows first; I a multiple of 16): a gated MLP's activation input to its down
    projection. ``torch.ops.grace.w4a16_gemm_glu``: on CUDA one kernel where the op's choice for (M, N, K) is a
    lean config with the activation epilogue (``ext.glu_kernel(M, N, K)`` says which), else the op's GEMM
    then the activation; elsewhere the reference."""
    return _call(torch.ops.grace.w4a16_gemm_glu, "w4a16_gemm_glu", x, packed, group_size, 2)


def w4a16_gemm_norm(x: torch.Tensor, packed: dict[str, torch.Tensor], gamma: torch.Tensor, eps: float,
                    glu: bool = False, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """out (..., N) = rms_norm(x, gamma, eps) @ W.T (glu: out (..., N/2) = silu(gate) * up of that, for a fused
    [gate; up] weight): an RMSNorm and the projection after it in one call. ``torch.ops.grace.w4a16_gemm_norm``:
    on CUDA one lean kernel with the norm folded in (kernels/NOTES.md v21) where the op's choice for (M, N, K) has
    it (``ext.norm_kernel`` says which), else the norm and then the op; elsewhere the norm and the reference.
    gamma: (K,) in x's dtype."""
    if gamma.dim() != 1 or gamma.shape[0] != x.shape[-1]:
        raise ValueError(f"w4a16_gemm_norm: gamma must have shape ({x.shape[-1]},), got {tuple(gamma.shape)}")
    if not eps >= 0:
        raise ValueError(f"w4a16_gemm_norm: eps must be >= 0, got {eps}")
    return _call(torch.ops.grace.w4a16_gemm_norm, "w4a16_gemm_norm", x, packed, group_size, 2 if glu else 1,
                 norm=(gamma.to(x.dtype), float(eps), bool(glu)))


def _call(op, name: str, x: torch.Tensor, packed: dict[str, torch.Tensor], group_size: int, div: int,
          norm: tuple | None = None) -> torch.Tensor:
    """Checks shared by the wrappers, then op(x2d, qweight, scales, group_size) reshaped to x's leading dims x
    N / div (div = 2: a fused [gate; up] weight, N = 2I with I a multiple of 16); norm = (gamma, eps, glu):
    op(x2d, qweight, scales, gamma, eps, group_size, glu)."""
    if group_size != GROUP_SIZE:
        raise ValueError(f"{name}: group_size must be {GROUP_SIZE}, got {group_size}")
    qweight, scales = packed["qweight"], packed["scales"]
    if qweight.dtype != torch.int32 or qweight.dim() != 3 or qweight.shape[2] != 128:
        raise ValueError(f"{name}: qweight must be int32 (N/16, K/64, 128) from pack_weights, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = packed_shape(packed)
    if N % (div * N_TILE) != 0:
        raise ValueError(f"{name}: the fused [gate; up] weight has N={N} rows; it must be 2 x I with I a "
                         f"multiple of {N_TILE}")
    if tuple(scales.shape) != (N // N_TILE, K // GROUP_SIZE, 16):
        raise ValueError(f"{name}: scales must have shape {(N // N_TILE, K // GROUP_SIZE, 16)}, "
                         f"got {tuple(scales.shape)}")
    if x.device != qweight.device or x.device != scales.device:
        raise ValueError(f"{name}: x is on {x.device} but the packed weight is on {qweight.device}")
    if x.shape[-1] != K:
        raise ValueError(f"{name}: x has K={x.shape[-1]} but the packed weight has K={K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x.is_cuda:
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"{name}: x must be bfloat16 or float16 on CUDA, got {x.dtype}")
        if scales.dtype != x.dtype:
            scales = scales.to(x.dtype)
        if not torch.compiler.is_compiling():
            load_extension()
    if norm is None:
        out = op(x2, qweight, scales, group_size)
    else:
        gamma, eps, glu = norm
        out = op(x2, qweight, scales, gamma, eps, group_size, glu)
    return out.reshape(*lead, N // div)
