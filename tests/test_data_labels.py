"""Assistant-only labels on every family's real processor; image tokens never cut."""

import pytest
import torch
from PIL import Image

from grace_ds.data.labels import IGNORE_INDEX, SkipSample, build_example, conversation_to_messages
from grace_ds.models.processors import build_processor

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")

# What each family's real template closes an assistant turn with (written out per family on
# purpose: the implementation has no template-specific code, the test pins the outcome).
EXPECTED_SUPERVISED = {
    "qwen2_vl": "red<|im_end|>\nB<|im_end|>\n",
    "qwen2_5_vl": "red<|im_end|>\nB<|im_end|>\n",
    "qwen3_vl": "red<|im_end|>\nB<|im_end|>\n",
    "llava": " red</s> B</s>",
}

CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the star?\nAnswer the question using a single word or phrase."},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "<image>\nHow many circles are there in the image?\nOptions:\nA. 2\nB. 3\n"
                               "Answer with the option's letter from the given choices directly."},
    {"from": "gpt", "value": "B"},
]


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (224, 224), (200, 30, 30)), Image.new("RGB", (300, 200), (30, 30, 200))]


@pytest.mark.parametrize("family", FAMILIES)
def test_only_assistant_tokens_supervised(family, images):
    proc = build_processor(family)
    ex = build_example(proc, CONV, images)
    ids, labels = ex["input_ids"][0], ex["labels"][0]
    assert labels.shape == ids.shape
    sup = labels != IGNORE_INDEX
    assert torch.equal(labels[sup], ids[sup])        # supervised labels are the tokens themselves
    assert proc.tokenizer.decode(ids[sup]) == EXPECTED_SUPERVISED[family]
    # two contiguous supervised runs, one per assistant turn
    starts = (sup[1:] & ~sup[:-1]).sum() + int(sup[0])
    assert int(starts) == 2
    # image tokens: as many as the processor alone makes, never supervised
    img = proc.image_token_id
    plain = proc(text=[proc.apply_chat_template(conversation_to_messages(CONV), tokenize=False)],
                 images=images, return_tensors="pt")
    assert torch.equal(plain["input_ids"][0], ids)
    assert int((ids == img).sum()) == int((plain["input_ids"][0] == img).sum()) > 2
    assert not sup[ids == img].any()
    for k, v in plain.items():
        assert torch.equal(v, ex[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_max_length_never_cuts_image_tokens(family, images):
    proc = build_processor(family)
    full = build_example(proc, CONV, images)
    ids = full["input_ids"][0]
    img_pos = (ids == proc.image_token_id).nonzero().flatten()
    last = int(img_pos[-1])
    with pytest.raises(SkipSample) as e:
        build_example(proc, CONV, images, max_length=last)          # would cut the last image
    assert e.value.reason == "image_tokens_exceed_max_length"
    # a length past the images but before the 2nd answer: the text is cut, the images stay whole
    first_answer_end = int((full["labels"][0] != IGNORE_INDEX).nonzero()[0]) + 1
    if first_answer_end <= last:
        cut = build_example(proc, CONV, images, max_length=last + 2)
        n = cut["input_ids"].shape[1]
        assert n == last + 2
        assert int((cut["input_ids"][0] == proc.image_token_id).sum()) == len(img_pos)
        for k, v in cut.items():
            if v.dim() == 2 and v.shape[0] == 1 and k != "image_grid_thw":
                assert v.shape[1] == n, k
        assert torch.equal(cut["input_ids"][0], ids[:n]) and torch.equal(cut["labels"][0], full["labels"][0][:n])
    # no room for any answer token at all -> skipped, not trained on an unsupervised sample
    one_turn = CONV[:2]
    ex = build_example(proc, one_turn, images[:1])
    first_sup = int((ex["labels"][0] != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(SkipSample) as e:
        build_example(proc, one_turn, images[:1], max_length=first_sup)
    assert e.value.reason in ("no_supervised_tokens", "image_tokens_exceed_max_length")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_text_only_and_image_mid_text(family, images):
    proc = build_processor(family)
    ex = build_example(proc, [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}], [])
    sup = ex["labels"][0] != IGNORE_INDEX
    assert proc.tokenizer.decode(ex["input_ids"][0][sup]).strip().startswith("Hi.")
    assert "pixel_values" not in ex or ex["pixel_values"].numel() == 0
    conv = [{"from": "human", "value": "Look: <image> and <image>. Same?"}, {"from": "gpt", "value": "No."}]
    ex = build_example(proc, conv, images)
    sup = ex["labels"][0] != IGNORE_INDEX
    assert "No." in proc.tokenizer.decode(ex["input_ids"][0][sup])
    msgs = conversation_to_messages(conv)
    assert [c["type"] for c in msgs[0]["content"]] == ["text", "image", "text", "image", "text"]


def test_processor_rejection_becomes_a_counted_skip():
    proc = build_processor("qwen2_vl")
    with pytest.raises(SkipSample) as e:      # Qwen's smart_resize refuses a 1000:1 aspect ratio
        build_example(proc, CONV[:2], [Image.new("RGB", (2000, 2), (0, 0, 0))])
    assert e.value.reason == "processor_error" and "ValueError" in str(e.value)
