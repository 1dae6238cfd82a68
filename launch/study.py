"""Reproduce the paper's comparison on the synthetic VQA benchmark, with one command.

    python launch/study.py [--preset gpu|cpu|cpu-smoke] [--out DIR] [--seeds N] [--jobs N] [--doc docs/study.md]

Steps: synthetic train / val / hard-val shards -> teacher (larger tiny VLM, CE only) -> per seed:
the student in 16 bits with CE only (baseline) -> W4 students from it: RTN, QAT (CE), QAT + naive KD
(token KL, T=1), QAT + GRACE, GRACE ablations (GDKD only, RCKA only, IB controller off) and W8
GRACE -> evaluation of every model on val and val_hard -> tables shaped like the paper's Tables 2
and 4 (mean ± std over seeds) and a PASS/FAIL check of the paper's ordering.

Resumable: each run's export and scores are cached under --out; re-running skips finished runs.
Writes <out>/study.json and <out>/study.md (and --doc, by default docs/study.md for the gpu preset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpu", choices=("gpu", "cpu", "cpu-smoke"))
    ap.add_argument("--out", default=None, help="study directory (default runs/study-<preset>)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per student row (preset default: gpu 3, cpu-smoke 1)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds are first-seed .. first-seed + seeds - 1 (run seeds 3-4 in a second call with "
                         "--first-seed 3 --seeds 2, unpack both into one --out, then --report-only --seeds 5)")
    ap.add_argument("--doc", default=None, help="also write the markdown here (default: docs/study.md for gpu)")
    ap.add_argument("--notes", default=None, help="a markdown file appended as the commentary section")
    ap.add_argument("--subprocess", action="store_true", help="run each training in a fresh process")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no new run after this many seconds (exit code 3: run again to continue)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each in its own process, spread over the visible GPUs (several per GPU "
                         "is fine: the study's models are small); default 1 = in this process, in plan order")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="with --jobs > 1: stop the runs still going at this time (they resume from their last "
                         "checkpoint when the command is run again; exit code 3)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a preset field, e.g. --set teacher_steps=600 (see grace_ds/study/presets.py)")
    ap.add_argument("--prune", action="store_true",
                    help="delete step checkpoints and the exports of scored rows (keeps teacher + bf16 finals)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rebuild study.{md,json} (and --doc) from the scored runs under --out, "
                         "e.g. the runs.tgz that scripts/study_device.sh brings back")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def apply_sets(preset, items):
    """--set FIELD=VALUE on the preset dataclass; the value is parsed as YAML (numbers, bools, null)."""
    import dataclasses

    import yaml

    fields = {f.name for f in dataclasses.fields(preset)}
    kw = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        kw[key] = yaml.safe_load(value)
    return preset.with_overrides(**kw) if kw else preset


def main(argv=None) -> int:
    args = parse_args(argv)
    from grace_ds.export.io import atomic_write_text
    from grace_ds.study.presets import get_preset
    from grace_ds.study.report import check_claims, missing_rows, render_markdown, summarise
    from grace_ds.study.runner import Study
    from grace_ds.study.writeup import auto_commentary, setup_text

    preset = apply_sets(get_preset(args.preset), args.set)
    out = Path(args.out or REPO / "runs" / f"study-{args.preset}")
    study = Study(preset, out, seeds=args.seeds, first_seed=args.first_seed, subprocess_runs=args.subprocess, progress=not args.no_progress,
                  time_budget_s=args.time_budget, deadline_s=args.deadline, prune=args.prune)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: expected >= 1")
    if args.report_only:
        study.check_preset()              # the scores must come from this preset
        prior = out / "study.json"
        seconds = json.loads(prior.read_text()).get("seconds", 0.0) if prior.exists() else 0.0
        scores = study.collect()
        result = {"scores": scores, "seconds": seconds, "complete": not missing_rows(summarise(scores))}
    else:
        result = study.run(jobs=args.jobs)
    summary = summarise(result["scores"])
    checks = check_claims(summary, scores=result["scores"])
    missing = missing_rows(summary)
    notes = auto_commentary(summary, checks, preset)
    if args.notes:
        notes = Path(args.notes).read_text() + "\n\n" + notes
    md = render_markdown(summary, checks, preset=preset.name, seeds=len(study.seeds), notes=notes,
                         hard_difficulty=preset.hard_difficulty, scores=result["scores"],
                         setup=setup_text(preset, len(study.seeds), result["seconds"]))
    doc = {
        "preset": preset.name, "seeds": study.seeds, "seconds": result["seconds"],
        "scores": result["scores"],
        "summary": {r: {s: {m: vars(st) for m, st in ms.items()} for s, ms in ss.items()} for r, ss in summary.items()},
        "checks": [vars(c) for c in checks], "missing_rows": missing, "complete": result["complete"],
    }
    # atomic: a study killed while writing leaves the previous tables, not half of the new ones
    atomic_write_text(out / "study.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "study.md", md)
    doc_path = args.doc or (str(REPO / "docs" / "study.md") if preset.name == "gpu" else None)
    if not result["complete"]:
        print(md)
        print(f"INCOMPLETE: {len(missing)} row/split cells missing; partial tables in {out / 'study.md'}. "
              f"Run the same command again to continue (finished runs are cached).", file=sys.stderr)
        return 3
    if doc_path:
        Path(doc_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(doc_path), md)
    print(md)
    print(f"wrote {out / 'study.json'} and {out / 'study.md'}" + (f" and {doc_path}" if doc_path else ""))
    if missing:
        print(f"MISSING rows: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
