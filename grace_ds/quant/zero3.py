"""ZeRO-3 awareness for the quantiser, without importing DeepSpeed unless a model needs it.

Under ZeRO-3 a parameter outside its module's forward is an empty shard (`param.ds_status` is
NOT_AVAILABLE, `param.shape` is (0,)); its full shape is `param.ds_shape`. Anything that reads a
whole weight outside forward (scale init, export, bake) must gather it first, on every rank, in
the same order (the gather is a collective).
"""

from __future__ import annotations

import contextlib

from torch import nn


def is_zero3_param(param) -> bool:
    return param is not None and hasattr(param, "ds_id")


def full_shape(param) -> tuple[int, ...]:
    return tuple(param.ds_shape) if is_zero3_param(param) else tuple(param.shape)


@contextlib.contextmanager
def gathered(params, modifier_rank=None):
    """Full parameters inside the block; a no-op for ordinary parameters.

    modifier_rank=None: read-only (every rank sees the full tensor, nothing is written back).
    """
    zero = [p for p in params if is_zero3_param(p)]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank):
        yield


def partition_like(reference: nn.Parameter, new_params: list[nn.Parameter]) -> None:
    """Turn plain parameters added to a zero.Init model into ZeRO-3 parameters, partitioned like
    `reference` (same process group and Init config).

    DeepSpeed would also convert them inside deepspeed.initialize (`_convert_to_zero_parameters`),
    but until then the model would hold full and partitioned parameters side by side. The conversion
    broadcasts from rank 0, so every rank must call this for the same parameters in the same order;
    it keeps the dtype (the log-scales stay fp32).
    """
    todo = [p for p in new_params if not is_zero3_param(p)]
    if todo:
        reference.convert_to_zero_parameters(param_list=todo)
