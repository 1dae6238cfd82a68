"""The frozen teacher: an interface the loop calls, and its ZeRO-Inference implementation.

`Teacher` is a protocol (`__call__(batch) -> TeacherOutput`), so a tensor-parallel teacher or an
offline logit cache can replace `ZeroInferenceTeacher` without touching the loop.

`ZeroInferenceTeacher` builds the model under `deepspeed.zero.Init` (via `load_model(...,
zero3_config=...)`), so a 72B teacher is partitioned as it is constructed and never materialises
on one rank, then wraps it in a ZeRO stage-3 engine without optimizer (optionally offloading the
partitions to CPU or NVMe). Its lm_head weight is gathered ONCE and kept resident: the fused loss
needs it whole for every chunk, and re-gathering a frozen (V, H) matrix every micro-batch would
be pure traffic (2.5 GB for a 72B teacher, the price of one resident copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class TeacherOutput:
    hidden: torch.Tensor              # (B, S, H_t) final-norm hidden states (fused loss) ...
    head_weight: torch.Tensor         # ... with the gathered lm_head weight (V_t, H_t)
    visual: list[torch.Tensor]        # per image (n_i, H_t) penultimate-layer features at visual positions


class Teacher(Protocol):
    def __call__(self, batch: dict) -> TeacherOutput: ...


class _HiddenForward(nn.Module):
    """The module the teacher engine wraps: forward = adapter.forward_hidden. Being the engine's
    root module, its ZeRO-3 hooks mark the start and end of every forward (prefetch trace)."""

    def __init__(self, model: nn.Module, adapter):
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, batch: dict):
        return self.adapter.forward_hidden(self.model, batch)


def visual_features(adapter, input_ids: torch.Tensor, penultimate: torch.Tensor) -> list[torch.Tensor]:
    """Per image, in order: penultimate hidden states at its visual-token positions (RCKA input).
    One gather for the whole batch, then split into per-image views."""
    rows, cols, counts = adapter.visual_index(input_ids)
    if not counts:
        return []
    dev = penultimate.device
    return list(penultimate[rows.to(dev), cols.to(dev)].split(counts))


class ZeroInferenceTeacher:
    def __init__(self, path: str, *, ds_config: dict, dtype: torch.dtype, cache_dir=None,
                 gather_whole_layers: bool = False):
        import deepspeed

        from grace_ds.models import get_adapter, load_model

        model = load_model(path, dtype=dtype, zero3_config=ds_config, cache_dir=cache_dir)
        model.requires_grad_(False)
        model.eval()
        if gather_whole_layers:
            from grace_ds.models.loading import gather_whole_layers as mark
            mark(model)
        self.config = model.config
        self.adapter = get_adapter(model)
        self.engine, *_ = deepspeed.initialize(model=_HiddenForward(model, self.adapter), config=ds_config)
        self.engine.eval()
        head = self.adapter.lm_head(model)
        with deepspeed.zero.GatheredParameters([head.weight]):
            self.head_weight = head.weight.detach().clone()

    @torch.no_grad()
    def __call__(self, batch: dict) -> TeacherOutput:
        hidden, penultimate = self.engine(batch)
        return TeacherOutput(hidden=hidden, head_weight=self.head_weight,
                             visual=visual_features(self.adapter, batch["input_ids"], penultimate))
