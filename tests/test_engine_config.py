"""Config loading and validation (no model is built), and checkpoint-directory selection."""

from __future__ import annotations

import json

import pytest

from grace_ds.engine import checkpoint as ckpt
from grace_ds.engine.config import ConfigError, apply_overrides, config_from_dict, load_config


@pytest.fixture()
def data_dirs(tmp_path):
    for d in ("train", "val"):
        (tmp_path / "data" / d).mkdir(parents=True)
    return [str(tmp_path / "data" / "train")], [str(tmp_path / "data" / "val")]


def _raw(data_dirs, **extra):
    raw = {"data": {"train_dirs": data_dirs[0], "val_dirs": data_dirs[1]}, "train": {"output_dir": "/tmp/x"}}
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v)
    return raw


def test_demo_recipe_loads_and_overrides_coerce_types():
    cfg = load_config(None, ["train.max_steps=7", "optim.lr=1e-4", "quant.bits=8", "grace.kd_mode=kl",
                             "grace.use_rcka=false", "model.teacher=null", "teacher_train.max_steps=0", "optim.betas=[0.9, 0.95]"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-4
    assert cfg.quant.bits == 8 and cfg.quant.quant_config().bits == 8
    assert cfg.grace.kd_mode == "kl" and cfg.grace.use_rcka is False
    assert cfg.model.teacher is None
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.train_dirs == ["runs/demo/data/train"]     # {output_dir} interpolated
    assert cfg.data.micro_batch_size == cfg.train.micro_batch_size
    # The resolved config round-trips through YAML (it is saved with every checkpoint).
    import yaml
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, needle", [
    ("train.max_stepz=3", "unknown config key(s) 'train.max_stepz'; valid keys in section 'train': micro_batch_size"),
    ("bogus.x=1", "unknown config key(s) 'bogus'"),
    ("train.max_steps=abc", "'train.max_steps' = 'abc': expected an integer"),
    ("train.grad_accum=0", "'train.grad_accum' = 0: must be >= 1"),
    ("optim.lr=-1", "'optim.lr' = -1.0: must be > 0"),
    ("quant.bits=3", "bits=3 is not supported"),
    ("grace.kd_mode=foo", "grace"),
    ("train.resume=/no/such/dir", "'train.resume' = '/no/such/dir'"),
    ("model.student=not-a-model", "'model.student' = 'not-a-model': no such directory and not a tiny preset"),
    ("deepspeed.student_config=nope.json", "'deepspeed.student_config' = 'nope.json': no such file"),
    ("grace.use_kd=maybe", "'grace.use_kd' = 'maybe': expected true or false"),
    ("train.max_steps", "is not key=value"),
])
def test_bad_values_name_key_value_and_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_missing_data_dir_without_synthetic(data_dirs):
    raw = _raw(([data_dirs[0][0] + "_missing"], data_dirs[1]))
    with pytest.raises(ConfigError, match=r"data.train_dirs.*no such directory.*synthetic.enabled=true"):
        config_from_dict(raw)
    assert config_from_dict(_raw(data_dirs)).data.train_dirs == data_dirs[0]


def test_data_batch_must_agree_with_train_batch(data_dirs):
    raw = _raw(data_dirs, data={"micro_batch_size": 3}, train={"micro_batch_size": 2})
    with pytest.raises(ConfigError, match="set train.micro_batch_size only"):
        config_from_dict(raw)


def test_teacher_stage_needs_a_teacher(data_dirs):
    raw = _raw(data_dirs, model={"teacher": None}, teacher_train={"max_steps": 5})
    with pytest.raises(ConfigError, match="teacher_train.max_steps"):
        config_from_dict(raw)


def test_recipes_all_validate_their_keys():
    """Every shipped recipe parses against the dataclasses (paths to real checkpoints may not exist
    here, so only the key/type layer is checked)."""
    import yaml
    from pathlib import Path

    from grace_ds.engine.config import TrainConfig, _build
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    for r in recipes:
        raw = apply_overrides(yaml.safe_load(r.read_text()), [])
        _build(TrainConfig, raw, "")


def _complete(root, name):
    d = root / "checkpoints" / name
    d.mkdir(parents=True)
    (d / ckpt.COMPLETE).write_text("ok")
    return d


def test_find_latest_ignores_half_written_checkpoints(tmp_path):
    assert ckpt.find_latest(tmp_path) is None
    good = _complete(tmp_path, "step_00000004")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004")
    # A crash mid-save: the tmp dir exists, no COMPLETE, latest not yet moved.
    (tmp_path / "checkpoints" / ".tmp-step_00000006" / "ds").mkdir(parents=True)
    assert ckpt.find_latest(tmp_path) == good
    # latest pointing at a dir without COMPLETE (e.g. hand-edited): the newest complete one wins.
    (tmp_path / "checkpoints" / "step_00000008").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000008")
    assert ckpt.find_latest(tmp_path) == good
    ckpt.remove_stale(tmp_path)
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000006").exists()


def test_metrics_truncated_to_resume_step(tmp_path):
    from grace_ds.engine.logging import read_metrics, truncate_after
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 7)))
    truncate_after(p, 4)
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3, 4]


def test_lr_schedule_warmup_then_cosine_to_floor():
    from grace_ds.engine.schedule import lr_multiplier
    m = [lr_multiplier(s, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) for s in range(11)]
    assert m[0] == 0.5 and m[1] == 1.0 and m[2] == 1.0
    assert all(a >= b for a, b in zip(m[2:], m[3:]))
    assert abs(m[10] - 0.1) < 1e-12
