"""Tiny VLM presets: real transformers classes from small configs, random weights, real processors.

`build_tiny_preset(name, out_dir, seed)` writes a directory that looks like a downloaded checkpoint
(config.json, model.safetensors, processor files) so every code path - `from_pretrained`, the
processor, ZeRO-3 construction - is the one a real Qwen2-VL or LLaVA takes.

Design points the rest of the project relies on:
- Teacher and student of one family share the tokenizer, the image processor and the vision
  patching (same tokens per image); only widths and depths differ, as for Qwen2-VL 7B -> 2B.
- Student text `hidden_size` / `intermediate_size` are multiples of 128 so the INT4 group size 128
  divides every quantised linear's `in_features`.
- Padded vocabularies, as in real checkpoints: the student's `vocab_size` is `len(tokenizer)`
  rounded up to a multiple of 64 and the teacher's adds another 64 rows (Qwen2-VL-7B has 152064
  rows, the 2B 151936, for the same ~151.6K-token tokenizer). The rows past `len(tokenizer)` are
  never produced by the tokenizer; losses slice logits to the shared real vocabulary
  (`CompatReport.shared_vocab`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from grace_ds.models.processors import GEOMETRY, build_processor, corpus_fingerprint

# Bump when a preset's architecture or the build recipe changes: cached presets are rebuilt.
PRESET_FORMAT_VERSION = 1
MARKER_FILE = "grace_preset.json"


@dataclass(frozen=True)
class TinyPreset:
    family: str                  # qwen2_vl | qwen2_5_vl | qwen3_vl | llava
    role: str                    # teacher | student (decides vocab padding)
    hidden_size: int             # text width
    num_layers: int              # decoder layers
    intermediate_size: int       # text MLP width
    num_heads: int
    num_kv_heads: int
    vision_width: int            # ViT width
    vision_depth: int = 2
    vision_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


TINY_PRESETS: dict[str, TinyPreset] = {
    # head_dim 64 everywhere so mrope_section [8, 12, 12] (sums to head_dim/2) fits both roles.
    "tiny-qwen2vl-teacher": TinyPreset("qwen2_vl", "teacher", 256, 4, 768, 4, 2, vision_width=64),
    "tiny-qwen2vl-student": TinyPreset("qwen2_vl", "student", 128, 2, 384, 2, 1, vision_width=32),
    "tiny-qwen25vl-teacher": TinyPreset("qwen2_5_vl", "teacher", 256, 4, 768, 4, 2, vision_width=64),
    "tiny-qwen25vl-student": TinyPreset("qwen2_5_vl", "student", 128, 2, 384, 2, 1, vision_width=32),
    "tiny-qwen3vl-teacher": TinyPreset("qwen3_vl", "teacher", 256, 4, 768, 4, 2, vision_width=64),
    "tiny-qwen3vl-student": TinyPreset("qwen3_vl", "student", 128, 2, 384, 2, 1, vision_width=32),
    "tiny-llava-teacher": TinyPreset("llava", "teacher", 256, 4, 768, 4, 2, vision_width=64),
    "tiny-llava-student": TinyPreset("llava", "student", 128, 2, 384, 2, 1, vision_width=32),
}

VOCAB_MULTIPLE = 64


def padded_vocab_size(n_tokens: int, role: str) -> int:
    base = -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return base + (VOCAB_MULTIPLE if role == "teacher" else 0)


def make_config(name: str, processor):
    """The transformers config for preset `name`, with token ids taken from `processor`."""
    import transformers

    spec = _spec(name)
    tok = processor.tokenizer
    vocab = padded_vocab_size(len(tok), spec.role)
    text = dict(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    g = GEOMETRY[spec.family]
    if spec.family == "llava":
        text.update(model_type="llama", bos_token_id=tok.bos_token_id, rms_norm_eps=1e-5)
        vision = dict(
            model_type="clip_vision_model", hidden_size=spec.vision_width,
            intermediate_size=4 * spec.vision_width, num_hidden_layers=spec.vision_depth,
            num_attention_heads=spec.vision_heads, image_size=g.image_size, patch_size=g.patch_size,
            projection_dim=spec.vision_width,
        )
        return transformers.LlavaConfig(
            text_config=text, vision_config=vision,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_seq_length=g.tokens_per_image, vision_feature_layer=-2,
            vision_feature_select_strategy="default", tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
        )

    ids = dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    text["bos_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
    vision = dict(depth=spec.vision_depth, num_heads=spec.vision_heads, patch_size=g.patch_size,
                  spatial_merge_size=g.merge_size, temporal_patch_size=g.temporal_patch_size)
    half = spec.head_dim // 2
    if spec.family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
        vision.update(embed_dim=spec.vision_width, hidden_size=spec.hidden_size, mlp_ratio=2)
        cfg_cls = transformers.Qwen2VLConfig
    elif spec.family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
        # window_size 112 px = a 4x4 merged window: with the 4x4 merged grid of a 112 px image the
        # windowed blocks see the whole image, as small images do in the real model.
        vision.update(hidden_size=spec.vision_width, intermediate_size=2 * spec.vision_width,
                      out_hidden_size=spec.hidden_size, window_size=112,
                      fullatt_block_indexes=[spec.vision_depth - 1])
        cfg_cls = transformers.Qwen2_5_VLConfig
    else:  # qwen3_vl
        text.update(head_dim=spec.head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
            "mrope_section": [half // 4 + half % 4, 3 * half // 8, 3 * half // 8]})
        side = g.image_size // g.patch_size
        vision.update(hidden_size=spec.vision_width, intermediate_size=2 * spec.vision_width,
                      out_hidden_size=spec.hidden_size, num_position_embeddings=side * side,
                      deepstack_visual_indexes=[0])
        cfg_cls = transformers.Qwen3VLConfig
    return cfg_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build_tiny_preset(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write preset `name` (config.json, model.safetensors, processor files) to `out_dir`.

    Weights are the family's own random init under `torch.manual_seed(seed)`, so the same
    (name, seed) gives bit-identical files. Returns the directory.
    """
    import torch

    from grace_ds.models.adapters import model_class_for

    spec = _spec(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(spec.family, out)
    config = make_config(name, processor)
    cls = model_class_for(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / MARKER_FILE).write_text(json.dumps(_marker(name, seed), indent=2, sort_keys=True) + "\n")
    return out


def _marker(name: str, seed: int) -> dict:
    return {"preset": name, "seed": seed, "format": PRESET_FORMAT_VERSION,
            "tokenizer": corpus_fingerprint(), "spec": asdict(_spec(name))}


def preset_cache_dir() -> Path:
    """Where `ensure_preset` keeps built presets: $GRACE_DS_CACHE or ~/.cache/grace_ds, + /presets."""
    root = os.environ.get("GRACE_DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grace_ds")
    return Path(root) / "presets"


def ensure_preset(name: str, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The built preset directory, (re)building it when missing or stale (tokenizer/recipe changed).

    Safe when every rank of a job calls it at once: an exclusive file lock serialises the check and
    the build, and the build goes to a temporary directory renamed into place, so no rank ever reads
    a half-written preset.
    """
    import fcntl
    import shutil

    out = Path(cache_dir) / name if cache_dir is not None else preset_cache_dir() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_current(out, name, seed):
                return out
            tmp = out.parent / f".{name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_preset(name, tmp, seed=seed)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            return out
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_current(out: Path, name: str, seed: int) -> bool:
    marker = out / MARKER_FILE
    if not (marker.exists() and (out / "model.safetensors").exists()):
        return False
    try:
        return json.loads(marker.read_text()) == _marker(name, seed)
    except json.JSONDecodeError:
        return False


def _spec(name: str) -> TinyPreset:
    if name not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {name!r}: expected one of {', '.join(TINY_PRESETS)}")
    return TINY_PRESETS[name]
