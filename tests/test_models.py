"""grace_ds.models: offline processors, tiny presets, adapters, compatibility, ZeRO-3 loading.

Everything runs on real transformers classes built from the tiny presets; the references for
forward_hidden are the HF model's own `output_hidden_states` / logits.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

from grace_ds.models import (
    GEOMETRY,
    TINY_PRESETS,
    build_processor,
    build_tiny_preset,
    check_compatible,
    ensure_preset,
    get_adapter,
    load_model,
    load_processor,
)
from grace_ds.models.presets import padded_vocab_size

FAMILY_PRESETS = {
    "qwen2_vl": ("tiny-qwen2vl-teacher", "tiny-qwen2vl-student"),
    "qwen2_5_vl": ("tiny-qwen25vl-teacher", "tiny-qwen25vl-student"),
    "qwen3_vl": ("tiny-qwen3vl-teacher", "tiny-qwen3vl-student"),
    "llava": ("tiny-llava-teacher", "tiny-llava-student"),
}
QUESTION = ("How many red circles are there?\nOptions:\nA. 2\nB. 3\n"
            "Answer with the option's letter from the given choices directly.")


@pytest.fixture(scope="module")
def preset_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {name: build_tiny_preset(name, root / name, seed=0) for name in TINY_PRESETS}


def _image(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8))


def _messages(n_images: int = 1, answer: str | None = "B"):
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": QUESTION}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def _batch(processor, family, images_per_row=(1, 1, 2, 0)):
    size = GEOMETRY[family].image_size
    texts, images, k = [], [], 0
    for n in images_per_row:
        texts.append(processor.apply_chat_template(_messages(n), tokenize=False))
        images.append([_image(k + i, size) for i in range(n)])
        k += n
    flat = [im for row in images for im in row]
    batch = processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].clone()   # adapters must ignore keys the model does not take
    return dict(batch)


# -- processors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_processor_round_trip(family, tmp_path):
    proc = build_processor(family, tmp_path / "p")
    again = load_processor(tmp_path / "p")
    assert type(again).__name__.startswith(type(proc).__name__.replace("NoVideo", ""))
    tok = again.tokenizer
    assert tok.get_vocab() == proc.tokenizer.get_vocab()
    # Saved files name the real class, so AutoProcessor resolves the family's processor elsewhere.
    saved = json.loads((tmp_path / "p" / "processor_config.json").read_text())
    real = {"llava": "LlavaProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
            "qwen3_vl": "Qwen3VLProcessor"}[family]
    assert saved["processor_class"] == real
    # ... also when the loaded processor is saved again (the trainer's final export does that).
    again.save_pretrained(str(tmp_path / "re"))
    assert json.loads((tmp_path / "re" / "processor_config.json").read_text())["processor_class"] == real
    assert json.loads((tmp_path / "re" / "tokenizer_config.json").read_text()).get("processor_class", real) == real

    # Byte-level BPE: any text (unseen words, unicode) round-trips with no unknown token.
    text = "Zebra quokka ünïcödé 42 ✓ Answer with the option's letter"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    # The benchmark's words are single tokens (the corpus did its job).
    assert len(tok(" circle", add_special_tokens=False)["input_ids"]) == 1

    rendered = again.apply_chat_template(_messages(1), tokenize=False)
    if family == "llava":
        assert rendered == f"USER: <image>\n{QUESTION} ASSISTANT: B</s>"
    else:
        start = "" if family == "qwen3_vl" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        assert rendered == (f"{start}<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}"
                            "<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n")
    gen = again.apply_chat_template(_messages(1, answer=None), tokenize=False, add_generation_prompt=True)
    assert gen.endswith("ASSISTANT:" if family == "llava" else "<|im_start|>assistant\n")

    g = GEOMETRY[family]
    enc = again(text=[rendered], images=[_image(0, g.image_size)], return_tensors="pt")
    image_id = tok.convert_tokens_to_ids(again.image_token)
    assert int((enc["input_ids"] == image_id).sum()) == g.tokens_per_image
    assert g.tokens_per_image == (16 if family != "llava" else 64)
    if family == "llava":
        assert enc["input_ids"][0, 0].item() == tok.bos_token_id
        assert tuple(enc["pixel_values"].shape) == (1, 3, g.image_size, g.image_size)
    else:
        assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
        assert (enc["mm_token_type_ids"] == (enc["input_ids"] == image_id)).all()


def test_load_processor_released_checkpoint_layout(tmp_path):
    """Released Qwen2-VL checkpoints keep the processor class in preprocessor_config.json (no
    processor_config.json); load_processor must still give the family's processor."""
    proc = build_processor("qwen2_vl")
    proc.image_processor.save_pretrained(tmp_path)
    proc.tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg["processor_class"] = "Qwen2VLProcessor"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert not (tmp_path / "processor_config.json").exists()
    again = load_processor(tmp_path)
    assert type(again).__name__.startswith("Qwen2VLProcessor")
    enc = again(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[_image(0, 112)], return_tensors="pt")
    assert int((enc["input_ids"] == again.image_token_id).sum()) == 16
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no processor files"):
        load_processor(empty)


def test_tokenizer_training_is_deterministic_across_processes():
    import hashlib
    import subprocess
    import sys

    from grace_ds.models import processors

    # Teacher and student presets are often built by different processes (a cached teacher, a fresh
    # student): the trained tokenizer must be identical across processes, not only within one.
    code = ("from grace_ds.models.processors import _train_bpe_json, QWEN_SPECIAL_TOKENS, corpus_fingerprint; "
            "import hashlib; print(hashlib.sha256(_train_bpe_json((), QWEN_SPECIAL_TOKENS, "
            "corpus_fingerprint()).encode()).hexdigest())")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120,
                         capture_output=True, text=True).stdout.split()[-1]
    processors._train_bpe_json.cache_clear()
    here = processors._train_bpe_json((), processors.QWEN_SPECIAL_TOKENS, processors.corpus_fingerprint())
    assert hashlib.sha256(here.encode()).hexdigest() == out


# -- presets + adapters ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_preset_reload_and_forward_hidden(family, preset_dirs):
    from transformers import AutoModelForImageTextToText

    teacher_name, student_name = FAMILY_PRESETS[family]
    d = preset_dirs[student_name]
    model = AutoModelForImageTextToText.from_pretrained(str(d), local_files_only=True).eval()
    assert model.config.model_type == family
    proc = load_processor(d)
    adapter = get_adapter(model)
    assert adapter.family == family

    # Padded vocabularies: student to a multiple of 64, teacher 64 rows more (docs in presets.py).
    n_tok = len(proc.tokenizer)
    text_cfg = getattr(model.config, "text_config", model.config)
    assert text_cfg.vocab_size == padded_vocab_size(n_tok, "student") >= n_tok
    assert adapter.lm_head(model).weight.shape[0] == text_cfg.vocab_size
    # Every quantised linear of the student has in_features divisible by the group size 128.
    import re

    qlinears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                and any(re.search(p, n) for p in adapter.quant_include)]
    assert len(qlinears) == 7 * len(adapter.decoder_layers(model))
    assert all(m.in_features % 128 == 0 for _, m in qlinears)
    vision_names = {id(p) for v in adapter.vision_modules(model) for p in v.parameters()}
    assert vision_names and not any(id(m.weight) in vision_names for _, m in qlinears)

    batch = _batch(proc, family)
    with torch.no_grad():
        ref = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    # transformers installs its own output-recording hooks on first use; ours must come and go.
    n_hooks = sum(len(layer._forward_hooks) for layer in adapter.decoder_layers(model))
    # forward_hidden must not keep every layer's output even when the config asks for it (memory).
    # (transformers reads the flag from the text config's copy, which the decoder holds)
    flag_cfgs = {id(c): c for c in (model.config, getattr(model.config, "text_config", model.config),
                                     adapter.language_model(model).config)}.values()
    for c in flag_cfgs:
        c.output_hidden_states = True
    seen = []
    spy = model.model.register_forward_hook(lambda m, a, out: seen.append(getattr(out, "hidden_states", 0)))
    with torch.no_grad():
        final, penult = adapter.forward_hidden(model, batch)
    spy.remove()
    for c in flag_cfgs:
        c.output_hidden_states = False
    assert seen == [None]
    torch.testing.assert_close(final, ref.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(penult, ref.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(adapter.lm_head(model)(final), ref.logits, rtol=1e-5, atol=1e-5)
    assert sum(len(layer._forward_hooks) for layer in adapter.decoder_layers(model)) == n_hooks, "hook leaked"

    # Visual positions: per image in order, with the right count, exactly the image tokens.
    pos = adapter.visual_positions(batch["input_ids"])
    assert [row for row, _ in pos] == [0, 1, 2, 2]
    per = GEOMETRY[family].tokens_per_image
    assert all(p.numel() == per for _, p in pos)
    assert pos[2][1][-1] < pos[3][1][0]
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, p in pos:
        mask[row, p] = True
    assert torch.equal(mask, batch["input_ids"] == adapter.image_token_id())

    # Gradients flow through the penultimate capture (RCKA trains on it).
    model.train()
    final, penult = adapter.forward_hidden(model, batch)
    (final.square().mean() + penult.square().mean()).backward()
    assert adapter.decoder_layers(model)[0].mlp.down_proj.weight.grad is not None


def test_visual_positions_split_adjacent_images():
    from grace_ds.models.adapters import LlavaAdapter, Qwen2VLAdapter
    from grace_ds.models.presets import make_config

    proc = build_processor("llava")
    cfg = make_config("tiny-llava-student", proc)
    ad = LlavaAdapter(cfg)
    img = ad.image_token_id()
    row = torch.tensor([1, 5] + [img] * 128 + [7, 8] + [img] * 64 + [2])
    pos = ad.visual_positions(torch.stack([row, row.flip(0)]))
    assert [(r, int(p[0]), p.numel()) for r, p in pos] == [
        (0, 2, 64), (0, 66, 64), (0, 132, 64), (1, 1, 64), (1, 67, 64), (1, 131, 64)]
    with pytest.raises(ValueError, match="not a multiple of the 64 tokens per image"):
        ad.visual_positions(torch.tensor([[1] + [img] * 63 + [2]]))

    qproc = build_processor("qwen2_vl")
    qad = Qwen2VLAdapter(make_config("tiny-qwen2vl-student", qproc))
    t = qproc.tokenizer
    vs, ve, pad = (t.convert_tokens_to_ids(x) for x in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
    ids = torch.tensor([[vs] + [pad] * 16 + [ve, vs] + [pad] * 4 + [ve, 9]])
    assert [(int(p[0]), p.numel()) for _, p in qad.visual_positions(ids)] == [(1, 16), (19, 4)]


def test_forward_hidden_with_activation_checkpointing(preset_dirs):
    """The recompute in backward re-runs the hooked layer; the captured tensor must stay the
    forward one and gradients must match the plain run."""
    from transformers import AutoModelForImageTextToText

    d = preset_dirs["tiny-qwen2vl-student"]
    proc = load_processor(d)
    batch = _batch(proc, "qwen2_vl", images_per_row=(1, 2))
    grads = []
    for ckpt in (False, True):
        model = AutoModelForImageTextToText.from_pretrained(str(d), local_files_only=True)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        adapter = get_adapter(model)
        final, penult = adapter.forward_hidden(model, batch)
        (final.square().mean() + penult.square().mean()).backward()
        grads.append((final.detach(), penult.detach(),
                      adapter.decoder_layers(model)[0].self_attn.q_proj.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -- compatibility ------------------------------------------------------------------------------

def _load_pair(preset_dirs, teacher, student):
    from transformers import AutoConfig

    return (load_processor(preset_dirs[teacher]), load_processor(preset_dirs[student]),
            AutoConfig.from_pretrained(preset_dirs[teacher]), AutoConfig.from_pretrained(preset_dirs[student]))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_compat_ok_with_padded_vocab(family, preset_dirs):
    tp, sp, tc, sc = _load_pair(preset_dirs, *FAMILY_PRESETS[family])
    rep = check_compatible(tp, sp, tc, sc)
    assert rep.shared_vocab == len(sp.tokenizer)
    assert rep.teacher_vocab_size == rep.student_vocab_size + 64 > rep.shared_vocab
    assert rep.tokens_per_image == GEOMETRY[family].tokens_per_image
    assert rep.image_token_id == sc.image_token_id if family != "llava" else sc.image_token_index


def test_compat_errors_name_both_values(preset_dirs):
    tp, sp, tc, sc = _load_pair(preset_dirs, *FAMILY_PRESETS["qwen2_vl"])

    # Different tokenizer (a LLaVA one with the same id range).
    lp, _, lc, _ = _load_pair(preset_dirs, *FAMILY_PRESETS["llava"])
    with pytest.raises(ValueError, match=r"tokenizers differ: id 0 is .* for the teacher and .* for the student"):
        check_compatible(tp, lp, tc, lc)

    # Extra tokens: at the teacher's end they are harmless (shared range = the student's tokens),
    # at the student's end they have no teacher logits.
    tp_extra = load_processor(preset_dirs["tiny-qwen2vl-teacher"])
    tp_extra.tokenizer.add_tokens(["<extra_teacher_tok>"])
    assert check_compatible(tp_extra, sp, tc, sc).shared_vocab == len(sp.tokenizer) == len(tp_extra.tokenizer) - 1
    with pytest.raises(ValueError, match=rf"student tokenizer has {len(sp.tokenizer) + 1} tokens, teacher only "
                                         rf"{len(sp.tokenizer)}"):
        check_compatible(sp, tp_extra, sc, tc)

    # Different image token id in the student's config.
    bad = copy.deepcopy(sc)
    bad.image_token_id = sc.image_token_id - 1
    with pytest.raises(ValueError, match=f"teacher image_token_id {tc.image_token_id} != student {bad.image_token_id}"):
        check_compatible(tp, sp, tc, bad)

    # Different visual tokens per image: the student's processor resizes to 224 px -> 64 tokens.
    big = load_processor(preset_dirs["tiny-qwen2vl-student"])
    big.image_processor.size = {"shortest_edge": 224 * 224, "longest_edge": 224 * 224}
    with pytest.raises(ValueError, match="teacher emits 16 visual tokens per probe image, student 64"):
        check_compatible(tp, big, tc, sc)


def test_compat_across_qwen_families(preset_dirs):
    # Qwen2-VL and Qwen2.5-VL share tokenizer and pixel format: distillable across the two.
    tp, _, tc, _ = _load_pair(preset_dirs, *FAMILY_PRESETS["qwen2_vl"])
    _, sp, _, sc = _load_pair(preset_dirs, *FAMILY_PRESETS["qwen2_5_vl"])
    assert check_compatible(tp, sp, tc, sc).tokens_per_image == 16
    # Qwen3-VL: same tokenizer and token count, but 16 px patches with [-1, 1] normalisation; the
    # student's batch would not fit the Qwen2-VL vision tower.
    _, sp3, _, sc3 = _load_pair(preset_dirs, *FAMILY_PRESETS["qwen3_vl"])
    with pytest.raises(ValueError, match=r"different pixel_values .*shape \(64, 1176\) vs \(64, 1536\)"):
        check_compatible(tp, sp3, tc, sc3)
    # A processor whose patching disagrees with its own model's vision tower.
    with pytest.raises(ValueError, match="student processor patch_size=16 but vision_config.patch_size=14"):
        check_compatible(tp, sp3, tc, tc)


# -- preset cache ---------------------------------------------------------------------------------

def test_ensure_preset_reuses_and_rebuilds_stale(tmp_path):
    d = ensure_preset("tiny-qwen2vl-student", tmp_path)
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert ensure_preset("tiny-qwen2vl-student", tmp_path) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    marker = json.loads((d / "grace_preset.json").read_text())
    marker["tokenizer"] = "stale"
    (d / "grace_preset.json").write_text(json.dumps(marker))
    assert ensure_preset("tiny-qwen2vl-student", tmp_path) == d
    assert json.loads((d / "grace_preset.json").read_text())["tokenizer"] != "stale"
    m = load_model("tiny-qwen2vl-student", cache_dir=tmp_path)
    assert m.config.model_type == "qwen2_vl"
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a tiny preset"):
        load_model("Qwen/Qwen2-VL-2B-Instruct-not-here", cache_dir=tmp_path)


# -- ZeRO-3 construction ---------------------------------------------------------------------------

def _zero3_worker(rank: int, world: int, model_dir: str, result_file: str, port: int) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        import deepspeed
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
        deepspeed.init_distributed(dist_backend="gloo")
        ds = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        zmodel = load_model(model_dir, zero3_config=ds)
        params = list(zmodel.parameters())
        # Partitioned: no local full tensor, and each rank's shard holds ~1/world of the elements.
        partitioned = all(hasattr(p, "ds_numel") and p.numel() == 0 and p.ds_numel > 0
                          and p.ds_tensor.numel() == -(-p.ds_numel // world) for p in params)
        from transformers.integrations import is_deepspeed_zero3_enabled

        leaked = is_deepspeed_zero3_enabled()
        # A caller's own HfDeepSpeedConfig (e.g. HF Trainer's) survives a load_model inside it.
        from transformers.integrations import HfDeepSpeedConfig, deepspeed_config

        from grace_ds.models import zero3_context

        outer_cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
        outer = HfDeepSpeedConfig(outer_cfg)
        with zero3_context(ds):
            inner_mb = deepspeed_config()["train_micro_batch_size_per_gpu"]
        restored = deepspeed_config() is not None and deepspeed_config()["train_micro_batch_size_per_gpu"] == 2
        restored = restored and inner_mb == 1
        del outer
        plain = load_model(model_dir).eval()
        proc = load_processor(model_dir)
        family = plain.config.model_type
        batch = _batch(proc, family, images_per_row=(1, 1))
        adapter = get_adapter(plain)
        engine, *_ = deepspeed.initialize(model=zmodel, config=ds)
        engine.eval()
        with torch.no_grad():
            f_ref, p_ref = adapter.forward_hidden(plain, batch)
            f_z, p_z = get_adapter(engine).forward_hidden(engine, batch)
        out = {"partitioned": partitioned, "leaked": leaked, "restored": restored, "n": len(params),
               "final": (f_ref - f_z).abs().max().item(), "penult": (p_ref - p_z).abs().max().item()}
        dist.destroy_process_group()
    except Exception:  # report to the parent instead of dying silently
        out = {"error": traceback.format_exc()}
    with open(result_file, "w") as f:
        json.dump(out, f)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world,preset", [(1, "tiny-qwen2vl-teacher"), (2, "tiny-llava-teacher")])
def test_zero3_init_partitions_and_matches(world, preset, preset_dirs, tmp_path):
    """load_model under zero.Init: partitioned from construction, weights loaded into the shards
    (2 ranks: each holds half), and the same forward_hidden as a plain load, through the engine."""
    # Forked children keep the process group (and DeepSpeed's globals) out of the pytest process.
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_zero3_worker, args=(r, world, str(preset_dirs[preset]), str(tmp_path / f"r{r}.json"),
                                                     port)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, f"zero3 rank {r} exit code {p.exitcode}"
        out = json.loads((tmp_path / f"r{r}.json").read_text())
        assert "error" not in out, out.get("error")
        assert out["partitioned"] and out["n"] > 10
        assert not out["leaked"], "HfDeepSpeedConfig stayed registered after load_model"
        assert out["restored"], "zero3_context did not restore the caller's HfDeepSpeedConfig"
        assert out["final"] < 1e-5 and out["penult"] < 1e-5, out
