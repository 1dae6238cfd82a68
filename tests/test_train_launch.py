"""End to end on 2 CPU ranks with real DeepSpeed ZeRO-3 (gloo): launch/train.py through the
deepspeed launcher, a SIGKILL after a checkpoint and the resumed run reproducing the loss
trajectory, the final export layout, and the run's error paths (teacher/student mismatch, NaN).

The launches are real subprocesses (~30 s each on 2 cores); the error paths fork ranks from pytest
(tests/distributed.py), ~ a few seconds each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (imported once in the parent: forked ranks reuse it)
import pytest

import torch  # noqa: F401
import transformers  # noqa: F401

from distributed import DistributedError, run_distributed

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, KILL_AFTER = 4, 2, 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Synthetic shards + tiny presets, built once for the module."""
    root = tmp_path_factory.mktemp("train")
    from grace_ds.data.synthetic import main as generate
    assert generate(["--out", str(root / "data"), "--train", "48", "--val", "8", "--seed", "0",
                     "--difficulty", "easy", "--image-size", "112", "--samples-per-shard", "12", "--quiet"]) == 0
    from grace_ds.models import ensure_preset
    for name in ("tiny-qwen2vl-teacher", "tiny-qwen2vl-student", "tiny-llava-teacher"):
        ensure_preset(name, root / "presets")
    return root


def _overrides(root: Path, out: Path, **extra) -> list[str]:
    o = {
        "model.presets_dir": str(root / "presets"),
        "data.train_dirs": f"[{root / 'data' / 'train'}]",
        "data.val_dirs": f"[{root / 'data' / 'val'}]",
        "data.num_workers": 0,
        "data.max_length": 192,
        "synthetic.enabled": "false",
        "teacher_train.max_steps": 0,
        "train.max_steps": STEPS,
        "train.save_every": SAVE_EVERY,
        "train.keep_checkpoints": 2,
        "train.micro_batch_size": 2,
        "train.grad_accum": 2,
        "train.eval_batches": 1,
        "train.output_dir": str(out),
        "optim.lr": 1e-3,
        "log.progress": "false",
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _launch(args: list[str], launcher: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(env_extra or {})
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(_free_port()), "launch/train.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launch/train.py"]
    return subprocess.run(cmd + ["--accuracy", "0"] + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_two_rank_launch_kill_and_resume_reproduces_losses(workdir):
    # 1. Uninterrupted run: 2 ranks, ZeRO-3 student + ZeRO-Inference teacher. The same launcher for
    # all three runs: the deepspeed launcher's environment may pick other CPU kernels (ulp-level drift).
    straight = workdir / "straight"
    r = _launch(_overrides(workdir, straight), "torchrun")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    ref = _losses(straight)
    assert sorted(ref) == list(range(1, STEPS + 1))
    logged = set().union(*(json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()))
    for key in ("loss", "ce", "gdkd", "rcka", "beta", "omega", "gate_mean", "lr", "lr_scales", "grad_norm",
                "tokens_per_s", "samples_per_s", "data_wait_frac", "peak_mem_gb", "eval_ce"):
        assert key in logged, key
    assert list((straight / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    _check_final_export(straight / "final")

    # 2. Same run, rank 0 SIGKILLed right after the step-2 checkpoint (torchrun tears down rank 1).
    killed = workdir / "killed"
    r = _launch(_overrides(workdir, killed), "torchrun", {"GRACE_DS_SIGKILL_AFTER_STEP": str(KILL_AFTER)})
    assert r.returncode != 0, "the fault injection did not kill the run"
    assert (killed / "checkpoints" / "latest").read_text() == f"step_{KILL_AFTER:08d}"
    assert not (killed / "final").exists()

    # 3. Resume (train.resume=auto picks step 2) and finish: the loss trajectory equals the straight run's.
    r = _launch(_overrides(workdir, killed), "torchrun")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"resumed from {killed / 'checkpoints' / f'step_{KILL_AFTER:08d}'} at step {KILL_AFTER}" in r.stdout
    got = _losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-6, ({s: got[s] - ref[s] for s in ref}, got, ref)
    # keep_checkpoints=2: only the two newest step dirs survive, and the final one is complete.
    assert sorted(p.name for p in (killed / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]


def _check_final_export(final: Path):
    from safetensors import safe_open
    conf = json.loads((final / "config.json").read_text())
    gq = conf["grace_quantization"]
    assert gq["bits"] == 4 and gq["layers"] and all("language_model.layers" in n for n in gq["layers"])
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("log_scale" in k for k in keys)
    assert {f"{n}.weight" for n in gq["layers"]} <= keys           # QAT linears saved under plain names
    with safe_open(str(final / "int_weights.safetensors"), "pt") as f:
        meta, ikeys = f.metadata(), set(f.keys())
        codes = f.get_tensor(f"{gq['layers'][0]}.codes")
    assert meta["bits"] == "4" and codes.dtype == torch.int8 and -8 <= int(codes.min()) and int(codes.max()) <= 7
    assert ikeys == {f"{n}.{s}" for n in gq["layers"] for s in ("codes", "scales")}
    for name in ("recipe.yaml", "tokenizer.json", "processor_config.json"):
        assert (final / name).is_file(), name
    # The export loads back as the family's HF model, with the trained integer weights applied.
    from grace_ds.eval.checkpoint import load_for_eval
    _, _, info = load_for_eval(final)
    assert info["quantized_layers"] == len(gq["layers"])


# --------------------------------------------------------------------------- error paths (forked ranks)


def _run(rank, world, overrides):
    from grace_ds.engine import load_config, run_training
    return run_training(load_config(None, overrides)).metrics.get("loss")


def _run_with_nan(rank, world, overrides):
    from grace_ds.engine import student

    orig = student.StudentWithLoss.forward

    def poisoned(self, batch, teacher_out):
        loss, metrics = orig(self, batch, teacher_out)
        return (loss * float("nan") if self.step >= 1 else loss), metrics

    student.StudentWithLoss.forward = poisoned
    return _run(rank, world, overrides)


def test_incompatible_teacher_stops_before_any_engine(workdir, tmp_path):
    """A bare `python launch/train.py` (1-rank gloo group made by run_training itself) with a LLaVA
    teacher for a Qwen2-VL student: stops at the compatibility check, naming both sides."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "launch/train.py", "--accuracy", "0"]
                       + _overrides(workdir, out, **{"model.teacher": "tiny-llava-teacher"}),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    msg = r.stderr
    assert "ValueError" in msg and "teacher" in msg and "student" in msg, msg[-3000:]
    assert "tokenizers differ" in msg or "image_token_id" in msg, msg[-3000:]
    assert not (out / "checkpoints").exists()


def test_nan_loss_raises_naming_the_step(workdir, tmp_path):
    args = _overrides(workdir, tmp_path / "out", **{"train.max_steps": 3, "train.save_every": 0,
                                                    "train.export": "false", "data.val_dirs": "[]"})
    with pytest.raises(DistributedError, match=r"FloatingPointError: non-finite loss nan at step 1"):
        run_distributed(_run_with_nan, world_size=2, args=(args,), timeout=180)


def test_ce_only_run_without_teacher(workdir, tmp_path):
    """model.teacher=null: plain QAT (the study's baseline), 2 ranks, no export."""
    args = _overrides(workdir, tmp_path / "out", **{"model.teacher": "null", "train.max_steps": 2,
                                                    "train.save_every": 0, "train.export": "false",
                                                    "data.val_dirs": "[]"})
    losses = run_distributed(_run, world_size=2, args=(args,), timeout=180)
    assert losses[0] == losses[1] and losses[0] > 0


def test_gather_whole_layers_gives_the_same_training(workdir, tmp_path):
    """deepspeed.gather_whole_layers (one ZeRO-3 hook pair per decoder layer / vision block) is a
    scheduling change only: 2 ranks, teacher + GRACE + W4 QAT, the same per-step losses and gradient
    norms as the default per-sub-module gathering."""
    import json

    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"out_{flag}"
        args = _overrides(workdir, out, **{"train.max_steps": 3, "train.save_every": 0, "train.export": "false",
                                           "data.val_dirs": "[]", "deepspeed.gather_whole_layers": flag})
        run_distributed(_run, world_size=2, args=(args,), timeout=240)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        runs[flag] = [v for r in rows if "loss" in r for v in (r["loss"], r["gdkd"], r["rcka"], r["grad_norm"])]
    assert len(runs["false"]) == 12 and runs["false"][1] > 0 and runs["false"][2] > 0
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5)


def _run_with_nan_grads(rank, world, overrides, bad_steps):
    """The loss value stays finite, its gradient is NaN (0 * d sqrt(x)/dx at x = 0) on `bad_steps`."""
    import json
    from pathlib import Path as P

    from grace_ds.engine import load_config, run_training, student

    orig = student.StudentWithLoss.forward

    def poisoned(self, batch, teacher_out):
        loss, metrics = orig(self, batch, teacher_out)
        if self.step in bad_steps:
            loss = loss + 0.0 * torch.sqrt(loss - loss)
        return loss, metrics

    student.StudentWithLoss.forward = poisoned
    cfg = load_config(None, overrides)
    run_training(cfg)
    return [json.loads(x) for x in (P(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_nonfinite_gradient_step_is_skipped_and_counted(workdir, tmp_path):
    """One NaN gradient: DeepSpeed drops that update, the run goes on with finite weights and counts it."""
    args = _overrides(workdir, tmp_path / "out", **{"train.max_steps": 4, "train.save_every": 0, "train.grad_accum": 1,
                                                    "train.export": "false", "data.val_dirs": "[]"})
    rows = run_distributed(_run_with_nan_grads, world_size=2, args=(args, {1}), timeout=240)[0]
    rows = [r for r in rows if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert not math.isfinite(rows[1]["grad_norm"]) and all(math.isfinite(r["grad_norm"]) for r in rows[2:])
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_nonfinite_gradient_streak_stops_the_run(workdir, tmp_path):
    args = _overrides(workdir, tmp_path / "out", **{"train.max_steps": 6, "train.save_every": 0, "train.grad_accum": 1,
                                                    "train.export": "false", "data.val_dirs": "[]",
                                                    "train.max_skipped_steps": 2})
    with pytest.raises(DistributedError, match=r"non-finite gradient norm (nan|inf) at step 3, 3 steps in a row "
                                               r"\(train.max_skipped_steps=2\)"):
        run_distributed(_run_with_nan_grads, world_size=2, args=(args, {1, 2, 3, 4, 5}), timeout=240)
