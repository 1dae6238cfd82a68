"""Synthetic VQA benchmark: procedurally rendered shape scenes with MMBench-style questions.

    python -m grace_ds.data.synthetic --out DIR --train N --val M --seed S \
        [--difficulty basic|easy|medium|hard] [--image-size PX] [--hard-val M2] [--hard-difficulty D]
        [--qtypes colour,shape,...] [--samples-per-shard K]

Writes ``DIR/train``, ``DIR/val`` (and ``DIR/val_hard``) in the shard format of docs/data.md.
Each sample: one rendered PNG + one question, either multiple choice
("...Answer with the option's letter from the given choices directly." -> "B") or a short open
answer ("...Answer the question using a single word or phrase." -> "3" / "light blue").
Question types: colour, shape, count, position, relation, size.

Why it is not saturated quickly by a small model: at "hard" scenes hold 6-12 objects with partial
occlusion and clutter, counts go up to 9, colours include near neighbours (blue / light blue /
navy / teal), objects are referred to by composite descriptions among same-shape or same-colour
distractors, and size comparisons have a 15 % margin.

Determinism: sample i of split s is drawn from ``Random(sha256(f"{seed}/{s}/{i}/{attempt}"))``, so
the splits use disjoint seed streams and the same arguments give byte-identical shards. A val image
whose bytes equal any train image is regenerated (attempt + 1), so no val image/question is in train.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from grace_ds.data.format import ShardSample, write_shards

# ---------------------------------------------------------------------------------------------
# Vocabulary (everything the generator can say lives here: tokenizer_corpus() is built from it)

# name -> RGB. "family" groups near neighbours: hard scenes pick distractors from the same family.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 210, 20), "green": (30, 160, 50),
    "blue": (30, 80, 230), "purple": (130, 40, 170), "pink": (245, 130, 190), "brown": (130, 80, 35),
    "gray": (128, 128, 128), "black": (20, 20, 20), "cyan": (20, 200, 220), "magenta": (220, 30, 200),
    # fine distinctions (hard only)
    "dark red": (130, 10, 10), "light green": (140, 225, 130), "dark green": (10, 90, 30),
    "light blue": (130, 180, 250), "navy": (15, 25, 120), "teal": (0, 128, 128),
    "olive": (120, 120, 20), "maroon": (110, 20, 60), "violet": (175, 120, 230), "lime": (170, 230, 20),
}
COLOUR_FAMILY: dict[str, str] = {
    "red": "red", "dark red": "red", "maroon": "red", "orange": "red",
    "pink": "magenta", "magenta": "magenta", "purple": "magenta", "violet": "magenta",
    "yellow": "yellow", "olive": "yellow", "lime": "yellow", "brown": "yellow",
    "green": "green", "light green": "green", "dark green": "green",
    "blue": "blue", "light blue": "blue", "navy": "blue", "teal": "blue", "cyan": "blue",
    "gray": "gray", "black": "gray",
}
SHAPES = ("circle", "square", "triangle", "star", "pentagon", "hexagon", "diamond", "cross")
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZES = ("small", "large")                      # descriptors used when size disambiguates
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBERS = tuple(str(i) for i in range(10))
LETTERS = "ABCDEF"
QTYPES = ("colour", "shape", "count", "position", "relation", "size")

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."

# Question templates; {a}/{b} are referring expressions ("the red star", "the large circle").
TEMPLATES = {
    "colour": ("What colour is {a}?", "Which colour does {a} have?"),
    "shape": ("What shape is the {c} object?", "Which shape is the {c} object?"),
    "count": ("How many {p} are there in the image?", "How many {c} {p} are in the image?",
              "How many objects are there in the image?"),
    "position": ("Where in the image is {a}?", "In which part of the image is {a} located?"),
    "relation": ("Where is {a} relative to {b}?", "Is {a} to the left of, to the right of, above or below {b}?"),
    "size": ("Which of these objects is the largest?", "Which of these objects is the smallest?"),
}
OPTIONS_HEADER = "Options:"


@dataclass(frozen=True)
class Difficulty:
    """One difficulty level; sizes are fractions of the image side."""

    min_objects: int
    max_objects: int
    max_count: int                 # counting answers go up to this
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    radius: tuple[float, float]    # object radius range, fraction of the image side
    size_margin: float             # "largest" must be this factor larger than the runner-up
    overlap: float                 # allowed centre distance as a fraction of r1+r2 (1.0 = no overlap)
    clutter: int                   # number of clutter strokes / dots
    colour_jitter: int             # +- per channel, so colours are not a pixel lookup
    similar_distractors: float     # probability a distractor shares the target's colour family/shape
    n_options: int
    # (shape, colour) pairs objects may take; None = any shape with any colour. The "-seen"/"-unseen"
    # variants split the pairs: train on the seen ones, test on pairs never seen together.
    pairs: tuple[tuple[str, str], ...] | None = None


_BASIC = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "cyan", "magenta")
DIFFICULTIES: dict[str, Difficulty] = {
    # 1-2 large objects (40-60 px at 112 px), 6 colours, 3 shapes: what a VLM trained from scratch for a
    # few thousand steps can read (the study's GPU preset; "easy" already needs shape recognition at
    # one 14-px patch per object, which tiny from-scratch models did not learn in ~1000 steps).
    "basic": Difficulty(1, 2, 3, _BASIC[:6], SHAPES[:3], (0.18, 0.26), 1.6, 1.0, 0, 0, 0.0, 3),
    "easy": Difficulty(1, 3, 3, _BASIC[:8], SHAPES[:4], (0.10, 0.16), 1.6, 1.0, 0, 0, 0.0, 3),
    "medium": Difficulty(3, 6, 6, _BASIC, SHAPES[:6], (0.07, 0.13), 1.3, 1.0, 6, 8, 0.4, 4),
    "hard": Difficulty(6, 12, 9, tuple(COLOURS), SHAPES, (0.045, 0.10), 1.15, 0.6, 14, 14, 0.7, 5),
}
# Compositional hold-out for `basic`: each of the 6 colours is unseen with exactly one of the 3 shapes
# (each shape keeps 4 seen colours). Train/val on "basic-seen", score the harder split on
# "basic-unseen": the colours and shapes are all familiar, only their pairing is new.
UNSEEN_PAIRS = (("circle", "red"), ("circle", "blue"), ("square", "orange"), ("square", "purple"),
                ("triangle", "yellow"), ("triangle", "green"))
DIFFICULTIES["basic-seen"] = replace(DIFFICULTIES["basic"], pairs=tuple(
    (sh, c) for sh in DIFFICULTIES["basic"].shapes for c in DIFFICULTIES["basic"].colours if (sh, c) not in UNSEEN_PAIRS))
DIFFICULTIES["basic-unseen"] = replace(DIFFICULTIES["basic"], pairs=UNSEEN_PAIRS)
# The tokenizer corpus samples these (the variants emit no new words): fixed, so adding a
# difficulty never changes the tokenizer.
CORPUS_DIFFICULTIES = ("basic", "easy", "medium", "hard")


@dataclass
class Obj:
    shape: str
    colour: str
    x: float        # centre, fraction of the image side
    y: float
    r: float        # radius, fraction of the image side
    angle: float = 0.0

    def cell(self) -> str:
        col = 0 if self.x < 1 / 3 else (1 if self.x < 2 / 3 else 2)
        row = 0 if self.y < 1 / 3 else (1 if self.y < 2 / 3 else 2)
        return POSITIONS[row * 3 + col]


@dataclass
class GeneratorConfig:
    seed: int = 0
    difficulty: str = "medium"
    image_size: int = 224          # pixels (square); processors resize
    mc_fraction: float = 0.6       # multiple-choice share, the rest is open short answer
    max_attempts: int = 50         # scene re-draws before giving up on an unambiguous question
    qtypes: tuple[str, ...] = QTYPES   # question types drawn (uniformly)


# ---------------------------------------------------------------------------------------------
# Scene sampling


def _rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    h = hashlib.sha256(f"grace-synth/{seed}/{split}/{index}/{attempt}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def _place(rng: random.Random, objs: list[Obj], r: float, d: Difficulty, cell: str | None = None) -> tuple[float, float] | None:
    for _ in range(60):
        if cell is not None:
            i = POSITIONS.index(cell)
            row, col = divmod(i, 3)
            # keep the centre well inside the cell so the position answer is unambiguous
            x = (col + rng.uniform(0.25, 0.75)) / 3
            y = (row + rng.uniform(0.25, 0.75)) / 3
        else:
            x, y = rng.uniform(r + 0.01, 1 - r - 0.01), rng.uniform(r + 0.01, 1 - r - 0.01)
        x = min(max(x, r + 0.01), 1 - r - 0.01)
        y = min(max(y, r + 0.01), 1 - r - 0.01)
        if all(math.hypot(x - o.x, y - o.y) > d.overlap * (r + o.r) + 0.01 for o in objs):
            return x, y
    return None


def _add_obj(rng, objs, d, shape, colour, r=None, cell=None) -> Obj | None:
    r = r if r is not None else rng.uniform(*d.radius)
    pos = _place(rng, objs, r, d, cell)
    if pos is None:
        return None
    o = Obj(shape, colour, pos[0], pos[1], r, rng.uniform(0, 2 * math.pi) if shape != "circle" else 0.0)
    objs.append(o)
    return o


def _similar_colour(rng, colour, d) -> str:
    fam = [c for c in d.colours if COLOUR_FAMILY[c] == COLOUR_FAMILY[colour] and c != colour]
    return rng.choice(fam) if fam else rng.choice([c for c in d.colours if c != colour])


def _pair(rng, d: Difficulty, not_shape: str | None = None) -> tuple[str, str]:
    """A random (shape, colour) for a new object; without `d.pairs` the same draws as always
    (shape, then colour), so the unrestricted difficulties generate the same data as before."""
    if d.pairs is None:
        shape = rng.choice([s for s in d.shapes if s != not_shape] if not_shape else d.shapes)
        return shape, rng.choice(d.colours)
    return rng.choice([p for p in d.pairs if p[0] != not_shape] if not_shape else d.pairs)


def _random_scene(rng, d: Difficulty, n: int) -> list[Obj]:
    objs: list[Obj] = []
    for _ in range(n):
        _add_obj(rng, objs, d, *_pair(rng, d))
    return objs


def _describe(rng, target: Obj, objs: list[Obj], avoid: str | None = None) -> str | None:
    """Shortest unambiguous referring expression for target ("the star", "the red star",
    "the large star"); avoid="colour" forbids naming the colour (colour questions)."""
    same_shape = [o for o in objs if o.shape == target.shape]
    if len(same_shape) == 1:
        return f"the {target.shape}"
    if avoid != "colour" and sum(o.colour == target.colour for o in same_shape) == 1:
        return f"the {target.colour} {target.shape}"
    if len(same_shape) == 2:
        other = same_shape[0] if same_shape[1] is target else same_shape[1]
        if max(target.r, other.r) / min(target.r, other.r) >= 1.4:
            return f"the {'large' if target.r > other.r else 'small'} {target.shape}"
    return None


def _relation(a: Obj, b: Obj) -> str | None:
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > 1.8 * abs(dy) and abs(dx) > a.r + b.r:
        return RELATIONS[0] if dx < 0 else RELATIONS[1]
    if abs(dy) > 1.8 * abs(dx) and abs(dy) > a.r + b.r:
        return RELATIONS[2] if dy < 0 else RELATIONS[3]
    return None


def _options(rng, answer: str, pool: list[str], d: Difficulty, qtype: str) -> list[str]:
    """MC options that do not give the answer away from the option list alone.

    Near-answer distractors are what make a question hard, but a naive "answer +- 1, +- 2" set puts
    the answer in the middle every time. So: counts use a window of consecutive numbers with the
    answer at a random offset; colours (at medium/hard) pair the answer's near colours with another
    colour's near colours, so the answer is not simply the centre of the only similar cluster;
    everything else draws distractors uniformly.
    """
    k = min(d.n_options, len(set(pool)))
    if qtype == "count":
        a = int(answer)
        hi = max(int(p) for p in pool)
        lo_start = max(0, a - k + 1)
        start = rng.randint(lo_start, max(lo_start, min(a, hi - k + 1)))
        opts = [str(i) for i in range(start, start + k)]
    elif qtype == "colour" and rng.random() < d.similar_distractors:
        fam = [c for c in pool if COLOUR_FAMILY[c] == COLOUR_FAMILY[answer] and c != answer]
        other = rng.choice([c for c in pool if COLOUR_FAMILY[c] != COLOUR_FAMILY[answer]])
        other_fam = [c for c in pool if COLOUR_FAMILY[c] == COLOUR_FAMILY[other]]
        rng.shuffle(fam)
        rng.shuffle(other_fam)
        # equal cluster sizes (answer + n_fam vs n_fam + 1 of the other family): neither cluster
        # stands out as "the one with the answer"
        n_fam = max(1, (k - 2) // 2)
        picked = fam[:n_fam] + other_fam[: min(n_fam + 1, k - 1 - len(fam[:n_fam]))]
        rest = [c for c in pool if c != answer and c not in picked]
        rng.shuffle(rest)
        opts = [answer] + (picked + rest)[: k - 1]
    else:
        rest = [p for p in dict.fromkeys(pool) if p != answer]
        rng.shuffle(rest)
        opts = [answer] + rest[: k - 1]
    rng.shuffle(opts)
    return opts


def _question(rng, d: Difficulty, qtype: str, cfg: GeneratorConfig) -> dict | None:
    """Sample a scene + question for qtype. Returns None when this draw is ambiguous (caller redraws)."""
    n = rng.randint(d.min_objects, d.max_objects)
    if qtype == "count":
        shape, colour = _pair(rng, d)
        variant = rng.randrange(3)
        lo = 0 if d.max_count > 3 else 1
        c = rng.randint(lo, d.max_count)
        objs: list[Obj] = []
        for _ in range(c):
            if _add_obj(rng, objs, d, shape, colour) is None:
                return None
        # distractors: same shape other colour (variant 1), other shapes (variant 0); similar ones at hard
        if variant == 2:
            # "how many objects": a random scene of up to max_count objects, shapes/colours mixed
            objs = _random_scene(rng, d, rng.randint(max(1, lo), d.max_count))
        n_distract = max(0, n - c) if variant != 2 else 0
        for _ in range(n_distract):
            if variant == 1 and rng.random() < 0.5 + d.similar_distractors / 2:
                dist = (shape, _similar_colour(rng, colour, d))
            else:
                dist = _pair(rng, d, not_shape=shape)
            _add_obj(rng, objs, d, *dist)
        if variant == 0:
            q = TEMPLATES["count"][0].format(p=PLURAL[shape])
            ans = sum(o.shape == shape for o in objs)
        elif variant == 1:
            q = TEMPLATES["count"][1].format(c=colour, p=PLURAL[shape])
            ans = sum(o.shape == shape and o.colour == colour for o in objs)
        else:
            q = TEMPLATES["count"][2]
            ans = len(objs)
        if ans > 9:
            return None
        answer = str(ans)
        pool = list(NUMBERS[: max(d.max_count, len(objs)) + 1])
        return dict(objs=objs, question=q, answer=answer, pool=pool)

    objs = _random_scene(rng, d, n)
    if not objs:
        return None
    if qtype in ("colour", "shape"):
        target = rng.choice(objs)
        # similar distractors: same shape in a near colour (colour q) or same colour other shape (shape q)
        if rng.random() < d.similar_distractors:
            if qtype == "colour":
                _add_obj(rng, objs, d, rng.choice([s for s in d.shapes if s != target.shape]), _similar_colour(rng, target.colour, d))
            else:
                _add_obj(rng, objs, d, rng.choice([s for s in d.shapes if s != target.shape]), _similar_colour(rng, target.colour, d))
        if qtype == "colour":
            ref = _describe(rng, target, objs, avoid="colour")
            if ref is None:
                return None
            q = rng.choice(TEMPLATES["colour"]).format(a=ref)
            return dict(objs=objs, question=q, answer=target.colour, pool=list(d.colours))
        # the shape question refers by colour, so the colour must be unique (a near colour may exist)
        if sum(o.colour == target.colour for o in objs) != 1:
            return None
        q = rng.choice(TEMPLATES["shape"]).format(c=target.colour)
        return dict(objs=objs, question=q, answer=target.shape, pool=list(d.shapes))
    if qtype == "position":
        objs = []
        cell = rng.choice(POSITIONS)
        target = _add_obj(rng, objs, d, *_pair(rng, d), cell=cell)
        if target is None:
            return None
        for _ in range(n - 1):
            _add_obj(rng, objs, d, *_pair(rng, d))
        ref = _describe(rng, target, objs)
        if ref is None:
            return None
        q = rng.choice(TEMPLATES["position"]).format(a=ref)
        return dict(objs=objs, question=q, answer=cell, pool=list(POSITIONS))
    if qtype == "relation":
        if len(objs) < 2:
            _add_obj(rng, objs, d, *_pair(rng, d))
        if len(objs) < 2:
            return None
        a, b = rng.sample(objs, 2)
        rel = _relation(a, b)
        ra, rb = _describe(rng, a, objs), _describe(rng, b, objs)
        if rel is None or ra is None or rb is None:
            return None
        q = rng.choice(TEMPLATES["relation"]).format(a=ra, b=rb)
        return dict(objs=objs, question=q, answer=rel, pool=list(RELATIONS))
    if qtype == "size":
        if len(objs) < 2:
            _add_obj(rng, objs, d, *_pair(rng, d))
        k = min(len(objs), d.n_options)
        if k < 2:
            return None
        chosen = rng.sample(objs, k)
        largest = rng.random() < 0.5
        key = sorted(chosen, key=lambda o: o.r, reverse=largest)
        ratio = key[0].r / key[1].r if largest else key[1].r / key[0].r
        if ratio < d.size_margin:
            # enforce the margin by scaling the winner (keeps the question answerable at every level)
            key[0].r = key[1].r * d.size_margin * 1.02 if largest else key[1].r / (d.size_margin * 1.02)
            key[0].r = min(key[0].r, 0.2)
            if (largest and key[0].r / key[1].r < d.size_margin) or key[0].x < key[0].r or key[0].x > 1 - key[0].r \
                    or key[0].y < key[0].r or key[0].y > 1 - key[0].r:
                return None
        refs = [_describe(rng, o, objs) for o in chosen]
        if any(r is None for r in refs) or len(set(refs)) != len(refs):
            return None
        q = TEMPLATES["size"][0 if largest else 1]
        answer = refs[chosen.index(key[0])]
        # the options are exactly the chosen objects: pool = refs
        return dict(objs=objs, question=q, answer=answer, pool=refs, fixed_options=True)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


# ---------------------------------------------------------------------------------------------
# Rendering


def _polygon(o: Obj, size: int) -> list[tuple[float, float]]:
    cx, cy, r = o.x * size, o.y * size, o.r * size
    def ring(k, rad, phase=0.0):
        return [(cx + rad * math.cos(o.angle + phase + 2 * math.pi * i / k), cy + rad * math.sin(o.angle + phase + 2 * math.pi * i / k)) for i in range(k)]
    if o.shape == "square":
        return ring(4, r, math.pi / 4)
    if o.shape == "triangle":
        return ring(3, r)
    if o.shape == "pentagon":
        return ring(5, r)
    if o.shape == "hexagon":
        return ring(6, r)
    if o.shape == "diamond":
        pts = ring(4, r)
        # squash one axis so a diamond is not a rotated square
        return [(cx + (x - cx) * (0.6 if i % 2 else 1.0), cy + (y - cy) * (0.6 if i % 2 else 1.0)) for i, (x, y) in enumerate(pts)]
    if o.shape == "star":
        outer, inner = ring(5, r), ring(5, r * 0.42, math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if o.shape == "cross":
        w = r * 0.35
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        ca, sa = math.cos(o.angle), math.sin(o.angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]
    raise ValueError(o.shape)


def render(objs: list[Obj], d: Difficulty, size: int, rng: random.Random) -> bytes:
    bg = (255, 255, 255) if d.clutter == 0 else tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(d.clutter):
        # thin grey strokes and dots: visual noise that is never an object of the vocabulary
        g = rng.randint(170, 215)
        if rng.random() < 0.5:
            draw.line([(rng.uniform(0, size), rng.uniform(0, size)), (rng.uniform(0, size), rng.uniform(0, size))], fill=(g, g, g), width=1)
        else:
            x, y, rr = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1, 2.5)
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(g, g, g))
    for o in objs:
        base = COLOURS[o.colour]
        j = d.colour_jitter
        fill = tuple(min(255, max(0, c + rng.randint(-j, j))) for c in base) if j else base
        if o.shape == "circle":
            cx, cy, r = o.x * size, o.y * size, o.r * size
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o, size), fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)   # level 1: ~3x faster than 6, still deterministic
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Samples


def make_sample(cfg: GeneratorConfig, split: str, index: int, attempt: int = 0) -> ShardSample:
    d = DIFFICULTIES[cfg.difficulty]
    for sub in range(cfg.max_attempts):
        rng = _rng(cfg.seed, split, index, attempt * 1000 + sub)
        qtype = rng.choice(cfg.qtypes)
        mc = rng.random() < cfg.mc_fraction
        q = _question(rng, d, qtype, cfg)
        if q is not None and d.pairs is not None and any((o.shape, o.colour) not in d.pairs for o in q["objs"]):
            q = None          # e.g. a similar-colour distractor made a pair of the other side: redraw
        if q is not None:
            break
    else:
        raise RuntimeError(f"synthetic: no unambiguous question after {cfg.max_attempts} draws "
                           f"(split={split}, index={index}); raise GeneratorConfig.max_attempts")
    if q.get("fixed_options"):
        mc = True    # "which of these objects" needs its options listed
    image = render(q["objs"], d, cfg.image_size, rng)
    meta = {"qtype": qtype, "format": "mc" if mc else "open", "answer_text": q["answer"],
            "difficulty": cfg.difficulty, "split": split, "seed": cfg.seed, "index": index,
            "objects": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(o).items()} for o in q["objs"]]}
    if mc:
        opts = (sorted(q["pool"], key=lambda _: rng.random()) if q.get("fixed_options")
                else _options(rng, q["answer"], q["pool"], d, qtype))
        letter = LETTERS[opts.index(q["answer"])]
        lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts))
        prompt = f"<image>\n{q['question']}\n{OPTIONS_HEADER}\n{lines}\n{MC_INSTRUCTION}"
        answer = letter
        meta.update(options=opts, answer=letter)
    else:
        prompt = f"<image>\n{q['question']}\n{OPEN_INSTRUCTION}"
        answer = q["answer"]
        meta.update(options=None, answer=answer)
    key = f"{split}-{index:08d}"
    record = {"id": key, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}], "meta": meta}
    return ShardSample(key, record, [("png", image)])


def _make_first(args: tuple[GeneratorConfig, str, int]) -> ShardSample:
    return make_sample(*args)


def generate_split(cfg: GeneratorConfig, split: str, n: int, forbidden: set[str] | None = None,
                   seen: set[str] | None = None, stats: dict | None = None, progress: bool = True,
                   workers: int = 1) -> Iterator[ShardSample]:
    """Yield n samples in index order; an image whose hash is in ``forbidden`` (another split) or
    ``seen`` (earlier in this split) is redrawn with attempt + 1.

    With workers > 1 the first attempts are rendered in a process pool (ordered imap); the dedup
    check and any redraw stay in this process, in index order, so the output does not depend on
    the number of workers.
    """
    import multiprocessing as mp

    from tqdm import tqdm

    seen = set() if seen is None else seen
    forbidden = forbidden or set()
    bar = tqdm(total=n, desc=f"synthetic {split}", unit="sample", disable=not progress, file=sys.stderr)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        workers = 1   # called inside a training process that holds a CUDA context: never fork it
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and n >= 256 else None
    try:
        firsts = (pool.imap(_make_first, ((cfg, split, i) for i in range(n)), chunksize=32) if pool
                  else (make_sample(cfg, split, i) for i in range(n)))
        for i, s in enumerate(firsts):
            for attempt in range(1, 101):
                h = hashlib.sha256(s.images[0][1]).hexdigest()
                if h not in forbidden and h not in seen:
                    break
                if stats is not None:
                    stats["dedup_redrawn"] = stats.get("dedup_redrawn", 0) + 1
                s = make_sample(cfg, split, i, attempt)
            else:
                raise RuntimeError(f"synthetic: could not draw a unique image for {split}[{i}]; the difficulty "
                                   f"is too easy for this many samples")
            seen.add(h)
            yield s
            bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()


def tokenizer_corpus() -> list[str]:
    """Every word and phrase the generator can emit, in the contexts it emits them.

    Used by grace_ds.models.processors to train the tiny tokenizers offline. It covers each template
    filled with every value of each slot, every option line form, both instructions, and a few
    hundred real prompts at every difficulty.
    """
    out: list[str] = [MC_INSTRUCTION, OPEN_INSTRUCTION, OPTIONS_HEADER, "<image>"]
    out += list(COLOURS) + list(SHAPES) + list(PLURAL.values()) + list(SIZES) + list(POSITIONS)
    out += list(RELATIONS) + list(NUMBERS) + list(LETTERS)
    refs = [f"the {s}" for s in SHAPES] + [f"the {c} {s}" for c in COLOURS for s in SHAPES] + \
           [f"the {z} {s}" for z in SIZES for s in SHAPES]
    for qtype, temps in TEMPLATES.items():
        for t in temps:
            for i, ref in enumerate(refs):
                c = list(COLOURS)[i % len(COLOURS)]
                p = PLURAL[SHAPES[i % len(SHAPES)]]
                out.append(t.format(a=ref, b=refs[(i * 7 + 3) % len(refs)], c=c, p=p))
    for values in (list(COLOURS), list(SHAPES), list(POSITIONS), list(RELATIONS), list(NUMBERS), refs):
        for i, v in enumerate(values):
            out.append(f"{LETTERS[i % len(LETTERS)]}. {v}")
    for diff in CORPUS_DIFFICULTIES:
        cfg = GeneratorConfig(seed=12345, difficulty=diff, image_size=32)
        for i in range(100):
            rec = make_sample(cfg, "corpus", i).record
            out += [t["value"] for t in rec["conversations"]]
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grace_ds.data.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (train/, val/, val_hard/ are created)")
    ap.add_argument("--train", type=int, required=True, help="number of training samples")
    ap.add_argument("--val", type=int, required=True, help="number of validation samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", choices=tuple(DIFFICULTIES), default="medium")
    ap.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--hard-val", type=int, default=0, help="extra validation split at --hard-difficulty (val_hard/)")
    ap.add_argument("--hard-difficulty", choices=tuple(DIFFICULTIES), default="hard",
                    help="difficulty of val_hard (default hard)")
    ap.add_argument("--mc-fraction", type=float, default=GeneratorConfig.mc_fraction,
                    help="share of multiple-choice questions (the rest are open short answers); every split")
    ap.add_argument("--qtypes", default=",".join(QTYPES),
                    help=f"comma-separated question types for every split (default all: {','.join(QTYPES)})")
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="rendering processes (output is identical for any value)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    qtypes = tuple(q.strip() for q in args.qtypes.split(",") if q.strip())
    bad = [q for q in qtypes if q not in QTYPES]
    if bad or not qtypes:
        ap.error(f"--qtypes {args.qtypes!r}: expected a comma-separated subset of {','.join(QTYPES)}")
    if not 0.0 <= args.mc_fraction <= 1.0:
        ap.error(f"--mc-fraction {args.mc_fraction}: expected a value in [0, 1]")
    cfg = GeneratorConfig(seed=args.seed, difficulty=args.difficulty, image_size=args.image_size, qtypes=qtypes,
                          mc_fraction=args.mc_fraction)
    train_hashes: set[str] = set()
    plan = [("train", args.train, cfg), ("val", args.val, cfg)]
    if args.hard_val:
        plan.append(("val_hard", args.hard_val, GeneratorConfig(seed=args.seed, difficulty=args.hard_difficulty,
                                                                 image_size=args.image_size, qtypes=qtypes,
                                                                 mc_fraction=args.mc_fraction)))
    for split, n, c in plan:
        stats: dict = {}
        seen: set[str] = set()
        forbidden = set() if split == "train" else train_hashes
        gen = generate_split(c, split, n, forbidden=forbidden, seen=seen, stats=stats, progress=not args.quiet,
                             workers=args.workers)
        params = {**asdict(c), "split": split, "n": n}
        m = write_shards(gen, out / split, prefix=split, samples_per_shard=args.samples_per_shard,
                         extra_manifest={"created_by": "grace_ds.data.synthetic", "generator": params, "dedup": stats},
                         overwrite=args.overwrite)
        if split == "train":
            train_hashes = seen
        print(f"{split}: {m.total} samples in {len(m.shards)} shards -> {out / split}", file=sys.stderr)
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
