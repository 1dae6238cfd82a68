"""Text around the study's tables: the setup actually run and a commentary derived from the numbers.

The commentary states what the numbers support and nothing more: whether the benchmark separates
the teacher from the student (if not, no ordering claim can be tested), which claims fail and by how
much, and a reminder when the preset is the smoke test.
"""

from __future__ import annotations

import math

from grace_ds.study.presets import ModelSpec, StudyPreset
from grace_ds.study.report import Check, Stat


def _model(m) -> str:
    if isinstance(m, ModelSpec):
        return (f"text {m.hidden_size}x{m.num_layers} layers (MLP {m.intermediate_size}), "
                f"vision {m.vision_width}x{m.vision_depth}")
    return str(m)


def setup_text(p: StudyPreset, seeds: int, seconds: float) -> str:
    return "\n".join([
        "## Setup",
        "",
        f"- Data: synthetic VQA (`grace_ds.data.synthetic`), difficulty `{p.difficulty}` (hard-val: "
        f"`{p.hard_difficulty}`), {p.train_samples} train / {p.val_samples} val / {p.hard_val_samples} hard-val samples, "
        f"{p.image_size}px images, data seed {p.data_seed}; question types "
        f"{', '.join(p.qtypes) if p.qtypes else 'all six'}; multiple-choice share "
        f"{'0.6 (default)' if p.mc_fraction is None else f'{p.mc_fraction:g}'}.",
        f"- Teacher: {_model(p.teacher)}; student: {_model(p.student)} (Qwen2-VL family, shared tokenizer).",
        f"- Steps (micro batch {p.micro_batch} x accum {p.grad_accum}): teacher {p.teacher_steps} at micro batch "
        f"{p.teacher_micro_batch or p.micro_batch} (lr {p.teacher_lr:g}), "
        f"bf16 student {p.baseline_steps} (lr {p.baseline_lr:g}), every W4/W8 student {p.qat_steps} more from the bf16 "
        f"student (lr {p.qat_lr:g}, vision frozen). Group size {p.group_size}; GDKD T = {p.kd_temperature:g}, "
        f"omega = {p.omega:g}; IB controller of the authors' script (tau 3.0, eta 0.003, beta 0.5 in [0.1, 1.0]; "
        "without the controller beta stays 0.5; one ablation row uses the code defaults); naive KD = token KL at "
        "T = 1, weight 1.",
        "- Checks: student rows are compared seed by seed (each seed's W4/W8 rows start from that seed's bf16 "
        "student), so the spread of a difference is the std of its per-seed differences.",
        f"- Seeds: {seeds} per student row (the seed sets the student's init, data order and QAT run); the teacher "
        "is trained once.",
        f"- Evaluation: {'all' if p.eval_samples is None else f'the first {p.eval_samples}'} samples of each held-out "
        f"split, greedy decoding ({p.max_new_tokens} new tokens), quantised students scored with their integer weights.",
        f"- Wall time of this invocation: {seconds / 60:.1f} min (cached runs are not re-timed).",
    ])


HOW_TO_RUN = """## How to run it

- CPU smoke (CI, checks that every row is produced): `python launch/study.py --preset cpu-smoke --out /tmp/s`
  (`tests/test_study.py` runs it).
- The real comparison (`--preset gpu`, 3 seeds, 34 runs) in one device call on one GPU: 8.3 minutes on
  one H200 (2026-11-29), 7.0 on two. The device machine has no
  deepspeed/webdataset: build the wheels here first (`bash ../shared/tools/device-wheels.sh` -> `.whl/`),
  then run, carrying `.whl`, on `nvidia-h200` (or any H100/H200 kind; extra GPUs share the runs):

      bash scripts/study_device.sh --preset gpu --out /tmp/study --jobs 24 --time-budget 480 \\
          --deadline 565 --prune --no-progress          # device call: timeout_s 598, carry [".whl"]

  5 seeds (docs/study.md, 2026-11-28) take a second call for seeds 3-4: the same command with
  `--first-seed 3 --seeds 2`; unpack both `runs.tgz` into one directory and report with `--seeds 5`
  (training is deterministic per seed, so the merge is one 5-seed study).
  Exit code 3 means the budget or deadline stopped it: run the same command again on the warm machine
  (finished runs are cached under `--out`; a run cut mid-training resumes from its last checkpoint).
  `$OUT` gets `study.{md,json}`, `runs.tgz` (per-run logs, scores, first/last training metrics) and GPU/CPU
  load samples. Unpack `runs.tgz` with `study.json` into a directory and rebuild this page from it with
  `python launch/study.py --preset gpu --out DIR --report-only --doc docs/study.md`.
- Any checkpoint on any shard set: `python -m grace_ds.eval --checkpoint DIR --shards DIR [DIR ...] --out r.json`.
- How the preset was sized, and every device run so far: docs/study_runs.md.
"""


def _mean(summary: dict, row: str, split: str = "val") -> Stat | None:
    s = summary.get(row, {}).get(split, {}).get("acc")
    return s if s is not None and s.n and not math.isnan(s.mean) else None


def auto_commentary(summary: dict, checks: list[Check], p: StudyPreset) -> str:
    lines = []
    if p.name == "cpu-smoke":
        lines.append("This is the CPU smoke preset: a handful of steps on tiny models. It checks that every row "
                     "is produced; its numbers are noise and support no claim.")
    for split in ("val", "val_hard"):
        t, s = _mean(summary, "teacher", split), _mean(summary, "student_bf16", split)
        if not (t and s):
            continue
        gap = t.mean - s.mean
        lines.append(f"Teacher {t.mean:.1f} vs bf16 student {s.mean:.1f} on {split} ({gap:+.1f} points).")
        if gap <= max(2.0, s.std):
            lines.append(f"On {split} the benchmark does not separate teacher and student, so distillation has "
                         f"little to transfer there: the {split} checks cannot be meaningful. Raise the teacher's "
                         "steps/size or change the split's difficulty.")
        if t.mean > 97.0 and s.mean > 97.0:
            lines.append(f"Both saturate {split}.")
    collapsed = [r for r, per in summary.items()
                 if per.get("val", {}).get("top_letter_share", Stat(0, 0, 0)).n
                 and per["val"]["top_letter_share"].mean >= 90.0]
    if collapsed:
        const = next(iter(summary.values())).get("val", {}).get("constant_letter_acc")
        lines.append(f"{len(collapsed)} of {len(summary)} rows answer (almost) every multiple-choice question with the same "
                     f"letter ({', '.join(sorted(collapsed))}): their MC accuracy is that letter's share of the answers, "
                     "not evidence of reading the image" + (f" (always the most frequent letter: {const.mean:.1f}%)"
                                                              if const is not None and const.n else "") + ".")
    if p.name == "gpu":
        lines.append("The gpu preset's sizes come from the measured device runs in docs/study_runs.md, which "
                     "also discusses these results.")
    one_seed = [r for r, per in summary.items() if r != "teacher" and 0 < per.get("val", {}).get("acc", Stat(0, 0, 0)).n < 2]
    if one_seed:
        lines.append("One seed per row: the spread is unknown (taken as 0), so a PASS here only means the means are "
                     "ordered, not that the gap is beyond noise. Run with --seeds 3 before reading anything into it.")
    fails = [c for c in checks if c.verdict != "PASS"]
    if fails:
        lines.append("Claims that did not hold here: " + "; ".join(f"{c.claim} [{c.split}] ({c.detail})" for c in fails) + ".")
    else:
        lines.append("Every checked claim of the paper passed (rules above the checks table).")
    return "\n\n".join(lines) + "\n\n" + HOW_TO_RUN
