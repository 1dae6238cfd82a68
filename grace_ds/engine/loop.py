"""`run_training(cfg)`: one training run, in the order it happens.

    distributed -> data (generate synthetic if asked) -> compatibility check -> teacher (ZeRO-Inference)
    -> student (ZeRO-3 QAT engine) -> resume -> train_loop -> final export

Works under the deepspeed launcher, torchrun, or a bare single process (a 1-rank gloo group is
created). `teacher_train.max_steps > 0` first trains the teacher with CE only (a nested run into
<output_dir>/teacher) and distils from its final/ dir.
"""

from __future__ import annotations

import math
import os
import random
import socket
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from grace_ds.engine import checkpoint as ckpt
from grace_ds.engine.config import TrainConfig, replace
from grace_ds.engine.data import build_loaders, ensure_synthetic_data, infinite_batches, to_device
from grace_ds.engine.export import export_final
from grace_ds.engine.logging import MetricsLogger, Throughput
from grace_ds.engine.student import build_student, default_ds_configs, ds_config, torch_dtype
from grace_ds.engine.teacher import ZeroInferenceTeacher
from grace_ds.torch_extensions import use_per_env_extensions_dir


@dataclass
class TrainResult:
    final_dir: Path | None                 # <output_dir>/final (None when train.export is false)
    metrics: dict                          # last step's averaged metrics (+ eval_* of the last eval)
    history: list[dict] = field(default_factory=list)   # every logged step (also in metrics.jsonl)


def run_training(cfg: TrainConfig) -> TrainResult:
    # DeepSpeed 0.19 calls the deprecated all_gather_into_tensor / reduce_scatter_tensor every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch.distributed", category=FutureWarning)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.teacher_train.max_steps > 0:
        cfg = replace(cfg, model={"teacher": str(train_teacher(cfg))}, teacher_train={"max_steps": 0})
    out = Path(cfg.train.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale(out)
        print(f"[grace_ds] resolved config ({world} rank(s)):\n{cfg.to_yaml()}", flush=True)
    seed_everything(cfg.train.seed + rank)
    cache = cfg.model.presets_dir or str(out / "presets")
    ensure_synthetic_data(cfg)

    # Compatibility before any engine: tokenizer, image token, visual tokens per image.
    processor, vocab_size = check_models(cfg, cache)
    from grace_ds.distill import GraceObjective
    objective = GraceObjective(cfg.grace)
    teacher = None
    if cfg.model.teacher is not None:
        t_ds = ds_config(default_ds_configs(cfg)[1], micro_batch=cfg.train.micro_batch_size, grad_accum=1,
                         world_size=world, dtype=torch_dtype(cfg.model.teacher_dtype), nvme_path=cfg.deepspeed.nvme_path)
        teacher = ZeroInferenceTeacher(cfg.model.teacher, ds_config=t_ds, dtype=torch_dtype(cfg.model.teacher_dtype),
                                       cache_dir=cache, gather_whole_layers=cfg.deepspeed.gather_whole_layers)
    train_loader, val_loader = build_loaders(cfg, processor, rank, world)
    total_steps = cfg.train.max_steps or cfg.train.epochs * len(train_loader) // cfg.train.grad_accum
    engine, wrapper, qat_layers = build_student(cfg, objective=objective, vocab_size=vocab_size,
                                                total_steps=total_steps, world_size=world, cache_dir=cache)

    start_step = 0
    resume_from = ckpt.find_latest(out) if cfg.train.resume == "auto" else (
        None if cfg.train.resume == "none" else Path(cfg.train.resume))
    if resume_from is not None:
        trainer_state, rank_state = ckpt.load_checkpoint(engine, resume_from)
        objective.load_state_dict(trainer_state["objective"])
        train_loader.load_state_dict(rank_state["loader"])
        start_step = trainer_state["step"]
        ckpt.set_rng_state(rank_state["rng"])      # last: nothing above may shift the resumed stream
        if rank == 0:
            print(f"[grace_ds] resumed from {resume_from} at step {start_step}/{total_steps}", flush=True)

    log = MetricsLogger(out, enabled=rank == 0, total_steps=total_steps, initial_step=start_step,
                        tensorboard=cfg.log.tensorboard, metrics_file=cfg.log.metrics_file,
                        progress=cfg.log.progress, desc="teacher" if cfg.model.teacher is None else "distil")
    try:
        history = train_loop(cfg, engine, wrapper, teacher, objective, train_loader, val_loader, log,
                             start_step, total_steps)
        last = dict(history[-1]) if history else {}
        if val_loader is not None:
            ev = evaluate(engine, wrapper, teacher, val_loader, cfg.train.eval_batches)
            log.log(total_steps, ev)
            log.write("[grace_ds] final validation: " + _fmt(ev))
            last.update(ev)
        final_dir = export_final(engine, wrapper, cfg, processor, qat_layers) if cfg.train.export else None
    finally:
        log.close()
    dist.barrier()
    return TrainResult(final_dir=final_dir, metrics=last, history=history)


def train_loop(cfg, engine, wrapper, teacher, objective, train_loader, val_loader, log, start_step, total_steps):
    """Per micro-batch: teacher forward -> student forward + GRACE loss -> backward -> (boundary) step;
    per optimizer step: controller update on the rank-averaged GDKD, log, eval, checkpoint."""
    t, history, speed = cfg.train, [], Throughput()
    skipped, in_a_row = 0, 0
    batches = infinite_batches(train_loader, speed, engine.device)
    for step in range(start_step, total_steps):
        wrapper.step = step
        cycle = defaultdict(float)
        for _ in range(t.grad_accum):
            batch = next(batches)
            teacher_out = teacher(batch) if teacher is not None else None
            loss, metrics = engine(batch, teacher_out)
            check_finite(loss, step, metrics)
            engine.backward(loss)
            engine.step()                          # DeepSpeed steps the optimizer at the boundary only
            for k, v in {"loss": loss.item(), **metrics}.items():
                cycle[k] += v / t.grad_accum
        avg = mean_over_ranks(cycle)
        if teacher is not None and cfg.grace.use_kd:
            objective.controller_step(avg["gdkd"])   # identical on every rank: the value is all-reduced
        avg.update(step_stats(engine), **speed.read(dist.get_world_size()))
        if math.isfinite(avg["grad_norm"]):
            in_a_row = 0
        else:
            # DeepSpeed found an inf/NaN gradient and dropped this update (ZeRO-3 step(): the
            # weights are untouched). One bf16 overflow should not end a run; a streak is divergence.
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row > t.max_skipped_steps:
                raise FloatingPointError(
                    f"non-finite gradient norm {avg['grad_norm']} at step {step}, {in_a_row} steps in a row "
                    f"(train.max_skipped_steps={t.max_skipped_steps}): the run diverged. Lower optim.lr or check "
                    f"the data, then resume from the last checkpoint (train.resume=auto)")
            log.write(f"[grace_ds] step {step + 1}: non-finite gradient norm {avg['grad_norm']}; DeepSpeed "
                      f"skipped this update ({in_a_row} in a row, {skipped} in this run)")
        avg["skipped_steps"] = skipped
        if (step + 1) % cfg.log.log_every == 0 or step + 1 == total_steps:
            log.log(step + 1, avg)
            history.append({"step": step + 1, **avg})
        log.progress(step + 1, avg)
        if t.eval_every and (step + 1) % t.eval_every == 0 and val_loader is not None and step + 1 < total_steps:
            ev = evaluate(engine, wrapper, teacher, val_loader, t.eval_batches)
            log.log(step + 1, ev)
            log.write(f"[grace_ds] step {step + 1}: " + _fmt(ev))
        if t.save_every and ((step + 1) % t.save_every == 0 or step + 1 == total_steps):
            save(cfg, engine, objective, train_loader, step + 1)
            fault_injection(step + 1)
    return history


# --------------------------------------------------------------------------- pieces of the loop


def check_finite(loss: torch.Tensor, step: int, metrics: dict) -> None:
    if not torch.isfinite(loss.detach()).all():
        terms = ", ".join(f"{k}={metrics.get(k)}" for k in ("ce", "gdkd", "rcka", "beta", "omega"))
        raise FloatingPointError(
            f"non-finite loss {loss.item()} at step {step} ({terms}): the run diverged. Lower optim.lr, "
            f"check the quantiser (quant.bits / quant.log_scale_clamp) and the data, then resume from the "
            f"last checkpoint (train.resume=auto)")


def mean_over_ranks(values: dict) -> dict:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def step_stats(engine) -> dict:
    groups = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    out = {"lr": groups.get("weights", next(iter(groups.values()))), "grad_norm": norm}
    if "scales" in groups:
        out["lr_scales"] = groups["scales"]
    return out


@torch.no_grad()
def evaluate(engine, wrapper, teacher, val_loader, max_batches: int = 0) -> dict:
    """Loss terms on the validation shards (same objective, no update, no controller step),
    weighted by supervised tokens over all batches and ranks: the eval loader pads its last batches
    with label-masked duplicates, and a batch with no supervised token must not pull the mean to 0."""
    engine.eval()
    sums = dict.fromkeys(("ce", "gdkd", "rcka", "loss", "tokens"), 0.0)  # same keys on every rank
    for i, batch in enumerate(val_loader):
        if max_batches and i >= max_batches:
            break
        batch = to_device(batch, engine.device)
        # every rank runs every forward (ZeRO-3 gathers are collectives); empty batches weigh 0
        n_tok = int((batch["labels"][:, 1:] != -100).sum())  # next-token shift, as in the loss
        loss, metrics = engine(batch, teacher(batch) if teacher is not None else None)
        for k in ("ce", "gdkd", "rcka"):
            sums[k] += metrics[k] * n_tok
        sums["loss"] += loss.item() * n_tok
        sums["tokens"] += n_tok
    engine.train()
    total = mean_over_ranks(sums)
    tokens = max(total.pop("tokens"), 1e-12)
    return {f"eval_{k}": v / tokens for k, v in total.items()}


def save(cfg: TrainConfig, engine, objective, train_loader, step: int) -> None:
    ckpt.save_checkpoint(
        engine, cfg.train.output_dir, step,
        trainer_state={"step": step, "objective": objective.state_dict()},
        rank_state={"loader": train_loader.state_dict()},
        config_yaml=cfg.to_yaml(), keep=cfg.train.keep_checkpoints)


def fault_injection(step: int) -> None:
    """Test hook: GRACE_DS_SIGKILL_AFTER_STEP=k kills rank 0 with SIGKILL right after the checkpoint
    of step k (the kill-and-resume test; a real crash, no cleanup runs)."""
    target = os.environ.get("GRACE_DS_SIGKILL_AFTER_STEP")
    if target and int(target) == step and dist.get_rank() == 0:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- setup helpers


def init_distributed() -> None:
    """Join the launcher's process group, or create a 1-rank one for a bare process. Always goes
    through deepspeed.init_distributed: it adopts an existing torch group (tests, the study helper),
    and zero.Init reads the world size from DeepSpeed's comm layer, not from torch's."""
    use_per_env_extensions_dir()  # before deepspeed JIT-builds shm_comm
    import deepspeed

    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_models(cfg: TrainConfig, cache) -> tuple[object, int | None]:
    """-> (student processor, shared vocabulary or None). Raises before any model is built when the
    teacher cannot be distilled into the student (the error names both values)."""
    from transformers import AutoConfig

    from grace_ds.models import check_compatible, load_processor

    student_ref = cfg.model.student_init or cfg.model.student
    s_path = _resolve_on_rank0_first(student_ref, cache)
    processor = load_processor(s_path)
    if cfg.model.teacher is None:
        return processor, None
    t_path = _resolve_on_rank0_first(cfg.model.teacher, cache)
    report = check_compatible(load_processor(t_path), processor,
                              AutoConfig.from_pretrained(str(t_path), local_files_only=True),
                              AutoConfig.from_pretrained(str(s_path), local_files_only=True))
    return processor, report.shared_vocab


def _resolve_on_rank0_first(ref: str, cache) -> Path:
    """Tiny presets are materialised on first use: rank 0 builds, the others wait, then read."""
    from grace_ds.models import resolve_model_path

    if dist.get_rank() == 0:
        path = resolve_model_path(ref, cache)
    dist.barrier()
    return resolve_model_path(ref, cache) if dist.get_rank() != 0 else path


def train_teacher(cfg: TrainConfig) -> Path:
    """The CE-only teacher stage (teacher: null, no quantisation) -> its final/ dir, reused if present."""
    out = Path(cfg.train.output_dir) / "teacher"
    final = out / "final"
    if (final / "config.json").is_file():
        return final
    tt = cfg.teacher_train
    teacher_cfg = replace(
        cfg,
        model={"student": cfg.model.teacher, "teacher": None, "student_init": None, "dtype": cfg.model.teacher_dtype,
               "presets_dir": cfg.model.presets_dir or str(Path(cfg.train.output_dir) / "presets")},
        quant={"enabled": False},
        grace={"use_kd": False, "use_rcka": False, "controller": False},
        optim={"lr": tt.lr, "warmup_steps": tt.warmup_steps},
        train={"max_steps": tt.max_steps, "output_dir": str(out), "freeze_vision": False},
        teacher_train={"max_steps": 0},
    )
    return run_training(teacher_cfg).final_dir


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
