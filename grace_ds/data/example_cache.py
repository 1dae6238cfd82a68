"""A disk cache of processed examples, shared by every loader (and process) that reads the same shards.

Turning a raw sample into model inputs (image decode, the HF processor's resize/normalise/patchify,
chat template, tokenisation, assistant-only labels) costs about 4 ms of CPU per sample for the
study's 112-pixel images, measured on the 2-core dev machine (docs/benchmarks.md). The
study trains about 25 models on one 24k-sample split, several epochs each: without a cache, the
same samples are processed about 20 times over, and the data workers, not the GPUs, set the pace.

`data.example_cache: DIR` keeps each processed example (the dict of tensors that `build_example`
returns, bit for bit) as one safetensors file (read in about a tenth of torch.load's time), keyed by

* a fingerprint of everything that shapes the example: the processor (tokenizer, image processor,
  chat template), the model family, `max_length`, and this file's format version;
* the shard file (absolute path, size and modification time: a regenerated shard is new data) and
  the sample's index in it.

Writes are atomic (temporary file + rename), so concurrent loaders race harmlessly: the last rename
wins and both wrote the same bytes. A writer killed between the two leaves its temporary file
(`.<index>.safetensors.<host>.<pid>.tmp`); the first write into that shard's directory by a later
process on the same host deletes the temporary files of processes that no longer exist. A failed
write (full disk) turns the cache off for that worker with one warning; a sample that fails to
process is never cached, so it is skipped and counted every time, as without the cache. Delete the
directory to reclaim the space; nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def processor_fingerprint(processor, family: str, max_length: int | None) -> str:
    h = hashlib.sha256()
    tok = getattr(processor, "tokenizer", processor)
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)).encode())
    ip = getattr(processor, "image_processor", None)
    h.update((ip.to_json_string() if ip is not None else "").encode())
    h.update(str(getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)).encode())
    h.update(f"|{family}|{max_length}|v{FORMAT_VERSION}".encode())
    return h.hexdigest()[:20]


class ExampleCache:
    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.dir = Path(root) / fingerprint
        self.enabled = True
        self._shard_ids: dict[str, str] = {}
        self._swept: set[Path] = set()
        self._host = socket.gethostname().replace(".", "_")

    def _shard_id(self, shard: str) -> str:
        sid = self._shard_ids.get(shard)
        if sid is None:
            st = os.stat(shard)
            sid = hashlib.sha1(f"{os.path.abspath(shard)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
            self._shard_ids[shard] = sid
        return sid

    def path(self, shard: str, index: int) -> Path:
        return self.dir / self._shard_id(shard) / f"{index}.safetensors"

    def get(self, shard: str, index: int) -> dict | None:
        if not self.enabled:
            return None
        p = self.path(shard, index)
        try:
            ex = load_file(p)
        except FileNotFoundError:
            return None
        except Exception as e:   # a torn or foreign file: process the sample again and overwrite it
            print(f"[grace_ds] example cache: unreadable {p} ({type(e).__name__}: {e}); re-processing",
                  file=sys.stderr, flush=True)
            return None
        return ex

    def sweep_orphans(self, directory: Path) -> int:
        """Delete this host's temporary files whose writer process is gone; returns how many."""
        n = 0
        for t in directory.glob(f".*.{self._host}.*.tmp"):
            try:
                pid = int(t.name.rsplit(".", 2)[1])
            except ValueError:
                continue
            if _alive(pid):
                continue
            try:
                t.unlink()
                n += 1
            except OSError:
                pass
        return n

    def put(self, shard: str, index: int, example: dict) -> None:
        if not self.enabled or not all(isinstance(v, torch.Tensor) for v in example.values()):
            return
        p = self.path(shard, index)
        tmp = p.with_name(f".{p.name}.{self._host}.{os.getpid()}.tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.parent not in self._swept:
                self._swept.add(p.parent)
                self.sweep_orphans(p.parent)
            save_file({k: v.contiguous() for k, v in example.items()}, tmp)
            os.replace(tmp, p)
        except OSError as e:
            self.enabled = False
            print(f"[grace_ds] example cache: cannot write {p} ({e}); caching off for this worker",
                  file=sys.stderr, flush=True)
            try:
                tmp.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # exists, owned by someone else
        return True
    return True
