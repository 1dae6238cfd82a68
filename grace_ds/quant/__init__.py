"""Group-wise LSQ weight-only fake quantisation (grace-method.md section 4).

    config = QuantConfig(bits=4, group_size=128)
    layers = prepare_qat(model, config)           # in place, before deepspeed.initialize
    optimizer = AdamW(scale_param_groups(model, lr, weight_decay))
    ...train...
    ints = export_int_weights(model)              # codes int8 + fp32 scales per layer
"""

from grace_ds.quant.config import QuantConfig
from grace_ds.quant.export import bake_fake_quant, export_int_weights
from grace_ds.quant.lsq import effective_group_size, fake_quantize, init_log_scale
from grace_ds.quant.prepare import prepare_qat, qat_modules, scale_param_groups
from grace_ds.quant.qat_linear import QATLinear

__all__ = [
    "QuantConfig", "init_log_scale", "fake_quantize", "QATLinear", "prepare_qat", "scale_param_groups",
    "export_int_weights", "bake_fake_quant", "effective_group_size", "qat_modules",
]
