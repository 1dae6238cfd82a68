"""The whole comparison, in the order it happens, resumable run by run.

    data -> model inits -> teacher (CE) -> per seed: bf16 student (CE) -> RTN, QAT, QAT+KD, GRACE,
    GRACE ablations, W8 GRACE (all from that seed's bf16 student) -> evaluation on val and val_hard
    -> tables + ordering checks

Every training goes through `grace_ds.engine.run_training` (in this process, or one subprocess of
`launch/train.py`-equivalent per run with `subprocess=True`), every score through
`grace_ds.eval.evaluate_checkpoint`. Each run's artefacts live in `<out>/runs/<name>/`:
`train/final/` (the export) and `eval.json`; a run whose `eval.json` exists is skipped, a run whose
`final/` exists is only evaluated, and an interrupted training resumes from its last checkpoint
(train.resume=auto), so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from grace_ds.distill.controller import CONTROLLER_PRESETS
from grace_ds.study.presets import ModelSpec, StudyPreset
from grace_ds.study.report import SPLITS

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RunSpec:
    """One student (or the teacher) of the study."""

    key: str                 # row key in report.MAIN_ROWS / ABLATION_ROWS
    kind: str                # "train" | "rtn"
    bits: int | None = None  # None = not quantised
    teacher: bool = False    # distil from the study's teacher
    grace: dict | None = None


# The IB controller of every GRACE row: the set of the authors' published script (tau 3.0, eta 0.003,
# beta 0.5 in [0.1, 1.0]; grace-method.md section 3), which the paper's numbers come from. The code
# defaults (tau 0.35, beta 1.0 in [0.1, 5.0]) are one ablation row: in run 5 they let GDKD sit above
# tau, raised beta to 1.26 and cost accuracy, and in run 6 they were 4.4 +- 1.8 points (paired, 3 seeds)
# below the script set (docs/study_runs.md).
SCRIPT_CONTROLLER = dict(CONTROLLER_PRESETS["authors_script"])
CODE_CONTROLLER = dict(CONTROLLER_PRESETS["code"])


# The W4/W8 students, all initialised from the same seed's bf16 student.
def student_runs(preset: StudyPreset) -> list[RunSpec]:
    T = preset.kd_temperature
    off = dict(use_kd=False, use_rcka=False, controller=False)
    # GDKD rows without the controller hold beta at the script set's beta_init (0.5)
    gdkd = dict(use_kd=True, kd_mode="gdkd", gate=True, temperature=T, **SCRIPT_CONTROLLER)
    full = dict(gdkd, use_rcka=True, omega=preset.omega, controller=True)
    runs = [
        # the bf16 student trained on for as many steps as the W4 rows, same lr and frozen vision:
        # the baseline that separates "quantised + distilled" from "trained longer"
        RunSpec("student_bf16_long", "train", bits=None, grace=off),
        RunSpec("rtn_w4", "rtn", bits=4),
        RunSpec("qat_w4", "train", bits=4, grace=off),
        # naive KD: token KL(p_T || p_S) at T = 1, fixed weight 1, no gate, no RCKA (issue 6)
        RunSpec("qat_kd_w4", "train", bits=4, teacher=True,
                grace=dict(use_kd=True, kd_mode="kl", gate=False, temperature=1.0, use_rcka=False,
                           controller=False, fixed_beta=1.0)),
        RunSpec("grace_w4", "train", bits=4, teacher=True, grace=full),
        RunSpec("gdkd_w4", "train", bits=4, teacher=True, grace=dict(gdkd, use_rcka=False, controller=False)),
        RunSpec("rcka_w4", "train", bits=4, teacher=True,
                grace=dict(use_kd=False, use_rcka=True, omega=preset.omega, controller=False)),
        RunSpec("grace_noib_w4", "train", bits=4, teacher=True,
                grace=dict(gdkd, use_rcka=True, omega=preset.omega, controller=False)),
        RunSpec("grace_w8", "train", bits=8, teacher=True, grace=full),
        RunSpec("grace_codectl_w4", "train", bits=4, teacher=True, grace={**full, **CODE_CONTROLLER}),
    ]
    if preset.grace_overrides:
        import dataclasses

        from grace_ds.distill import GraceConfig

        known = {f.name for f in dataclasses.fields(GraceConfig)}
        unknown = sorted(set(preset.grace_overrides) - known)
        if unknown:   # before any run starts, not in every distillation job after the teacher trained
            raise ValueError(f"grace_overrides has unknown GraceConfig fields {unknown}: use some of "
                             f"{', '.join(sorted(known))}")
        runs = [replace(r, grace={**r.grace, **preset.grace_overrides,
                                  **(CODE_CONTROLLER if r.key == "grace_codectl_w4" else {})})
                if r.teacher else r for r in runs]   # the code-controller row keeps its controller
    return runs


class Study:
    def __init__(self, preset: StudyPreset, out_dir: str | os.PathLike, *, seeds: int | None = None,
                 first_seed: int = 0, subprocess_runs: bool = False, progress: bool = True, log=print,
                 time_budget_s: float | None = None, deadline_s: float | None = None, prune: bool = False):
        self.p = preset
        self.out = Path(out_dir).resolve()
        # seeds first_seed .. first_seed + n - 1: training is deterministic per seed, so seeds run in
        # separate invocations (or on separate machines) can be merged into one --out and reported together
        if first_seed < 0:
            raise ValueError(f"--first-seed {first_seed}: must be >= 0")
        self.seeds = list(range(first_seed, first_seed + (seeds if seeds is not None else preset.seeds)))
        if not self.seeds:
            raise ValueError("--seeds must be >= 1")
        self.subprocess_runs = subprocess_runs
        # Delete what later runs do not need once a run is scored (step checkpoints; the final export
        # of every row but the teacher and the bf16 students), so the study directory stays small
        # enough to carry between device sessions.
        self.prune = prune
        # Stop before starting a run once this many seconds have passed (the GPU machine allows
        # 10 minutes per command): the next invocation continues from the cache.
        self.time_budget_s = time_budget_s
        # Parallel runs only: stop the runs still going at this many seconds (they resume from their
        # last checkpoint in the next invocation), so one call ends before the machine's limit.
        self.deadline_s = deadline_s
        self.progress = progress
        self.log = log
        self.data = self.out / "data"
        self.models = self.out / "models"
        self.runs = self.out / "runs"
        self.presets_dir = self.out / "presets"

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[tuple[str, str, int | None, RunSpec | None]]:
        """(run name, row key, seed, spec) in execution order; the teacher and bf16 rows first."""
        out = [("teacher", "teacher", None, None)]
        for s in self.seeds:
            out.append((f"student_bf16_s{s}", "student_bf16", s, None))
            for spec in student_runs(self.p):
                out.append((f"{spec.key}_s{s}", spec.key, s, spec))
        return out

    # ------------------------------------------------------------------ steps
    def check_preset(self) -> None:
        """Cached runs are only valid for the preset that made them: refuse to mix two presets."""
        path = self.out / "preset.json"
        from grace_ds.models.processors import corpus_fingerprint

        mine = json.loads(json.dumps(asdict(self.p), default=str))
        mine.pop("seeds", None)
        # Teacher and student must share one tokenizer: a tokenizer change between invocations
        # would pair a cached teacher with a student whose token ids mean other words.
        mine["tokenizer"] = corpus_fingerprint()
        if path.exists():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ValueError(f"{self.out} holds a study made with different settings ({', '.join(diff)}): "
                                 "use another --out, or delete that directory to start over")
        else:
            path.write_text(json.dumps(mine, indent=1, sort_keys=True) + "\n")

    def make_data(self) -> None:
        if all((self.data / s / "manifest.json").exists() for s in ("train", *SPLITS)):
            return
        from grace_ds.data.synthetic import main as synthetic

        self.log(f"[study] generating synthetic data into {self.data}")
        synthetic(["--out", str(self.data), "--train", str(self.p.train_samples), "--val", str(self.p.val_samples),
                   "--hard-val", str(self.p.hard_val_samples), "--seed", str(self.p.data_seed),
                   "--difficulty", self.p.difficulty, "--hard-difficulty", self.p.hard_difficulty, "--image-size", str(self.p.image_size),
                   "--samples-per-shard", str(max(64, self.p.train_samples // 16)), "--overwrite",
                   "--workers", str(min(8, os.cpu_count() or 1))]
                  + (["--qtypes", ",".join(self.p.qtypes)] if self.p.qtypes else [])
                  + (["--mc-fraction", str(self.p.mc_fraction)] if self.p.mc_fraction is not None else [])
                  + ([] if self.progress else ["--quiet"]))

    def _base_model(self, role: str) -> Path:
        """The initial (random) teacher or student directory of the preset, built once."""
        from grace_ds.models.presets import TINY_PRESETS, TinyPreset, build_tiny_preset, ensure_preset

        ref = self.p.teacher if role == "teacher" else self.p.student
        target = self.models / f"{role}_init"
        if (target / "config.json").exists():
            return target
        if isinstance(ref, ModelSpec):
            name = f"study-{self.p.name}-{role}"
            # Registered under a study-private name so the library's make_config builds it; the
            # engine then only ever sees the directory.
            TINY_PRESETS.setdefault(name, TinyPreset(self.p.family, role, **asdict(ref)))
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_preset(name, tmp, seed=0)
            os.replace(tmp, target)
        else:
            src = ensure_preset(ref)      # the shared preset cache (rebuilt when the tokenizer changed)
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            os.replace(tmp, target)
        return target

    def student_init(self, seed: int) -> Path:
        """The student's random init for `seed` (seed 0 = the preset's own init)."""
        base = self._base_model("student")
        if seed == 0:
            return base
        target = self.models / f"student_init_s{seed}"
        if (target / "model.safetensors").exists():
            return target
        import torch
        from transformers import AutoConfig

        from grace_ds.models.adapters import model_class_for

        config = AutoConfig.from_pretrained(str(base), local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + seed)
            model = model_class_for(config)._from_config(config, dtype=torch.float32)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        model.save_pretrained(str(tmp), safe_serialization=True)
        os.replace(tmp, target)
        return target

    def train_config(self, name: str, *, student: Path, seed: int, steps: int, lr: float, bits: int | None,
                     teacher: Path | None, grace: dict | None, freeze_vision: bool, init: Path | None,
                     micro_batch: int | None = None) -> dict:
        p = self.p
        mb = micro_batch or p.micro_batch
        return {
            "model": {"student": str(student), "teacher": str(teacher) if teacher else None,
                      "student_init": str(init) if init else None, "presets_dir": str(self.presets_dir)},
            "quant": {"enabled": bits is not None, "bits": bits or 4, "group_size": p.group_size},
            "grace": dict(grace or {"use_kd": False, "use_rcka": False, "controller": False}),
            "data": {"train_dirs": [str(self.data / "train")], "val_dirs": [], "num_workers": p.num_workers,
                     "micro_batch_size": mb, "seed": seed, "max_length": p.max_length,
                     # every run reads the same split: each sample is processed once for the study
                     "example_cache": str(self.out / "example_cache")},
            "optim": {"lr": lr, "warmup_steps": min(p.warmup_steps, max(steps // 10, 0))},
            "train": {"max_steps": steps, "micro_batch_size": mb, "grad_accum": p.grad_accum,
                      "seed": seed, "output_dir": str(self.runs / name / "train"), "freeze_vision": freeze_vision,
                      "resume": "auto", "save_every": p.save_every, "eval_every": 0},
            "log": {"tensorboard": False, "progress": self.progress},
            # tiny models: ZeRO-3's per-sub-module hooks were the step time (teacher 4 steps/s, GPU 8%
            # busy); one gather per layer instead (same arithmetic: tests/test_train_launch.py)
            "deepspeed": {"gather_whole_layers": True},
        }

    def train(self, name: str, raw: dict) -> Path:
        final = Path(raw["train"]["output_dir"]) / "final"
        if (final / "config.json").exists():
            return final
        (self.runs / name).mkdir(parents=True, exist_ok=True)
        (self.runs / name / "config.json").write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
        t0 = time.time()
        if self.subprocess_runs:
            cmd = [sys.executable, "-m", "grace_ds.study.train_one", str(self.runs / name / "config.json")]
            env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            subprocess.run(cmd, check=True, env=env)
        else:
            from grace_ds.engine import run_training
            from grace_ds.engine.config import config_from_dict

            result = run_training(config_from_dict(raw))
            if result.final_dir is None:
                raise RuntimeError(f"run {name}: the engine wrote no final export (train.export=false?)")
            _free_memory()
        if not (final / "config.json").exists():
            raise RuntimeError(f"run {name}: training finished but {final} has no config.json")
        self.log(f"[study] trained {name} in {time.time() - t0:.0f}s -> {final}")
        self._log_training_summary(name, Path(raw["train"]["output_dir"]) / "metrics.jsonl")
        return final

    def _log_training_summary(self, name: str, path: Path) -> None:
        """First and last logged step of a training (loss, beta, rates): the record kept in the run's
        log after --prune deletes metrics.jsonl."""
        if not path.exists():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            return
        keep = ("step", "loss", "ce", "gdkd", "rcka", "beta", "lr", "samples_per_s", "tokens_per_s",
                "data_wait_frac", "peak_mem_gb")
        for tag, row in (("first", rows[0]), ("last", rows[-1])):
            self.log(f"[study] {name} {tag} logged step: " + json.dumps({k: row[k] for k in keep if k in row}))

    def prune_run(self, name: str, keep_final: bool) -> None:
        run = self.runs / name
        for child in list(run.iterdir()):
            if child.name in ("eval.json", "config.json", "log.txt"):
                continue
            if keep_final and child.name == "train":
                for sub in list(child.iterdir()):
                    if sub.name != "final" and sub.is_dir():
                        shutil.rmtree(sub, ignore_errors=True)
                continue
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()

    def evaluate(self, name: str, ckpt: Path) -> dict:
        path = self.runs / name / "eval.json"
        if path.exists():
            return json.loads(path.read_text())
        from grace_ds.eval import evaluate_checkpoint

        doc = evaluate_checkpoint(ckpt, [self.data / s for s in SPLITS], out=path.with_suffix(".tmp.json"),
                                  max_samples=self.p.eval_samples, batch_size=self.p.eval_batch,
                                  max_new_tokens=self.p.max_new_tokens, progress=self.progress)
        os.replace(path.with_suffix(".tmp.json"), path)
        _free_memory()
        return doc

    # ------------------------------------------------------------------ one run
    def deps(self, key: str, seed: int | None, spec: RunSpec | None) -> list[str]:
        """Names of the runs whose exports this run starts from."""
        if key in ("teacher", "student_bf16"):
            return []
        return [f"student_bf16_s{seed}"] + (["teacher"] if spec is not None and spec.teacher else [])

    def run_one(self, name: str, key: str, seed: int | None, spec: RunSpec | None) -> dict:
        """Train (or round) and score one run; its dependencies' exports must exist."""
        p = self.p
        teacher_final = self.runs / "teacher" / "train" / "final"
        bf16_final = self.runs / f"student_bf16_s{seed}" / "train" / "final"
        cached = (self.runs / name / "eval.json").exists()
        if key == "teacher":
            raw = self.train_config(name, student=self._base_model("teacher"), seed=0, steps=p.teacher_steps,
                                    lr=p.teacher_lr, bits=None, teacher=None, grace=None,
                                    freeze_vision=False, init=None, micro_batch=p.teacher_micro_batch)
            ckpt = self.train(name, raw)
        elif key == "student_bf16":
            raw = self.train_config(name, student=self.student_init(seed), seed=seed, steps=p.baseline_steps,
                                    lr=p.baseline_lr, bits=None, teacher=None, grace=None,
                                    freeze_vision=False, init=None)
            ckpt = self.train(name, raw)
        elif cached:      # scored already: its checkpoint is not needed again (and may be pruned)
            ckpt = None
        elif spec.kind == "rtn":
            ckpt = self.runs / name / "final"
            if not (ckpt / "config.json").exists():
                from grace_ds.study.rtn import make_rtn_checkpoint

                make_rtn_checkpoint(bf16_final, ckpt, bits=spec.bits, group_size=p.group_size)
        else:
            raw = self.train_config(name, student=bf16_final, seed=seed, steps=p.qat_steps, lr=p.qat_lr,
                                    bits=spec.bits, teacher=teacher_final if spec.teacher else None,
                                    grace=spec.grace, freeze_vision=True, init=bf16_final)
            ckpt = self.train(name, raw)
        doc = self.evaluate(name, ckpt)
        if self.prune:
            self.prune_run(name, keep_final=key in ("teacher", "student_bf16"))
        return doc

    def prepare(self) -> None:
        """Everything the runs share, made once before any of them starts."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_preset()
        self.make_data()
        # Both random inits now, from the same tokenizer build (the engine's compatibility check
        # would otherwise only catch a mismatch at the first distillation run).
        self._base_model("teacher")
        for s in self.seeds:
            self.student_init(s)

    # ------------------------------------------------------------------ whole study
    def run(self, jobs: int = 1) -> dict:
        """Every run of the plan (serially, or `jobs` at a time in subprocesses spread over the
        visible GPUs), then the scores of every scored run in plan order."""
        t0 = time.time()
        self.prepare()
        if jobs > 1:
            complete = self._run_parallel(jobs, t0)
        else:
            complete = self._run_serial(t0)
        return {"scores": self.collect(), "seconds": round(time.time() - t0, 1), "complete": complete}

    def _over_budget(self, t0: float) -> bool:
        return self.time_budget_s is not None and time.time() - t0 > self.time_budget_s

    def _run_serial(self, t0: float) -> bool:
        from tqdm.auto import tqdm

        plan = self.plan()
        bar = tqdm(total=len(plan), desc="study runs", unit="run", disable=not self.progress, dynamic_ncols=True)
        for name, key, seed, spec in plan:
            bar.set_postfix_str(name)
            if not (self.runs / name / "eval.json").exists() and self._over_budget(t0):
                self.log(f"[study] time budget of {self.time_budget_s:.0f}s used: stopping before {name}; "
                         "run the same command again to continue")
                bar.close()
                return False
            self.run_one(name, key, seed, spec)
            bar.update(1)
        bar.close()
        return True

    def _run_parallel(self, jobs: int, t0: float) -> bool:
        """A small scheduler: each run is `python -m grace_ds.study.job OUT NAME` in its own process
        (own CUDA context and process group), started once its dependencies are scored, on the
        least-loaded GPU. A failed run is reported with the tail of its log; runs that do not
        depend on it go on. With a time budget no run starts after it, and at `deadline_s` the
        running ones are stopped (they resume from their last checkpoint next time)."""
        from tqdm.auto import tqdm

        self.save_job_spec()
        plan = self.plan()
        done = {name for name, *_ in plan if (self.runs / name / "eval.json").exists()}
        pending = [r for r in plan if r[0] not in done]
        ngpu = _gpu_count()
        load = [0] * max(ngpu, 1)
        # The teacher is the critical path (every distillation run waits for it): it counts as a full
        # GPU's share of jobs, so the others fill the remaining GPUs first.
        teacher_weight = max(1, -(-jobs // max(ngpu, 1))) if ngpu > 1 else 1
        threads = max(1, (os.cpu_count() or 2) // jobs)
        running: dict[str, tuple[subprocess.Popen, int, float, int]] = {}
        failed: dict[str, str] = {}
        bar = tqdm(total=len(plan), initial=len(done), desc="study runs", unit="run", disable=not self.progress,
                   dynamic_ncols=True)
        stopped = False
        retried: set[str] = set()
        try:
            stopped, pending = self._schedule(jobs, t0, pending, done, running, failed, retried, load, ngpu,
                                              threads, teacher_weight, bar)
        finally:
            # an exception or Ctrl-C here must not leave job processes (own sessions) running
            for proc, *_rest in running.values():
                _terminate(proc)
        bar.close()
        if failed:
            raise RuntimeError(f"study runs failed: {', '.join(f'{k} ({v})' for k, v in failed.items())}; "
                               "their logs are runs/<name>/log.txt under the study directory")
        return not stopped and not pending

    def _schedule(self, jobs, t0, pending, done, running, failed, retried, load, ngpu, threads, teacher_weight,
                  bar):
        stopped = False
        while pending or running:
            # start what is ready
            while len(running) < jobs and not stopped:
                ready = next((r for r in pending if all(d in done for d in self.deps(r[1], r[2], r[3]))), None)
                if ready is None:
                    break
                # only a run that would start is stopped by the budget: a budget that runs out while the
                # last runs finish leaves a complete study, not an "incomplete" exit code
                if self._over_budget(t0):
                    self.log(f"[study] time budget of {self.time_budget_s:.0f}s used: starting no new run")
                    stopped = True
                    break
                pending.remove(ready)
                name = ready[0]
                gpu = min(range(len(load)), key=load.__getitem__)
                env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
                if ngpu:
                    env["CUDA_VISIBLE_DEVICES"] = _visible_gpu(gpu)
                (self.runs / name).mkdir(parents=True, exist_ok=True)
                log = open(self.runs / name / "log.txt", "ab")
                proc = subprocess.Popen([sys.executable, "-m", "grace_ds.study.job", str(self.out), name],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                log.close()
                weight = teacher_weight if name == "teacher" else 1
                running[name] = (proc, gpu, time.time(), weight)
                load[gpu] += weight
                self.log(f"[study] started {name} on gpu {gpu if ngpu else '-'} ({len(running)} running)")
            if not running:
                break
            if self.deadline_s is not None and time.time() - t0 > self.deadline_s:
                for name, (proc, *_rest) in running.items():
                    self.log(f"[study] deadline of {self.deadline_s:.0f}s: stopping {name} (it resumes next time)")
                    _terminate(proc)
                running.clear()
                stopped = True
                break
            time.sleep(0.5)
            for name, (proc, gpu, started, weight) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                load[gpu] -= weight
                if rc == 0 and (self.runs / name / "eval.json").exists():
                    done.add(name)
                    bar.update(1)
                    self.log(f"[study] finished {name} in {time.time() - started:.0f}s")
                else:
                    tail = _tail(self.runs / name / "log.txt")
                    if name not in retried and _port_clash(tail):
                        # two jobs picked the same free rendezvous port at once: start it again
                        retried.add(name)
                        pending.insert(0, next(r for r in self.plan() if r[0] == name))
                        self.log(f"[study] {name}: rendezvous port already in use; starting it again")
                        continue
                    failed[name] = f"exit code {rc}"
                    self.log(f"[study] run {name} FAILED (exit code {rc}); last lines of "
                             f"{self.runs / name / 'log.txt'}:\n{tail}")
                    # whatever needed it cannot run in this invocation
                    pending = [r for r in pending if name not in self.deps(r[1], r[2], r[3])]
        return stopped, pending

    def collect(self) -> dict:
        """Scores of every scored run, in plan order: {row: {split: {metric: [value per seed]}}}.
        Position i of every student row is seed i (None where that run has no score yet), so rows
        can be compared seed by seed (report.paired_spread)."""
        scores: dict = {}
        for name, key, seed, spec in self.plan():
            path = self.runs / name / "eval.json"
            if not path.exists() and seed is None:
                continue
            # an unscored student run keeps its seed position with None in every metric
            doc = json.loads(path.read_text()) if path.exists() else None
            for split in SPLITS:
                r = doc["results"][split] if doc else {"overall_gen": None, "multiple_choice": {}, "open": {}}
                mc = r["multiple_choice"]
                vals = {"acc": r["overall_gen"], "mc_gen": mc.get("mc_gen"), "mc_ll": mc.get("mc_ll"),
                        "em": r["open"].get("em"), "top_letter_share": mc.get("top_pred_letter_share"),
                        "constant_letter_acc": mc.get("constant_letter_acc")}
                for m, v in vals.items():
                    scores.setdefault(key, {}).setdefault(split, {}).setdefault(m, []).append(
                        None if doc is None else float("nan") if v is None else float(v))
        return scores

    # ------------------------------------------------------------------ job processes
    def save_job_spec(self) -> None:
        """What a job process needs to rebuild this Study (the preset after --set, seeds, pruning)."""
        spec = {"preset": asdict(self.p), "seeds": len(self.seeds), "first_seed": self.seeds[0], "prune": self.prune}
        tmp = self.out / "job_spec.json.tmp"
        tmp.write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.out / "job_spec.json")

    @classmethod
    def from_job_spec(cls, out_dir: str | os.PathLike) -> "Study":
        spec = json.loads((Path(out_dir) / "job_spec.json").read_text())
        d = dict(spec["preset"])
        if d.get("qtypes") is not None:
            d["qtypes"] = tuple(d["qtypes"])
        for role in ("teacher", "student"):
            if isinstance(d[role], dict):
                d[role] = ModelSpec(**d[role])
        return cls(StudyPreset(**d), out_dir, seeds=spec["seeds"], first_seed=spec.get("first_seed", 0), progress=False,
                   prune=spec["prune"])

    def run_named(self, name: str) -> dict:
        for n, key, seed, spec in self.plan():
            if n == name:
                missing = [d for d in self.deps(key, seed, spec) if not (self.runs / d / "eval.json").exists()]
                if missing:
                    raise RuntimeError(f"run {name} needs {', '.join(missing)} first")
                return self.run_one(n, key, seed, spec)
        raise ValueError(f"no run named {name!r} in this study (runs: {', '.join(n for n, *_ in self.plan())})")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _visible_gpu(i: int) -> str:
    """The i-th GPU of the parent's CUDA_VISIBLE_DEVICES (or plain index i)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis:
        return vis.split(",")[i].strip()
    return str(i)


def _terminate(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _port_clash(log_tail: str) -> bool:
    t = log_tail.lower()
    return "address already in use" in t or "eaddrinuse" in t


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in lines[-n:])


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
