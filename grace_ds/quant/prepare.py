"""The model transform (prepare_qat) and the optimizer grouping that goes with it."""

from __future__ import annotations

import re

from torch import nn

from grace_ds.quant.config import QuantConfig
from grace_ds.quant.qat_linear import QATLinear


def _selected(name: str, config: QuantConfig) -> bool:
    return any(re.search(p, name) for p in config.include) and not any(re.search(p, name) for p in config.exclude)


def prepare_qat(model: nn.Module, config: QuantConfig = QuantConfig()) -> dict[str, QATLinear]:
    """Replace, in place, every nn.Linear whose qualified name matches config.include (re.search)
    and no config.exclude pattern by a QATLinear; returns {qualified name: QATLinear}.

    Call it BEFORE deepspeed.initialize (the engine hooks the modules it sees). ZeRO-3 safe: on a
    model built under deepspeed.zero.Init each weight is gathered to initialise its scales and the
    new log-scales are partitioned; every rank must call it (the gathers are collectives).
    Raises if nothing matches: training a model that was meant to be quantised in 16-bit would
    otherwise go unnoticed.
    """
    if type(model).__name__ == "DeepSpeedEngine":
        raise TypeError("prepare_qat got a DeepSpeedEngine: prepare the bare model before "
                        "deepspeed.initialize, the engine only hooks the modules it was given")
    # nn.Linear subclasses (e.g. MultiheadAttention's out_proj, whose weight the parent reads
    # directly) are left alone: only a plain linear's forward is guaranteed to be its whole use.
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and _selected(name, config)]
    if not targets:
        linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(f"prepare_qat: no nn.Linear matches include={config.include} minus "
                         f"exclude={config.exclude}; the model's linears are e.g. {linears[:5]} "
                         f"({len(linears)} in all; already prepared models have none left). "
                         f"Set QuantConfig.include to patterns of the decoder's linears")
    replaced = {}
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        qat = QATLinear(linear, config)
        setattr(parent, child, qat)
        replaced[name] = qat
    return replaced


def qat_modules(model: nn.Module) -> dict[str, QATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


def scale_param_groups(model: nn.Module, lr: float, weight_decay: float,
                       scale_lr_mult: float | None = None) -> list[dict]:
    """Optimizer parameter groups: [weights, no-decay, scales], each with a "name" key.

    - "weights": trainable parameters with >= 2 dims, lr, weight_decay;
    - "no_decay": trainable 1-D parameters (biases, norm gains), lr, weight decay 0 - decaying a
      norm gain towards 0 only shrinks activations;
    - "scales": every QATLinear.log_scale, lr = scale_lr_mult * lr, weight decay 0 (decay would
      pull every scale towards 1). scale_lr_mult=None takes the QATLinears' QuantConfig value.
    Frozen parameters are left out; each trainable parameter appears exactly once; empty groups are
    dropped (so find groups by "name", not by index). Under ZeRO-3 the tensors are shards, which
    is why the split uses ds_shape and never the shard's shape.
    """
    qats = qat_modules(model)
    scale_ids = {id(m.log_scale) for m in qats.values()}
    if scale_lr_mult is None:
        mults = {m.quant_config.scale_lr_mult for m in qats.values()}
        if len(mults) > 1:
            raise ValueError(f"QAT layers disagree on scale_lr_mult {sorted(mults)}: pass scale_lr_mult")
        scale_lr_mult = mults.pop() if mults else QuantConfig().scale_lr_mult
    decay, no_decay, scales = [], [], []
    for _, p in model.named_parameters():      # named_parameters() already de-duplicates shared params
        if not p.requires_grad:
            continue
        if id(p) in scale_ids:
            scales.append(p)
        elif len(getattr(p, "ds_shape", p.shape)) >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "weights", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": "scales", "params": scales, "lr": lr * scale_lr_mult, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
