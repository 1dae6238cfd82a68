"""Streaming loader: 2 ranks x 2 workers exactly once, equal steps, exact resume, skip-and-count."""

import io
import json
import os
import tarfile
from collections import Counter

import pytest
import torch

from grace_ds.data import DataConfig, DataError, ShardSample, build_eval_loader, build_train_loader, write_shards
from grace_ds.data.format import MANIFEST_NAME
from grace_ds.data.labels import IGNORE_INDEX
from grace_ds.data.loader import collate, epoch_plan
from grace_ds.data.synthetic import GeneratorConfig, make_sample
from grace_ds.models.processors import build_processor

FAMILY = "qwen2_vl"


def _synthetic(out, n, per_shard, seed=0):
    cfg = GeneratorConfig(seed=seed, difficulty="medium", image_size=48)
    return write_shards((make_sample(cfg, "train", i) for i in range(n)), out, "train", per_shard)


@pytest.fixture(scope="module")
def proc():
    return build_processor(FAMILY)


@pytest.fixture(scope="module")
def data48(tmp_path_factory):
    d = tmp_path_factory.mktemp("d48")
    _synthetic(d, 48, 10)          # shards of 10,10,10,10,8: uneven on purpose
    return d


def _cfg(d, **kw):
    base = dict(train_dirs=[str(d)], micro_batch_size=3, num_workers=2, shuffle_buffer=6, seed=5, max_length=256)
    base.update(kw)
    return DataConfig(**base)


def _run(loader, limit=None):
    keys = []
    for i, batch in enumerate(loader):
        keys.append(list(loader.last_keys))
        assert batch["input_ids"].shape[0] == loader.cfg.micro_batch_size
        if limit is not None and i + 1 == limit:
            break
    return keys


def test_plan_is_balanced_and_covers_everything():
    counts = [10, 10, 10, 10, 8]
    for epoch in range(3):
        plan = epoch_plan(counts, 4, seed=1, epoch=epoch, shuffle=True)
        sizes = [sum(s.end - s.start for s in p) for p in plan]
        assert sizes == [12, 12, 12, 12]
        covered = Counter((s.shard, i) for p in plan for s in p for i in range(s.start, s.end))
        assert len(covered) == 48 and set(covered.values()) == {1}
    assert epoch_plan(counts, 4, 1, 0, True) != epoch_plan(counts, 4, 1, 1, True)
    assert [sum(s.end - s.start for s in p) for p in epoch_plan([5, 6], 4, 0, 0, False)] == [2, 3, 3, 3]


def test_two_ranks_two_workers_each_sample_exactly_once(data48, proc):
    seen, lens = [], []
    for rank in range(2):
        loader = build_train_loader(_cfg(data48), proc, FAMILY, rank, 2)
        keys = _run(loader)
        assert len(keys) == len(loader) == 8          # 48 / (2 ranks * 3) = 8 steps on each rank
        lens.append(len(loader))
        seen += [k for b in keys for k in b]
        assert not loader.stats                      # nothing skipped, repeated or dropped
    assert len(seen) == 48 and len(set(seen)) == 48


def test_uneven_counts_give_equal_steps(tmp_path, proc):
    _synthetic(tmp_path, 46, 10)     # 46 over 4 slots: 11,11,12,12 samples
    for remainder, steps in (("wrap", 2 * 4), ("drop", 2 * 3)):
        seen, stats = [], Counter()
        for rank in range(2):
            loader = build_train_loader(_cfg(tmp_path, remainder=remainder), proc, FAMILY, rank, 2)
            keys = _run(loader)
            assert len(keys) == len(loader) == steps, remainder
            seen += [k for b in keys for k in b]
            stats.update(loader.stats)
        if remainder == "wrap":      # every sample at least once; the short workers wrap around
            assert set(seen) == {f"train-{i:08d}" for i in range(46)}
            assert len(seen) == 48 and stats["repeated"] == 2
        else:                        # 3 batches of 3 per worker, the rest dropped and counted
            assert len(seen) == len(set(seen)) == 36 and stats["dropped_remainder"] == 10


def test_deterministic_for_a_seed_and_epochs_differ(data48, proc):
    a = build_train_loader(_cfg(data48, num_workers=0), proc, FAMILY)
    b = build_train_loader(_cfg(data48, num_workers=0), proc, FAMILY)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    a.set_epoch(0)
    e0 = _run(a)
    a.set_epoch(1)
    e1 = _run(a)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, []))
    other = _run(build_train_loader(_cfg(data48, num_workers=0, seed=6), proc, FAMILY))
    assert other != e0


@pytest.mark.parametrize("stop_after", [5])   # odd: the resumed DataLoader must start at worker 1
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(data48, proc, stop_after):
    cfg = _cfg(data48, micro_batch_size=2)                 # 12 per worker slot, 6 batches, 12 steps
    full = build_train_loader(cfg, proc, FAMILY, 0, 2)
    full.set_epoch(3)
    want = _run(full)
    first = build_train_loader(cfg, proc, FAMILY, 0, 2)
    first.set_epoch(3)
    got = _run(first, limit=stop_after)
    state = json.loads(json.dumps(first.state_dict()))     # must survive a JSON checkpoint
    resumed = build_train_loader(cfg, proc, FAMILY, 0, 2)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)                                   # the loop re-sets the epoch: keeps the position
    got += _run(resumed)
    assert got == want                                     # same samples, same batches, same order
    nxt = _run(resumed)                                    # then the next epoch starts fresh
    assert len(nxt) == len(resumed) and nxt != want
    with pytest.raises(ValueError, match="world size"):
        build_train_loader(cfg, proc, FAMILY, 0, 1).load_state_dict(state)
    with pytest.raises(DataError, match="num_workers"):
        build_train_loader(_cfg(data48, num_workers=2), proc, FAMILY, 0, 30)   # 48 samples < 60 slots


# ------------------------------------------------------------------------------ bad input


def _members(key, record, image=None):
    out = []
    if image is not None:
        out.append((f"{key}.0.png", image))
    out.append((f"{key}.json", record if isinstance(record, bytes) else json.dumps(record).encode()))
    return out


def _raw_shard(path, members):
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """16 good samples + one of each kind of bad input, spread over 3 shards; the third shard is
    cut in the middle of a member (a corrupt tar): its last 2 samples are unreadable."""
    d = tmp_path_factory.mktemp("dirty")
    cfg = GeneratorConfig(seed=1, difficulty="easy", image_size=48)
    good = [make_sample(cfg, "train", i) for i in range(16)]
    img = good[0].images[0][1]
    conv = good[0].record["conversations"]
    bad = [
        ("badimg", _members("badimg", {"id": "x", "conversations": conv}, b"\x89PNG\r\n\x1a\n garbage")),
        ("badjson", _members("badjson", b"{not json", img)),
        ("nogpt", _members("nogpt", {"id": "x", "conversations": conv[:1]}, img)),
        ("tags", _members("tags", {"id": "x", "conversations": [{"from": "human", "value": "<image><image>?"}, conv[1]]}, img)),
        ("nojson", [("nojson.0.png", img)]),
    ]
    shard0 = [m for s in good[:8] for m in ShardSampleMembers(s)] + [m for _, ms in bad[:3] for m in ms]
    shard1 = [m for s in good[8:14] for m in ShardSampleMembers(s)] + [m for _, ms in bad[3:] for m in ms]
    shard2 = [m for s in good[14:] for m in ShardSampleMembers(s)] + \
             [m for i in range(2) for m in _members(f"lost{i}", {"id": "x", "conversations": conv}, img)]
    _raw_shard(d / "s-0.tar", shard0)
    _raw_shard(d / "s-1.tar", shard1)
    _raw_shard(d / "s-2.tar", shard2)
    raw = (d / "s-2.tar").read_bytes()
    # cut inside the data of lost0's image: tarfile raises "unexpected end of data" on reading it
    cut = raw.index(b"lost0.0.png") + 512 + 20
    (d / "s-2.tar").write_bytes(raw[:cut])
    manifest = {"format_version": 1, "total": 25,
                "shards": [{"name": "s-0.tar", "samples": 11}, {"name": "s-1.tar", "samples": 8},
                           {"name": "s-2.tar", "samples": 4}, ]}
    manifest["total"] = 23
    (d / MANIFEST_NAME).write_text(json.dumps(manifest))
    return d


def ShardSampleMembers(s: ShardSample):
    from grace_ds.data.format import sample_members
    return sample_members(s)


def test_bad_samples_skipped_and_counted_by_reason(dirty, proc):
    cfg = _cfg(dirty, num_workers=0, micro_batch_size=4, max_bad_fraction=0.5, shuffle=False)
    loader = build_train_loader(cfg, proc, FAMILY)
    keys = _run(loader)
    assert len(keys) == len(loader) == 6                   # ceil(23 / 4): bad samples are replaced, steps unchanged
    assert dict(loader.stats) == {"bad_image": 1, "bad_json": 1, "no_assistant_turn": 1,
                                  "more_image_tags_than_images": 1, "missing_json": 1, "corrupt_tar": 2,
                                  "repeated": 1 + 7}
    flat = [k for b in keys for k in b]
    assert set(flat) == {f"train-{i:08d}" for i in range(16)}       # every good sample, only good ones


def test_too_many_bad_samples_error_names_shard_and_key(dirty, proc):
    loader = build_train_loader(_cfg(dirty, num_workers=0, micro_batch_size=4, shuffle=False), proc, FAMILY)
    with pytest.raises(DataError, match=r"max_bad_fraction=0\.01.*s-0\.tar key badimg reason bad_image"):
        _run(loader)


def test_too_many_bad_samples_error_from_a_worker_process(dirty, proc):
    loader = build_train_loader(_cfg(dirty, num_workers=2, micro_batch_size=2, shuffle=False), proc, FAMILY)
    with pytest.raises(Exception, match=r"shard .*s-\d\.tar key \w+"):
        _run(loader)


def test_collate_right_pads_and_eval_loader_masks_wrapped_duplicates(data48, proc, tmp_path):
    a = torch.tensor([[5, 6, 7]])
    b = torch.tensor([[8]])
    out = collate([{"input_ids": a, "labels": a, "attention_mask": torch.ones_like(a), "pixel_values": torch.ones(2, 4)},
                   {"input_ids": b, "labels": b, "attention_mask": torch.ones_like(b), "pixel_values": torch.zeros(3, 4)}], 0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and out["pixel_values"].shape == (5, 4)
    _synthetic(tmp_path, 10, 10, seed=3)           # 10 over 2 ranks x 1 worker, batch 3: 2 batches each, 1 wrap
    n_sup = []
    for rank in range(2):
        ev = build_eval_loader(DataConfig(val_dirs=[str(tmp_path)], micro_batch_size=3, num_workers=0), proc, FAMILY, rank, 2)
        next(iter(ev))                               # a partial pass (train.eval_batches)...
        partial_first = list(ev.last_keys)
        full = []
        for batch in ev:                             # ...and the next pass starts from the beginning
            full.append(list(ev.last_keys))
            n_sup.append([int((row != IGNORE_INDEX).any()) for row in batch["labels"]])
        assert full[0] == partial_first and len(full) == len(ev) == 2 and ev.stats["repeated"] == 1
    assert sum(map(sum, n_sup)) == 10                # 12 rows, the 2 duplicates carry no loss


# ------------------------------------------------------------------------------ real ranks


def _ranks_body(rank, world_size, d, proc, stop_after):
    """Each step runs a collective (like a ZeRO-3 gather): unequal step counts would hang here."""
    import torch.distributed as dist

    cfg = _cfg(d, num_workers=0, micro_batch_size=2, max_bad_fraction=0.5, shuffle=False)
    loader = build_train_loader(cfg, proc, FAMILY, rank, world_size)
    first = []
    for step, _ in enumerate(loader):
        dist.all_reduce(torch.ones(1))
        first.append(list(loader.last_keys))
        if step + 1 == stop_after:
            break
    state = loader.state_dict()                      # collective: gathers every rank's position
    box = [state]
    dist.broadcast_object_list(box, src=0)           # resume every rank from rank 0's copy
    resumed = build_train_loader(cfg, proc, FAMILY, rank, world_size)
    resumed.load_state_dict(box[0])
    rest = []
    for _ in resumed:
        dist.all_reduce(torch.ones(1))
        rest.append(list(resumed.last_keys))
    full = _run(build_train_loader(cfg, proc, FAMILY, rank, world_size))
    assert first + rest == full, (rank, first, rest, full)      # exact continuation on every rank
    return len(loader), first, rest, dict(resumed.stats)


def test_two_gloo_ranks_equal_steps_and_resume_from_rank0_state(dirty, proc):
    from distributed import run_distributed

    (n0, f0, r0, s0), (n1, f1, r1, s1) = run_distributed(_ranks_body, 2, args=(str(dirty), proc, 3), timeout=60)
    assert n0 == n1 == len(f0) + len(r0) == len(f1) + len(r1) == 6     # 23 -> 12 per rank (wrap), batch 2
    assert s0.get("bad_image") == 1 and "corrupt_tar" in s1          # rank-local skips, equal steps anyway
    flat = [k for part in (f0, r0, f1, r1) for b in part for k in b]
    assert set(flat) == {f"train-{i:08d}" for i in range(16)}


@pytest.mark.parametrize("preset,family", [("tiny-qwen2vl-student", "qwen2_vl"), ("tiny-llava-student", "llava"),
                                           ("tiny-qwen25vl-student", "qwen2_5_vl"), ("tiny-qwen3vl-student", "qwen3_vl")])
def test_batches_feed_the_familys_model(data48, tmp_path, preset, family):
    """A padded batch from the loader is exactly what the HF model consumes (shapes, image tokens)."""
    from grace_ds.models.loading import load_model, load_processor
    from grace_ds.models.presets import build_tiny_preset

    d = build_tiny_preset(preset, tmp_path / preset)
    processor, model = load_processor(d), load_model(d)
    loader = build_train_loader(_cfg(data48, num_workers=0, micro_batch_size=3), processor, family)
    batch = next(iter(loader))
    assert (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()     # really padded
    out = model(**batch)
    assert torch.isfinite(out.loss)


# -- example cache ------------------------------------------------------------------------------

def _batches(loader):
    return [{k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]


def test_example_cache_gives_identical_batches_and_is_used(data48, proc, tmp_path):
    """Cold (writes), warm (reads) and uncached loaders give bit-identical batches; a warm pass
    never calls the processor; a cache made for another max_length is not reused."""
    import grace_ds.data.loader as loader_mod

    cache = tmp_path / "cache"
    base = _batches(build_train_loader(_cfg(data48), proc, FAMILY))                       # 2 worker processes
    cold = _batches(build_train_loader(_cfg(data48, example_cache=str(cache)), proc, FAMILY))
    assert len(list(cache.rglob("*.safetensors"))) == 48 and not list(cache.rglob("*.tmp"))
    warm = _batches(build_train_loader(_cfg(data48, example_cache=str(cache)), proc, FAMILY))
    base0 = _batches(build_train_loader(_cfg(data48, num_workers=0), proc, FAMILY))       # in-process
    calls = []
    real = loader_mod.build_example
    loader_mod.build_example = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        warm0 = _batches(build_train_loader(_cfg(data48, num_workers=0, example_cache=str(cache)), proc, FAMILY))
        assert calls == []
        other = build_train_loader(_cfg(data48, num_workers=0, max_length=255, example_cache=str(cache)), proc, FAMILY)
        next(iter(other))
        assert calls, "a cache made with another max_length was reused"
    finally:
        loader_mod.build_example = real
    for b0, b1, b2 in [*zip(base, cold, warm, strict=True), *zip(base0, warm0, warm0, strict=True)]:
        assert b0.keys() == b1.keys() == b2.keys()
        for k in b0:
            assert torch.equal(b0[k], b1[k]) and torch.equal(b0[k], b2[k]), k


def test_example_cache_keeps_bad_samples_counted_and_survives_a_torn_file(dirty, proc, tmp_path):
    cfg = _cfg(dirty, num_workers=0, micro_batch_size=4, max_bad_fraction=0.5, shuffle=False,
               example_cache=str(tmp_path / "c"))
    first = build_train_loader(cfg, proc, FAMILY)
    keys = _run(first)
    torn = sorted((tmp_path / "c").rglob("*.safetensors"))[0]
    torn.write_bytes(torn.read_bytes()[:40])           # a write cut short by a crash
    again = build_train_loader(cfg, proc, FAMILY)
    assert _run(again) == keys
    assert dict(again.stats) == dict(first.stats) and again.stats["bad_image"] == 1
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 16   # good samples only; the torn one rewritten


def test_example_cache_deletes_temporary_files_of_killed_writers(tmp_path):
    """A writer killed between write and rename leaves `.<i>.safetensors.<host>.<pid>.tmp`. The next
    write into that directory deletes it when the pid is gone, and keeps a live writer's file and
    another host's."""
    import subprocess
    import sys

    from grace_ds.data.example_cache import ExampleCache

    shard = tmp_path / "shard.tar"
    shard.write_bytes(b"x")
    cache = ExampleCache(tmp_path / "c", "fp")
    d = cache.path(str(shard), 0).parent
    d.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    orphan = d / f".3.safetensors.{cache._host}.{dead_pid}.tmp"
    live = d / f".4.safetensors.{cache._host}.{os.getppid()}.tmp"
    foreign = d / f".5.safetensors.otherhost.{dead_pid}.tmp"
    for f in (orphan, live, foreign):
        f.write_bytes(b"partial")
    cache.put(str(shard), 0, {"input_ids": torch.arange(4)})
    assert not orphan.exists() and live.exists() and foreign.exists()
    assert torch.equal(cache.get(str(shard), 0)["input_ids"], torch.arange(4))
    assert not list(d.glob(f"*{os.getpid()}.tmp"))     # its own write renamed, nothing left
