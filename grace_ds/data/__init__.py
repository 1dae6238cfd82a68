"""grace_ds.data: WebDataset shards + manifest, LLaVA-JSON converter, synthetic VQA benchmark,
streaming loader with equal per-rank steps and exact resume, assistant-only label masking.
Format spec and guarantees: docs/data.md."""

from grace_ds.data.format import Manifest, ShardInfo, ShardSample, read_manifest, write_shards
from grace_ds.data.labels import IGNORE_INDEX, SkipSample, build_example
from grace_ds.data.loader import DataConfig, DataError, ShardLoader, build_eval_loader, build_train_loader

__all__ = [
    "Manifest", "ShardInfo", "ShardSample", "read_manifest", "write_shards",
    "IGNORE_INDEX", "SkipSample", "build_example",
    "DataConfig", "DataError", "ShardLoader", "build_eval_loader", "build_train_loader",
]
