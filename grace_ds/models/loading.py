"""Load a VLM (HF directory or tiny preset name) and its processor, optionally straight into ZeRO-3.

With `zero3_config`, the model is constructed under `deepspeed.zero.Init` (transformers does it
when an `HfDeepSpeedConfig` with stage 3 is alive), so each parameter is partitioned as soon as its
module is built and the checkpoint is loaded shard by shard into the partitions: a 72B teacher never
materialises on one rank.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from grace_ds.models.adapters import model_class_for
from grace_ds.models.presets import TINY_PRESETS, ensure_preset
from grace_ds.models.processors import load_processor as _load_processor

__all__ = ["resolve_model_path", "load_model", "load_processor", "zero3_context"]


def resolve_model_path(path_or_preset: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """An existing HF directory as is; a tiny preset name -> its built directory (built on first use)."""
    p = Path(path_or_preset)
    if p.is_dir():
        return p
    name = str(path_or_preset)
    if name in TINY_PRESETS:
        return ensure_preset(name, cache_dir)
    raise FileNotFoundError(
        f"model {name!r} is neither a local directory nor a tiny preset: nothing is downloaded here, so "
        f"pass a local Hugging Face checkpoint directory or one of {', '.join(TINY_PRESETS)}")


def load_processor(path_or_preset: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """The model's processor (tokenizer, image processor, chat template), offline."""
    return _load_processor(resolve_model_path(path_or_preset, cache_dir))


def _read_ds_config(zero3_config) -> dict:
    cfg = zero3_config
    if isinstance(cfg, (str, os.PathLike)):
        cfg = json.loads(Path(cfg).read_text())
    cfg = dict(cfg)
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"zero3_config has zero_optimization.stage={stage!r}: zero.Init construction needs "
                         "stage 3 (use ds_configs/zero_inference_teacher_*.json or zero3_student*.json)")
    return cfg


def _dtype_for_ds(cfg: dict, dtype: torch.dtype) -> dict:
    """Make the DeepSpeed precision section agree with `dtype` (zero.Init casts partitions to it)."""
    cfg = json.loads(json.dumps(cfg))
    for key, want in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = cfg.get(key)
        enabled = section.get("enabled") if isinstance(section, dict) else None
        if enabled == "auto" or enabled is None:
            cfg.setdefault(key, {})["enabled"] = want
        elif bool(enabled) != want:
            raise ValueError(f"dtype {dtype} disagrees with the DeepSpeed config's {key}.enabled={enabled}: "
                             f"set {key}.enabled to {want} or pass the matching dtype")
    # HfDeepSpeedConfig rejects unresolved "auto" batch sizes only at engine init; zero.Init ignores them.
    return cfg


@contextmanager
def zero3_context(zero3_config, dtype: torch.dtype = torch.float32):
    """Inside: transformers constructs models under `deepspeed.zero.Init`.

    `HfDeepSpeedConfig` registers itself through a weak reference, so the object must stay
    referenced for the whole construction (held by this frame). It is unset on exit so later
    plain `from_pretrained` calls in the same process (e.g. a non-ZeRO student) are not partitioned.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_ds

    cfg = _dtype_for_ds(_read_ds_config(zero3_config), dtype)
    # A caller may already hold its own HfDeepSpeedConfig (e.g. HF Trainer): restore it afterwards.
    previous = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref is not None else None
    hf_ds_config = HfDeepSpeedConfig(cfg)
    try:
        yield hf_ds_config
    finally:
        del hf_ds_config
        if previous is not None:
            hf_ds.set_hf_deepspeed_config(previous)
        else:
            hf_ds.unset_hf_deepspeed_config()


def load_model(path_or_preset: str | os.PathLike, dtype: torch.dtype | str = torch.float32, zero3_config=None,
               cache_dir: str | os.PathLike | None = None) -> torch.nn.Module:
    """The family's `...ForConditionalGeneration` from a HF directory or tiny preset name, offline.

    `zero3_config` (dict or JSON path, stage 3): construct and load under `deepspeed.zero.Init`, so
    parameters come back partitioned (`param.ds_numel`, empty local data) over the current process
    group; `torch.distributed` must be initialised (deepspeed.init_distributed) beforehand.
    """
    from transformers import AutoConfig

    if isinstance(dtype, str):   # "bfloat16" / "float32" straight from a YAML recipe
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name: use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    path = resolve_model_path(path_or_preset, cache_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model directory "
                                f"or a tiny preset name ({', '.join(TINY_PRESETS)})")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    # Resolving the class here also imports it: transformers' lazy module import inside
    # zero.Init fails with "Signature mismatch ... new_tensor" (docs/environment.md).
    cls = model_class_for(config)
    from grace_ds.models.fast_paths import enabled, install_batched_vision_attention
    if enabled():
        install_batched_vision_attention()
    if zero3_config is None:
        model = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    else:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("load_model(zero3_config=...) needs torch.distributed initialised first "
                               "(deepspeed.init_distributed(), or the engine's distributed setup)")
        with zero3_context(zero3_config, dtype):
            model = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.config.use_cache = False   # training/distillation never decodes; avoids KV-cache allocation
    return model


def gather_whole_layers(model: torch.nn.Module) -> list[str]:
    """Mark every repeated block (the elements of each nn.ModuleList: decoder layers, vision blocks)
    as a ZeRO-3 leaf module: its parameters are gathered in one go by one hook pair, instead of one
    pair per sub-module (q/k/v/o, MLP, norms...). Call before deepspeed.initialize.

    What it is for: small models, where ZeRO-3's per-module hooks, not the GPU, set the step time
    (the study's 20M-parameter teacher ran 4 steps/s with its GPU 8% busy). The memory cost is one
    whole layer live at a time, which ZeRO-3's prefetch mostly holds anyway. -> the class names marked.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(child).__name__ for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                      for child in m if any(True for _ in child.parameters())})
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes
