"""The typed training config: YAML recipe + `key=value` overrides -> validated `TrainConfig`.

Every section is a dataclass; the library sections are the library's own configs (`QuantConfig`
plus `enabled`, `GraceConfig`, `DataConfig`) so a knob added there is settable here without a
second copy. Loading is `recipe dict <- overrides`, then one recursive build that coerces types and
rejects unknown keys with the list of valid ones, then cross-field checks (`validate`). All of it
runs before any model is built, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml

from grace_ds.data import DataConfig
from grace_ds.distill import GraceConfig
from grace_ds.quant import QuantConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO_ROOT / "recipes" / "demo.yaml"


class ConfigError(ValueError):
    """A bad config value; the message names the key, the value and the fix."""


@dataclass
class ModelSection:
    student: str = "tiny-qwen2vl-student"         # HF checkpoint dir or tiny preset name
    teacher: Optional[str] = "tiny-qwen2vl-teacher"   # HF dir, preset name, or null = CE-only training
    student_init: Optional[str] = None            # a previous run's final/ dir: start from its weights
    dtype: str = "auto"                           # student weights: auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    teacher_dtype: str = "auto"                   # teacher weights, same choices
    presets_dir: Optional[str] = None             # where tiny presets are materialised; null = <output_dir>/presets


@dataclass(frozen=True)
class QuantSection(QuantConfig):
    enabled: bool = True                          # false = no fake quantisation (bf16 baseline, teacher training)

    def quant_config(self) -> QuantConfig:
        return QuantConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QuantConfig)})


@dataclass
class OptimSection:
    lr: float = 2e-5                   # peak lr of the weight group (AdamW)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0              # linear warm-up, optimizer steps
    min_lr_ratio: float = 0.1          # cosine decays to min_lr_ratio * lr at the last step
    grad_clip: float = 1.0             # global grad-norm clip; 0 = off
    scale_lr_mult: Optional[float] = None   # null = quant.scale_lr_mult (lr of the LSQ scale group)


@dataclass
class TrainSection:
    micro_batch_size: int = 1          # samples per rank per forward
    grad_accum: int = 1                # micro-batches per optimizer step
    max_steps: int = 0                 # optimizer steps; 0 = epochs * steps per epoch
    epochs: int = 1
    seed: int = 42
    activation_checkpointing: bool = False
    freeze_vision: bool = True         # vision tower + projector/merger stay frozen (and unquantised)
    eval_every: int = 0                # optimizer steps between validation passes; 0 = only at the end if data.val set
    eval_batches: int = 0              # validation micro-batches per pass; 0 = the whole val set
    save_every: int = 0                # optimizer steps between checkpoints; 0 = none (final export only)
    keep_checkpoints: int = 2          # newest N step checkpoints kept
    max_skipped_steps: int = 10        # non-finite gradient norms in a row before the run stops (each one:
                                       # DeepSpeed drops that update; counted as metric "skipped_steps")
    output_dir: str = "runs/demo"
    resume: str = "auto"               # auto (latest good checkpoint if any) | none | a checkpoint dir
    export: bool = True                # write <output_dir>/final (HF 16-bit + int weights + processor + recipe)


@dataclass
class TeacherTrainSection:
    """Optional CE-only stage that trains the teacher first (the CPU demo: a random tiny teacher
    knows nothing). Its final/ dir then replaces `model.teacher`."""
    max_steps: int = 0                 # 0 = no teacher stage
    lr: float = 1e-3
    warmup_steps: int = 10


@dataclass
class SyntheticSection:
    """Generate the synthetic benchmark into data.train/data.val dirs when they do not exist."""
    enabled: bool = False
    train: int = 2000                  # training samples
    val: int = 200                     # validation samples
    seed: int = 0
    difficulty: str = "easy"           # easy | medium | hard (grace_ds.data.synthetic)
    image_size: int = 112              # pixels per side (the tiny processors resize to 112 anyway)
    samples_per_shard: int = 100       # >= ranks x workers shards keep every rank busy


@dataclass
class DeepSpeedSection:
    student_config: str = "auto"       # auto = ds_configs/zero3_student.json on GPU, zero3_student_cpu.json on CPU
    teacher_config: str = "auto"       # auto = ds_configs/zero_inference_teacher_gpu.json (cpu variant on CPU)
    nvme_path: Optional[str] = None    # fills offload_param.nvme_path of the NVMe teacher config
    # Both engines: gather each decoder layer / vision block whole, with one ZeRO-3 hook pair instead
    # of one per sub-module (models.loading.gather_whole_layers). For small models, whose step time
    # is the hooks' Python; off by default.
    gather_whole_layers: bool = False


@dataclass
class LogSection:
    log_every: int = 1                 # optimizer steps between TensorBoard/JSONL records
    tensorboard: bool = True           # <output_dir>/tb
    metrics_file: str = "metrics.jsonl"   # per-step record, relative to output_dir (appended; resume-safe)
    progress: bool = True              # tqdm bar on rank 0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    grace: GraceConfig = field(default_factory=GraceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    teacher_train: TeacherTrainSection = field(default_factory=TeacherTrainSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Recipe YAML (None = recipes/demo.yaml) + dotted overrides -> validated TrainConfig."""
    path = DEMO_RECIPE if path is None else Path(path)
    if not Path(path).is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist: pass --config recipes/<name>.yaml")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping of sections, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides))


def config_from_dict(raw: dict) -> TrainConfig:
    cfg = _build(TrainConfig, raw, "")
    # "{output_dir}" in data paths: recipes can keep generated data next to the run.
    for key in ("train_dirs", "val_dirs"):
        v = getattr(cfg.data, key)
        fix = lambda p: str(p).replace("{output_dir}", cfg.train.output_dir)
        setattr(cfg.data, key, fix(v) if isinstance(v, str) else [fix(p) for p in v])
    data_mb = (raw.get("data") or {}).get("micro_batch_size")
    if data_mb is not None and data_mb != cfg.train.micro_batch_size:
        raise ConfigError(f"config key 'data.micro_batch_size' = {data_mb!r} differs from train.micro_batch_size "
                          f"= {cfg.train.micro_batch_size}: set train.micro_batch_size only (the loader uses it)")
    cfg.data = dataclasses.replace(cfg.data, micro_batch_size=cfg.train.micro_batch_size)
    validate(cfg)
    return cfg


def apply_overrides(raw: dict, overrides) -> dict:
    """`a.b=v` -> raw["a"]["b"] = yaml(v). YAML parses the value, so 3, 1.0e-4, true, null, [1, 2]
    mean what they look like; the dataclass build then coerces it to the field's type."""
    raw = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    return raw


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {path or '<root>'!r} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section {path!r}" if path else "the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(repr(_join(path, k)) for k in unknown)}; "
                          f"valid keys in {where}: {', '.join(fields)}")
    hints = get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], data[name], _join(path, name)) for name in fields if name in data}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:   # the library configs validate in __post_init__
        raise ConfigError(f"config section {path or '<root>'!r}: {e}") from None


def _coerce(tp, value, key: str):
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key {key!r}: {value!r} fits none of {tp}")
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r} = {value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} = {value!r}: expected a list, e.g. {key}=[a, b]")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(args[0], v, key) for v in value]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"config key {key!r} = {value!r}: expected {len(args)} items")
            items = [_coerce(a, v, key) for a, v in zip(args, value)]
        else:
            items = [_coerce(args[0], v, key) if args else v for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} = {value!r}: expected a mapping")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):     # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} = {value!r}: expected a string")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key {key!r} = {value!r}: expected {tp.__name__}")
    return value


# --------------------------------------------------------------------------- validation

DTYPES = ("auto", "bfloat16", "float32", "float16")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks; each error names the key, the value and the fix."""
    def need(ok: bool, key: str, value, fix: str):
        if not ok:
            raise ConfigError(f"config key {key!r} = {value!r}: {fix}")

    m, t, o = cfg.model, cfg.train, cfg.optim
    need(bool(m.student), "model.student", m.student, "set an HF checkpoint dir or a tiny preset name")
    need(m.dtype in DTYPES, "model.dtype", m.dtype, f"use one of {DTYPES}")
    need(m.teacher_dtype in DTYPES, "model.teacher_dtype", m.teacher_dtype, f"use one of {DTYPES}")
    for key in ("student", "teacher", "student_init"):
        v = getattr(m, key)
        if v is not None:
            need(_model_ref_ok(v), f"model.{key}", v,
                 "no such directory and not a tiny preset name (see grace_ds.models.TINY_PRESETS)")
    if m.student_init is not None:
        need((Path(m.student_init) / "config.json").is_file(), "model.student_init", m.student_init,
             "must be a previous run's final/ dir (with config.json)")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
    need(t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0 (0 = run train.epochs epochs)")
    need(t.max_steps > 0 or t.epochs >= 1, "train.epochs", t.epochs, "set train.epochs >= 1 or train.max_steps > 0")
    for key in ("eval_every", "save_every", "eval_batches"):
        need(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "must be >= 0 (0 = off)")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    need(bool(t.output_dir), "train.output_dir", t.output_dir, "set an output directory")
    need(t.resume in ("auto", "none") or Path(t.resume).is_dir(), "train.resume", t.resume,
         "use auto, none, or an existing checkpoint directory")
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    need(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = no clipping)")
    need(o.scale_lr_mult is None or o.scale_lr_mult > 0, "optim.scale_lr_mult", o.scale_lr_mult,
         "must be > 0, or null to use quant.scale_lr_mult")
    g = cfg.grace
    need(g.kd_mode in ("gdkd", "kl"), "grace.kd_mode", g.kd_mode, "use gdkd (GRACE) or kl (naive KD baseline)")
    need(g.temperature > 0, "grace.temperature", g.temperature, "must be > 0 (paper: 2.0)")
    need(g.beta_min <= g.beta_max, "grace.beta_min", g.beta_min, f"must be <= grace.beta_max ({g.beta_max})")
    need(cfg.log.log_every >= 1, "log.log_every", cfg.log.log_every, "must be >= 1")
    need(cfg.teacher_train.max_steps >= 0, "teacher_train.max_steps", cfg.teacher_train.max_steps, "must be >= 0")
    need(cfg.teacher_train.max_steps == 0 or m.teacher is not None, "teacher_train.max_steps",
         cfg.teacher_train.max_steps, "a teacher stage needs model.teacher (the model to pre-train)")
    for key in ("student_config", "teacher_config"):
        v = getattr(cfg.deepspeed, key)
        need(v == "auto" or resolve_path(v).is_file(), f"deepspeed.{key}", v,
             "no such file: use auto or a JSON under ds_configs/")
    need(bool(_data_dirs(cfg, "train_dirs")), "data.train_dirs", cfg.data.train_dirs,
         "set the training shard directories (python -m grace_ds.data.convert writes them)")
    if not cfg.synthetic.enabled:
        for key in ("train_dirs", "val_dirs"):
            for d in _data_dirs(cfg, key):
                need(Path(d).is_dir(), f"data.{key}", d,
                     "no such directory: convert your data (python -m grace_ds.data.convert) or set "
                     "synthetic.enabled=true to generate the synthetic benchmark there")


def _data_dirs(cfg: TrainConfig, key: str) -> list[str]:
    v = getattr(cfg.data, key, None)
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


def _model_ref_ok(ref: str) -> bool:
    from grace_ds.models import TINY_PRESETS
    return ref in TINY_PRESETS or Path(ref).is_dir()


def resolve_path(p: str | os.PathLike) -> Path:
    """Relative paths resolve against the cwd, then the repo root (recipes name ds_configs/...)."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


# --------------------------------------------------------------------------- helpers


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _deepcopy(x):
    import copy
    return copy.deepcopy(x)


def replace(cfg: TrainConfig, **sections) -> TrainConfig:
    """`replace(cfg, train={"max_steps": 5})`: a copy with some keys of some sections changed,
    re-validated (the study helper and the teacher stage derive runs this way)."""
    raw = cfg.to_dict()
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)
