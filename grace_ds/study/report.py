"""The study's tables (shaped like the paper's Tables 2 and 4) and the check of the paper's ordering.

Pure functions over per-seed scores, so the table and the PASS/FAIL logic are unit-tested with
made-up numbers where the right verdict is known.

Verdicts. "spread" is the seed-to-seed standard deviation of the difference a - b (sample std,
ddof = 1; 0 with one seed):
- paired (the default when per-seed scores are given and both rows have the same seeds): the std of
  the per-seed differences. Seed s of every W4/W8 row starts from the same bf16 student s, with the
  same data order, so most of the seed-to-seed variance is shared and cancels in the difference;
- unpaired (the teacher, one run; or no per-seed scores): sqrt(std_a^2 + std_b^2), as for two
  independent rows. The detail text shows it next to the paired figure.
With n paired seeds, "mean diff > std of diffs" is a one-sided t-test at t > sqrt(n) (p ~ 0.11 at
n = 3, ~ 0.04 at n = 5).
- "a > b":   PASS iff mean_a - mean_b > spread; otherwise FAIL ("within seed spread" or "reversed").
- "a >= b":  PASS iff mean_a >= mean_b; FAIL otherwise (the note says whether the gap is within the
             spread, i.e. not distinguishable from equality).
- "a within d points of b": PASS iff mean_b - mean_a <= d.
All on accuracy in points (percent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Row key -> (label, bits). The order is the table order.
MAIN_ROWS: list[tuple[str, str, str]] = [
    ("teacher", "Teacher (larger tiny VLM, CE)", "bf16"),
    ("student_bf16", "Student baseline (CE)", "bf16"),
    ("student_bf16_long", "Student baseline, + the W4 rows' extra steps (CE)", "bf16"),
    ("rtn_w4", "RTN (post-training rounding)", "W4"),
    ("qat_w4", "QAT (CE only)", "W4"),
    ("qat_kd_w4", "QAT + naive KD (token KL, T=1)", "W4"),
    ("grace_w4", "QAT + GRACE", "W4"),
    ("grace_w8", "QAT + GRACE", "W8"),
]
# Row key -> (label, GDKD, RCKA, IB controller).
ABLATION_ROWS: list[tuple[str, str, bool, bool, bool]] = [
    ("qat_w4", "none (QAT, CE only)", False, False, False),
    ("gdkd_w4", "GDKD only", True, False, False),
    ("rcka_w4", "RCKA only", False, True, False),
    ("grace_noib_w4", "GDKD + RCKA, IB controller off", True, True, False),
    ("grace_w4", "GRACE (all three)", True, True, True),
    ("grace_codectl_w4", "GRACE, controller at the code defaults (tau 0.35, beta 1.0 in [0.1, 5.0])", True, True, True),
]
SPLITS = ("val", "val_hard")
METRICS = ("acc", "mc_gen", "mc_ll", "em")   # acc = all questions answered by generation
HEADLINE = "acc"


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int

    def fmt(self) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "-"
        if self.n == 1:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f}"


def stat(values: list[float]) -> Stat:
    """Mean and sample std (ddof=1) in points; NaNs are dropped."""
    v = [100.0 * x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return Stat(float("nan"), float("nan"), 0)
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return Stat(m, s, len(v))


def summarise(scores: dict) -> dict:
    """scores[row][split][metric] = [per-seed values in 0..1] -> same shape with Stat."""
    return {row: {split: {m: stat(vals) for m, vals in per_split.items()} for split, per_split in per_row.items()}
            for row, per_row in scores.items()}


def _get(summary: dict, row: str, split: str, metric: str = HEADLINE) -> Stat:
    return summary.get(row, {}).get(split, {}).get(metric, Stat(float("nan"), float("nan"), 0))


@dataclass(frozen=True)
class Check:
    claim: str
    split: str
    verdict: str          # PASS | FAIL | MISSING
    detail: str


def paired_diff(va: list | None, vb: list | None) -> Stat:
    """Mean and sample std (points) of the per-seed differences a - b; n = 0 when the rows are not
    paired: either is missing, the seed counts differ, a value is None/NaN, or there is one seed."""
    if not va or not vb or len(va) != len(vb) or len(va) < 2 \
            or any(x is None or math.isnan(x) for x in (*va, *vb)):
        return Stat(float("nan"), float("nan"), 0)
    return stat([x - y for x, y in zip(va, vb)])


def paired_spread(va: list[float] | None, vb: list[float] | None) -> float | None:
    """Sample std (points) of the per-seed differences, or None when the rows are not paired."""
    d = paired_diff(va, vb)
    return d.std if d.n else None


def _compare(claim: str, split: str, a: Stat, b: Stat, kind: str, points: float = 2.0,
             paired: float | None = None) -> Check:
    if a.n == 0 or b.n == 0 or math.isnan(a.mean) or math.isnan(b.mean):
        return Check(claim, split, "MISSING", "a row has no result")
    diff = a.mean - b.mean
    unpaired = math.sqrt(a.std ** 2 + b.std ** 2)
    spread = unpaired if paired is None else paired
    what = "spread" if paired is None else f"paired spread {paired:.1f} over {a.n} seeds, unpaired"
    nums = f"{a.mean:.1f} vs {b.mean:.1f} (diff {diff:+.1f}, {what} {unpaired:.1f}" + (
        "; one seed: no spread estimate)" if min(a.n, b.n) < 2 and kind != "within" else ")")
    if kind == ">":
        if diff > spread:
            return Check(claim, split, "PASS", nums)
        why = "within seed spread" if diff >= -spread else "reversed"
        return Check(claim, split, "FAIL", f"{nums}: {why}")
    if kind == ">=":
        if diff >= 0:
            return Check(claim, split, "PASS", nums + ("" if diff > spread else ": gap within seed spread"))
        why = "within seed spread" if diff >= -spread else "reversed beyond seed spread"
        return Check(claim, split, "FAIL", f"{nums}: {why}")
    if kind == "within":
        gap = b.mean - a.mean
        verdict = "PASS" if gap <= points else "FAIL"
        return Check(claim, split, verdict, f"{a.mean:.1f} vs {b.mean:.1f}: {gap:.1f} points below (limit {points:g})")
    raise ValueError(f"unknown comparison {kind!r}")


# (claim text, row a, kind, row b)
CLAIMS: list[tuple[str, str, str, str]] = [
    ("GRACE W4 >= bf16 student", "grace_w4", ">=", "student_bf16"),
    # the same claim against a bf16 student trained as many steps as the W4 rows (same recipe minus
    # quantisation and teacher): without it, the extra training alone can make the first one pass
    ("GRACE W4 >= bf16 student (same steps)", "grace_w4", ">=", "student_bf16_long"),
    ("GRACE W4 > QAT + naive KD", "grace_w4", ">", "qat_kd_w4"),
    ("QAT + naive KD > QAT", "qat_kd_w4", ">", "qat_w4"),
    ("QAT > RTN", "qat_w4", ">", "rtn_w4"),
    ("GRACE W4 within 2 points of the teacher", "grace_w4", "within", "teacher"),
    ("GDKD helps (GDKD only > none)", "gdkd_w4", ">", "qat_w4"),
    ("RCKA helps (RCKA only > none)", "rcka_w4", ">", "qat_w4"),
    ("IB controller helps (GRACE > IB off)", "grace_w4", ">", "grace_noib_w4"),
]


def check_claims(summary: dict, splits=SPLITS, metric: str = HEADLINE, scores: dict | None = None) -> list[Check]:
    """The paper's claims on `summary`; with the per-seed `scores` (summarise's input) the
    comparisons between student rows are paired by seed (module docstring)."""
    def seeds(row, split):
        return (scores or {}).get(row, {}).get(split, {}).get(metric)

    out = []
    for split in splits:
        for claim, a, kind, b in CLAIMS:
            paired = paired_spread(seeds(a, split), seeds(b, split)) if kind != "within" else None
            out.append(_compare(claim, split, _get(summary, a, split, metric), _get(summary, b, split, metric), kind,
                                paired=paired))
    return out


def missing_rows(summary: dict, splits=SPLITS) -> list[str]:
    """Rows of either table without a headline number on some split (the smoke test's criterion)."""
    keys = [k for k, _, _ in MAIN_ROWS] + [k for k, *_ in ABLATION_ROWS]
    return [f"{k}/{s}" for k in dict.fromkeys(keys) for s in splits if _get(summary, k, s).n == 0]


def main_table(summary: dict) -> str:
    head = ("| Model | Weights | val acc | val MC (gen) | val MC (loglik) | val open EM | hard acc | "
            "hard MC (loglik) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for key, label, bits in MAIN_ROWS:
        cells = [_get(summary, key, "val", m).fmt() for m in ("acc", "mc_gen", "mc_ll", "em")]
        cells += [_get(summary, key, "val_hard", m).fmt() for m in ("acc", "mc_ll")]
        lines.append(f"| {label} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(summary: dict) -> str:
    mark = {True: "✓", False: "-"}
    lines = ["| W4 student | GDKD | RCKA | IB | val acc | val MC (loglik) | hard acc |", "|---|---|---|---|---|---|---|"]
    for key, label, g, r, ib in ABLATION_ROWS:
        cells = [_get(summary, key, "val", "acc").fmt(), _get(summary, key, "val", "mc_ll").fmt(),
                 _get(summary, key, "val_hard", "acc").fmt()]
        lines.append(f"| {label} | {mark[g]} | {mark[r]} | {mark[ib]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(scores: dict, base: str = "qat_w4", metric: str = HEADLINE) -> str:
    """Every student row minus `base`, seed by seed: the differences the checks use, for each row."""
    labels = {k: f"{label} ({bits})" for k, label, bits in MAIN_ROWS}
    labels.update({k: label + " (W4)" for k, label, *_ in ABLATION_ROWS if k not in labels})
    lines = [f"| Row | val: row - {base} | hard: row - {base} |", "|---|---|---|"]
    for key in labels:
        if key in ("teacher", base):
            continue
        cells = []
        for split in SPLITS:
            d = paired_diff(scores.get(key, {}).get(split, {}).get(metric),
                            scores.get(base, {}).get(split, {}).get(metric))
            cells.append("-" if d.n == 0 else f"{d.mean:+.1f} ± {d.std:.1f}")
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_table(checks: list[Check]) -> str:
    lines = ["| Claim (paper) | Split | Verdict | Numbers (acc, points) |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.claim} | {c.split} | **{c.verdict}** | {c.detail} |")
    return "\n".join(lines)


def render_markdown(summary: dict, checks: list[Check], *, preset: str, seeds: int, notes: str = "",
                    setup: str = "", hard_difficulty: str = "hard", scores: dict | None = None) -> str:
    n_pass = sum(c.verdict == "PASS" for c in checks)
    parts = [
        "# Study: GRACE vs. its baselines on the synthetic VQA benchmark",
        "",
        f"Generated by `python launch/study.py --preset {preset}` ({seeds} seed(s) per student row; "
        "mean ± sample std over seeds, accuracy in percent). Regenerate rather than edit the tables.",
        "",
    ]
    if setup:
        parts += [setup, ""]
    parts += [
        "## Table 2 analogue: teacher, bf16 student, INT4/INT8 students",
        "",
        "\"acc\" = every held-out question answered by greedy generation (multiple choice: the parsed "
        "answer letter; open questions: exact match). MC (loglik) picks the option letter with the highest "
        "log-likelihood. `val` = held-out split at the training difficulty, `hard` = held-out split at "
        f"difficulty {hard_difficulty}.",
        "",
        main_table(summary),
        "",
        "## Table 4 analogue: GRACE ablation (W4 students)",
        "",
        ablation_table(summary),
        "",
    ]
    if scores is not None and seeds > 1:
        parts += [
            "## Paired by seed: each row minus QAT (CE only)",
            "",
            "Seed s of every W4/W8 row starts from the same bf16 student s, so differences are taken seed by "
            "seed: mean ± std of the per-seed differences, in points (the spread the checks below use).",
            "",
            paired_table(scores),
            "",
        ]
    parts += [
        f"## The paper's ordering, checked ({n_pass}/{len(checks)} PASS)",
        "",
        "`a > b` passes only when the gap exceeds the seed spread of the difference: the std of the per-seed "
        "differences when both rows were trained from the same seeds' bf16 students (paired), otherwise "
        "sqrt(std_a² + std_b²). `a >= b` passes when the mean is not lower; \"within 2 points\" compares means.",
        "",
        checks_table(checks),
        "",
    ]
    if notes:
        parts += ["## Commentary", "", notes.strip(), ""]
    return "\n".join(parts)
