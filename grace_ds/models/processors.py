"""Real Hugging Face processors for the tiny presets, built offline.

Nothing can be downloaded, yet the tests and the CPU demo must run the same code path as a real
Qwen2-VL or LLaVA checkpoint (chat template, image-token expansion, `image_grid_thw`,
`mm_token_type_ids`). So each family gets:

- a byte-level BPE tokenizer trained here with the `tokenizers` library (every string encodes, no
  UNK) on the synthetic benchmark's vocabulary, wrapped as `PreTrainedTokenizerFast` with the
  family's special tokens and its real chat template;
- the family's real image processor class, sized so one square image gives a small fixed grid;
- the family's real processor class, saved with `save_pretrained` and reloadable offline with
  `AutoProcessor.from_pretrained(dir)`.

Building is deterministic (fixed corpus order, single-threaded BPE trainer) and takes well under a
second, so presets can rebuild it rather than ship binary files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

# The BPE trainer is deterministic single-threaded; pin it before `tokenizers` spawns its pool.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")

# Cap on the trained vocabulary (256 bytes + merges), before special tokens. The benchmark's corpus
# is small, so BPE runs out of pairs first (about 720 tokens with grace_ds.data.synthetic's corpus):
# every benchmark word is then a single token and the tiny models' embeddings stay cheap.
BPE_VOCAB_SIZE = 2048


@dataclass(frozen=True)
class VisionGeometry:
    """How one image becomes visual tokens; shared by a family's teacher and student."""

    image_size: int          # pixels per side the image processor resizes to
    patch_size: int          # ViT patch side, pixels
    merge_size: int = 1      # Qwen's spatial merge (2x2 patches -> 1 token); 1 for LLaVA
    temporal_patch_size: int = 1

    @property
    def tokens_per_image(self) -> int:
        side = self.image_size // self.patch_size
        return side * side // (self.merge_size * self.merge_size)


# 112 px / 14 = 8x8 patches -> 16 merged tokens (Qwen2/2.5); Qwen3-VL's real patch is 16 so 128 px
# keeps the same 8x8 grid; LLaVA keeps one token per patch (CLS dropped) -> 64 tokens.
GEOMETRY: dict[str, VisionGeometry] = {
    "qwen2_vl": VisionGeometry(image_size=112, patch_size=14, merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": VisionGeometry(image_size=112, patch_size=14, merge_size=2, temporal_patch_size=2),
    "qwen3_vl": VisionGeometry(image_size=128, patch_size=16, merge_size=2, temporal_patch_size=2),
    "llava": VisionGeometry(image_size=112, patch_size=14),
}

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
LLAVA_SPECIAL_TOKENS_FRONT = ("<unk>", "<s>", "</s>")   # Llama's ids 0, 1, 2
LLAVA_SPECIAL_TOKENS_BACK = ("<image>", "<pad>")        # appended after the vocabulary, as in llava-hf

# Qwen2-VL-Instruct's chat template (verbatim from the released tokenizer_config.json); Qwen2.5-VL
# ships the same one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's template without the tool-calling / reasoning branches (no data here uses
# them): no default system prompt, otherwise the same message layout as Qwen2-VL.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5 (Vicuna v1 conversation): "USER: <image>\n... ASSISTANT: ...</s>". Images of a turn
# come first, as in llava-hf's template; assistant turns end with </s> as in the original training
# data (conv_vicuna_v1 sep2), so the model learns to stop.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] if c['type'] == 'image' or 'image' in c or 'image_url' in c %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Used only when grace_ds.data.synthetic is not importable. Byte-level BPE encodes any text either
# way; the corpus only decides which words become single tokens.
_BUILTIN_WORDS = """
circle square triangle star diamond hexagon pentagon cross heart ellipse rectangle ring arrow
red green blue yellow orange purple pink brown black white gray grey cyan magenta
small medium large big tiny huge
one two three four five six seven eight nine ten zero none
left right top bottom middle center upper lower corner above below next to beside near far
inside outside between behind front first second third last most least more fewer same different
how many what which where is are the a an of in on at to and or there colour color shape size
count position relation image picture object objects shape shapes
Question: Answer: Options: Answer with the option's letter from the given choices directly.
Answer the question using a single word or phrase.
A B C D E F A. B. C. D. E. F. (A) (B) (C) (D) (E) (F) yes no Yes No true false
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20
USER: ASSISTANT: You are a helpful assistant.
system
user
assistant
""".split("\n")


@functools.lru_cache(maxsize=1)
def tokenizer_corpus_lines() -> tuple[str, ...]:
    """The training corpus: the data package's benchmark vocabulary if present, else the built-in list.

    Cached per process: the data package generates its corpus (about a second) and every preset
    build needs it twice (training + fingerprint).
    """
    lines: list[str] = []
    try:
        from grace_ds.data.synthetic import tokenizer_corpus  # written by the data part

        lines = [str(s) for s in tokenizer_corpus()]
    except ImportError:
        lines = []
    if not lines:
        lines = [s for s in _BUILTIN_WORDS if s.strip()]
    # The chat templates' own words, whatever the data corpus holds.
    lines = lines + ["system", "user", "assistant", "You are a helpful assistant.", "USER:", "ASSISTANT:"]
    # Short entries (single words) also as " word" and "Word": byte-level BPE keeps the leading
    # space in the token, and mid-sentence words are what the model mostly sees.
    extra = []
    for s in lines:
        if len(s.split()) <= 2:
            extra.extend((" " + s, s.capitalize(), " " + s.capitalize()))
    return tuple(dict.fromkeys(lines + extra))   # de-duplicated, order kept (determinism)


def corpus_fingerprint() -> str:
    """Changes whenever the tokenizer would change; presets store it to detect stale caches."""
    h = hashlib.sha256()
    h.update(f"bpe={BPE_VOCAB_SIZE}".encode())
    for line in tokenizer_corpus_lines():
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def _train_bpe(special_front: tuple[str, ...], special_back: tuple[str, ...]):
    from tokenizers import Tokenizer

    # Training is the slow part of a preset build (about a second); every preset of a family
    # shares the same tokenizer, so train once per process and copy.
    return Tokenizer.from_str(_train_bpe_json(special_front, special_back, corpus_fingerprint()))


@functools.lru_cache(maxsize=4)
def _train_bpe_json(special_front: tuple[str, ...], special_back: tuple[str, ...], fingerprint: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if "<s>" in special_front:
        # Llama/LLaVA tokenizers prepend <s> to every encoded text (add_bos_token), chat or not.
        bos = special_front.index("<s>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE + len(special_front),
        min_frequency=1,
        special_tokens=list(special_front),   # front specials get ids 0..k-1 (Llama layout)
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = tokenizer_corpus_lines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    # Back specials get the ids after the trained vocabulary (Qwen's 151643+, llava-hf's 32000).
    tok.add_special_tokens(list(special_back))
    return tok.to_str()


def build_tokenizer(family: str):
    """A `PreTrainedTokenizerFast` with the family's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    _check_family(family)
    if family == "llava":
        raw = _train_bpe(LLAVA_SPECIAL_TOKENS_FRONT, LLAVA_SPECIAL_TOKENS_BACK)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>"},
            chat_template=LLAVA_CHAT_TEMPLATE,
            padding_side="right",
            model_max_length=4096,
        )
    else:
        raw = _train_bpe((), QWEN_SPECIAL_TOKENS)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens={
                "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
            },
            chat_template=QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_VL_CHAT_TEMPLATE,
            padding_side="right",
            model_max_length=4096,
        )
    return tok


def build_image_processor(family: str):
    """The family's real image processor class, sized so a square image gives a fixed small grid."""
    _check_family(family)
    g = GEOMETRY[family]
    if family == "llava":
        # As for Qwen: the default class is the torchvision backend; the PIL one gives the same output.
        if _has_torchvision():
            from transformers import CLIPImageProcessor as clip_cls
        else:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as clip_cls
        return _make_clip(clip_cls, g)
    cls = _qwen_image_processor_cls()
    pixels = g.image_size * g.image_size
    # min_pixels == max_pixels pins a square image to image_size^2; pass `size` explicitly because
    # the class mutates its class-level default dict when given min/max_pixels.
    kwargs = dict(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=g.patch_size, merge_size=g.merge_size, temporal_patch_size=g.temporal_patch_size,
    )
    if family == "qwen3_vl":   # Qwen3-VL normalises to [-1, 1]
        kwargs.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return cls(**kwargs)


def _make_clip(cls, g: VisionGeometry):
    return cls(
        size={"shortest_edge": g.image_size},
        crop_size={"height": g.image_size, "width": g.image_size},
        do_center_crop=True,
    )


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401

        return True
    except ImportError:
        return False


def _qwen_image_processor_cls():
    # transformers 5 has a torchvision backend (the default class) and a PIL one; the CPU venv has no
    # torchvision, so pick what works. Both produce identical outputs.
    if _has_torchvision():
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def build_processor(family: str, out_dir: str | os.PathLike | None = None):
    """The family's real processor (tokenizer + image processor + chat template), optionally saved.

    `family`: one of qwen2_vl, qwen2_5_vl, qwen3_vl, llava. With `out_dir`, the processor is saved
    there with `save_pretrained` and can be reloaded offline with `AutoProcessor.from_pretrained`.
    """
    _check_family(family)
    tok = build_tokenizer(family)
    img = build_image_processor(family)
    g = GEOMETRY[family]
    if family == "llava":
        from transformers import LlavaProcessor

        proc = LlavaProcessor(
            image_processor=img, tokenizer=tok, patch_size=g.patch_size,
            vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
            image_token="<image>", num_additional_image_tokens=1,   # CLIP's CLS, dropped by "default"
        )
    else:
        cls = _qwen_processor_cls(family)
        if _has_torchvision():
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

            video = Qwen2VLVideoProcessor(patch_size=g.patch_size, merge_size=g.merge_size,
                                          temporal_patch_size=g.temporal_patch_size)
            proc = cls(image_processor=img, tokenizer=tok, video_processor=video, chat_template=tok.chat_template)
        else:
            proc = cls(image_processor=img, tokenizer=tok, chat_template=tok.chat_template)
    if out_dir is not None:
        save_processor(proc, out_dir)
    return proc


def save_processor(processor, out_dir: str | os.PathLike) -> None:
    """`processor.save_pretrained(out_dir)` (the no-video variant records the real class name itself)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(out))


def _record_real_class_name(out: Path, variant: str, real: str) -> None:
    # The saved files must name the real processor class so AutoProcessor on a machine with
    # torchvision loads Qwen2VLProcessor & co; load_processor maps it back to the variant here.
    for f in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        fp = out / f
        if fp.exists():
            d = json.loads(fp.read_text())
            if d.get("processor_class") == variant:
                d["processor_class"] = real
                fp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


_NO_VIDEO_CLASSES: dict[str, type] = {}


def _qwen_processor_cls(family: str) -> type:
    """The family's processor class; without torchvision, a subclass with no video slot.

    transformers 5's video processors import torchvision at module level and the processor's
    constructor type-checks a video processor, so without torchvision no Qwen-VL processor (not
    even a downloaded one) can be built. The subclass drops only the video slot: text, chat
    template, image processing and image-token expansion are the parent's code, unchanged.
    """
    import transformers

    real_name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                 "qwen3_vl": "Qwen3VLProcessor"}[family]
    real = getattr(transformers, real_name)
    if _has_torchvision():
        return real
    if real_name not in _NO_VIDEO_CLASSES:
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # The parent passes video_processor=None positionally as a third argument;
            # ProcessorMixin zips args with get_attributes() (image_processor, tokenizer), so it
            # is dropped rather than type-checked.
            real.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                          video_processor=None, chat_template=chat_template, **kwargs)

        def save_pretrained(self, save_directory, *args, **kwargs):
            # Whoever saves it (preset build, the trainer's final export) writes the real class
            # name, so the directory loads with AutoProcessor wherever torchvision exists.
            out = real.save_pretrained(self, save_directory, *args, **kwargs)
            _record_real_class_name(Path(save_directory), type(self).__name__, real_name)
            return out

        _NO_VIDEO_CLASSES[real_name] = type(
            real_name + "NoVideo", (real,),
            {"__init__": __init__, "save_pretrained": save_pretrained, "_real_class_name": real_name,
             "__module__": __name__,
             "__doc__": f"{real_name} without its video processor (torchvision is not installed)."},
        )
    return _NO_VIDEO_CLASSES[real_name]


def load_processor(path: str | os.PathLike):
    """`AutoProcessor.from_pretrained(path)` offline, with a clear error when no processor is there."""
    from transformers import AutoProcessor

    p = Path(path)
    if p.is_dir() and not any((p / f).exists() for f in ("processor_config.json", "preprocessor_config.json",
                                                          "tokenizer_config.json")):
        raise FileNotFoundError(
            f"no processor files in {p} (expected preprocessor_config.json / tokenizer_config.json): "
            "save one with processor.save_pretrained(dir) or build a tiny preset with build_tiny_preset")
    if not _has_torchvision():
        family = _qwen_family_of_saved_processor(p)
        if family is not None:
            return _qwen_processor_cls(family).from_pretrained(str(path), local_files_only=True)
    return AutoProcessor.from_pretrained(str(path), local_files_only=True)


_QWEN_PROCESSOR_FAMILY = {"Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl",
                          "Qwen3VLProcessor": "qwen3_vl"}
_QWEN_PROCESSOR_FAMILY.update({k + "NoVideo": v for k, v in _QWEN_PROCESSOR_FAMILY.items()})


def _qwen_family_of_saved_processor(p: Path) -> str | None:
    """The Qwen family a saved processor belongs to, from whichever file records its class.

    transformers 5 writes processor_config.json; released checkpoints (Qwen2-VL-7B-Instruct & co)
    record "processor_class" in preprocessor_config.json / tokenizer_config.json instead.
    """
    for f in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        fp = p / f
        if fp.exists():
            try:
                name = json.loads(fp.read_text()).get("processor_class")
            except (json.JSONDecodeError, AttributeError):
                continue
            if name:
                return _QWEN_PROCESSOR_FAMILY.get(name)
    return None


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}: expected one of {', '.join(FAMILIES)}")
