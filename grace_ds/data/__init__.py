"""grace_ds.data: WebDataset shards + manifest, LLaVA-JSON converter, synthetic VQA benchmark,
streaming loader with exact resume, assistant-only label masking. Format spec: docs/data.md."""

from grace_ds.data.format import Manifest, ShardInfo, ShardSample, read_manifest, write_shards

__all__ = ["Manifest", "ShardInfo", "ShardSample", "read_manifest", "write_shards"]
