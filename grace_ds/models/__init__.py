"""Model families for GRACE-DS: adapters, tiny presets with offline processors, compatibility, loading.

Public API (docs/architecture.md): VLMAdapter, get_adapter, TINY_PRESETS, build_tiny_preset,
build_processor, load_processor, load_model, check_compatible, CompatReport, OutputCapture.

Names resolve lazily (PEP 562): `grace_ds.models.processors` is imported by the data loader's
workers and by tokenizer-only tools, which should not pay for importing torch and transformers'
model classes.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "adapters": ("ADAPTERS", "LlavaAdapter", "Qwen2VLAdapter", "Qwen25VLAdapter", "Qwen3VLAdapter",
                 "VLMAdapter", "get_adapter", "model_class_for", "unwrap"),
    "capture": ("OutputCapture", "capture_penultimate"),
    "compat": ("CompatReport", "check_compatible"),
    "loading": ("load_model", "load_processor", "resolve_model_path", "zero3_context"),
    "presets": ("TINY_PRESETS", "TinyPreset", "build_tiny_preset", "ensure_preset", "preset_cache_dir"),
    "processors": ("FAMILIES", "GEOMETRY", "build_processor", "save_processor"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'grace_ds.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"grace_ds.models.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
