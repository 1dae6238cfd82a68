"""ZeRO-3 and the fused loss: make the lm_head weight visible where the loss reads it.

Under ZeRO-3 a parameter is an empty shard (shape (0,)) except while a module that owns it runs
forward/backward. The fused loss reads `lm_head.weight` as a plain tensor from the wrapper's
forward (lm_head's own forward never runs) and again in backward (it recomputes logits), so the
weight is registered as an external parameter of the wrapper: ZeRO-3 then gathers it for the
wrapper's whole forward and backward. Without it, a loss computed outside the engine's forward
sees the empty shard (the known failure of fused-loss libraries); fused_gdkd_ce refuses it.

DeepSpeed 0.19 also auto-registers a partitioned parameter that is read during the root module's
forward (a forward pre-hook sets ZeROOrderedDict._in_forward), so an unregistered read inside the
forward happens to work there (measured in tests/test_distill_zero3.py). The explicit registration
does not rely on that heuristic: older DeepSpeed versions lack it, and with it the weight is part
of the wrapper's fetch set from the first step (ZeRO's prefetch trace sees it like any other).
"""

from __future__ import annotations

from torch import nn


def register_head_for_loss(owner: nn.Module, weight: nn.Parameter) -> bool:
    """Register `weight` (e.g. lm_head.weight) on `owner`, the module whose forward calls the loss.

    Call it once, after the model exists (under deepspeed.zero.Init or before deepspeed.initialize;
    both work, registration is by parameter identity). Returns True when a registration was made;
    safe and a no-op (False) when DeepSpeed is absent.
    """
    if not isinstance(weight, nn.Parameter):
        raise TypeError(
            f"register_head_for_loss needs the nn.Parameter itself (got {type(weight).__name__}): pass "
            f"model.lm_head.weight, not a tensor derived from it"
        )
    if not any(p is weight for p in owner.parameters()):
        raise ValueError(
            "the weight is not a parameter of `owner`: register it on the module that contains the model "
            "(the wrapper whose forward calls the loss), so ZeRO-3 tracks it with the model's parameters"
        )
    try:
        import deepspeed  # `deepspeed.zero` is a namespace set by the package, not an importable module
    except ImportError:
        return False
    deepspeed.zero.register_external_parameter(owner, weight)
    return True


def is_partitioned(t) -> bool:
    """True when `t` is a ZeRO-3 parameter whose data is currently an empty shard."""
    return hasattr(t, "ds_id") and t.numel() == 0
