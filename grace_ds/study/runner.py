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
from dataclasses import asdict, dataclass
from pathlib import Path

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


# The W4/W8 students, all initialised from the same seed's bf16 student.
def student_runs(preset: StudyPreset) -> list[RunSpec]:
    T = preset.kd_temperature
    off = dict(use_kd=False, use_rcka=False, controller=False)
    gdkd = dict(use_kd=True, kd_mode="gdkd", gate=True, temperature=T)
    full = dict(**gdkd, use_rcka=True, omega=preset.omega, controller=True)
    return [
        RunSpec("rtn_w4", "rtn", bits=4),
        RunSpec("qat_w4", "train", bits=4, grace=off),
        # naive KD: token KL(p_T || p_S) at T = 1, fixed weight 1, no gate, no RCKA (issue 6)
        RunSpec("qat_kd_w4", "train", bits=4, teacher=True,
                grace=dict(use_kd=True, kd_mode="kl", gate=False, temperature=1.0, use_rcka=False,
                           controller=False, fixed_beta=1.0)),
        RunSpec("grace_w4", "train", bits=4, teacher=True, grace=full),
        RunSpec("gdkd_w4", "train", bits=4, teacher=True, grace=dict(**gdkd, use_rcka=False, controller=False)),
        RunSpec("rcka_w4", "train", bits=4, teacher=True,
                grace=dict(use_kd=False, use_rcka=True, omega=preset.omega, controller=False)),
        RunSpec("grace_noib_w4", "train", bits=4, teacher=True,
                grace=dict(**gdkd, use_rcka=True, omega=preset.omega, controller=False)),
        RunSpec("grace_w8", "train", bits=8, teacher=True, grace=full),
    ]


class Study:
    def __init__(self, preset: StudyPreset, out_dir: str | os.PathLike, *, seeds: int | None = None,
                 subprocess_runs: bool = False, progress: bool = True, log=print,
                 time_budget_s: float | None = None, prune: bool = False):
        self.p = preset
        self.out = Path(out_dir).resolve()
        self.seeds = list(range(seeds if seeds is not None else preset.seeds))
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
                   "--difficulty", self.p.difficulty, "--image-size", str(self.p.image_size),
                   "--samples-per-shard", str(max(64, self.p.train_samples // 16)), "--overwrite"]
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
                     teacher: Path | None, grace: dict | None, freeze_vision: bool, init: Path | None) -> dict:
        p = self.p
        return {
            "model": {"student": str(student), "teacher": str(teacher) if teacher else None,
                      "student_init": str(init) if init else None, "presets_dir": str(self.presets_dir)},
            "quant": {"enabled": bits is not None, "bits": bits or 4, "group_size": p.group_size},
            "grace": dict(grace or {"use_kd": False, "use_rcka": False, "controller": False}),
            "data": {"train_dirs": [str(self.data / "train")], "val_dirs": [], "num_workers": p.num_workers,
                     "micro_batch_size": p.micro_batch, "seed": seed, "max_length": p.max_length},
            "optim": {"lr": lr, "warmup_steps": min(p.warmup_steps, max(steps // 10, 0))},
            "train": {"max_steps": steps, "micro_batch_size": p.micro_batch, "grad_accum": p.grad_accum,
                      "seed": seed, "output_dir": str(self.runs / name / "train"), "freeze_vision": freeze_vision,
                      "resume": "auto", "save_every": p.save_every, "eval_every": 0},
            "log": {"tensorboard": False, "progress": self.progress},
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
        return final

    def prune_run(self, name: str, keep_final: bool) -> None:
        run = self.runs / name
        for child in list(run.iterdir()):
            if child.name in ("eval.json", "config.json"):
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

    # ------------------------------------------------------------------ whole study
    def run(self) -> dict:
        from tqdm.auto import tqdm

        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_preset()
        self.make_data()
        # Both random inits now, from the same tokenizer build (the engine's compatibility check
        # would otherwise only catch a mismatch at the first distillation run).
        self._base_model("teacher")
        for s in self.seeds:
            self.student_init(s)
        plan = self.plan()
        scores: dict = {}
        bar = tqdm(total=len(plan), desc="study runs", unit="run", disable=not self.progress, dynamic_ncols=True)
        teacher_final = bf16_final = None
        complete = True
        for name, key, seed, spec in plan:
            bar.set_postfix_str(name)
            p = self.p
            cached = (self.runs / name / "eval.json").exists()
            if not cached and self.time_budget_s is not None and time.time() - t0 > self.time_budget_s:
                self.log(f"[study] time budget of {self.time_budget_s:.0f}s used: stopping before {name}; "
                         "run the same command again to continue")
                complete = False
                break
            if key == "teacher":
                raw = self.train_config(name, student=self._base_model("teacher"), seed=0, steps=p.teacher_steps,
                                        lr=p.teacher_lr, bits=None, teacher=None, grace=None,
                                        freeze_vision=False, init=None)
                ckpt = teacher_final = self.train(name, raw)
            elif key == "student_bf16":
                raw = self.train_config(name, student=self.student_init(seed), seed=seed, steps=p.baseline_steps,
                                        lr=p.baseline_lr, bits=None, teacher=None, grace=None,
                                        freeze_vision=False, init=None)
                ckpt = bf16_final = self.train(name, raw)
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
            for split in SPLITS:
                r = doc["results"][split]
                vals = {"acc": r["overall_gen"], "mc_gen": r["multiple_choice"].get("mc_gen"),
                        "mc_ll": r["multiple_choice"].get("mc_ll"), "em": r["open"].get("em"),
                        "top_letter_share": r["multiple_choice"].get("top_pred_letter_share"),
                        "constant_letter_acc": r["multiple_choice"].get("constant_letter_acc")}
                for m, v in vals.items():
                    scores.setdefault(key, {}).setdefault(split, {}).setdefault(m, []).append(
                        float("nan") if v is None else float(v))
            bar.update(1)
        bar.close()
        return {"scores": scores, "seconds": round(time.time() - t0, 1), "complete": complete}


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
