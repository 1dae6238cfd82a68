"""File helpers shared by the converter and the loader: atomic writes and (sharded) safetensors reading."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def atomic_save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors save to a temp file in the same directory, then rename: a crash never leaves a
    truncated file under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class SafetensorsDir:
    """Lazy reader of `model.safetensors` or a sharded `model.safetensors.index.json` checkpoint."""

    def __init__(self, directory: Path, stem: str = "model"):
        directory = Path(directory)
        single = directory / f"{stem}.safetensors"
        index = directory / f"{stem}.safetensors.index.json"
        if single.exists():
            files = [single]
            self._where = None
        elif index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
            self._where = {k: directory / f for k, f in weight_map.items()}
        else:
            raise FileNotFoundError(f"{directory}: neither {single.name} nor {index.name} exists")
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        if self._where is None:
            self._where = {k: single for k in self._handles[single].keys()}
        self.metadata = self._handles[files[0]].metadata() or {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str):
        return self._handles[self._where[key]].get_tensor(key)

    def get_slice(self, key: str):
        return self._handles[self._where[key]].get_slice(key)
