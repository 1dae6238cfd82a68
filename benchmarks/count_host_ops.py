"""Host-side cost of one training step of the study's student, counted rather than timed (CPU).

    python benchmarks/count_host_ops.py [--batch 64] [--out DIR]

Small VLMs are bound by the host: every aten op is a kernel launch on a GPU and every
`_local_scalar_dense` (`.item()`, `.tolist()`, boolean indexing) a device->host sync. This counts
both with a TorchDispatchMode, on the study `gpu` preset's student and the study's `basic` data:

1. one forward + backward, with transformers' own code paths and with grace_ds/models/fast_paths.py
   (CPU RoPE position ids from the loader, batched vision attention);
2. `rcka_loss` forward + backward for `--batch` images of 16 visual tokens, the per-image loop
   against the batched path;
3. the data loader (`num_workers=0`): seconds per batch processed, writing `data.example_cache`,
   and read back from it.

Counts do not depend on the machine; the loader timings do (the figures in docs/benchmarks.md are
from the 2-core dev machine).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "labels", "position_ids")


class Tally(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return self.ops["aten._local_scalar_dense"]


def step_counts(model, batch) -> tuple[int, int]:
    with Tally() as fwd:
        loss = model(**{k: v for k, v in batch.items() if k in KEYS}).loss
    with Tally() as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(fwd.ops.values()) + sum(bwd.ops.values()), fwd.syncs + bwd.syncs


def rcka_counts(n_images: int, batched: bool) -> tuple[int, int]:
    cka = importlib.import_module("grace_ds.distill.cka")   # the package re-exports a function named cka
    gen = torch.Generator().manual_seed(0)
    t = [torch.randn(16, 512, generator=gen) for _ in range(n_images)]
    s = [torch.randn(16, 256, generator=gen, requires_grad=True) for _ in range(n_images)]
    real = cka._stackable
    if not batched:
        cka._stackable = lambda *a: False
    try:
        with Tally() as tally:
            cka.rcka_loss(t, s)[0].backward()
    finally:
        cka._stackable = real
    return sum(tally.ops.values()), tally.syncs


def loader(data: Path, processor, rope, batch: int, cache: str | None = None):
    from grace_ds.data import DataConfig, build_train_loader

    cfg = DataConfig(train_dirs=[str(data / "train")], micro_batch_size=batch, num_workers=0, max_length=512,
                     example_cache=cache)
    return build_train_loader(cfg, processor, "qwen2_vl", batch_fn=rope)


def loader_seconds(data: Path, processor, rope, batch: int, cache: str | None) -> float:
    t0, n = time.perf_counter(), 0
    for _ in loader(data, processor, rope, batch, cache):
        n += 1
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="/tmp/count_host_ops")
    a = ap.parse_args(argv)
    out = Path(a.out)

    from grace_ds.data.synthetic import main as synthetic
    from grace_ds.models import load_model, load_processor
    from grace_ds.models.fast_paths import RopeIndex, install_batched_vision_attention, \
        uninstall_batched_vision_attention
    from grace_ds.study.presets import get_preset
    from grace_ds.study.runner import Study

    torch.manual_seed(0)
    student = Study(get_preset("gpu"), out / "study", progress=False)._base_model("student")
    data = out / "data"
    if not (data / "train" / "manifest.json").exists():
        synthetic(["--out", str(data), "--train", str(32 * a.batch), "--val", "8", "--difficulty", "basic",
                   "--qtypes", "colour,shape,position,count", "--mc-fraction", "0", "--image-size", "112",
                   "--samples-per-shard", "256", "--overwrite", "--quiet"])
    processor = load_processor(str(student))
    model = load_model(str(student), dtype=torch.float32)
    rope = RopeIndex.for_config(model.config)

    rows = []
    batch_fast = next(iter(loader(data, processor, rope, a.batch)))
    batch_plain = {k: v for k, v in batch_fast.items() if k != "position_ids"}
    uninstall_batched_vision_attention()
    rows.append(("student step, transformers' paths", *step_counts(model, batch_plain)))
    install_batched_vision_attention()
    rows.append(("student step, fast paths", *step_counts(model, batch_fast)))
    rows.append((f"rcka_loss, {a.batch} images, per-image loop", *rcka_counts(a.batch, False)))
    rows.append((f"rcka_loss, {a.batch} images, batched", *rcka_counts(a.batch, True)))

    print(f"\nbatch {a.batch}, study gpu preset student (256x2 text, 64x2 vision), forward + backward\n")
    print("| what | aten ops | device->host syncs |\n|---|---|---|")
    for name, ops, syncs in rows:
        print(f"| {name} | {ops:,} | {syncs} |")

    cache = out / "example_cache"
    if cache.exists():
        import shutil
        shutil.rmtree(cache)
    timings = [("processed", loader_seconds(data, processor, rope, a.batch, None)),
               ("writing the cache", loader_seconds(data, processor, rope, a.batch, str(cache))),
               ("read from the cache", loader_seconds(data, processor, rope, a.batch, str(cache)))]
    print(f"\nloader, num_workers 0, batch {a.batch}, RoPE position ids included\n")
    print("| batches | seconds per batch |\n|---|---|")
    for name, sec in timings:
        print(f"| {name} | {sec:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
