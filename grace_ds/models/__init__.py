"""Model families for GRACE-DS: adapters, tiny presets with offline processors, compatibility, loading.

Public API (docs/architecture.md): VLMAdapter, get_adapter, TINY_PRESETS, build_tiny_preset,
build_processor, load_processor, load_model, check_compatible, CompatReport, OutputCapture.
"""

from grace_ds.models.adapters import (
    ADAPTERS,
    LlavaAdapter,
    Qwen2VLAdapter,
    Qwen3VLAdapter,
    Qwen25VLAdapter,
    VLMAdapter,
    get_adapter,
    model_class_for,
    unwrap,
)
from grace_ds.models.capture import OutputCapture, capture_penultimate
from grace_ds.models.compat import CompatReport, check_compatible
from grace_ds.models.loading import load_model, load_processor, resolve_model_path, zero3_context
from grace_ds.models.presets import TINY_PRESETS, TinyPreset, build_tiny_preset, ensure_preset, preset_cache_dir
from grace_ds.models.processors import FAMILIES, GEOMETRY, build_processor, save_processor

__all__ = [
    "ADAPTERS", "CompatReport", "FAMILIES", "GEOMETRY", "LlavaAdapter", "OutputCapture", "Qwen25VLAdapter",
    "Qwen2VLAdapter", "Qwen3VLAdapter", "TINY_PRESETS", "TinyPreset", "VLMAdapter", "build_processor",
    "build_tiny_preset", "capture_penultimate", "check_compatible", "ensure_preset", "get_adapter",
    "load_model", "load_processor", "model_class_for", "preset_cache_dir", "resolve_model_path",
    "save_processor", "unwrap", "zero3_context",
]
