"""GRACE-DS: GRACE quantisation-aware distillation of vision-language models with DeepSpeed.

Subpackages: quant (group-wise LSQ fake quantisation), distill (GRACE objective), data (WebDataset
shards, synthetic benchmark, loader), models (family adapters, tiny presets), engine (DeepSpeed
student/teacher engines, checkpoints, loop), export (HF + packed INT4), eval (scoring).
See docs/architecture.md for the public contracts.
"""

__version__ = "0.1.0"
