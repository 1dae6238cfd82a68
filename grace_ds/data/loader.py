"""Streaming training loader over WebDataset shards: equal steps on every rank, exact resume.

Pipeline (per rank): manifest -> per-epoch plan -> this rank's W worker slots -> each worker reads
its contiguous range of samples shard by shard (sequential tar reads) -> seeded shuffle buffer ->
decode -> the model's HF processor (chat template + image preprocessing) -> assistant-only labels
and the max-length policy (labels.py) -> right-padding collate -> torch DataLoader (prefetching
workers, pinned memory).

Why a plan from the manifest instead of webdataset's shard splitting: the manifest gives every
shard's sample count, so the loader knows, before reading anything,
  * the steps per epoch, identical on every rank (uneven batch counts deadlock ZeRO collectives);
  * which samples each (rank, worker) slot owns: the shards are shuffled per epoch (seeded), laid
    end to end, and cut into R*W contiguous ranges of N//(R*W) or N//(R*W)+1 samples, so work is
    balanced to one sample and each slot touches at most a couple of shards more than it needs;
  * where every worker is in its stream, so a checkpoint can resume mid-epoch exactly.

Steps per epoch (B = micro batch, S = R*W slots): every worker yields the same number q of full
batches, so every rank runs W*q steps.
  remainder="wrap" (default): q = ceil(ceil(N/S)/B); a worker whose share is short wraps around to
      the start of its own range (those samples are seen twice that epoch; counted as "repeated").
  remainder="drop": q = floor(floor(N/S)/B); samples past q*B in a worker's share are not used that
      epoch (counted as "dropped_remainder"; a different set each epoch when shuffling).
When N is a multiple of S*B both give every sample exactly once per epoch. A skipped (bad) sample
is replaced by the next one in the worker's stream (wrapping if needed), so step counts never
change.

Resume: the main process records, for the last batch it handed out, each worker's position in its
emission stream (and bad-sample count). load_state_dict restarts every worker there; skipping the
consumed part re-reads tar bytes and replays the shuffle buffer but decodes nothing. The DataLoader
workers are rotated so the batch order after resume equals the uninterrupted order.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from grace_ds.data.format import image_index, read_manifest, split_member_name, validate_conversation
from grace_ds.data.labels import IGNORE_INDEX, SkipSample, build_example

STATE_VERSION = 1
REMAINDER_POLICIES = ("wrap", "drop")


@dataclass
class DataConfig:
    train_dirs: list[str] = field(default_factory=list)   # shard dirs, each with manifest.json (concatenated)
    val_dirs: list[str] = field(default_factory=list)     # validation shard dirs (build_eval_loader)
    micro_batch_size: int = 1          # samples per rank per step
    num_workers: int = 2               # DataLoader worker processes per rank; 0 = decode in the main process
    shuffle: bool = True               # shuffle shard order per epoch + shuffle buffer
    shuffle_buffer: int = 256          # samples held (as raw bytes) per worker for the in-stream shuffle
    seed: int = 0                      # plan + shuffle seed; the same seed gives the same batches
    max_length: int = 2048             # tokens after image expansion; image tokens are never cut
    max_bad_fraction: float = 0.01     # skipped / a worker's epoch share; above it: DataError naming shard+key
    remainder: str = "wrap"            # "wrap" | "drop": how per-worker shares are made equal (module doc)
    pin_memory: bool = True            # only takes effect when CUDA is available
    prefetch_factor: int = 2           # batches prefetched per worker
    example_cache: str | None = None   # dir: keep processed examples on disk, shared by runs (example_cache.py)


class DataError(RuntimeError):
    """Too many bad samples, or a dataset that cannot feed the requested ranks/workers."""


# --------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Segment:
    shard: int      # index into the loader's shard list
    start: int      # first sample index within the shard (inclusive)
    end: int        # exclusive


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def epoch_plan(counts: list[int], n_slots: int, seed: int, epoch: int, shuffle: bool) -> list[list[Segment]]:
    """Split the epoch's samples into n_slots contiguous, balanced ranges of (shard, start, end)."""
    order = list(range(len(counts)))
    if shuffle:
        random.Random(_seed("plan", seed, epoch)).shuffle(order)
    total = sum(counts)
    bounds = [s * total // n_slots for s in range(n_slots + 1)]
    plan: list[list[Segment]] = [[] for _ in range(n_slots)]
    base = 0
    for sh in order:
        lo, hi = base, base + counts[sh]
        for s in range(n_slots):
            a, b = max(lo, bounds[s]), min(hi, bounds[s + 1])
            if a < b:
                plan[s].append(Segment(sh, a - base, b - base))
        base = hi
    return plan


def batches_per_worker(total: int, n_slots: int, batch: int, remainder: str) -> int:
    if remainder == "wrap":
        return math.ceil(math.ceil(total / n_slots) / batch)
    if remainder == "drop":
        return (total // n_slots) // batch
    raise ValueError(f"remainder={remainder!r}: use one of {REMAINDER_POLICIES}")


# --------------------------------------------------------------------------------------- raw stream


@dataclass
class RawSample:
    shard: str                       # shard path (for error messages)
    index: int                       # sample index within the shard
    key: str | None
    members: dict[str, bytes] | None = None
    reason: str | None = None        # set: this position is a known-bad sample (corrupt/missing)
    detail: str = ""


def _read_segment(path: Path, seg: Segment) -> Iterator[RawSample]:
    """Samples seg.start..seg.end-1 of one shard. A corrupt header ends the shard: the samples the
    manifest promised but that could not be read come out as bad placeholders (reason corrupt_tar),
    so they are counted, never silently lost, and the stream positions stay aligned with the plan."""
    nxt = seg.start                  # next sample index to hand out
    idx, key, members = -1, None, {}
    # tarfile ends the archive silently at an invalid header after the first member, so "fewer
    # samples than the manifest says" is how most header corruption shows up: same reason.
    reason, detail = "corrupt_tar", "shard ended before its manifest sample count (truncated or corrupt header)"
    try:
        with tarfile.open(path, "r:") as tar:
            for ti in tar:
                if not ti.isfile():
                    continue
                k, suffix = split_member_name(ti.name)
                if k != key:
                    if key is not None and idx >= seg.start:
                        yield RawSample(str(path), idx, key, members)
                        nxt = idx + 1
                    key, members = k, {}
                    idx += 1
                    if idx >= seg.end:
                        return
                if idx >= seg.start:     # members before the range are skipped without reading
                    members[suffix] = tar.extractfile(ti).read()
            if key is not None and idx >= seg.start:
                yield RawSample(str(path), idx, key, members)
                nxt = idx + 1
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason, detail = "corrupt_tar", f"unreadable after key {key!r}: {type(e).__name__}: {e}"
    for i in range(nxt, seg.end):
        yield RawSample(str(path), i, None, None, reason=reason, detail=detail)


def _shuffled(items: Iterator[RawSample], rng: random.Random, size: int) -> Iterator[RawSample]:
    """Seeded reservoir-style shuffle buffer (same algorithm as webdataset's, but deterministic)."""
    if size <= 1:
        yield from items
        return
    buf: list[RawSample] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], it
        yield out
    rng.shuffle(buf)
    yield from buf


def slot_stream(paths: list[Path], segments: list[Segment], seed: int, epoch: int, slot: int,
                shuffle_buffer: int) -> Iterator[tuple[int, RawSample]]:
    """Infinite (position, raw sample) stream of one slot: its range, shuffled, then wrapped."""
    rng = random.Random(_seed("buffer", seed, epoch, slot))
    pos = 0
    while True:
        def one_pass():
            for seg in segments:
                yield from _read_segment(paths[seg.shard], seg)
        for raw in _shuffled(one_pass(), rng, shuffle_buffer):
            yield pos, raw
            pos += 1


# --------------------------------------------------------------------------------------- decode


def decode_sample(raw: RawSample):
    """RawSample -> (record, [PIL images]); raises SkipSample with the reason."""
    from PIL import Image

    if raw.reason is not None:
        raise SkipSample(raw.reason, raw.detail)
    js = raw.members.get("json")
    if js is None:
        raise SkipSample("missing_json")
    try:
        record = json.loads(js.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from None
    imgs = sorted((image_index(s), s) for s in raw.members if image_index(s) is not None)
    reason = validate_conversation(record, len(imgs))
    if reason:
        raise SkipSample(reason)
    images = []
    for _, suffix in imgs:
        try:
            im = Image.open(io.BytesIO(raw.members[suffix]))
            im.load()
            images.append(im.convert("RGB"))
        except Exception as e:   # PIL raises many types for corrupt data
            raise SkipSample("bad_image", f"{suffix}: {e}") from None
    return record, images


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right padding: input_ids with pad_token_id, labels with -100, masks and type ids with 0.
    Sequence tensors are those shaped like input_ids (1, S); everything else (pixel_values, Qwen's
    flattened patches, image_grid_thw) is concatenated along dim 0."""
    seq_len = max(e["input_ids"].shape[1] for e in examples)
    keys = list(dict.fromkeys(k for e in examples for k in e))
    out = {}
    for k in keys:
        vals = [e[k] for e in examples if k in e]
        is_seq = all(v.dim() == 2 and v.shape == e["input_ids"].shape for e, v in
                     ((e, e[k]) for e in examples if k in e))
        if is_seq and len(vals) == len(examples):
            pad = pad_token_id if k == "input_ids" else (IGNORE_INDEX if k == "labels" else 0)
            t = torch.full((len(vals), seq_len), pad, dtype=vals[0].dtype)
            for i, v in enumerate(vals):
                t[i, : v.shape[1]] = v[0]
            out[k] = t
        else:
            out[k] = torch.cat(vals, dim=0)
    return out


# --------------------------------------------------------------------------------------- dataset


@dataclass
class _EpochJob:
    """Everything a worker needs for one epoch (pickled to DataLoader workers)."""

    epoch: int
    plan: list[list[Segment]]       # this rank's W slots
    slot_ids: list[int]             # global slot id per local worker
    start_pos: list[int]            # per local worker: stream position to resume from
    start_bad: list[int]            # per local worker: bad samples already counted this epoch
    quotas: list[int]               # per local worker: batches still to produce
    rotation: int                   # DataLoader worker i serves local worker (i + rotation) % W


class _SlotDataset(IterableDataset):
    def __init__(self, loader: "ShardLoader", job: _EpochJob):
        self.loader = loader
        self.job = job

    def __iter__(self):
        info = get_worker_info()
        W = len(self.job.slot_ids)
        if info is None:
            # in-process: interleave the local workers round-robin, the same order a DataLoader gives
            its = [self._worker(w) for w in range((self.job.rotation) % W, W)] + \
                  [self._worker(w) for w in range(0, self.job.rotation % W)]
            active = list(its)
            while active:
                for it in list(active):
                    try:
                        yield next(it)
                    except StopIteration:
                        active.remove(it)
            return
        torch.set_num_threads(1)    # workers share the cores; intra-op threads only oversubscribe
        yield from self._worker((info.id + self.job.rotation) % W)

    def _worker(self, w: int):
        L, job, cfg = self.loader, self.job, self.loader.cfg
        quota = job.quotas[w]
        if quota <= 0:
            return
        slot = job.slot_ids[w]
        share = sum(s.end - s.start for s in job.plan[w])
        budget = cfg.max_bad_fraction * max(share, 1)
        bad = job.start_bad[w]
        reasons: Counter = Counter()      # since the last batch (sent with it to the main process)
        all_reasons: Counter = Counter()  # since this worker started (for error messages)
        repeated = 0
        examples, keys = [], []
        good_in_pass = 0
        stream = slot_stream(L.paths, job.plan[w], cfg.seed, job.epoch, slot, cfg.shuffle_buffer if cfg.shuffle else 0)
        cache = None
        if L.cache_fingerprint is not None:
            from grace_ds.data.example_cache import ExampleCache

            cache = ExampleCache(cfg.example_cache, L.cache_fingerprint)
        for pos, raw in stream:
            if pos < job.start_pos[w]:
                continue                  # resume: already consumed before the checkpoint
            if share and pos % share == 0 and pos > 0:
                if good_in_pass == 0 and pos - share >= job.start_pos[w]:   # a whole pass seen here
                    raise DataError(f"worker slot {slot}: a whole pass over its {share} samples gave no usable "
                                    f"sample (skips: {dict(all_reasons)}); check the shards under {L.dirs}")
                good_in_pass = 0
            if share and pos >= share:
                repeated += 1
            try:
                ex = cache.get(raw.shard, raw.index) if cache is not None and raw.reason is None else None
                if ex is None:
                    record, images = decode_sample(raw)
                    ex = build_example(L.processor, record["conversations"], images, cfg.max_length)
                    if cache is not None:
                        cache.put(raw.shard, raw.index, ex)
            except SkipSample as e:
                bad += 1
                reasons[e.reason] += 1
                all_reasons[e.reason] += 1
                if bad > budget:
                    raise DataError(
                        f"too many bad samples: {bad} skipped in a share of {share} (max_bad_fraction="
                        f"{cfg.max_bad_fraction}); last: shard {raw.shard} key {raw.key or f'#{raw.index}'} "
                        f"reason {e}; by reason in this worker since its start: {dict(all_reasons)}. Fix or re-convert the data "
                        f"(python -m grace_ds.data.convert reports bad samples), or raise data.max_bad_fraction"
                    ) from None
                continue
            good_in_pass += 1
            if L.eval_mode and share and pos >= share:
                # eval: a wrapped duplicate only keeps the ranks' forward counts equal; no loss on it
                ex["labels"] = torch.full_like(ex["labels"], IGNORE_INDEX)
            examples.append(ex)
            keys.append(raw.key)
            if len(examples) == cfg.micro_batch_size:
                batch = collate(examples, L.pad_token_id)
                if L.batch_fn is not None:
                    batch = L.batch_fn(batch)
                batch["_meta"] = {"worker": w, "pos": pos + 1, "bad": bad, "keys": keys,
                                  "skipped": dict(reasons), "repeated": repeated}
                reasons, repeated = Counter(), 0
                examples, keys = [], []
                yield batch
                quota -= 1
                if quota == 0:
                    return


# --------------------------------------------------------------------------------------- loader


class ShardLoader:
    """Iterate micro-batches for one rank. len() = steps per epoch, equal on every rank.

    ``stats`` counts skipped samples by reason (plus "repeated", "dropped_remainder") as seen by the
    batches handed out so far. ``last_keys`` are the sample keys of the last batch (tests, debugging).
    """

    def __init__(self, cfg: DataConfig, processor, family: str, rank: int, world_size: int,
                 dirs: list[str], eval_mode: bool = False, batch_fn=None):
        if cfg.remainder not in REMAINDER_POLICIES:
            raise ValueError(f"data.remainder={cfg.remainder!r}: use one of {REMAINDER_POLICIES}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if cfg.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size={cfg.micro_batch_size}: must be >= 1")
        if not dirs:
            raise ValueError("no shard directories given (data.train_dirs / data.val_dirs)")
        self.cfg, self.processor, self.family = cfg, processor, family
        # Applied to each collated batch in the worker (picklable), e.g. fast_paths.RopeIndex: work
        # that would otherwise run on the training process's critical path.
        self.batch_fn = batch_fn
        self.cache_fingerprint = None
        if cfg.example_cache:
            from grace_ds.data.example_cache import processor_fingerprint

            self.cache_fingerprint = processor_fingerprint(processor, family, cfg.max_length)
        self.rank, self.world_size = rank, world_size
        self.dirs = [str(d) for d in dirs]
        self.paths: list[Path] = []
        self.counts: list[int] = []
        for d in self.dirs:
            m = read_manifest(d)
            for p, s in zip(m.shard_paths(), m.shards):
                if not p.exists():
                    raise FileNotFoundError(f"shard {p} listed in {d}/manifest.json is missing; re-copy or re-convert the data")
                self.paths.append(p)
                self.counts.append(s.samples)
        self.total = sum(self.counts)
        self.workers = max(1, cfg.num_workers)
        self.n_slots = world_size * self.workers
        self.eval_mode = eval_mode
        if self.total < self.n_slots:
            raise DataError(f"{self.total} samples in {self.dirs} cannot feed {world_size} ranks x {self.workers} "
                            f"workers (every worker needs at least one sample); lower data.num_workers or add data")
        self.quota = batches_per_worker(self.total, self.n_slots, cfg.micro_batch_size, cfg.remainder)
        if self.quota == 0:
            raise DataError(
                f"{self.total} samples cannot give one batch of {cfg.micro_batch_size} to each of "
                f"{world_size} ranks x {self.workers} workers with remainder='drop'; use fewer workers, "
                f"a smaller micro batch, remainder='wrap', or more data")
        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = 0 if pad is None else int(pad)
        self.epoch = 0
        self._reset_positions()
        self.stats: Counter = Counter()
        self.last_keys: list[str] = []

    # -- bookkeeping ------------------------------------------------------------------------------
    def _reset_positions(self) -> None:
        self.consumed = 0
        self.positions = [0] * self.workers
        self.bad = [0] * self.workers
        self.done = [0] * self.workers          # batches handed out per local worker this epoch

    def __len__(self) -> int:
        return self.workers * self.quota

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (plan + shuffle seed). Setting the current epoch keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_positions()

    def _plan(self) -> list[list[Segment]]:
        plan = epoch_plan(self.counts, self.n_slots, self.cfg.seed, self.epoch, self.cfg.shuffle)
        return plan[self.rank * self.workers:(self.rank + 1) * self.workers]

    def __iter__(self):
        W = self.workers
        if self.eval_mode:
            self._reset_positions()              # every validation pass starts at the beginning
        if self.consumed >= len(self):           # finished epoch without set_epoch: move on
            self.epoch += 1
            self._reset_positions()
        plan = self._plan()
        rotation = self.consumed % W
        job = _EpochJob(self.epoch, plan, [self.rank * W + w for w in range(W)], list(self.positions),
                        list(self.bad), [self.quota - d for d in self.done], rotation)
        ds = _SlotDataset(self, job)
        if self.cfg.num_workers > 0:
            dl = DataLoader(ds, batch_size=None, num_workers=W, prefetch_factor=self.cfg.prefetch_factor,
                            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(), persistent_workers=False)
        else:
            dl = ds
        if self.consumed == 0 and self.cfg.remainder == "drop":
            used = self.quota * self.cfg.micro_batch_size
            self.stats["dropped_remainder"] += sum(max(0, sum(s.end - s.start for s in p) - used) for p in plan)
        for batch in dl:
            meta = batch.pop("_meta")
            w = meta["worker"]
            self.positions[w], self.bad[w] = meta["pos"], meta["bad"]
            self.done[w] += 1
            self.consumed += 1
            self.stats.update(meta["skipped"])
            if meta["repeated"]:
                self.stats["repeated"] += meta["repeated"]
            self.last_keys = meta["keys"]
            yield batch
        if self.consumed >= len(self):
            self.epoch += 1
            self._reset_positions()

    # -- resume -----------------------------------------------------------------------------------
    def _local_state(self) -> dict:
        return {"consumed": self.consumed, "positions": list(self.positions), "bad": list(self.bad),
                "done": list(self.done), "stats": dict(self.stats)}

    def state_dict(self) -> dict:
        """Resume state. Under torch.distributed with world_size > 1 this is a collective (every
        rank must call it): the state holds every rank's positions, so rank 0's copy restores all."""
        ranks = {self.rank: self._local_state()}
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.rank, self._local_state()))
            ranks = {r: s for r, s in gathered}
        return {"version": STATE_VERSION, "epoch": self.epoch, "seed": self.cfg.seed,
                "world_size": self.world_size, "workers": self.workers, "total": self.total,
                "micro_batch_size": self.cfg.micro_batch_size, "remainder": self.cfg.remainder,
                "ranks": {str(r): s for r, s in ranks.items()}}

    def load_state_dict(self, state: dict) -> None:
        mine = {"world_size": self.world_size, "workers": self.workers, "seed": self.cfg.seed,
                "total": self.total, "micro_batch_size": self.cfg.micro_batch_size, "remainder": self.cfg.remainder}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"loader state does not match this loader (saved, now): {diff}; exact resume needs the "
                             f"same data, seed, world size, num_workers, micro batch and remainder policy")
        r = state["ranks"].get(str(self.rank))
        if r is None:
            raise ValueError(f"loader state has no entry for rank {self.rank} (has {sorted(state['ranks'])}); "
                             f"call state_dict() on every rank (it gathers) when saving")
        self.epoch = int(state["epoch"])
        self.consumed = int(r["consumed"])
        self.positions, self.bad, self.done = list(r["positions"]), list(r["bad"]), list(r["done"])
        self.stats = Counter(r["stats"])


def _family_check(family: str) -> None:
    known = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")
    if family not in known:
        raise ValueError(f"family {family!r} not supported; expected one of {known}")


def build_train_loader(cfg: DataConfig, processor, family: str, rank: int = 0, world_size: int = 1,
                       batch_fn=None) -> ShardLoader:
    """The training loader for one rank (see the module docstring for the guarantees)."""
    _family_check(family)
    dirs = [cfg.train_dirs] if isinstance(cfg.train_dirs, str) else list(cfg.train_dirs)
    return ShardLoader(cfg, processor, family, rank, world_size, dirs, batch_fn=batch_fn)


def build_eval_loader(cfg: DataConfig, processor, family: str, rank: int = 0, world_size: int = 1,
                      batch_fn=None) -> ShardLoader:
    """Validation loader: no shuffling, remainder="wrap" so every rank runs the same number of
    forwards (ZeRO-3 gathers are collectives); the wrapped duplicates are counted in stats["repeated"]."""
    _family_check(family)
    from dataclasses import replace

    dirs = [cfg.val_dirs] if isinstance(cfg.val_dirs, str) else list(cfg.val_dirs)
    ecfg = replace(cfg, shuffle=False, remainder="wrap")
    return ShardLoader(ecfg, processor, family, rank, world_size, dirs, eval_mode=True, batch_fn=batch_fn)
