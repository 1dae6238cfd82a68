"""Shard format: WebDataset tar shards + a manifest.json (spec in docs/data.md).

One sample per key. Members of sample ``<key>``:
  ``<key>.0.png``, ``<key>.1.jpg``, ...   images in order (png / jpg / jpeg / webp)
  ``<key>.json``                          {"id", "conversations": [{"from", "value"}], "meta": {...}}
``manifest.json`` beside the shards lists every shard with its sample count, so loaders know the
dataset size (and can compute equal per-rank step counts) without reading a single tar.

Shards are written to ``<name>.tmp`` then renamed, and the manifest is written last: a directory
with a manifest is complete; a crash mid-write leaves no manifest (and at worst ``.tmp`` files).
Tar headers are normalised (mtime 0, uid/gid 0, no user names) so the same samples give
byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
IMAGE_TAG = "<image>"
HUMAN, GPT = "human", "gpt"

# "<idx>.<ext>" image members; the bare "<ext>" form (one image, common in public WebDataset sets)
# is read too, as image 0.
_IMAGE_SUFFIX = re.compile(r"^(?:(\d+)\.)?(png|jpe?g|webp)$", re.IGNORECASE)
# Keys must not contain "." (WebDataset splits key/suffix at the first dot of the basename) nor "/".
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class ShardSample:
    """One sample as written to a shard."""

    key: str                                    # unique within the dataset; [A-Za-z0-9_-]+
    record: dict                                # the .json member: {"id", "conversations", "meta"}
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (extension, encoded bytes), in order


@dataclass
class ShardInfo:
    name: str       # file name relative to the manifest's directory
    samples: int    # number of samples (keys) in the shard
    bytes: int = 0  # file size in bytes


@dataclass
class Manifest:
    directory: Path
    shards: list[ShardInfo]
    total: int
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)   # e.g. {"generator": {...}} for synthetic sets

    def shard_paths(self) -> list[Path]:
        return [self.directory / s.name for s in self.shards]


def safe_key(raw: str) -> str:
    """Map an arbitrary id to a valid key (dots and slashes would break WebDataset's key split)."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", str(raw))
    return key or "_"


def validate_conversation(record: object, n_images: int) -> str | None:
    """Return a skip reason for a malformed record, or None when it is usable.

    Shared by the converter and the loader so both skip (and count) the same things.
    """
    if not isinstance(record, dict):
        return "bad_json"
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "no_turns"
    n_tags = 0
    for turn in conv:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return "malformed_turn"
        if turn.get("from") not in (HUMAN, GPT):
            return "wrong_role"
        if turn["from"] == GPT and IMAGE_TAG in turn["value"]:
            return "image_tag_in_assistant_turn"   # images are inputs; a model cannot emit one
        n_tags += turn["value"].count(IMAGE_TAG)
    if not any(t["from"] == GPT for t in conv):
        return "no_assistant_turn"
    if conv[0]["from"] != HUMAN:
        return "wrong_role"   # chat templates expect the user to speak first
    if n_tags > n_images:
        return "more_image_tags_than_images"
    if n_tags < n_images:
        return "fewer_image_tags_than_images"
    return None


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0          # fixed: same samples -> byte-identical shards
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def sample_members(sample: ShardSample) -> list[tuple[str, bytes]]:
    if not _KEY_OK.match(sample.key):
        raise ValueError(f"shard key {sample.key!r} is invalid: use [A-Za-z0-9_-] only (see safe_key)")
    out = []
    for i, (ext, data) in enumerate(sample.images):
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"sample {sample.key!r}: image extension {ext!r} not in {IMAGE_EXTS}")
        out.append((f"{sample.key}.{i}.{ext}", data))
    js = json.dumps(sample.record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    out.append((f"{sample.key}.json", js.encode("utf-8")))
    return out


def write_shards(
    samples: Iterable[ShardSample],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    extra_manifest: dict | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Stream ``samples`` into ``<out_dir>/<prefix>-NNNNNN.tar`` shards, then write the manifest.

    Duplicate keys raise (a key names one sample). ``overwrite=False`` refuses a directory that
    already holds a manifest, so a second run cannot silently mix two datasets.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / MANIFEST_NAME
    if mpath.exists():
        if not overwrite:
            raise FileExistsError(f"{mpath} exists: pass overwrite=True (--overwrite) or use an empty directory")
        mpath.unlink()
        for old in out.glob(f"{prefix}-*.tar"):
            old.unlink()
    shards: list[ShardInfo] = []
    seen: set[str] = set()
    tar: tarfile.TarFile | None = None
    tmp_path: Path | None = None
    count = 0

    def close_current() -> None:
        nonlocal tar
        if tar is None:
            return
        tar.close()
        final = tmp_path.with_suffix("")          # drop ".tmp"
        os.replace(tmp_path, final)
        shards.append(ShardInfo(final.name, count, final.stat().st_size))
        tar = None

    try:
        for sample in samples:
            if sample.key in seen:
                raise ValueError(f"duplicate key {sample.key!r}: keys must be unique in a dataset")
            seen.add(sample.key)
            if tar is None:
                tmp_path = out / f"{prefix}-{len(shards):06d}.tar.tmp"
                # GNU format; headers normalised by _tarinfo.
                tar = tarfile.open(tmp_path, "w", format=tarfile.GNU_FORMAT)
                count = 0
            for name, data in sample_members(sample):
                _add(tar, name, data)
            count += 1
            if count >= samples_per_shard:
                close_current()
        close_current()
    except BaseException:
        if tar is not None:
            tar.close()
            tmp_path.unlink(missing_ok=True)
        raise
    manifest = Manifest(out, shards, sum(s.samples for s in shards), FORMAT_VERSION, dict(extra_manifest or {}))
    _write_manifest(manifest)
    return manifest


def _write_manifest(m: Manifest) -> None:
    doc = {
        "format_version": m.format_version,
        "total": m.total,
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in m.shards],
        **m.extra,
    }
    tmp = m.directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, m.directory / MANIFEST_NAME)


def read_manifest(directory: str | os.PathLike) -> Manifest:
    d = Path(directory)
    path = d / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: a shard directory needs the manifest written by write_shards "
            f"(python -m grace_ds.data.convert / grace_ds.data.synthetic); an interrupted write leaves none"
        )
    doc = json.loads(path.read_text())
    ver = doc.get("format_version")
    if ver != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {ver!r}, this code reads {FORMAT_VERSION}; regenerate the shards")
    shards = [ShardInfo(s["name"], int(s["samples"]), int(s.get("bytes", 0))) for s in doc["shards"]]
    total = int(doc["total"])
    if total != sum(s.samples for s in shards):
        raise ValueError(f"{path}: total {total} != sum of shard counts {sum(s.samples for s in shards)}")
    extra = {k: v for k, v in doc.items() if k not in ("format_version", "total", "shards")}
    return Manifest(d, shards, total, ver, extra)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.0.png`` -> (``key``, ``0.png``): WebDataset's rule (key up to the first dot of the basename)."""
    base = name.rsplit("/", 1)[-1]
    key, _, suffix = base.partition(".")
    return key, suffix


def image_index(suffix: str) -> int | None:
    m = _IMAGE_SUFFIX.match(suffix)
    if not m:
        return None
    return int(m.group(1)) if m.group(1) is not None else 0


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {suffix: bytes}) per sample in file order. Raises tarfile.ReadError/EOFError on a
    corrupt header (the caller decides whether to skip the rest of the shard)."""
    with tarfile.open(path, "r:") as tar:
        key, members = None, {}
        for ti in tar:
            if not ti.isfile():
                continue
            k, suffix = split_member_name(ti.name)
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            f = tar.extractfile(ti)
            members[suffix] = f.read()
        if key is not None:
            yield key, members
