"""launch/study.py: table + ordering logic on made-up numbers, RTN rows, and the cpu-smoke study end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grace_ds.study.report import (
    ABLATION_ROWS,
    MAIN_ROWS,
    SPLITS,
    ablation_table,
    check_claims,
    main_table,
    missing_rows,
    render_markdown,
    stat,
    summarise,
)

REPO = Path(__file__).resolve().parents[1]
ROWS = list(dict.fromkeys([k for k, _, _ in MAIN_ROWS] + [k for k, *_ in ABLATION_ROWS]))


def _scores(means: dict[str, float], jitter: float = 0.0, seeds: int = 3) -> dict:
    """Per-seed accuracies (0..1) around `means` (points) with a +-jitter pattern whose std is known."""
    offs = [-jitter, 0.0, jitter][:seeds]
    return {row: {split: {"acc": [(m + o) / 100 for o in offs], "mc_ll": [(m + o) / 100 for o in offs]}
                  for split in SPLITS} for row, m in means.items()}


PAPER_LIKE = {"teacher": 80.0, "student_bf16": 72.0, "student_bf16_long": 73.0, "rtn_w4": 60.0, "qat_w4": 66.0, "qat_kd_w4": 70.0,
              "grace_w4": 79.0, "grace_w8": 79.5, "gdkd_w4": 74.0, "rcka_w4": 69.0, "grace_noib_w4": 76.0,
              "grace_codectl_w4": 78.0}


def test_stat_mean_and_sample_std():
    s = stat([0.70, 0.72, 0.74])
    assert math.isclose(s.mean, 72.0) and math.isclose(s.std, 2.0) and s.n == 3
    assert s.fmt() == "72.0 ± 2.0"
    one = stat([0.5])
    assert one.std == 0.0 and one.fmt() == "50.0"
    assert stat([float("nan")]).n == 0 and stat([]).fmt() == "-"


def test_all_claims_pass_when_the_paper_ordering_holds_beyond_spread():
    checks = check_claims(summarise(_scores(PAPER_LIKE, jitter=0.5)))
    assert len(checks) == 9 * len(SPLITS)
    assert all(c.verdict == "PASS" for c in checks), [c for c in checks if c.verdict != "PASS"]


def test_claims_fail_within_spread_and_when_reversed():
    means = dict(PAPER_LIKE, qat_kd_w4=66.5, rtn_w4=68.0, teacher=82.0, grace_w4=71.0)
    checks = {(c.claim, c.split): c for c in check_claims(summarise(_scores(means, jitter=1.0)))}
    v = lambda claim: checks[(claim, "val")]   # noqa: E731
    # 66.5 vs 66.0 with std 1.0 each: spread 1.41 > 0.5 -> not separated
    assert v("QAT + naive KD > QAT").verdict == "FAIL" and "within seed spread" in v("QAT + naive KD > QAT").detail
    # QAT 66 < RTN 68 by more than the spread -> reversed
    assert v("QAT > RTN").verdict == "FAIL" and "reversed" in v("QAT > RTN").detail
    # GRACE 71 < bf16 72: >= fails, inside the spread; and below the longer-trained bf16 (73) too
    assert v("GRACE W4 >= bf16 student").verdict == "FAIL"
    assert "within seed spread" in v("GRACE W4 >= bf16 student").detail
    assert v("GRACE W4 >= bf16 student (same steps)").verdict == "FAIL"
    # 11 points below the teacher
    assert v("GRACE W4 within 2 points of the teacher").verdict == "FAIL"
    # the IB check: 71 vs 76 reversed
    assert v("IB controller helps (GRACE > IB off)").verdict == "FAIL"


def test_paired_seeds_separate_what_the_unpaired_spread_cannot():
    """Seed-to-seed variance shared by two rows (same bf16 start) cancels in the paired difference."""
    from grace_ds.study.report import paired_spread

    base = [0.70, 0.78, 0.74]                         # std 4 points across seeds
    scores = {"qat_w4": {"val": {"acc": base}}, "rtn_w4": {"val": {"acc": [x - 0.03 for x in base[:2]] + [0.70]}}}
    summary = summarise(scores)
    unpaired = {c.claim: c for c in check_claims(summary, splits=("val",))}["QAT > RTN"]
    paired = {c.claim: c for c in check_claims(summary, splits=("val",), scores=scores)}["QAT > RTN"]
    assert unpaired.verdict == "FAIL" and "within seed spread" in unpaired.detail
    # differences 3, 3, 4 points: mean 3.33 > std 0.58
    assert paired.verdict == "PASS" and "paired spread 0.6 over 3 seeds" in paired.detail, paired.detail
    assert math.isclose(paired_spread([0.5, 0.6, 0.7], [0.4, 0.5, 0.7]), math.sqrt(1 / 3) * 10)
    # not paired: seed counts differ, a seed is missing (None), or one seed
    assert paired_spread([0.5, 0.6], [0.5, 0.6, 0.7]) is None
    assert paired_spread([0.5, None, 0.7], [0.4, 0.5, 0.7]) is None
    assert paired_spread([0.5], [0.4]) is None
    # a reversal by more than the paired spread is called one
    rev = {"qat_w4": {"val": {"acc": base}}, "rtn_w4": {"val": {"acc": [x + 0.05 for x in base]}}}
    c = {c.claim: c for c in check_claims(summarise(rev), splits=("val",), scores=rev)}["QAT > RTN"]
    assert c.verdict == "FAIL" and c.detail.endswith("reversed")


def test_paired_table_lists_each_row_minus_qat_seed_by_seed():
    from grace_ds.study.report import paired_table

    scores = _scores(PAPER_LIKE, jitter=1.0)
    scores["rcka_w4"]["val"]["acc"] = [0.70, 0.72, 0.71]          # QAT is 65, 66, 67 on val
    scores["gdkd_w4"]["val"]["acc"] = [0.60, None, 0.62]          # a missing seed: not paired
    table = paired_table(scores)
    rows = {ln.split(" | ")[0][2:]: ln for ln in table.splitlines()[2:]}
    assert rows["RCKA only (W4)"].split(" | ")[1] == "+5.0 ± 1.0"      # 70-65, 72-66, 71-67
    assert rows["GDKD only (W4)"].split(" | ")[1] == "-"
    assert "Teacher" not in table and "QAT (CE only)" not in table
    assert rows["QAT + GRACE (W8)"].split(" | ")[1] == "+13.5 ± 0.0"   # 79.5 - 66.0, identical jitter
    md = render_markdown(summarise(scores), check_claims(summarise(scores), scores=scores), preset="gpu",
                         seeds=3, scores=scores)
    assert "## Paired by seed: each row minus QAT (CE only)" in md


def test_ge_passes_on_equal_means_and_missing_rows_are_reported():
    means = dict(PAPER_LIKE, grace_w4=72.0)
    checks = {(c.claim, c.split): c for c in check_claims(summarise(_scores(means)))}
    assert checks[("GRACE W4 >= bf16 student", "val")].verdict == "PASS"
    partial = _scores({k: v for k, v in PAPER_LIKE.items() if k != "rcka_w4"})
    summary = summarise(partial)
    assert missing_rows(summary) == ["rcka_w4/val", "rcka_w4/val_hard"]
    by = {(c.claim, c.split): c.verdict for c in check_claims(summary)}
    assert by[("RCKA helps (RCKA only > none)", "val")] == "MISSING"
    assert "| RCKA only | - | ✓ | - | - | - | - |" in ablation_table(summary)


def test_tables_have_every_row_and_the_markdown_is_complete():
    summary = summarise(_scores(PAPER_LIKE, jitter=0.5))
    main = main_table(summary).splitlines()
    assert len(main) == 2 + len(MAIN_ROWS)
    assert main[2].startswith("| Teacher") and "80.0 ± 0.5" in main[2]
    assert len(ablation_table(summary).splitlines()) == 2 + len(ABLATION_ROWS)
    md = render_markdown(summary, check_claims(summary), preset="gpu", seeds=3, notes="honest words")
    for needle in ("Table 2 analogue", "Table 4 analogue", "18/18 PASS", "## Commentary", "honest words"):
        assert needle in md


def test_student_runs_set_the_documented_knobs(tmp_path):
    from grace_ds.study.presets import get_preset
    from grace_ds.study.runner import student_runs

    runs = {r.key: r for r in student_runs(get_preset("gpu"))}
    assert set(runs) == set(ROWS) - {"teacher", "student_bf16"}
    assert runs["rtn_w4"].kind == "rtn" and runs["grace_w8"].bits == 8
    long = runs["student_bf16_long"]     # the W4 rows' recipe without quantisation or teacher
    assert long.kind == "train" and long.bits is None and not long.teacher and not long.grace["use_kd"]
    kd = runs["qat_kd_w4"].grace
    assert kd["kd_mode"] == "kl" and kd["temperature"] == 1.0 and not kd["use_rcka"] and runs["qat_kd_w4"].teacher
    assert not runs["qat_w4"].teacher and not runs["qat_w4"].grace["use_kd"]
    g = runs["grace_w4"].grace
    assert g["kd_mode"] == "gdkd" and g["gate"] and g["use_rcka"] and g["controller"]
    assert runs["grace_noib_w4"].grace["controller"] is False and runs["grace_noib_w4"].grace["use_rcka"]
    assert not runs["gdkd_w4"].grace["use_rcka"] and not runs["rcka_w4"].grace["use_kd"]
    # every GRACE row runs the authors' script controller; one ablation row runs the code defaults,
    # and differs from GRACE W4 in nothing else
    from grace_ds.distill.controller import CONTROLLER_PRESETS

    script, code = CONTROLLER_PRESETS["authors_script"], CONTROLLER_PRESETS["code"]
    for key in ("grace_w4", "grace_w8", "grace_noib_w4", "gdkd_w4"):
        assert all(runs[key].grace[k] == v for k, v in script.items()), key
    alt = runs["grace_codectl_w4"].grace
    assert all(alt[k] == v for k, v in code.items())
    assert {k: v for k, v in alt.items() if k not in code} == {k: v for k, v in g.items() if k not in code}
    # grace_overrides reach every distillation row and no other
    over = {r.key: r for r in student_runs(get_preset("gpu").with_overrides(grace_overrides={"tau": 7.0, "beta_max": 2.0}))}
    assert all((r.grace.get("tau") == 7.0 and r.grace.get("beta_max") == 2.0) == r.teacher
               for r in over.values() if r.grace and r.key != "grace_codectl_w4")
    pinned = student_runs(get_preset("gpu").with_overrides(grace_overrides={"tau": 9.0, "omega": 2.0}))
    pinned = {r.key: r.grace for r in pinned}
    assert pinned["grace_w4"]["tau"] == 9.0 and pinned["grace_codectl_w4"]["tau"] == 0.35   # keeps its controller
    assert pinned["grace_codectl_w4"]["omega"] == 2.0
    assert over["grace_w4"].grace["kd_mode"] == "gdkd" and runs["grace_w4"].grace["tau"] == 3.0
    with pytest.raises(ValueError, match=r"unknown GraceConfig fields \['taux'\]: use some of .*tau"):
        student_runs(get_preset("gpu").with_overrides(grace_overrides={"taux": 3.0}))
    # every config builds against the engine's typed config (a typo'd knob fails here, not on the GPU)
    from grace_ds.engine.config import config_from_dict
    from grace_ds.study.runner import Study

    study = Study(get_preset("cpu-smoke"), REPO / "runs" / "unused", progress=False)
    for spec in student_runs(get_preset("gpu")):
        if spec.kind != "train":
            continue
        raw = study.train_config(spec.key, student=REPO, seed=0, steps=5, lr=1e-4, bits=spec.bits, teacher=REPO,
                                 grace=spec.grace, freeze_vision=True, init=None)
        raw["data"]["train_dirs"] = [str(tmp_path)]
        raw["model"]["teacher"] = "tiny-qwen2vl-teacher" if spec.teacher else None
        raw["model"]["student"] = "tiny-qwen2vl-student"
        cfg = config_from_dict(raw)
        assert cfg.quant.enabled == (spec.bits is not None) and (spec.bits is None or cfg.quant.bits == spec.bits)


def test_cpu_smoke_study_produces_every_row_and_resumes(tmp_path):
    """The whole study on the cpu-smoke preset, 2 runs at a time in job processes (the parallel
    scheduler); a second, serial invocation reuses every cached run."""
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(REPO / "launch" / "study.py"), "--preset", "cpu-smoke", "--out", str(out),
           "--no-progress", "--prune"]
    r = subprocess.run(cmd + ["--jobs", "2"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # dependencies respected: no W4 run started before its bf16 student finished, no KD run before the teacher
    log = r.stdout.splitlines()
    at = {ln.split()[2]: i for i, ln in enumerate(log) if ln.startswith("[study] finished ")}
    st = {ln.split()[2]: i for i, ln in enumerate(log) if ln.startswith("[study] started ")}
    assert set(st) == set(at) and len(st) == 12
    assert all(st[n] > at["student_bf16_s0"] for n in st if n not in ("teacher", "student_bf16_s0"))
    assert all(st[n] > at["teacher"] for n in ("qat_kd_w4_s0", "grace_w4_s0", "grace_w8_s0", "rcka_w4_s0"))
    assert (out / "runs" / "grace_w4_s0" / "log.txt").exists()       # each job's log survives --prune
    doc = json.loads((out / "study.json").read_text())
    assert doc["missing_rows"] == []
    for row in ROWS:
        for split in SPLITS:
            vals = doc["scores"][row][split]["acc"]
            assert len(vals) == 1 and 0.0 <= vals[0] <= 1.0
    assert len(doc["checks"]) == 18 and {c["verdict"] for c in doc["checks"]} <= {"PASS", "FAIL"}
    md = (out / "study.md").read_text()
    assert "Table 2 analogue" in md and "smoke preset" in md
    # the RTN row is a real W4 export scored with its integer weights
    rtn = json.loads((out / "runs" / "rtn_w4_s0" / "eval.json").read_text())
    assert rtn["model"]["format"] == "fake-quant" and rtn["model"]["bits"] == 4
    grace8 = json.loads((out / "runs" / "grace_w8_s0" / "eval.json").read_text())
    assert grace8["model"]["bits"] == 8 and grace8["model"]["weights"] == "int_weights codes*scales"

    # --prune kept only what later runs need
    assert (out / "runs" / "teacher" / "train" / "final" / "config.json").exists()
    assert (out / "runs" / "student_bf16_s0" / "train" / "final" / "config.json").exists()
    assert not (out / "runs" / "grace_w4_s0" / "train").exists() and not (out / "runs" / "rtn_w4_s0" / "final").exists()

    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[study] trained" not in r2.stdout            # nothing retrained
    assert json.loads((out / "study.json").read_text())["scores"] == doc["scores"]

    # --report-only from what scripts/study_device.sh brings back (preset, scores, logs; no models, no data)
    back = tmp_path / "back"
    for f in [out / "preset.json", out / "study.json", *out.glob("runs/*/eval.json"), *out.glob("runs/*/log.txt")]:
        (back / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, back / f.relative_to(out))
    r3 = subprocess.run([sys.executable, str(REPO / "launch" / "study.py"), "--preset", "cpu-smoke", "--out", str(back),
                         "--report-only", "--no-progress", "--doc", str(tmp_path / "doc.md")],
                        capture_output=True, text=True, env=env, cwd=REPO)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert not (back / "data").exists() and not (back / "models").exists()   # nothing built or trained
    assert json.loads((back / "study.json").read_text())["scores"] == doc["scores"]
    assert (tmp_path / "doc.md").read_text() == (out / "study.md").read_text()   # wall time read from study.json


def test_time_budget_stops_before_any_run_and_presets_cannot_mix(tmp_path):
    from grace_ds.study.presets import get_preset
    from grace_ds.study.runner import Study

    smoke = get_preset("cpu-smoke")
    res = Study(smoke, tmp_path, progress=False, log=lambda *_: None, time_budget_s=0).run()
    assert res["complete"] is False and "teacher" not in res["scores"]
    assert all(v is None for per_row in res["scores"].values() for per_split in per_row.values()
               for vals in per_split.values() for v in vals)   # seed positions kept, nothing scored
    assert (tmp_path / "data" / "val_hard" / "manifest.json").exists()
    with pytest.raises(ValueError, match="different settings.*qat_steps"):
        Study(smoke.with_overrides(qat_steps=99), tmp_path, progress=False, time_budget_s=0).run()
    # only the seed count may change between invocations
    assert Study(smoke, tmp_path, seeds=3, progress=False, log=lambda *_: None, time_budget_s=0).run()["complete"] is False


def test_parallel_failure_names_the_run_and_its_log(tmp_path, monkeypatch):
    """A job that fails is reported with its log; runs that need it are not started."""
    from grace_ds.study.presets import get_preset
    from grace_ds.study.runner import Study

    study = Study(get_preset("cpu-smoke"), tmp_path, progress=False, log=lambda *_: None)
    study.prepare()
    # break the teacher's init so its job fails fast
    (tmp_path / "models" / "teacher_init" / "config.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"teacher \(exit code"):
        study.run(jobs=2)
    log = (tmp_path / "runs" / "teacher" / "log.txt").read_text()
    assert "Traceback" in log
    assert not (tmp_path / "runs" / "grace_w4_s0").exists()        # needs the teacher: never started
    assert (tmp_path / "runs" / "qat_w4_s0" / "eval.json").exists()  # independent of it: finished
    from grace_ds.study.runner import _port_clash

    assert _port_clash("torch.distributed.DistNetworkError: ... EADDRINUSE") and not _port_clash(log)


def test_probe_learnability_trains_and_scores(tmp_path, capsys):
    """benchmarks/probe_learnability.py (the plain-PyTorch loop used to size the gpu preset) runs on a
    study's model and data and prints loss + exact match."""
    import importlib.util

    from grace_ds.study.presets import get_preset
    from grace_ds.study.runner import Study

    Study(get_preset("cpu-smoke"), tmp_path, progress=False, log=lambda *_: None).prepare()
    spec = importlib.util.spec_from_file_location("probe", REPO / "benchmarks" / "probe_learnability.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.main(["--model", str(tmp_path / "models" / "student_init"), "--data", str(tmp_path / "data"),
                       "--steps", "2", "--bs", "2", "--workers", "0", "--eval-every", "1", "--tag", "t"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("t step")]
    assert [ln.split()[2] for ln in lines] == ["1", "2"]
    assert all(0.0 <= float(ln.split()[6]) <= 1.0 for ln in lines)


def test_first_seed_offsets_the_plan_and_survives_the_job_spec(tmp_path):
    """--first-seed 3 --seeds 2 plans seeds 3 and 4 (to merge with a 0-2 run); job processes see the same."""
    from grace_ds.study.presets import get_preset
    from grace_ds.study.runner import Study

    study = Study(get_preset("cpu-smoke"), tmp_path, seeds=2, first_seed=3, progress=False)
    assert study.seeds == [3, 4]
    names = [n for n, *_ in study.plan()]
    assert "student_bf16_s3" in names and "grace_w4_s4" in names and not any(n.endswith("_s0") for n in names)
    tmp_path.mkdir(exist_ok=True)
    study.save_job_spec()
    again = Study.from_job_spec(tmp_path)
    assert again.seeds == [3, 4] and [n for n, *_ in again.plan()] == names
    with pytest.raises(ValueError, match="first-seed -1"):
        Study(get_preset("cpu-smoke"), tmp_path, seeds=2, first_seed=-1, progress=False)


def test_budget_running_out_while_the_last_runs_finish_is_still_complete(tmp_path, monkeypatch):
    """Run 9 regression: every run had started before the time budget ran out and all finished,
    yet the study exited 'incomplete'. Job processes are faked; the scheduler is real."""
    import grace_ds.study.runner as runner
    from grace_ds.study.presets import get_preset

    study = runner.Study(get_preset("cpu-smoke"), tmp_path, progress=False, log=lambda *_: None,
                         time_budget_s=0.3)
    plan = [("teacher", "teacher", None, None)]
    monkeypatch.setattr(study, "plan", lambda: plan)
    t0 = __import__("time").time()

    class FakeJob:   # finishes (writes its score) 0.8 s after the start, past the 0.3 s budget
        def __init__(self, cmd, **kw):
            self.name = cmd[-1]

        def poll(self):
            if __import__("time").time() - t0 < 0.8:
                return None
            (study.runs / self.name / "eval.json").write_text("{}")
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakeJob)
    study.out.mkdir(parents=True, exist_ok=True)
    assert study._run_parallel(jobs=2, t0=t0) is True
    # and a run that could only start after the budget (it waits for the teacher) is still refused
    plan.append(("student_bf16_s0", "student_bf16", 0, None))
    monkeypatch.setattr(study, "deps", lambda key, seed, spec: [] if key == "teacher" else ["teacher"])
    (study.runs / "teacher" / "eval.json").unlink()
    t0 = __import__("time").time()
    assert study._run_parallel(jobs=2, t0=t0) is False
