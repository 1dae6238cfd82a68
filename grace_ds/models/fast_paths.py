"""Two exact fast paths for the Qwen-VL families: fewer GPU launches and host syncs per step.

Small VLMs (the study's, the demo's) are bound by the host, not by the GPU: counted with a
dispatch-mode tally on the study's student at batch 64 (docs/benchmarks.md), one forward
issued about 5,300 aten ops, and two thirds of them came from one function, transformers'
`get_rope_index`. It walks the batch in Python, row by row, with four device->host syncs per row.
Another quarter came from the vision tower's attention, which runs one SDPA call per image. On a
GPU shared by several processes every sync waits for the others' time slices.

1. `RopeIndex`: computes the multimodal RoPE position ids (3, B, S) on the CPU, in the data
   loader's worker processes, with the model class's own `get_rope_index` bound to a config-only
   shim. The batch then carries `position_ids`, which the model uses instead of computing them on
   the device. The teacher uses them only when its RoPE inputs (merge size, token ids) match the
   student's (`rope_signature`), else it computes its own as before.
2. `install_batched_vision_attention()`: when every image of the batch has the same number of
   patches (every image of a fixed-size dataset), the vision attention runs as one batched SDPA call
   of shape (images, heads, patches, dim) instead of a Python loop over images. Otherwise it falls
   back to transformers' own forward. Same arithmetic, same kernel family; checked against the
   original forward and backward in tests/test_fast_paths.py. The vision rotary positions of equal
   grids are likewise built once and repeated, instead of once per image.

Both are on by default; `GRACE_DS_FAST_PATHS=0` turns both off (to compare, or to rule them out).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

# family -> (transformers module, base model class, vision attention class)
_QWEN = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel", "VisionAttention"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel",
                   "Qwen2_5_VLVisionAttention"),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel", "Qwen3VLVisionAttention"),
}


def enabled() -> bool:
    return os.environ.get("GRACE_DS_FAST_PATHS", "1") != "0"


# --------------------------------------------------------------------------- 1. RoPE index on CPU


class _ConfigShim:
    """Stands in for the base model inside `get_rope_index`, which reads only `self.config` and
    calls other methods of the class (bound here to the shim)."""

    def __init__(self, cls, config):
        self._cls = cls
        self.config = config

    def __getattr__(self, name):
        attr = getattr(self._cls, name)
        return attr.__get__(self) if callable(attr) else attr


def rope_signature(config) -> str:
    """What the multimodal position ids depend on, besides the batch. Two configs with the same
    signature give the same `position_ids` for the same batch."""
    vc = config.vision_config
    parts = (config.model_type, getattr(vc, "spatial_merge_size", None), getattr(vc, "tokens_per_second", None),
             getattr(config, "image_token_id", None), getattr(config, "video_token_id", None),
             getattr(config, "vision_start_token_id", None))
    return "|".join(map(str, parts))


class RopeIndex:
    """batch -> batch with `position_ids` (3, B, S) and `rope_signature`, computed on the CPU.

    Picklable (it holds a config), so the data loader's workers run it after collating. Returns the
    batch unchanged for families without multimodal RoPE (LLaVA) or batches without images.
    """

    def __init__(self, config):
        self.config = config
        self.family = config.model_type
        self.signature = rope_signature(config)

    @classmethod
    def for_config(cls, config) -> "RopeIndex | None":
        if not enabled() or config.model_type not in _QWEN:
            return None
        return cls(config)

    @functools.cached_property
    def _shim(self):
        mod, base, _ = _QWEN[self.family]
        return _ConfigShim(getattr(importlib.import_module(mod), base), self.config)

    def __getstate__(self):
        return {"config": self.config, "family": self.family, "signature": self.signature}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __call__(self, batch: dict) -> dict:
        if batch.get("image_grid_thw") is None or batch.get("mm_token_type_ids") is None:
            return batch
        with torch.no_grad():
            pos, _ = self._shim.get_rope_index(
                batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"], attention_mask=batch.get("attention_mask"))
        batch["position_ids"] = pos
        batch["rope_signature"] = self.signature
        return batch


def inputs_for(config, batch: dict) -> dict:
    """`batch` for a model with `config`: drops precomputed position ids made for another RoPE."""
    if "position_ids" in batch and batch.get("rope_signature") != rope_signature(config):
        return {k: v for k, v in batch.items() if k != "position_ids"}
    return batch


# --------------------------------------------------------------------------- 2. batched vision SDPA

_INSTALLED: dict[str, object] = {}


def _batched_forward(original, rotary):
    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        impl = self.config._attn_implementation
        if impl != "sdpa" or position_embeddings is None or not enabled():
            return original(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()   # the original syncs here too
        if not lengths or min(lengths) != max(lengths):
            return original(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        n, length = len(lengths), lengths[0]
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)
        # (seq, heads, dim) -> (images, heads, patches, dim): one call instead of one per image
        q, k, v = (t.reshape(n, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq, -1).contiguous())

    forward.__wrapped__ = original
    return forward


def _repeated_position_ids(original):
    """The vision rotary positions of n equal grids are one grid's, repeated: no loop over images."""
    def get_vision_position_ids(grid_thw, spatial_merge_size, include_temporal=False, kwargs=None):
        precomputed = kwargs is not None and kwargs.get("position_ids") is not None
        rows = None if precomputed or not isinstance(spatial_merge_size, int) else grid_thw.tolist()
        if not rows or len(rows) < 2 or any(r != rows[0] for r in rows) or not enabled():
            return original(grid_thw, spatial_merge_size, include_temporal=include_temporal, kwargs=kwargs)
        one = original(grid_thw[:1], spatial_merge_size, include_temporal=include_temporal)
        return one.repeat(len(rows), 1)

    get_vision_position_ids.__wrapped__ = original
    return get_vision_position_ids


def install_batched_vision_attention() -> list[str]:
    """Patch the Qwen-VL vision attention classes and their vision position ids (idempotent).
    -> the families patched."""
    for family, (mod_name, _, attn_name) in _QWEN.items():
        if family in _INSTALLED:
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        cls = getattr(mod, attn_name, None)
        rotary = getattr(mod, "apply_rotary_pos_emb_vision", None)
        if cls is None or rotary is None:
            continue
        saved = [(cls, "forward", cls.forward)]
        cls.forward = _batched_forward(cls.forward, rotary)
        if callable(getattr(mod, "get_vision_position_ids", None)):
            saved.append((mod, "get_vision_position_ids", mod.get_vision_position_ids))
            mod.get_vision_position_ids = _repeated_position_ids(mod.get_vision_position_ids)
        _INSTALLED[family] = saved
    return sorted(_INSTALLED)


def uninstall_batched_vision_attention() -> None:
    for saved in _INSTALLED.values():
        for owner, name, original in saved:
            setattr(owner, name, original)
    _INSTALLED.clear()
