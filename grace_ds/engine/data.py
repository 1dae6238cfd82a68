"""The training run's data: synthetic generation on demand, per-rank loaders, endless iteration.

The loaders are grace_ds.data's (`build_train_loader`: streaming shards, equal steps per rank,
exact resume through state_dict). `infinite_batches` walks epochs and times the wait for each
batch (the "data_wait_frac" metric).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch.distributed as dist


def ensure_synthetic_data(cfg) -> None:
    """synthetic.enabled: generate the benchmark into the parent of data.train_dirs[0] if missing
    (rank 0 writes, the others wait). Deterministic in synthetic.seed, so every rank agrees."""
    s = cfg.synthetic
    if not s.enabled:
        return
    train = Path(_first(cfg.data.train_dirs))
    val_dirs = [Path(d) for d in _as_list(cfg.data.val_dirs)]
    root = train.parent
    if dist.get_rank() == 0 and not (train / "manifest.json").is_file():
        from grace_ds.data.synthetic import main as generate
        if train.name != "train" or any(v != root / "val" for v in val_dirs):
            raise ValueError(f"synthetic.enabled generates <root>/train and <root>/val: set data.train_dirs to "
                             f"[{root}/train] and data.val_dirs to [{root}/val] (got {train}, {val_dirs})")
        rc = generate(["--out", str(root), "--train", str(s.train), "--val", str(s.val), "--seed", str(s.seed),
                       "--difficulty", s.difficulty, "--image-size", str(s.image_size),
                       "--samples-per-shard", str(s.samples_per_shard), "--quiet"])
        if rc:
            raise RuntimeError(f"synthetic data generation into {root} failed (exit {rc})")
    dist.barrier()


def build_loaders(cfg, processor, rank: int, world: int):
    """-> (train loader, val loader or None). train.micro_batch_size is the one batch knob."""
    from grace_ds.data import build_eval_loader, build_train_loader
    from grace_ds.models import get_adapter
    from grace_ds.models.fast_paths import RopeIndex

    config = processor_config(cfg)
    family = get_adapter(config).family
    data_cfg = dataclasses.replace(cfg.data, micro_batch_size=cfg.train.micro_batch_size)
    rope = RopeIndex.for_config(config)   # multimodal position ids made in the workers, on the CPU
    train = build_train_loader(data_cfg, processor, family, rank, world, batch_fn=rope)
    val = build_eval_loader(data_cfg, processor, family, rank, world, batch_fn=rope) if _as_list(cfg.data.val_dirs) else None
    return train, val


def processor_config(cfg):
    from transformers import AutoConfig

    from grace_ds.models import resolve_model_path
    ref = cfg.model.student_init or cfg.model.student
    cache = cfg.model.presets_dir or str(Path(cfg.train.output_dir) / "presets")
    return AutoConfig.from_pretrained(str(resolve_model_path(ref, cache)), local_files_only=True)


def infinite_batches(loader, throughput, device):
    """Batches across epochs, on `device`. The loader advances its own epoch at the end of one and
    resumes mid-epoch from load_state_dict, so this only re-enters it and times the wait."""
    while True:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            throughput.add_batch(batch, time.perf_counter() - t0)
            yield to_device(batch, device)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def _as_list(v):
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


def _first(v):
    items = _as_list(v)
    if not items:
        raise ValueError("data.train_dirs is empty: set it to your shard directories")
    return items[0]
