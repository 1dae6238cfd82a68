"""Model configs for the end-to-end benchmark (no weights can be downloaded: architectures from numbers)
and the benchmark's prompt: one image + text, built for the config's vision geometry.

7B configs restate the published config.json of llava-hf/llava-1.5-7b-hf and Qwen/Qwen2-VL-7B-Instruct.
The tiny ones keep the same families with widths that are multiples of 128 (the kernel's group size).
"""
from __future__ import annotations

import torch

BENCH_ARCHS = ("llava-1.5-7b", "qwen2-vl-7b", "tiny-llava", "tiny-qwen2vl")

# Qwen2-VL special tokens (Qwen2-VL-7B-Instruct tokenizer)
_QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def bench_config(name: str):
    """transformers config for one of BENCH_ARCHS (architectures set, so load/_from_config find the class)."""
    import transformers

    if name == "llava-1.5-7b":
        cfg = transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                               projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
            text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            image_token_index=32000, image_seq_length=576, projector_hidden_act="gelu",
            vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
            pad_token_id=32001)
        cfg.architectures = ["LlavaForConditionalGeneration"]
    elif name == "tiny-llava":
        cfg = transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                               projection_dim=64),
            text_config=dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=384,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0),
            image_token_index=500, image_seq_length=16, vision_feature_layer=-2,
            vision_feature_select_strategy="default", tie_word_embeddings=False, pad_token_id=0)
        cfg.architectures = ["LlavaForConditionalGeneration"]
    elif name == "qwen2-vl-7b":
        cfg = transformers.Qwen2VLConfig(
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                             rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                              "mrope_section": [16, 24, 24]}),
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16,
                               in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            tie_word_embeddings=False, **_QWEN_IDS)
        cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    elif name == "tiny-qwen2vl":
        cfg = transformers.Qwen2VLConfig(
            text_config=dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [8, 12, 12]}),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=128, mlp_ratio=2, num_heads=2, in_channels=3,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            tie_word_embeddings=False, image_token_id=500, video_token_id=501, vision_start_token_id=502,
            vision_end_token_id=503)
        cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    else:
        raise ValueError(f"unknown architecture {name!r}; choose one of {BENCH_ARCHS}")
    return cfg


def w4a16_shapes(config, fuse: bool = True, lm_head: bool = True) -> list[tuple[int, int]]:
    """The (N, K) weights the W4A16 kernel runs for a model: its quantised linears (QuantConfig's default
    selection, as `launch/convert.py` packs them), with q/k/v and gate/up concatenated when `fuse`
    (`--fuse-proj`) and the output head when `lm_head` (`--int4-lm-head`); distinct shapes, in model
    order. Built on the meta device: nothing is allocated. For `kernels.w4a16.sweep_decode --model`."""
    from grace_ds.export.fuse import GROUPS
    from grace_ds.export.load import build_empty_model, select_quant_layers

    model = build_empty_model(config)
    mods = dict(model.named_modules())
    names = select_quant_layers(model)
    if lm_head:
        head = model.get_output_embeddings()
        names += [n for n, m in mods.items() if m is head and n not in names]
    chosen, shapes = set(names), []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        m = mods[name]
        shape = (m.out_features, m.in_features)
        for members in GROUPS.values() if fuse else ():
            siblings = [f"{parent}.{x}" if parent else x for x in members]
            if leaf in members and all(s in chosen for s in siblings):
                if leaf != members[0]:
                    shape = None   # counted with the group's first member
                else:
                    shape = (sum(mods[s].out_features for s in siblings), m.in_features)
        if shape is not None and shape not in shapes:
            shapes.append(shape)
    return shapes


def family(config) -> str:
    mt = getattr(config, "model_type", "")
    if mt == "llava":
        return "llava"
    if mt in ("qwen2_vl", "qwen2_5_vl"):
        return mt
    raise ValueError(f"model_type {mt!r}: the benchmark prompt is implemented for llava, qwen2_vl and qwen2_5_vl")


def image_tokens_for(config, target: int = 576) -> tuple[int, object]:
    """(visual tokens, geometry) of the benchmark image: LLaVA's fixed CLIP resolution; for Qwen the
    square patch grid whose merged token count is closest to `target` (48x48 patches -> 576 tokens)."""
    fam = family(config)
    if fam == "llava":
        v = config.vision_config
        side = v.image_size // v.patch_size
        return side * side, v.image_size  # "default" strategy drops CLS: one token per patch
    m = config.vision_config.spatial_merge_size
    side = max(1, round(target ** 0.5)) * m
    return (side // m) ** 2, side


def make_prompt(config, batch: int, n_text: int = 64, n_visual: int = 576, device="cpu", dtype=torch.bfloat16,
                seed: int = 0) -> dict:
    """Model inputs: per row [one image (its visual tokens)] + n_text random text tokens; random pixels."""
    g = torch.Generator().manual_seed(seed)
    fam = family(config)
    vocab = config.get_text_config().vocab_size
    n_img, geom = image_tokens_for(config, n_visual)
    hi = min(vocab, 30000)
    text = torch.randint(3, hi, (batch, n_text), generator=g)
    if fam == "llava":
        img_id = config.image_token_index
        text[text == img_id] = 3
        ids = torch.cat([torch.full((batch, n_img), img_id), text], dim=1)
        pix = torch.randn(batch, 3, geom, geom, generator=g)
        out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix.to(dtype))
    else:
        special = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   config.vision_end_token_id}
        for s in special:
            text[text == s] = 3
        side = geom
        img = torch.full((batch, n_img), config.image_token_id)
        ids = torch.cat([torch.full((batch, 1), config.vision_start_token_id), img,
                         torch.full((batch, 1), config.vision_end_token_id), text], dim=1)
        v = config.vision_config
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        pix = torch.randn(batch * side * side, patch_dim, generator=g)
        out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix.to(dtype),
                   image_grid_thw=torch.tensor([[1, side, side]] * batch),
                   mm_token_type_ids=(ids == config.image_token_id).to(torch.int32))
    return {k: v.to(device) for k, v in out.items()}
