"""From a trained QAT model to integer weights (the source of truth for packing) or a baked model."""

from __future__ import annotations

import torch
from torch import nn

from grace_ds.quant.lsq import quantize_codes
from grace_ds.quant.prepare import qat_modules
from grace_ds.quant.qat_linear import QATLinear
from grace_ds.quant.zero3 import gathered, is_zero3_param


def _clamped_log_scale(m: QATLinear) -> torch.Tensor:
    clamp = m.quant_config.log_scale_clamp
    theta = m.log_scale.detach()
    return theta if clamp is None else theta.clamp(float(clamp[0]), float(clamp[1]))


@torch.no_grad()
def export_int_weights(model: nn.Module) -> dict[str, dict]:
    """Per QATLinear: {"codes": int8 (out, in), "scales": fp32 (out, in / group_size),
    "bits": int, "group_size": effective int, "bias": Tensor | None}, all on the CPU.

    codes.float() * scales.repeat_interleave(group_size, 1) equals fake_quantize(weight.float(),
    log_scale) bit for bit: both go through quantize_codes and one fp32 multiply. Under ZeRO-3
    every rank must call it (each layer is gathered in turn) and every rank gets the full result.
    """
    out = {}
    for name, m in qat_modules(model).items():
        with gathered([m.weight, m.log_scale, m.bias]):
            q, s, _ = quantize_codes(m.weight.float(), _clamped_log_scale(m), m.bits, m.group_size)
            out[name] = {
                "codes": q.to(torch.int8).reshape(m.out_features, m.in_features).cpu(),
                "scales": s.to(torch.float32).reshape(m.out_features, m.in_features // m.group_size).cpu(),
                "bits": m.bits,
                "group_size": m.group_size,
                "bias": None if m.bias is None else m.bias.detach().clone().cpu(),
            }
    return out


@torch.no_grad()
def bake_fake_quant(model: nn.Module) -> int:
    """Replace each QATLinear by a plain nn.Linear whose weight is the fake-quantised weight
    (dtype and requires_grad of the latent weight kept; the bias Parameter is shared). Returns the
    number of layers replaced. Works on a consolidated (non-ZeRO-3) model only: a new full
    parameter inside a partitioned model would not be managed by the engine.
    """
    count = 0
    for name, m in list(qat_modules(model).items()):
        if any(is_zero3_param(p) for p in (m.weight, m.log_scale, m.bias)):
            raise RuntimeError(f"bake_fake_quant: {name} holds ZeRO-3 partitioned parameters; consolidate "
                               f"the model first (load the saved 16-bit checkpoint in one process)")
        q, s, _ = quantize_codes(m.weight, _clamped_log_scale(m), m.bits, m.group_size)
        w_hat = (q * s[:, None]).reshape(m.out_features, m.in_features).to(m.weight.dtype)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(w_hat, requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            linear.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
        count += 1
    return count
