"""grace_ds.models.fast_paths: CPU RoPE position ids and batched vision attention are exact.

The reference is transformers' own code path, run in the same process on the same weights: the
model computing `position_ids` itself and the vision attention looping over images.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from grace_ds.models import GEOMETRY, build_tiny_preset, get_adapter, load_model, load_processor
from grace_ds.models import fast_paths
from grace_ds.models.fast_paths import RopeIndex, inputs_for, rope_signature

QWEN = {"qwen2_vl": "tiny-qwen2vl-student", "qwen2_5_vl": "tiny-qwen25vl-student", "qwen3_vl": "tiny-qwen3vl-student"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    return {fam: build_tiny_preset(name, root / name, seed=0) for fam, name in QWEN.items()}


def _batch(processor, family, images_per_row, sizes=None):
    side = GEOMETRY[family].image_size
    texts, flat = [], []
    for r, n in enumerate(images_per_row):
        content = [{"type": "image"}] * n + [{"type": "text", "text": f"What is in picture {r}?"}]
        msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]
        texts.append(processor.apply_chat_template(msgs, tokenize=False))
        for _ in range(n):
            h, w = sizes[len(flat)] if sizes else (side, side)
            flat.append(Image.fromarray(np.random.RandomState(len(flat)).randint(0, 255, (h, w, 3), dtype=np.uint8)))
    return dict(processor(text=texts, images=flat or None, return_tensors="pt", padding=True))


def _run(model, adapter, batch):
    model.zero_grad(set_to_none=True)
    hidden, pen = adapter.forward_hidden(model, batch)
    (hidden.square().mean() + pen.mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), pen.detach(), grads


@pytest.mark.parametrize("family", list(QWEN))
@pytest.mark.parametrize("mixed_sizes", [False, True])
def test_fast_paths_match_transformers(family, mixed_sizes, dirs):
    """Forward and every gradient equal the original path: one batch with rows of 1, 2 and 0 images
    and left/right padding; mixed image sizes exercise the per-image fallback."""
    torch.manual_seed(0)
    model = load_model(dirs[family], dtype=torch.float64)    # installs the vision patch
    assert family in fast_paths.install_batched_vision_attention()
    proc = load_processor(dirs[family])
    adapter = get_adapter(model)
    side = GEOMETRY[family].image_size
    # the tiny processors resize to a fixed pixel count: only another aspect ratio changes the grid
    sizes = [(side, side), (side, 2 * side), (side, side), (side, side)] if mixed_sizes else None
    batch = _batch(proc, family, (1, 2, 0, 1), sizes)
    grids = {tuple(g) for g in batch["image_grid_thw"].tolist()}
    assert len(grids) == (2 if mixed_sizes else 1), grids
    batch["pixel_values"] = batch["pixel_values"].double()

    fast = RopeIndex.for_config(model.config)({k: v.clone() for k, v in batch.items()})
    assert fast["position_ids"].shape == (3, *batch["input_ids"].shape)
    h1, p1, g1 = _run(model, adapter, fast)

    fast_paths.uninstall_batched_vision_attention()
    try:
        h0, p0, g0 = _run(model, adapter, batch)   # model computes position ids; loops over images
    finally:
        fast_paths.install_batched_vision_attention()
    torch.testing.assert_close(h1, h0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p1, p0, rtol=1e-10, atol=1e-10)
    assert g1.keys() == g0.keys() and any("visual" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("family", list(QWEN))
def test_rope_index_equals_model_and_pickles(family, dirs):
    model = load_model(dirs[family], dtype=torch.float32)
    proc = load_processor(dirs[family])
    batch = _batch(proc, family, (2, 1, 0))
    rope = pickle.loads(pickle.dumps(RopeIndex.for_config(model.config)))   # as a loader worker gets it
    got = rope(dict(batch))["position_ids"]
    want, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                         None, attention_mask=batch["attention_mask"])
    assert torch.equal(got, want)
    # text positions advance by the image's merged grid, not its token count: not just arange
    assert not torch.equal(got[0, 0], torch.arange(got.shape[-1]))


def test_position_ids_kept_only_for_the_same_rope(dirs):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(dirs["qwen2_vl"]))
    other = AutoConfig.from_pretrained(str(dirs["qwen2_vl"]))
    other.vision_config.spatial_merge_size = 1
    batch = {"input_ids": torch.zeros(1, 3), "position_ids": torch.zeros(3, 1, 3), "rope_signature": rope_signature(cfg)}
    assert "position_ids" in inputs_for(cfg, batch)
    assert "position_ids" not in inputs_for(other, batch)
    assert "position_ids" not in inputs_for(cfg, {**batch, "rope_signature": None})
    llava = AutoConfig.from_pretrained(str(build_tiny_preset("tiny-llava-student", dirs["qwen2_vl"].parent / "llava", seed=0)))
    assert RopeIndex.for_config(llava) is None


def test_fast_paths_can_be_turned_off(monkeypatch, dirs):
    from transformers import AutoConfig

    monkeypatch.setenv("GRACE_DS_FAST_PATHS", "0")
    assert RopeIndex.for_config(AutoConfig.from_pretrained(str(dirs["qwen2_vl"]))) is None


def test_gather_whole_layers_marks_each_repeated_block(dirs):
    from deepspeed.utils import z3_leaf_module

    from grace_ds.models.loading import gather_whole_layers

    model = load_model(dirs["qwen2_vl"], dtype=torch.float32)
    assert gather_whole_layers(model) == ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]
    leaves = [n for n, m in model.named_modules() if z3_leaf_module(m)]
    n_layers = model.config.text_config.num_hidden_layers + model.config.vision_config.depth
    assert len(leaves) == n_layers and all(".layers." in n or ".blocks." in n for n in leaves)
