"""Learning-rate schedule: linear warm-up, then cosine decay to `min_lr_ratio * lr`.

Stepped once per optimizer step (DeepSpeed calls `lr_scheduler.step()` at each accumulation
boundary and saves the scheduler in its checkpoint). It is a multiplier, so the LSQ scale group
keeps its own `scale_lr_mult * lr` peak.
"""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps,
                                   min_lr_ratio=min_lr_ratio),
    )
