"""Can this teacher be distilled into this student? Checked before any engine is built.

Token-level KD compares distributions over the same vocabulary and RCKA pairs the same visual
positions, so teacher and student must share: the tokenizer (token string <-> id on the real
vocabulary), the image token id, and the number of visual tokens per image. Embedding tables may be
padded to different sizes (Qwen2-VL-7B: 152064 rows, 2B: 151936, same tokenizer); losses then use
the first `shared_vocab` rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grace_ds.models.adapters import get_adapter


@dataclass(frozen=True)
class CompatReport:
    shared_vocab: int                  # real tokens both tokenizers share = logits columns to compare
                                       # (= the student's tokenizer length; the teacher may have more)
    teacher_vocab_size: int            # lm_head rows (padded)
    student_vocab_size: int
    image_token_id: int
    tokens_per_image: int              # visual tokens for the probe image, equal on both sides
    family_teacher: str
    family_student: str


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _probe(processor, adapter) -> dict:
    """The processor's output for one mid-grey probe image (the real expansion path)."""
    from PIL import Image

    ip = processor.image_processor
    size = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
    side = 224
    if isinstance(size, dict) and size.get("height"):
        side = int(size["height"])
    # A gradient, not a flat colour, so normalisation differences show up in the pixel values.
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    img = Image.fromarray(np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8))
    token = getattr(processor, "image_token", None)
    if token is None:
        raise ValueError(f"{type(processor).__name__} has no image_token: pass the model's multimodal processor")
    text = f"<|vision_start|>{token}<|vision_end|>" if adapter.family != "llava" else token
    enc = processor(text=[text], images=[img], return_tensors="pt")
    n = int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids(token)).sum())
    return {"tokens": n, "pixel_values": enc["pixel_values"], "grid": enc.get("image_grid_thw")}


def _check_processor_matches_model(side: str, processor, adapter, config) -> None:
    """The vision tower must accept what its processor produces (patch geometry)."""
    vc = config.vision_config
    ip = processor.image_processor
    if adapter.family == "llava":
        crop = getattr(ip, "crop_size", None) or {}
        got = crop.get("height") if isinstance(crop, dict) else None
        if got is not None and int(got) != int(vc.image_size):
            raise ValueError(f"{side} processor crops to {got} px but the vision tower expects {vc.image_size}: "
                             "use the model's own processor (crop_size = vision_config.image_size)")
        return
    for attr, cattr in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                        ("merge_size", "spatial_merge_size")):
        a, b = getattr(ip, attr, None), getattr(vc, cattr, None)
        if a is not None and b is not None and int(a) != int(b):
            raise ValueError(f"{side} processor {attr}={a} but vision_config.{cattr}={b}: use the model's own "
                             "processor (its preprocessor_config.json)")


def check_compatible(teacher_processor, student_processor, teacher_config, student_config) -> CompatReport:
    """A CompatReport, or ValueError naming both values and the fix."""
    ta, sa = get_adapter(teacher_config), get_adapter(student_config)
    t_tok, s_tok = teacher_processor.tokenizer, student_processor.tokenizer
    t_vocab = int(_text_config(teacher_config).vocab_size)
    s_vocab = int(_text_config(student_config).vocab_size)

    # 1. Same tokenizer on the shared real range: every id below min(len) must map to the same token.
    n_t, n_s = len(t_tok), len(s_tok)
    shared = min(n_t, n_s)
    t_map = {i: t for t, i in t_tok.get_vocab().items() if i < shared}
    s_map = {i: t for t, i in s_tok.get_vocab().items() if i < shared}
    diff = [i for i in range(shared) if t_map.get(i) != s_map.get(i)]
    if diff:
        i = diff[0]
        raise ValueError(
            f"teacher and student tokenizers differ: id {i} is {t_map.get(i)!r} for the teacher and "
            f"{s_map.get(i)!r} for the student ({len(diff)} of {shared} ids differ): distillation "
            "compares logits id by id, so both models must use the same tokenizer (same family and "
            "release, e.g. Qwen2-VL 7B -> 2B); retokenising across families is not supported")
    if n_s > n_t:
        # The loader tokenises with the student's processor: ids >= n_t would hit the teacher's
        # padding rows (or index past its embedding) and have no teacher distribution.
        raise ValueError(
            f"student tokenizer has {n_s} tokens, teacher only {n_t}: the student's extra tokens "
            f"(ids {n_t}..{n_s - 1}) have no teacher logits; use the teacher's tokenizer for the student "
            "or remove the added tokens (padded embedding rows are fine)")
    # A teacher with extra tokens at the end (n_t > n_s) is fine: the student's batch never contains
    # them, and the losses compare the first `shared` logits only.
    for side, n, v in (("teacher", n_t, t_vocab), ("student", n_s, s_vocab)):
        if v < n:
            raise ValueError(f"{side} vocab_size {v} < its tokenizer's {n} tokens: the checkpoint and tokenizer "
                             "do not belong together (resize the embeddings or use the matching tokenizer)")

    # 2. Same image token, known to the model configs and the processors alike.
    t_img, s_img = ta.image_token_id(teacher_config), sa.image_token_id(student_config)
    if t_img != s_img:
        raise ValueError(
            f"teacher image_token_id {t_img} != student {s_img}: visual positions would not line up; "
            "use a teacher and student of the same family whose configs use the same image token")
    for side, proc in (("teacher", teacher_processor), ("student", student_processor)):
        pid = getattr(proc, "image_token_id", None)
        if pid is None:
            pid = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
        if int(pid) != t_img:
            raise ValueError(f"{side} processor image token id {pid} != model config image_token_id {t_img}: "
                             "the processor does not belong to the model (save the model's own processor)")

    # 3. Same number of visual tokens per image (same patching / merge / resize) and the same pixel
    #    format: the loader runs ONE processor (the student's) and both models consume its batch.
    for side, proc, ad, cfg in (("teacher", teacher_processor, ta, teacher_config),
                                ("student", student_processor, sa, student_config)):
        _check_processor_matches_model(side, proc, ad, cfg)
    tp, sp = _probe(teacher_processor, ta), _probe(student_processor, sa)
    t_n, s_n = tp["tokens"], sp["tokens"]
    if t_n != s_n:
        raise ValueError(
            f"teacher emits {t_n} visual tokens per probe image, student {s_n}: RCKA pairs visual "
            "positions one to one; use the same image processor settings (size / min_pixels / max_pixels, "
            "patch and merge size) for both, e.g. the student's processor for both models")
    for side, ad, cfg in (("teacher", ta, teacher_config), ("student", sa, student_config)):
        fixed = ad.tokens_per_image(cfg)
        if fixed is not None and fixed != t_n:
            raise ValueError(f"{side} model expects {fixed} image tokens per image but its processor emits "
                             f"{t_n}: set the processor's image size / patch_size to match the vision tower")
    tpv, spv = tp["pixel_values"], sp["pixel_values"]
    if tpv.shape != spv.shape or not np.allclose(tpv.numpy(), spv.numpy(), atol=1e-4):
        what = (f"shape {tuple(tpv.shape)} vs {tuple(spv.shape)}" if tpv.shape != spv.shape
                else f"max difference {float((tpv - spv).abs().max()):.3g} (normalisation differs)")
        raise ValueError(
            f"teacher and student image processors produce different pixel_values for the same image "
            f"({what}): the loader builds each batch once with the student's processor, so both vision "
            "towers must take the same pixel format (same family's patching and image_mean/std)")

    return CompatReport(shared_vocab=shared, teacher_vocab_size=t_vocab, student_vocab_size=s_vocab,
                        image_token_id=t_img, tokens_per_image=t_n, family_teacher=ta.family,
                        family_student=sa.family)
