"""Assistant-only labels for any family's chat template, aligned with the processor's expanded ids.

No template-specific code: for assistant turn i the chat template renders
  prefix_i = template(messages[:i], add_generation_prompt=True)
  full_i   = template(messages[:i+1])
and the characters full_i[len(prefix_i):] (the answer plus whatever the template closes a turn
with: "<|im_end|>\n" for Qwen, "</s>" for LLaVA) are supervised; everything else is -100. This
needs only that the template renders a conversation prefix as a text prefix, which is checked.

The processor replaces each image placeholder by N image tokens. Labels are computed on the
unexpanded token sequence (the tokenizer's offsets map characters to tokens) and then carried over
to the expanded ids by walking both sequences: outside image-token runs they are identical (image
tokens are special tokens, so they split the text the same way in both).

Max-length policy: image tokens are never cut. A sample whose last image token does not fit in
max_length is skipped (reason "image_tokens_exceed_max_length"); otherwise only text after the last
image is truncated, and a sample left with no supervised token is skipped too.
"""

from __future__ import annotations

import re

import torch

from grace_ds.data.format import GPT, IMAGE_TAG

IGNORE_INDEX = -100


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter key in loader stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TemplateError(ValueError):
    """The chat template does not render a conversation prefix as a text prefix."""


def conversation_to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from": human|gpt, "value"} with <image> tags) -> HF chat messages with
    {"type": "image"} items at the tags' places. Newlines next to a tag are dropped: templates put
    their own separator after the image (LLaVA: "<image>\\n"), as LLaVA's own preprocessing does."""
    msgs = []
    for turn in conversations:
        role = "assistant" if turn["from"] == GPT else "user"
        if role == "assistant":
            msgs.append({"role": role, "content": [{"type": "text", "text": turn["value"]}]})
            continue
        parts = turn["value"].split(IMAGE_TAG)
        content: list[dict] = []
        for k, part in enumerate(parts):
            if k > 0:
                content.append({"type": "image"})
            text = part
            if k > 0:
                text = re.sub(r"^\n+", "", text)
            if k < len(parts) - 1:
                text = re.sub(r"\n+$", "", text)
            if text:
                content.append({"type": "text", "text": text})
        msgs.append({"role": role, "content": content})
    return msgs


def _render(processor, messages, add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def supervised_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the [start, end) character spans of every assistant turn."""
    text = _render(processor, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        pre = _render(processor, messages[:i], True)
        full = _render(processor, messages[: i + 1], False)
        if not full.startswith(pre) or not text.startswith(full):
            raise TemplateError(
                f"chat template of {type(processor).__name__} does not render conversation prefixes as "
                f"text prefixes (turn {i}: prefix {pre[-40:]!r} vs full {full[len(pre) - 40:len(pre) + 20]!r}); "
                f"label masking needs that property"
            )
        if len(full) > len(pre):
            spans.append((len(pre), len(full)))
    return text, spans


def image_token_id(processor) -> int:
    tid = getattr(processor, "image_token_id", None)
    if tid is None:
        tok = getattr(processor, "image_token", None)
        if tok is None:
            raise ValueError(f"{type(processor).__name__} has neither image_token_id nor image_token")
        tid = processor.tokenizer.convert_tokens_to_ids(tok)
    return int(tid)


def _expand_labels(u_ids: list[int], u_labels: list[int], e_ids: list[int], img: int) -> list[int]:
    """Carry labels from the unexpanded ids to the processor's expanded ids (image runs -> -100)."""
    out = [IGNORE_INDEX] * len(e_ids)
    i = 0
    for j, tok in enumerate(u_ids):
        if tok == img:
            if i < len(e_ids) and e_ids[i] == img:
                while i < len(e_ids) and e_ids[i] == img:
                    i += 1
                continue
            if j > 0 and u_ids[j - 1] == img:
                continue   # adjacent placeholders: their runs merged into the one just consumed
            raise ValueError(f"label alignment: expected image tokens at expanded position {i}")
        if i >= len(e_ids) or e_ids[i] != tok:
            got = e_ids[i] if i < len(e_ids) else None
            raise ValueError(f"label alignment: token {tok} at {j} != expanded {got} at {i}; "
                             f"the processor changed text tokens, not only image placeholders")
        out[i] = u_labels[j]
        i += 1
    if i != len(e_ids):
        raise ValueError(f"label alignment: {len(e_ids) - i} expanded tokens left over")
    return out


def build_example(processor, conversations: list[dict], images: list, max_length: int | None = None) -> dict:
    """Processor outputs for one sample (batch dim 1) plus ``labels``; raises SkipSample."""
    messages = conversation_to_messages(conversations)
    text, spans = supervised_spans(processor, messages)
    if not spans:
        raise SkipSample("no_assistant_turn")
    try:
        enc = processor(text=[text], images=images or None, return_tensors="pt")
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        # e.g. Qwen's smart_resize rejects images under 28 px or with aspect ratio > 200
        raise SkipSample("processor_error", f"{type(e).__name__}: {e}") from None
    tok = processor.tokenizer
    u = tok(text, return_offsets_mapping=True)
    u_ids, offsets = u["input_ids"], u["offset_mapping"]
    u_labels = [IGNORE_INDEX] * len(u_ids)
    for j, (a, b) in enumerate(offsets):
        if b > a and any(a < e and b > s for s, e in spans):   # any overlap with an assistant span
            u_labels[j] = u_ids[j]
    img = image_token_id(processor)
    e_ids = enc["input_ids"][0].tolist()
    labels = torch.tensor([_expand_labels(u_ids, u_labels, e_ids, img)], dtype=torch.long)
    out = dict(enc)
    out["labels"] = labels
    seq_len = len(e_ids)
    if max_length is not None and seq_len > max_length:
        pos = (enc["input_ids"][0] == img).nonzero()
        last_img = int(pos[-1]) if len(pos) else -1
        if last_img >= max_length:
            raise SkipSample("image_tokens_exceed_max_length",
                             f"last image token at {last_img} >= max_length {max_length}")
        shape = enc["input_ids"].shape
        for k, v in list(out.items()):
            if isinstance(v, torch.Tensor) and v.shape == shape:
                out[k] = v[:, :max_length]
    if not (out["labels"] != IGNORE_INDEX).any():
        raise SkipSample("no_supervised_tokens", "all assistant tokens fall beyond max_length")
    return out
