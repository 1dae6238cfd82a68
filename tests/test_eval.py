"""grace_ds.eval: parsing and scoring on hand-made cases, checkpoint loading, end-to-end on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from grace_ds.eval.samples import record_to_item
from grace_ds.eval.scoring import (
    Option,
    aggregate,
    exact_match,
    normalize_answer,
    parse_answer_letter,
    parse_options,
    pick_max,
)

REPO = Path(__file__).resolve().parents[1]

MMB_Q = ("<image>\nWhich object is the largest?\nA. the red star\nB. the blue circle\nC. the green square\n"
         "Answer with the option's letter from the given choices directly.")
OPTS = [Option("A", "the red star"), Option("B", "the blue circle"), Option("C", "the green square")]


# ---------------------------------------------------------------------------- option parsing

def test_parse_options_mmbench_lines():
    assert parse_options(MMB_Q) == OPTS


def test_parse_options_synthetic_header_and_paren_forms():
    q = "How many stars?\nOptions:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\nAnswer with the option's letter."
    assert [o.letter for o in parse_options(q)] == ["A", "B", "C", "D"]
    assert parse_options(q)[2].text == "3"
    q2 = "Pick one:\nA) yes\nB) no"
    assert parse_options(q2) == [Option("A", "yes"), Option("B", "no")]


def test_parse_options_inline_scienceqa():
    q = "Context: a map.\nWhich state is farthest north?\nOptions: (A) Ohio (B) Maine (C) Texas"
    assert parse_options(q) == [Option("A", "Ohio"), Option("B", "Maine"), Option("C", "Texas")]


def test_parse_options_rejects_non_lists():
    assert parse_options("What colour is the star?\nAnswer the question using a single word or phrase.") == []
    assert parse_options("A. single line that looks like an option") == []
    assert parse_options("A. x\nC. y") == []            # not consecutive letters
    # a stray earlier "A." line is superseded by the question's real list
    q = "A. note\nQuestion?\nA. red\nB. blue"
    assert parse_options(q) == [Option("A", "red"), Option("B", "blue")]


# ---------------------------------------------------------------------------- answer letters

@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("B.", "B"), (" (C) ", "C"), ("C)", "C"), ("A. the red star", "A"), ("B: blue", "B"),
    ("The answer is C.", "C"), ("answer: (A)", "A"), ("the blue circle", "B"), ("The Blue Circle.", "B"),
    ("B</s>", "B"), ("D", None), ("I do not know", None), ("", None), ("Blue", None),
])
def test_parse_answer_letter(text, letter):
    assert parse_answer_letter(text, OPTS) == letter


def test_parse_answer_letter_ambiguous_text_is_unparsed():
    opts = [Option("A", "red"), Option("B", "Red")]
    assert parse_answer_letter("red", opts) is None


# ---------------------------------------------------------------------------- exact match

def test_normalize_and_exact_match():
    assert normalize_answer("The Light-Blue star.") == "light blue star"
    assert normalize_answer("Two") == "2"
    assert exact_match("Three.", "3")
    assert exact_match(" top left", "Top left")
    assert exact_match("an apple", "apple")
    assert not exact_match("3 stars", "3")
    assert not exact_match("", "")
    assert not exact_match("the", "a")       # nothing left after normalisation is never a match


def test_pick_max():
    assert pick_max({"A": -2.0, "B": -1.0, "C": -3.0}) == "B"
    assert pick_max({"A": -1.0, "B": -1.0}) == "A"
    assert pick_max({"A": float("nan"), "B": -5.0}) == "B"
    assert pick_max({}) is None


# ---------------------------------------------------------------------------- aggregation

def test_aggregate_known_numbers():
    recs = [
        {"kind": "mc", "type": "colour", "hits": {"mc_gen": True, "mc_ll": True, "mc_ll_text": False}},
        {"kind": "mc", "type": "colour", "hits": {"mc_gen": False, "mc_ll": True, "mc_ll_text": False},
         "unparsed": True},
        {"kind": "mc", "type": "count", "hits": {"mc_gen": True, "mc_ll": False, "mc_ll_text": True}},
        {"kind": "open", "type": "count", "hits": {"em": True}},
        {"kind": "open", "type": "count", "hits": {"em": False}},
    ]
    r = aggregate(recs)
    assert r["n_samples"] == 5
    mc = r["multiple_choice"]
    assert mc["n"] == 3 and math.isclose(mc["mc_gen"], 2 / 3) and math.isclose(mc["mc_ll"], 2 / 3)
    assert math.isclose(mc["mc_ll_text"], 1 / 3) and math.isclose(mc["unparsed_rate"], 1 / 3)
    assert r["open"] == {"n": 2, "em": 0.5, "n_open": 2}
    assert math.isclose(r["accuracy"], 2 / 3)
    assert math.isclose(r["overall_gen"], 3 / 5)
    # per type: each metric over the samples that carry it (count has 1 MC and 2 open samples)
    cnt = r["per_type"]["count"]
    assert cnt["n"] == 3 and cnt["n_mc"] == 1 and cnt["n_open"] == 2
    assert cnt["mc_gen"] == 1.0 and cnt["em"] == 0.5 and cnt["unparsed_rate"] == 0.0
    assert r["per_type"]["colour"]["mc_gen"] == 0.5


# ---------------------------------------------------------------------------- shard records

def _record(question, answer, meta=None, turns=None):
    conv = turns or [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": "k", "conversations": conv, "meta": meta or {}}


def test_record_mmbench_without_meta():
    it = record_to_item("k", _record(MMB_Q, "B"), images=["img"])
    assert it.kind == "mc" and it.answer_letter == "B" and it.options == OPTS
    assert it.qtype == "multiple_choice"
    assert it.messages == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": MMB_Q.replace("<image>\n", "")}]}]


def test_record_answer_given_as_text_or_letter_line():
    assert record_to_item("k", _record(MMB_Q, "the green square"), ["i"]).answer_letter == "C"
    assert record_to_item("k", _record(MMB_Q, "A. the red star"), ["i"]).answer_letter == "A"


def test_record_open_and_meta_type():
    it = record_to_item("k", _record("<image>\nHow many stars?\nAnswer the question using a single word or phrase.",
                                     "3", meta={"qtype": "count"}), ["i"])
    assert it.kind == "open" and it.reference == "3" and it.qtype == "count" and it.options == []


def test_record_meta_options_fallback():
    it = record_to_item("k", _record("<image>\nWhich colour?", "blue", meta={"options": ["red", "blue"]}), ["i"])
    assert it.answer_letter == "B" and [o.text for o in it.options] == ["red", "blue"]


def test_record_multi_turn_scores_last_answer():
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Shapes."},
             {"from": "human", "value": "Which?\nA. x\nB. y"}, {"from": "gpt", "value": "A"}]
    it = record_to_item("k", _record(None, None, turns=turns), ["i"])
    assert [m["role"] for m in it.messages] == ["user", "assistant", "user"]
    assert it.answer_letter == "A"


def test_record_errors_name_the_sample():
    with pytest.raises(ValueError, match="'k'.*no assistant"):
        record_to_item("k", _record(None, None, turns=[{"from": "human", "value": "hi"}]), [])
    with pytest.raises(ValueError, match="1 <image> tags but 2 images"):
        record_to_item("k", _record(MMB_Q, "A"), ["a", "b"])


# ---------------------------------------------------------------------------- int weights -> model

def test_apply_int_weights_hand_made(tmp_path):
    from safetensors.torch import save_file

    from grace_ds.eval.checkpoint import apply_int_weights

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.proj = torch.nn.Linear(4, 2, bias=False)
    codes = torch.tensor([[1, -2, 3, -8], [7, 0, -1, 2]], dtype=torch.int8)
    scales = torch.tensor([[0.5, 0.25], [2.0, 1.0]])          # group size 2
    save_file({"model.proj.codes": codes, "model.proj.scales": scales}, str(tmp_path / "iw.safetensors"))
    assert apply_int_weights(model, tmp_path / "iw.safetensors") == 1
    expect = torch.tensor([[0.5, -1.0, 0.75, -2.0], [14.0, 0.0, -1.0, 2.0]])
    assert torch.equal(model.model.proj.weight.data, expect)

    save_file({"model.proj.codes": codes[:, :2].contiguous(), "model.proj.scales": scales},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="codes shape"):
        apply_int_weights(model, tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------- end to end (tiny model)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from grace_ds.data.synthetic import main as synth
    from grace_ds.models.presets import ensure_preset

    root = tmp_path_factory.mktemp("eval")
    synth(["--out", str(root / "data"), "--train", "4", "--val", "10", "--seed", "3", "--image-size", "64",
           "--quiet"])
    ckpt = ensure_preset("tiny-qwen2vl-student")     # shared cache: built once per machine
    return root, ckpt


def test_evaluate_checkpoint_end_to_end(tiny, tmp_path):
    from grace_ds.eval import evaluate_checkpoint

    root, ckpt = tiny
    out = tmp_path / "r.json"
    doc = evaluate_checkpoint(ckpt, root / "data" / "val", out=out, batch_size=4, max_new_tokens=4,
                              keep_predictions=True, progress=False)
    on_disk = json.loads(out.read_text())
    assert on_disk["n_samples"] == 10 and doc["model"]["format"] == "hf"
    mc = on_disk["multiple_choice"]
    assert mc["n"] + on_disk["open"]["n"] == 10 and mc["n"] > 0
    for k in ("mc_gen", "mc_ll", "mc_ll_text"):
        assert 0.0 <= mc[k] <= 1.0
    assert set(on_disk["per_type"]) <= {"colour", "shape", "count", "position", "relation", "size"}
    preds = on_disk["predictions"]
    for p in preds:
        if p["kind"] == "mc":
            # the log-likelihood choice is the arg-max of the recorded per-letter scores
            lp = p["letter_logprobs"]
            assert p["ll_letter"] == max(lp, key=lp.get) and all(v <= 0 for v in lp.values())


def test_letter_loglik_matches_a_plain_forward_and_batch_size(tiny):
    """The first-generation-step shortcut equals log_softmax of an unpadded forward of prompt+letter,
    and left padding does not change scores (batch 1 vs batch 5)."""
    from grace_ds.eval.checkpoint import load_for_eval
    from grace_ds.eval.predict import Predictor
    from grace_ds.eval.samples import iter_items

    root, ckpt = tiny
    model, proc, _ = load_for_eval(ckpt)
    items = [it for it in iter_items(root / "data" / "val") if it.kind == "mc"][:5]
    pred = Predictor(model, proc, max_new_tokens=2)
    batched = pred.score(items)
    single = [pred.score([it])[0] for it in items]
    for b, s in zip(batched, single):
        for letter in b["letter_logprobs"]:
            assert abs(b["letter_logprobs"][letter] - s["letter_logprobs"][letter]) < 1e-4
    it = items[0]
    prompt = pred.prompt_text(it)
    for opt in it.options:
        c = pred.continuation(it, prompt, opt.letter)
        enc = proc(text=[prompt + c.text], images=it.images, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0].float()[:, : len(proc.tokenizer)]
        k = len(c.ids)
        lp = logits[-k - 1:-1].log_softmax(-1).gather(1, enc["input_ids"][0, -k:, None]).sum().item()
        assert abs(lp - single[0]["letter_logprobs"][opt.letter]) < 1e-4


def test_fake_quant_checkpoint_scores_integer_weights(tiny, tmp_path):
    from grace_ds.eval.checkpoint import detect_format, load_for_eval
    from grace_ds.study.rtn import make_rtn_checkpoint

    root, ckpt = tiny
    rtn = make_rtn_checkpoint(ckpt, tmp_path / "rtn", bits=4, group_size=128)
    assert detect_format(rtn) == "fake-quant"
    model, _, info = load_for_eval(rtn)
    assert info["weights"] == "int_weights codes*scales" and info["quantized_layers"] > 0
    latent, _, _ = load_for_eval(rtn, fmt="latent")
    name = next(n for n, _ in model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    w = dict(model.named_modules())[name].weight
    w_lat = dict(latent.named_modules())[name].weight
    assert not torch.equal(w, w_lat)
    # every row of the quantised weight sits on a 16-level grid (<= 16 distinct values per group)
    g = w.reshape(w.shape[0], -1, 128)
    assert max(len(torch.unique(g[r, j])) for r in range(4) for j in range(g.shape[1])) <= 16
    vision = [n for n, _ in model.named_parameters() if "visual" in n][0]
    assert torch.equal(dict(model.named_parameters())[vision], dict(latent.named_parameters())[vision])


def test_cli_errors_are_clear(tmp_path, tiny):
    from grace_ds.eval.__main__ import main

    with pytest.raises(FileNotFoundError, match="config.json not found"):
        main(["--checkpoint", str(tmp_path), "--shards", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        main(["--checkpoint", str(tiny[1]), "--shards", str(tmp_path), "--no-progress"])
    with pytest.raises(ValueError, match="fake-quant needs"):
        main(["--checkpoint", str(tiny[1]), "--shards", str(tmp_path), "--format", "fake-quant"])


def test_cli_writes_json(tiny, tmp_path, capsys):
    from grace_ds.eval.__main__ import main

    root, ckpt = tiny
    assert main(["--checkpoint", str(ckpt), "--shards", str(root / "data" / "val"), str(root / "data" / "train"),
                 "--out", str(tmp_path / "o.json"), "--max-samples", "3", "--no-progress",
                 "--no-text-loglik", "--max-new-tokens", "2"]) == 0
    doc = json.loads((tmp_path / "o.json").read_text())
    assert set(doc["results"]) == {"val", "train"} and doc["results"]["val"]["n_samples"] == 3
    assert "mc_ll_text" not in doc["results"]["val"]["multiple_choice"]
    assert "val: n=3" in capsys.readouterr().out


def test_packed_checkpoint_scores_like_its_fake_quant_source(tiny, tmp_path):
    """launch/convert.py output (packed INT4) is detected and scores like the export it came from."""
    pytest.importorskip("grace_ds.export.convert")
    from grace_ds.eval import evaluate_checkpoint
    from grace_ds.eval.checkpoint import detect_format
    from grace_ds.export.convert import convert_checkpoint
    from grace_ds.study.rtn import make_rtn_checkpoint

    root, ckpt = tiny
    rtn = make_rtn_checkpoint(ckpt, tmp_path / "rtn", bits=4, group_size=128)
    packed = tmp_path / "packed"
    convert_checkpoint(rtn, packed, fmt="grace", progress=False, log=lambda *_: None)
    assert detect_format(packed) == "packed"
    kw = dict(max_samples=6, batch_size=6, max_new_tokens=2, keep_predictions=True, progress=False, dtype="fp32")
    a = evaluate_checkpoint(rtn, root / "data" / "val", **kw)
    b = evaluate_checkpoint(packed, root / "data" / "val", **kw)
    assert b["model"]["format"] == "packed" and b["model"]["bits"] == 4
    for pa, pb in zip(a["predictions"], b["predictions"]):
        for letter, v in pa.get("letter_logprobs", {}).items():
            # same codes; the W4A16 kernel layout keeps the scales in bf16 (its contract), hence ~1e-3
            assert abs(v - pb["letter_logprobs"][letter]) < 1e-2


def test_aggregate_exposes_constant_letter_answers():
    recs = [{"kind": "mc", "type": "t", "hits": {"mc_gen": a == "B"}, "answer": a, "pred_letter": "B"}
            for a in ("A", "B", "B", "C")]
    mc = aggregate(recs)["multiple_choice"]
    assert mc["pred_letter_counts"] == {"B": 4} and mc["answer_letter_counts"] == {"A": 1, "B": 2, "C": 1}
    assert mc["constant_letter_acc"] == 0.5 and mc["top_pred_letter_share"] == 1.0 and mc["mc_gen"] == 0.5
