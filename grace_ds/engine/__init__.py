"""DeepSpeed training engine: typed config, ZeRO-3 QAT student, ZeRO-Inference teacher, loop,
atomic checkpoints, logging and the final export.

    from grace_ds.engine import load_config, run_training
    result = run_training(load_config("recipes/demo.yaml", ["train.max_steps=10"]))
"""

from grace_ds.engine.config import ConfigError, TrainConfig, load_config
from grace_ds.engine.loop import TrainResult, run_training
from grace_ds.engine.teacher import Teacher, TeacherOutput, ZeroInferenceTeacher

__all__ = ["ConfigError", "Teacher", "TeacherOutput", "TrainConfig", "TrainResult", "ZeroInferenceTeacher",
           "load_config", "run_training"]
