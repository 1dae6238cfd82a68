"""Synthetic benchmark: determinism, train/val disjointness, answers that match the scene."""

import hashlib
import io
import json
import re

import pytest
from PIL import Image

from grace_ds.data import read_manifest
from grace_ds.data.format import iter_tar_samples
from grace_ds.data.synthetic import (
    COLOURS, DIFFICULTIES, LETTERS, MC_INSTRUCTION, OPEN_INSTRUCTION, QTYPES, GeneratorConfig, Obj, _relation,
    main, make_sample, tokenizer_corpus,
)


def _gen(out, *extra):
    main(["--out", str(out), "--train", "60", "--val", "20", "--seed", "7", "--samples-per-shard", "25",
          "--quiet", *extra])


def _samples(d):
    out = []
    for p in read_manifest(d).shard_paths():
        out.extend(iter_tar_samples(p))
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    _gen(root / "a", "--difficulty", "hard", "--hard-val", "10")
    return root


def test_same_arguments_give_byte_identical_shards(synth, tmp_path):
    _gen(tmp_path / "b", "--difficulty", "hard", "--hard-val", "10")
    for split in ("train", "val", "val_hard"):
        a, b = synth / "a" / split, tmp_path / "b" / split
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for n in names:
            assert (a / n).read_bytes() == (b / n).read_bytes(), f"{split}/{n} differs between runs"


def test_other_seed_differs(synth, tmp_path):
    main(["--out", str(tmp_path), "--train", "5", "--val", "1", "--seed", "8", "--quiet", "--difficulty", "hard"])
    a = {hashlib.sha256(m["0.png"]).hexdigest() for _, m in _samples(synth / "a" / "train")}
    b = {hashlib.sha256(m["0.png"]).hexdigest() for _, m in _samples(tmp_path / "train")}
    assert not a & b


def test_manifest_counts_and_params(synth):
    m = read_manifest(synth / "a" / "train")
    assert m.total == 60 and [s.samples for s in m.shards] == [25, 25, 10]
    assert m.extra["generator"]["seed"] == 7 and m.extra["generator"]["difficulty"] == "hard"
    assert read_manifest(synth / "a" / "val_hard").extra["generator"]["difficulty"] == "hard"


def test_train_and_val_disjoint(synth):
    def hashes(split):
        return {hashlib.sha256(m["0.png"]).hexdigest() for _, m in _samples(synth / "a" / split)}
    tr, va, vh = hashes("train"), hashes("val"), hashes("val_hard")
    assert len(tr) == 60 and len(va) == 20 and len(vh) == 10
    assert not tr & va and not tr & vh


def test_val_image_equal_to_train_is_redrawn(tmp_path):
    # a generator whose val draw for index 0 equals train's must redraw: force it by forbidding it
    from grace_ds.data.synthetic import generate_split

    cfg = GeneratorConfig(seed=1, difficulty="easy", image_size=64)
    first = next(generate_split(cfg, "val", 1, progress=False))
    stats = {}
    h = hashlib.sha256(first.images[0][1]).hexdigest()
    again = next(generate_split(cfg, "val", 1, forbidden={h}, stats=stats, progress=False))
    assert hashlib.sha256(again.images[0][1]).hexdigest() != h and stats["dedup_redrawn"] == 1


def _check_answer(meta):
    """Recompute the answer from the scene description stored in meta."""
    objs = [Obj(**o) for o in meta["objects"]]
    q, ans = meta["_question"], meta["answer_text"]
    t = meta["qtype"]
    if t == "count":
        m = re.match(r"How many (?:(.+) )?(\w+) are", q)
        if q.startswith("How many objects"):
            return str(len(objs)) == ans
        colour, plural = m.group(1), m.group(2)
        shape = plural[:-2] if plural.endswith("es") and plural[:-2] in ("cross",) else plural[:-1]
        n = sum(o.shape == shape and (colour is None or o.colour == colour) for o in objs)
        return str(n) == ans
    if t == "shape":
        colour = re.search(r"the (.+) object", q).group(1)
        hits = [o for o in objs if o.colour == colour]
        return len(hits) == 1 and hits[0].shape == ans
    def resolve(ref):
        words = ref.split()
        shape = words[-1]
        cands = [o for o in objs if o.shape == shape]
        mod = " ".join(words[:-1])
        if mod in ("large", "small"):
            assert len(cands) == 2
            return max(cands, key=lambda o: o.r) if mod == "large" else min(cands, key=lambda o: o.r)
        if mod:
            cands = [o for o in cands if o.colour == mod]
        assert len(cands) == 1, (ref, q)
        return cands[0]

    if t == "colour":
        ref = re.search(r"(?:is|does) the (.+?)(?: have)?\?", q).group(1)
        return resolve(ref).colour == ans
    if t == "position":
        ref = re.search(r"is the (.+?)(?: located)?\?", q).group(1)
        return resolve(ref).cell() == ans
    if t == "relation":
        m = re.match(r"(?:Where is|Is) the (.+?) (?:relative to|to the left of, to the right of, above or below) the (.+)\?", q)
        return _relation(resolve(m.group(1)), resolve(m.group(2))) == ans
    if t == "size":
        opts = [resolve(o[len("the "):]) for o in meta["options_or_refs"]]
        best = max(opts, key=lambda o: o.r) if "largest" in q else min(opts, key=lambda o: o.r)
        return resolve(ans[len("the "):]) is best
    raise AssertionError(t)


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_answers_match_the_scene(difficulty):
    cfg = GeneratorConfig(seed=3, difficulty=difficulty, image_size=96)
    seen_types = set()
    for i in range(150):
        s = make_sample(cfg, "train", i)
        rec = s.record
        human, gpt = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        meta = dict(rec["meta"])
        lines = human.split("\n")
        assert lines[0] == "<image>"
        meta["_question"] = lines[1]
        if meta["format"] == "mc":
            assert lines[2] == "Options:" and lines[-1] == MC_INSTRUCTION
            opts = [l[3:] for l in lines[3:-1]]
            assert [l[:3] for l in lines[3:-1]] == [f"{c}. " for c in LETTERS[: len(opts)]]
            assert opts == meta["options"] and len(set(opts)) == len(opts)
            assert gpt == meta["answer"] and opts[LETTERS.index(gpt)] == meta["answer_text"]
        else:
            assert lines[-1] == OPEN_INSTRUCTION and gpt == meta["answer_text"]
        if meta["qtype"] == "size":
            assert meta["format"] == "mc", "'which of these objects' needs its options"
            meta["options_or_refs"] = meta["options"]
        assert _check_answer(meta), (difficulty, i, human, gpt, meta)
        seen_types.add(meta["qtype"])
        im = Image.open(io.BytesIO(s.images[0][1]))
        assert im.size == (96, 96)
    assert seen_types == {"colour", "shape", "count", "position", "relation", "size"}


def test_hard_is_harder_than_easy():
    def stats(d):
        cfg = GeneratorConfig(seed=0, difficulty=d)
        counts, n_objs, n_opts = [], [], []
        for i in range(120):
            m = make_sample(cfg, "train", i).record["meta"]
            n_objs.append(len(m["objects"]))
            if m["qtype"] == "count":
                counts.append(int(m["answer_text"]))
            if m["options"]:
                n_opts.append(len(m["options"]))
        return max(counts), sum(n_objs) / len(n_objs), max(n_opts)
    e, h = stats("easy"), stats("hard")
    assert e[0] <= 3 and h[0] >= 8          # counting up to 9 at hard
    assert h[1] > 2 * e[1]                  # far more objects (distractors, clutter)
    assert h[2] > e[2]                      # more options to choose from
    fine = {"light blue", "navy", "teal", "dark red", "light green", "dark green", "maroon", "olive", "violet", "lime"}
    assert fine <= set(DIFFICULTIES["hard"].colours) and not fine & set(DIFFICULTIES["easy"].colours)


def test_tokenizer_corpus_covers_every_emitted_word():
    corpus = tokenizer_corpus()
    vocab = set(" ".join(corpus).replace("\n", " ").split())
    for name in COLOURS:
        assert all(w in vocab for w in name.split())
    for d in DIFFICULTIES:
        cfg = GeneratorConfig(seed=99, difficulty=d, image_size=32)
        for i in range(100):
            rec = make_sample(cfg, "val", i).record
            for turn in rec["conversations"]:
                missing = set(turn["value"].replace("\n", " ").split()) - vocab
                assert not missing, (d, i, missing)
    assert all(isinstance(s, str) for s in corpus) and json.dumps(corpus)


def test_worker_pool_gives_the_same_samples():
    from grace_ds.data.synthetic import generate_split

    cfg = GeneratorConfig(seed=2, difficulty="easy", image_size=24)
    plain = list(generate_split(cfg, "train", 300, progress=False, workers=1))
    # forbid two images (as if train had them) so the redraw path runs in both modes
    forbidden = {hashlib.sha256(plain[i].images[0][1]).hexdigest() for i in (5, 260)}
    one_stats, two_stats = {}, {}
    one = list(generate_split(cfg, "train", 300, forbidden=forbidden, stats=one_stats, progress=False, workers=1))
    two = list(generate_split(cfg, "train", 300, forbidden=forbidden, stats=two_stats, progress=False, workers=2))
    assert [(s.key, s.record, s.images) for s in one] == [(s.key, s.record, s.images) for s in two]
    assert one_stats == two_stats == {"dedup_redrawn": 2}
    assert one[5].images != plain[5].images and one[6].images == plain[6].images


def test_mc_options_do_not_give_the_answer_away():
    # near-answer distractors must not put the answer at a predictable place (e.g. the middle count)
    cfg = GeneratorConfig(seed=4, difficulty="hard", image_size=32)
    ranks = []
    for i in range(400):
        m = make_sample(cfg, "train", i).record["meta"]
        if m["format"] == "mc" and m["qtype"] == "count":
            opts = sorted(map(int, m["options"]))
            assert opts == list(range(opts[0], opts[0] + len(opts)))       # consecutive window
            ranks.append(opts.index(int(m["answer_text"])))
    assert len(ranks) > 30 and max(ranks.count(r) for r in set(ranks)) / len(ranks) < 0.4 and len(set(ranks)) == 5


def test_qtypes_mc_fraction_and_hard_difficulty_apply_to_every_split(tmp_path):
    """--qtypes / --mc-fraction restrict every split; val_hard takes --hard-difficulty."""
    _gen(tmp_path, "--difficulty", "basic", "--hard-val", "15", "--hard-difficulty", "easy",
         "--qtypes", "colour,count", "--mc-fraction", "0")
    for split, difficulty in (("train", "basic"), ("val", "basic"), ("val_hard", "easy")):
        samples = _samples(tmp_path / split)
        assert samples
        for _, members in samples:
            meta = json.loads(members["json"])["meta"]
            assert meta["qtype"] in ("colour", "count") and meta["format"] == "open", (split, meta)
            assert meta["difficulty"] == difficulty
    with pytest.raises(SystemExit):
        _gen(tmp_path / "bad", "--qtypes", "colour,nope")
    with pytest.raises(SystemExit):
        _gen(tmp_path / "bad2", "--mc-fraction", "1.5")


def test_basic_scenes_are_few_large_objects():
    cfg = GeneratorConfig(seed=5, difficulty="basic", image_size=112)
    for i in range(60):
        objs = make_sample(cfg, "train", i).record["meta"]["objects"]
        # radius 0.18-0.26 of the side; a "size" question shrinks one object by the 1.6 margin
        assert 1 <= len(objs) <= 3 and all(o["r"] >= 0.18 / 1.6 - 1e-3 for o in objs)


def test_seen_and_unseen_pairs_split_basic():
    """basic-seen never draws a held-out (shape, colour) pair and basic-unseen only those; every
    colour and shape is still seen in training, so only the pairing is new."""
    from grace_ds.data.synthetic import UNSEEN_PAIRS

    basic, seen, unseen = (DIFFICULTIES[k] for k in ("basic", "basic-seen", "basic-unseen"))
    everything = {(s, c) for s in basic.shapes for c in basic.colours}
    assert set(seen.pairs) | set(unseen.pairs) == everything and not set(seen.pairs) & set(unseen.pairs)
    assert {c for _, c in seen.pairs} == set(basic.colours) and {s for s, _ in seen.pairs} == set(basic.shapes)
    assert set(unseen.pairs) == set(UNSEEN_PAIRS)
    for name, allowed in (("basic-seen", set(seen.pairs)), ("basic-unseen", set(unseen.pairs))):
        # count questions too: their similar-colour distractors are drawn outside the pair sampler
        for qtypes in (QTYPES, ("count",)):
            cfg = GeneratorConfig(seed=5, difficulty=name, image_size=64, qtypes=qtypes)
            found = set()
            for i in range(300):
                objs = make_sample(cfg, "val", i).record["meta"]["objects"]
                found |= {(o["shape"], o["colour"]) for o in objs}
            assert found <= allowed and len(found) >= len(allowed) - 1, (name, qtypes, found)
