"""Pure scoring: option parsing, answer-letter parsing, exact match, aggregation.

No model here, so every rule is unit-tested on hand-made strings. The rules follow the conventions
of the benchmarks our shards come from:

- ScienceQA / MMBench exports (LLaVA evaluation style) list the options one per line, "A. text",
  and end with "Answer with the option's letter from the given choices directly."; LLaVA's ScienceQA
  prompt also uses an inline "Options: (A) text (B) text" form. Both are parsed from the question
  text itself, so converted real benchmarks score without any synthetic metadata.
- A generated answer counts as choosing letter X when, after stripping, it is "X", "X.", "(X)",
  "X) ...", "X. ...", "X: ..." or "The answer is X"; or when it equals one option's text. Anything else
  is unparsed and counts as wrong (reported separately, so a model that never emits a letter is
  visible rather than merely inaccurate).
- Short open answers use VQA-style normalisation (case, punctuation, articles, number words).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field

LETTERS = string.ascii_uppercase

# "A. text", "A) text", "(A) text", "A: text" at the start of a line.
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\.\):]\s+(.+?)\s*$")
# Inline "Options: (A) x (B) y" (LLaVA ScienceQA prompt).
_INLINE_OPTIONS = re.compile(r"Options?:\s*(\(A\).*)$", re.IGNORECASE | re.DOTALL)
_INLINE_ITEM = re.compile(r"\(([A-Z])\)\s*(.*?)\s*(?=\([A-Z]\)|$)", re.DOTALL)


@dataclass(frozen=True)
class Option:
    letter: str
    text: str


def parse_options(question: str) -> list[Option]:
    """Options listed in a question, in order; [] when the question is not multiple choice.

    Only a consecutive run of letters starting at "A" counts (A, B, C, ...), so a sentence that happens
    to start with "I. " or "A. " alone is not mistaken for an option list.
    """
    found: list[Option] = []
    for line in question.splitlines():
        m = _OPTION_LINE.match(line)
        if m is None:
            continue
        letter, text = m.group(1), m.group(2)
        expected = LETTERS[len(found)] if len(found) < len(LETTERS) else None
        if letter == expected:
            found.append(Option(letter, text))
        elif letter == "A":            # a new list starts: keep the later (the question's own) list
            found = [Option(letter, text)]
    if len(found) >= 2:
        return found
    m = _INLINE_OPTIONS.search(question)
    if m:
        items = [Option(a, b.strip()) for a, b in _INLINE_ITEM.findall(m.group(1).split("\n")[0])]
        if len(items) >= 2 and [o.letter for o in items] == list(LETTERS[: len(items)]):
            return items
    return []


_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Z])\)?[\.\):]?$"),                       # "B", "B.", "(B)", "B)"
    re.compile(r"^\(?([A-Z])[\.\):]\s"),                           # "B. circle", "(B) circle", "B: ..."
    re.compile(r"answer\s+is\s*:?\s*\(?([A-Z])\b\)?", re.IGNORECASE),
    re.compile(r"^answer\s*:\s*\(?([A-Z])\b", re.IGNORECASE),
)


def parse_answer_letter(text: str, options: list[Option]) -> str | None:
    """The option letter a free-form answer picks, or None when it cannot be read."""
    letters = {o.letter for o in options}
    s = text.strip()
    for pat in _LETTER_PATTERNS:
        m = pat.search(s)
        if m and m.group(1) in letters:
            return m.group(1)
    # The model answered with an option's text instead of its letter.
    norm = normalize_answer(s)
    if norm:
        hits = [o.letter for o in options if normalize_answer(o.text) == norm]
        if len(hits) == 1:
            return hits[0]
    # "B" followed by noise ("B</s>", "Bcircle"): a leading capital letter that is an option and is
    # not the start of an ordinary word.
    m = re.match(r"^\(?([A-Z])(?![a-z])", s)
    if m and m.group(1) in letters:
        return m.group(1)
    return None


def reference_letter(answer: str, options: list[Option]) -> str | None:
    """The letter of the reference answer ("B", "B. circle" or the option text itself)."""
    return parse_answer_letter(answer, options)


_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    "zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_PUNCT = re.compile(r"[" + re.escape(string.punctuation.replace("-", "")) + r"]")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lowercase, drop punctuation and articles, number words -> digits."""
    s = _PUNCT.sub(" ", text.lower().replace("-", " "))
    words = [_NUMBER_WORDS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference) != ""


def pick_max(scores: dict[str, float]) -> str | None:
    """The key with the highest finite score (ties -> first in order); None when none is finite."""
    best, best_v = None, -math.inf
    for k, v in scores.items():
        if v is not None and math.isfinite(v) and v > best_v:
            best, best_v = k, v
    return best


@dataclass
class _Acc:
    """Running accuracies; every metric has its own denominator (the records that carry it)."""

    n: int = 0
    correct: dict[str, int] = field(default_factory=dict)
    counted: dict[str, int] = field(default_factory=dict)
    unparsed: int = 0

    def add(self, hits: dict[str, bool], unparsed: bool = False) -> None:
        self.n += 1
        for k, v in hits.items():
            self.correct[k] = self.correct.get(k, 0) + int(bool(v))
            self.counted[k] = self.counted.get(k, 0) + 1
        self.unparsed += int(unparsed)

    def summary(self) -> dict:
        out: dict = {"n": self.n}
        for k in sorted(self.correct):
            out[k] = self.correct[k] / self.counted[k]
        if "mc_gen" in self.counted:
            out["n_mc"] = self.counted["mc_gen"]
            out["unparsed_rate"] = self.unparsed / self.counted["mc_gen"]
        if "em" in self.counted:
            out["n_open"] = self.counted["em"]
        return out


def aggregate(records: list[dict]) -> dict:
    """Per-sample records -> overall and per-type accuracies.

    A record is {"kind": "mc"|"open", "type": str, "hits": {metric: bool}, "unparsed": bool}.
    Metrics for mc: mc_gen (letter by generation), mc_ll (option letter log-likelihood), mc_ll_text
    (option text log-likelihood, mean per token); for open: em (exact match).
    "accuracy" (headline) = mc_gen over the multiple-choice samples; "overall_gen" = the share of all
    samples answered correctly by generation (mc_gen or em).
    """
    by_kind: dict[str, _Acc] = {}
    by_type: dict[str, _Acc] = {}
    for r in records:
        by_kind.setdefault(r["kind"], _Acc()).add(r["hits"], r.get("unparsed", False))
        by_type.setdefault(r["type"], _Acc()).add(r["hits"], r.get("unparsed", False))
    mc = by_kind.get("mc", _Acc()).summary()
    op = by_kind.get("open", _Acc()).summary()
    out = {
        "n_samples": len(records),
        "multiple_choice": mc,
        "open": op,
        "per_type": {t: a.summary() for t, a in sorted(by_type.items())},
    }
    out["accuracy"] = mc.get("mc_gen", float("nan")) if mc["n"] else float("nan")
    # A model that always writes one letter scores the share of that letter among the references:
    # the histograms and the best constant-letter accuracy make that visible next to mc_gen.
    mc_recs = [r for r in records if r["kind"] == "mc" and "answer" in r]
    if mc_recs:
        preds: dict[str, int] = {}
        refs: dict[str, int] = {}
        for r in mc_recs:
            preds[str(r.get("pred_letter"))] = preds.get(str(r.get("pred_letter")), 0) + 1
            refs[r["answer"]] = refs.get(r["answer"], 0) + 1
        mc["pred_letter_counts"] = dict(sorted(preds.items()))
        mc["answer_letter_counts"] = dict(sorted(refs.items()))
        mc["constant_letter_acc"] = max(refs.values()) / len(mc_recs)
        mc["top_pred_letter_share"] = max(preds.values()) / len(mc_recs)
    # Every sample, answered by generation: mc_gen for multiple choice, em for open answers.
    gen_hits = [bool(r["hits"].get("mc_gen", r["hits"].get("em", False))) for r in records]
    out["overall_gen"] = sum(gen_hits) / len(gen_hits) if gen_hits else float("nan")
    return out
