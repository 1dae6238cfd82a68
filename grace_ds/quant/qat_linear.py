"""QATLinear: a linear layer whose weight is fake-quantised in every forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grace_ds.quant.config import QuantConfig
from grace_ds.quant.lsq import effective_group_size, fake_quantize, init_log_scale
from grace_ds.quant.zero3 import full_shape, gathered, is_zero3_param, partition_like


class QATLinear(nn.Module):
    """Replaces an nn.Linear for quantisation-aware training.

    `.weight` and `.bias` are the ORIGINAL Parameter objects of the wrapped linear (shared, not
    copied): optimizer state, tied references and ZeRO-3 partitions stay valid, and saving the model
    keeps the latent weights under their old names. `.log_scale` is one fp32 theta = ln(scale) per
    group, flat (n_groups,), row-major over (out, in) - the layout of init_log_scale. (Under
    DeepSpeed with bf16/fp16 enabled it is held in that dtype like every model parameter.)

    Built from a ZeRO-3 partitioned linear, the weight is gathered to initialise the scales (never
    from the empty shard: that leaves theta = 0, scale 1, and a loss of ~60) and the new log_scale
    is partitioned the same way.
    """

    def __init__(self, linear: nn.Linear, config: QuantConfig = QuantConfig(), log_scale: Tensor | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QATLinear wraps an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.quant_config = config
        self.bits = config.bits
        self.group_size = effective_group_size(self.in_features, config.group_size)
        n_groups = self.out_features * self.in_features // self.group_size
        if full_shape(self.weight) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {full_shape(self.weight)} does not match the linear's "
                             f"(out_features, in_features) = ({self.out_features}, {self.in_features})")
        if log_scale is None:
            with gathered([self.weight]):
                log_scale = init_log_scale(self.weight, config.bits, config.group_size,
                                           candidates=config.init_candidates, init_range=config.init_range)
        if log_scale.numel() != n_groups:
            raise ValueError(f"log_scale has {log_scale.numel()} entries, expected {n_groups} "
                             f"({self.out_features} x {self.in_features} / group {self.group_size})")
        self.log_scale = nn.Parameter(log_scale.detach().reshape(-1).to(torch.float32).clone())
        if is_zero3_param(self.weight):
            # ZeRO-3 keeps one flat low-precision buffer per rank and asserts a single dtype
            # (zero/utils.py defragment): on a bf16 zero.Init model an fp32 log_scale makes
            # deepspeed.initialize fail. The engine casts it the same way on a model that was not
            # built under zero.Init; the optimizer's fp32 master copy keeps the precise value.
            self.log_scale.data = self.log_scale.data.to(self.weight.dtype)
            partition_like(self.weight, [self.log_scale])

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.quant_config
        w_hat = fake_quantize(self.weight, self.log_scale, self.bits, self.group_size,
                              lsq_grad_scale=cfg.lsq_grad_scale, log_scale_clamp=cfg.log_scale_clamp)
        return F.linear(x, w_hat, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}")
