"""Shard samples -> evaluation items (chat messages, reference answer, options, question type).

Everything the scorer needs comes from the conversation text, so converted real benchmarks
(ScienceQA-IMG, MMBench via grace_ds.data.convert) work without synthetic metadata; the sample's
`meta` only adds the question type (and an options list when the text has none).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from grace_ds.eval.scoring import LETTERS, Option, parse_options, reference_letter

IMAGE_TAG = "<image>"
# Meta keys that name the question type, in order of preference (synthetic set, MMBench, ScienceQA).
TYPE_KEYS = ("question_type", "qtype", "type", "task", "category", "subject")


@dataclass
class EvalItem:
    key: str
    messages: list[dict]          # chat messages up to (not including) the scored assistant turn
    images: list                  # PIL images, in order
    reference: str                # the scored assistant turn's text
    options: list[Option] = field(default_factory=list)
    answer_letter: str | None = None   # set for multiple-choice items
    qtype: str = "unknown"

    @property
    def kind(self) -> str:
        return "mc" if self.answer_letter is not None else "open"


def _user_content(text: str, n_images: int) -> list[dict]:
    # Images first, then the text without its <image> tags: what LLaVA-style data means by the tag
    # and what the families' chat templates render.
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    clean = text.replace(IMAGE_TAG, "").strip()
    content.append({"type": "text", "text": clean})
    return content


def record_to_item(key: str, record: dict, images: list) -> EvalItem:
    """Build an EvalItem from a shard record; raises ValueError naming the key when unusable."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"sample {key!r}: no conversation turns")
    last_gpt = max((i for i, t in enumerate(conv) if t.get("from") == "gpt"), default=None)
    if last_gpt is None:
        raise ValueError(f"sample {key!r}: no assistant ('gpt') turn to score")
    messages = []
    for turn in conv[:last_gpt]:
        text = turn.get("value", "")
        if turn.get("from") == "human":
            messages.append({"role": "user", "content": _user_content(text, text.count(IMAGE_TAG))})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"sample {key!r}: the scored assistant turn does not follow a user turn")
    n_tags = sum(t.get("value", "").count(IMAGE_TAG) for t in conv[:last_gpt])
    if n_tags != len(images):
        raise ValueError(f"sample {key!r}: {n_tags} <image> tags but {len(images)} images")
    reference = conv[last_gpt]["value"].strip()
    question = conv[last_gpt - 1]["value"]
    meta = record.get("meta") or {}
    options = parse_options(question)
    if not options and isinstance(meta.get("options"), list) and len(meta["options"]) >= 2:
        options = [Option(LETTERS[i], str(t)) for i, t in enumerate(meta["options"])]
    letter = reference_letter(reference, options) if options else None
    if options and letter is None and isinstance(meta.get("answer_letter"), str):
        letter = meta["answer_letter"] if meta["answer_letter"] in {o.letter for o in options} else None
    qtype = next((str(meta[k]) for k in TYPE_KEYS if meta.get(k) not in (None, "")), None)
    if qtype is None:
        qtype = "multiple_choice" if letter is not None else "open"
    return EvalItem(key, messages, images, reference, options if letter else [], letter, qtype)


def _decode_image(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def iter_items(shard_dir: str | os.PathLike, max_samples: int | None = None,
               skipped: dict | None = None) -> Iterator[EvalItem]:
    """Items of a shard directory in manifest order. Unusable samples are counted in `skipped`."""
    from grace_ds.data.format import image_index, iter_tar_samples, read_manifest

    manifest = read_manifest(shard_dir)
    n = 0
    for path in manifest.shard_paths():
        for key, members in iter_tar_samples(path):
            if max_samples is not None and n >= max_samples:
                return
            try:
                if "json" not in members:
                    raise ValueError(f"sample {key!r}: no .json member")
                record = json.loads(members["json"].decode("utf-8"))
                imgs = sorted((image_index(s), s) for s in members if image_index(s) is not None)
                images = [_decode_image(members[s]) for _, s in imgs]
                item = record_to_item(key, record, images)
            except Exception as e:   # counted and reported, never silently dropped
                if skipped is None:
                    raise
                reason = type(e).__name__
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            n += 1
            yield item


def count_items(shard_dir: str | os.PathLike, max_samples: int | None = None) -> int:
    from grace_ds.data.format import read_manifest

    total = read_manifest(Path(shard_dir)).total
    return min(total, max_samples) if max_samples is not None else total
