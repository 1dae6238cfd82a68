"""The student: a QAT-prepared VLM + the GRACE objective, in one DeepSpeed ZeRO-3 engine.

Order matters (each step is a ZeRO-3 trap avoided):
1. build the model under `deepspeed.zero.Init` (partitioned as constructed);
2. freeze the vision tower, then `prepare_qat` - it gathers each weight to initialise its scales
   (a scale initialised on an empty shard stays 0 and training starts at a loss of ~60);
3. wrap it in `StudentWithLoss`, whose forward runs the student AND the loss, with `lm_head.weight`
   registered as an external parameter: the fused loss never calls lm_head's forward (it recomputes
   logits chunk by chunk, also in backward), so without the registration ZeRO-3 would hand it an
   empty shard;
4. `deepspeed.initialize` with a client AdamW over `scale_param_groups` (weights / no-decay /
   LSQ scales at scale_lr_mult * lr) and the warm-up + cosine schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from grace_ds.engine.config import TrainConfig, resolve_path
from grace_ds.engine.schedule import warmup_cosine
from grace_ds.engine.teacher import TeacherOutput, visual_features


class StudentWithLoss(nn.Module):
    def __init__(self, model: nn.Module, adapter, objective, vocab_size: int | None):
        super().__init__()
        from grace_ds.distill import register_head_for_loss

        self.model = model
        self.adapter = adapter
        self.objective = objective
        self.vocab_size = vocab_size      # shared real vocabulary of teacher and student (compat check)
        self.step = 0                     # optimizer step, set by the loop (omega / KD warm-ups)
        register_head_for_loss(self, adapter.lm_head(model).weight)   # ZeRO-3: gathered for our fwd+bwd

    def forward(self, batch: dict, teacher_out: TeacherOutput | None):
        hidden, penultimate = self.adapter.forward_hidden(self.model, batch)
        t = teacher_out
        return self.objective(
            labels=batch["labels"], step=self.step, vocab_size=self.vocab_size if t is not None else None,
            student_hidden=hidden, student_weight=self.adapter.lm_head(self.model).weight,
            teacher_hidden=t.hidden if t is not None else None,
            teacher_weight=t.head_weight if t is not None else None,
            student_visual=visual_features(self.adapter, batch["input_ids"], penultimate),
            teacher_visual=t.visual if t is not None else None,
        )


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def ds_config(path: str, *, micro_batch: int, grad_accum: int, world_size: int, dtype: torch.dtype,
              grad_clip: float | None = None, nvme_path: str | None = None) -> dict:
    """A ds_configs/*.json with its "auto" fields filled from our config (one source of truth)."""
    cfg = json.loads(resolve_path(path).read_text())
    fill = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip if grad_clip else 0.0,
    }
    for k, v in fill.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": dtype == torch.float16}
    offload = cfg.get("zero_optimization", {}).get("offload_param", {})
    if offload.get("device") == "nvme":
        if not nvme_path and offload.get("nvme_path") in (None, "auto"):
            raise ValueError(f"{path} offloads to NVMe: set deepspeed.nvme_path=/local/nvme/dir")
        if nvme_path:
            offload["nvme_path"] = nvme_path
    return cfg


def default_ds_configs(cfg: TrainConfig) -> tuple[str, str]:
    gpu = torch.cuda.is_available()
    student = cfg.deepspeed.student_config
    teacher = cfg.deepspeed.teacher_config
    if student == "auto":
        student = "ds_configs/zero3_student.json" if gpu else "ds_configs/zero3_student_cpu.json"
    if teacher == "auto":
        teacher = "ds_configs/zero_inference_teacher_gpu.json" if gpu else "ds_configs/zero_inference_teacher_cpu_only.json"
    return student, teacher


def build_student(cfg: TrainConfig, *, objective, vocab_size: int | None, total_steps: int,
                  world_size: int, cache_dir=None):
    """-> (engine, wrapper, qat_layer_names). Collective: every rank calls it."""
    import deepspeed

    from grace_ds.models import get_adapter, load_model
    from grace_ds.quant import prepare_qat, scale_param_groups

    dtype = torch_dtype(cfg.model.dtype)
    ds_cfg = ds_config(default_ds_configs(cfg)[0], micro_batch=cfg.train.micro_batch_size,
                       grad_accum=cfg.train.grad_accum, world_size=world_size, dtype=dtype,
                       grad_clip=cfg.optim.grad_clip)
    model = load_model(cfg.model.student_init or cfg.model.student, dtype=dtype, zero3_config=ds_cfg,
                       cache_dir=cache_dir)
    adapter = get_adapter(model)
    if cfg.train.freeze_vision:
        for m in adapter.vision_modules(model):
            m.requires_grad_(False)
    qat = prepare_qat(model, cfg.quant.quant_config()) if cfg.quant.enabled else {}
    if qat and cfg.model.student_init:
        n = restore_trained_scales(model, cfg.model.student_init, cfg.quant.bits)
        if torch.distributed.get_rank() == 0:
            print(f"[grace_ds] {n}/{len(qat)} LSQ scales restored from {cfg.model.student_init}", flush=True)
    if cfg.deepspeed.gather_whole_layers:
        from grace_ds.models.loading import gather_whole_layers
        gather_whole_layers(model)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = StudentWithLoss(model, adapter, objective, vocab_size)
    o = cfg.optim
    groups = scale_param_groups(model, o.lr, o.weight_decay,
                                o.scale_lr_mult if o.scale_lr_mult is not None else cfg.quant.scale_lr_mult)
    # torch's fused AdamW on GPU needs no JIT build (DeepSpeed's FusedAdam costs ~50 s to compile).
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  fused=torch.cuda.is_available())
    scheduler = warmup_cosine(optimizer, total_steps=total_steps, warmup_steps=o.warmup_steps,
                              min_lr_ratio=o.min_lr_ratio)
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine, wrapper, sorted(qat)


def restore_trained_scales(model, init_dir, bits: int) -> int:
    """Continue QAT from a previous run's final/: its trained LSQ scales (int_weights.safetensors)
    replace the grid-search init, layer by layer where bits and group count match. Collective under
    ZeRO-3 (each log-scale is gathered, written on rank 0 and re-partitioned)."""
    import deepspeed
    from safetensors import safe_open

    from grace_ds.quant import qat_modules

    path = Path(init_dir) / "int_weights.safetensors"
    if not path.is_file():
        return 0
    restored = 0
    with safe_open(str(path), "pt") as f:
        if f.metadata().get("bits") != str(bits):
            return 0
        keys = set(f.keys())
        for name, m in qat_modules(model).items():
            if f"{name}.scales" not in keys:
                continue
            scales = f.get_tensor(f"{name}.scales").float()
            with deepspeed.zero.GatheredParameters([m.log_scale], modifier_rank=0):
                if scales.numel() == m.log_scale.numel():
                    with torch.no_grad():
                        m.log_scale.copy_(scales.log().reshape(m.log_scale.shape).to(m.log_scale.dtype))
                    restored += 1
    return restored
