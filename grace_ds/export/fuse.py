"""Horizontal fusion of sibling projections that read the same input: q/k/v and gate/up.

At decode (one token per row) a 7B layer's 4096-wide projections are small GEMMs, and the W4A16
kernel streams a small weight at a lower rate than a large one (H200, M=1: 4096x4096 at 1.36 TB/s,
11008x4096 at 1.73, 28672x8192 at 2.47; docs/benchmarks.md). One (q+k+v) GEMM and one (gate+up)
GEMM per layer read the same bytes in fewer, larger launches.

`fuse_projections_(model)` works on any module whose children include a whole group (the
attention's `q_proj, k_proj, v_proj`, the MLP's `gate_proj, up_proj`) of the same kind:
- `nn.Linear`: the weights (and biases) are concatenated along the output dimension;
- `W4A16Linear` (packed for the kernel): the packed buffers are concatenated along dim 0. The
  layout's outermost dimension is the 16-row tile, so this is exactly the packing of the
  concatenated codes (`kernels/w4a16/pack.py`);
- `DequantLinear` / `W4A16Linear` without the kernel package: codes and scales are concatenated.
The group's fused module is registered once on the parent (`fused_qkv`, `fused_gate_up`), and each
member is replaced by a `FusedPart` that returns its slice. The model's own forward code is not
touched: the first member called with an input runs the fused GEMM and keeps the other slices
until their members ask for them (the same input object), then drops them. A member called with
another input recomputes, so the result is always the member's own projection of its input
(inputs are told apart by identity: a caller that changes its input in place between two members
would get stale slices; transformers' attention and MLP code do not).

The fused model computes the same products as the separate layers; the rounding of a GEMM can
differ with its shape, so outputs agree to floating-point tolerance (tests/test_export.py).

Gated MLPs, opt-in (`glu=True`; `GATED_MLPS`: transformers' Llama / Qwen2 / Qwen3 / Mistral MLPs, whose
forward is `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, with a SiLU `act_fn`): once gate/up are fused,
the MLP's class is swapped for a subclass whose forward is `down_proj(fused_gate_up.glu(x))`. For a packed INT4
layer `glu` is `W4A16Linear.forward_glu`: at decode one kernel computes silu(gate) * up in its epilogue
(kernels/NOTES.md v15) instead of a GEMM writing both halves and a second kernel reading them back.
Otherwise it is the fused GEMM, then the same activation, as the original forward. On an H200 the
kernel saves 0.4-4.1 us per call, but a compiled decode step measured 2.5% faster for Qwen2-VL-7B and
3% slower for LLaVA-1.5-7B at batch 1 (kernels/NOTES.md v15), so it stays off unless asked for.

RMSNorms folded in, opt-in (`fold_norms_`, after fusing; `launch/bench.py --fuse-norm`): in the decoder layers of
NORM_LAYERS, the input and post-attention RMSNorms move into the fused packed q/k/v and gate/up layers after them
(W4A16Linear.set_norm) and identities take their places. The residual stream reaches those GEMMs raw; at decode the
lean kernel sums its squares, scales by the norm weight and by rsqrt(mean + eps) itself (kernels/NOTES.md v21), so
the step loses the norm kernel between the residual add and each GEMM. Built 2026-11-30 without a GPU, not yet
measured: off unless asked for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grace_ds.export.load import DequantLinear, W4A16Linear

GROUPS = {"fused_qkv": ("q_proj", "k_proj", "v_proj"), "fused_gate_up": ("gate_proj", "up_proj")}


class FusedGroup(nn.Module):
    """The fused projection of a group plus the slices not yet handed out."""

    def __init__(self, fused: nn.Module, sizes: list[int]):
        super().__init__()
        self.fused, self.sizes = fused, list(sizes)
        self._x = None        # the input the pending slices belong to
        self._parts = None    # slice i, or None once handed out
        self._left = 0

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self._x is not x or self._parts is None or self._parts[i] is None:
            self._parts = list(self.fused(x).split(self.sizes, dim=-1))
            self._x, self._left = x, len(self.sizes)
        p = self._parts[i]
        self._parts[i] = None
        self._left -= 1
        if self._left == 0:   # every member served: hold nothing between calls
            self._x, self._parts = None, None
        return p

    def pending(self) -> bool:
        return self._x is not None

    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(first slice) * second slice of a two-member group (gate, up) of equal widths."""
        if isinstance(self.fused, W4A16Linear):
            return self.fused.forward_glu(x)
        gate, up = self.fused(x).split(self.sizes, dim=-1)
        return F.silu(gate) * up


# transformers MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (checked against
# transformers 5.17; a class not named here keeps its own forward over the fused parts)
GATED_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "Qwen3VLTextMLP")
_GLU_CLASSES: dict[type, type] = {}


def _glu_forward(self, x):
    return self.down_proj(self.fused_gate_up.glu(x))


def _is_silu(act) -> bool:
    if not isinstance(act, nn.Module):
        return False
    probe = torch.linspace(-8.0, 8.0, 33)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(probe), F.silu(probe), rtol=1e-6, atol=1e-6))
    except Exception:
        return False


def _use_glu_forward(parent: nn.Module) -> bool:
    """Swap a gated-SiLU MLP whose gate/up were just fused to the one-call forward; True if swapped."""
    cls = type(parent)
    group = getattr(parent, "fused_gate_up", None)
    if cls.__name__ not in GATED_MLPS or not isinstance(group, FusedGroup) or len(group.sizes) != 2 \
            or group.sizes[0] != group.sizes[1] or not isinstance(getattr(parent, "down_proj", None), nn.Module) \
            or not _is_silu(getattr(parent, "act_fn", None)):
        return False
    if cls not in _GLU_CLASSES:
        _GLU_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _glu_forward, "__module__": cls.__module__,
                                                        "__qualname__": cls.__qualname__ + "[fused gate/up + SiLU]"})
    parent.__class__ = _GLU_CLASSES[cls]
    return True


class FusedPart(nn.Module):
    """Stands in for one member of a fused group: its slice of the group's output."""

    def __init__(self, group: FusedGroup, index: int, in_features: int, out_features: int):
        super().__init__()
        object.__setattr__(self, "_group", group)   # not a child: the parent registers the group once
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, x):
        return self._group.part(x, self.index)

    def extra_repr(self):
        return f"part {self.index} of the fused group, in={self.in_features}, out={self.out_features}"


def _cat_bias(mods):
    return None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods], 0)


def _fuse_linear(mods: list[nn.Linear]) -> nn.Module:
    w = mods[0].weight
    bias = _cat_bias(mods)
    out = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in mods], 0))
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(w.requires_grad)
    return out


def _fuse_dequant(mods: list[DequantLinear]) -> DequantLinear:
    first = mods[0]
    return DequantLinear(torch.cat([m.codes for m in mods], 0), torch.cat([m.scales for m in mods], 0),
                         first.bits, first.group_size, _cat_bias(mods), first.compute_dtype).to(first.codes.device)


def _fusable(mods: list[nn.Module]) -> bool:
    kind = type(mods[0])
    if kind not in (nn.Linear, W4A16Linear, DequantLinear) or any(type(m) is not kind for m in mods):
        return False
    first = mods[0]
    if any(m.in_features != first.in_features or (m.bias is None) != (first.bias is None) for m in mods):
        return False
    if kind is nn.Linear:
        return all(m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device for m in mods)
    if kind is W4A16Linear:
        return all(m._keys == first._keys and m._consts == first._consts and m.group_size == first.group_size
                   and m.backend == first.backend for m in mods)
    return all(m.bits == first.bits and m.group_size == first.group_size for m in mods)


# Decoder layers whose attention reads its (normalised) input only through q/k/v and whose MLP only through gate/up
# (transformers 5.17), so an RMSNorm in front of them can move into the fused projection (fold_norms_)
NORM_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer",
               "Qwen3DecoderLayer", "MistralDecoderLayer")
NORM_SITES = (("input_layernorm", "self_attn", "fused_qkv"), ("post_attention_layernorm", "mlp", "fused_gate_up"))


def _rms_norm_eps(norm) -> float | None:
    """The eps of a module that computes transformers' RMSNorm (weight * x / rms(x), checked on a probe, so a
    (1 + weight) variant or another norm is not taken for one), else None."""
    from grace_ds.export.load import rms_norm

    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(norm, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    probe = (torch.randn(3, weight.shape[0], generator=g) * 3).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            ok = torch.equal(norm(probe), rms_norm(probe, weight, float(eps)))
    except Exception:
        return None
    return float(eps) if ok else None


def fold_norms_(model: nn.Module) -> int:
    """Move each decoder layer's RMSNorms (NORM_LAYERS, NORM_SITES) into the fused packed INT4 projection after
    them, in place, and put identities in their place; returns how many were moved. At decode the norm then runs
    inside the GEMM (W4A16Linear.set_norm, kernels/NOTES.md v21) instead of as a kernel of its own between the
    residual add and the GEMM. Run after fuse_projections_; norms in front of projections that are not fused
    packed INT4 layers stay where they are."""
    from grace_ds.export.load import W4A16Linear

    n = 0
    for layer in list(model.modules()):
        if type(layer).__name__ not in NORM_LAYERS:
            continue
        for norm_name, child, group_name in NORM_SITES:
            norm = getattr(layer, norm_name, None)
            group = getattr(getattr(layer, child, None), group_name, None)
            if not isinstance(group, FusedGroup) or not isinstance(group.fused, W4A16Linear):
                continue
            eps = _rms_norm_eps(norm)
            if eps is None:
                continue
            group.fused.set_norm(norm.weight, eps)
            setattr(layer, norm_name, nn.Identity())
            n += 1
    return n


def fuse_projections_(model: nn.Module, groups: dict[str, tuple[str, ...]] | None = None, glu: bool = False) -> int:
    """Fuse every complete group of sibling projections in place; returns how many groups were fused.

    Groups whose members differ in kind, input width, bias or packing are left as they are. glu (opt-in):
    gated SiLU MLPs (GATED_MLPS) whose gate/up were fused get the one-call forward (module docstring);
    measured end to end it is not a clear win (kernels/NOTES.md v15), hence off by default. The RMSNorm fold
    (fold_norms_) is a separate step."""
    groups = GROUPS if groups is None else groups
    n = 0
    for parent in list(model.modules()):   # a list: the loop adds modules
        children = dict(parent.named_children())
        for attr, members in groups.items():
            if attr in children or not all(m in children for m in members):
                continue
            mods = [children[m] for m in members]
            if not _fusable(mods):
                continue
            kind = type(mods[0])
            fused = _fuse_linear(mods) if kind is nn.Linear else \
                W4A16Linear.concatenated(mods) if kind is W4A16Linear else _fuse_dequant(mods)
            group = FusedGroup(fused, [m.out_features for m in mods])
            parent.add_module(attr, group)
            for i, (m_name, m) in enumerate(zip(members, mods)):
                setattr(parent, m_name, FusedPart(group, i, m.in_features, m.out_features))
            if glu and attr == "fused_gate_up":
                _use_glu_forward(parent)
            n += 1
    return n
