"""Atomic, resumable checkpoints.

Layout (one directory per optimizer step, under <output_dir>/checkpoints/):

    step_00000100/
      ds/                   DeepSpeed ZeRO-3 checkpoint (partitioned params, optimizer, lr scheduler)
      trainer_state.json    step, objective state (controller beta/ema), samples seen
      rank_<r>.pt           per rank: data-loader position and RNG states (python, numpy, torch, cuda)
      config.yaml           the resolved config
      COMPLETE              written last, after every file is fsynced
    latest                  name of the newest complete checkpoint, replaced atomically

A checkpoint is written into `.tmp-step_...`, fsynced, marked COMPLETE, then renamed into place;
`latest` is updated after the rename. A crash at any point leaves the previous checkpoint and the
`latest` pointer intact; a stale `.tmp-*` directory is ignored and removed on the next start.
Assumes every rank sees the same output_dir (shared filesystem), as DeepSpeed's own save does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DS_TAG = "ds"
COMPLETE = "COMPLETE"


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, output_dir, step: int, *, trainer_state: dict, rank_state: dict,
                    config_yaml: str, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    rank = dist.get_rank()
    root = checkpoint_root(output_dir)
    name = f"step_{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    _atomic_write(tmp / f"rank_{rank}.pt", lambda f: torch.save({**rank_state, "rng": rng_state()}, f))
    if rank == 0:
        _atomic_write(tmp / "trainer_state.json", lambda f: f.write(json.dumps(trainer_state, indent=1).encode()))
        _atomic_write(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
    dist.barrier()
    if rank == 0:
        _fsync_tree(tmp)
        _atomic_write(tmp / COMPLETE, lambda f: f.write(b"ok\n"))
        _fsync_dir(tmp)
        if final.exists():                        # re-saving a step after a resume: replace it whole
            old = root / f".old-{name}"
            os.rename(final, old)
            shutil.rmtree(old)
        os.rename(tmp, final)
        _fsync_dir(root)
        _atomic_write(root / "latest", lambda f: f.write(name.encode()))
        _prune(root, keep)
    dist.barrier()
    return final


def find_latest(output_dir) -> Path | None:
    """The checkpoint `latest` points to if it is complete, else the newest complete one."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / COMPLETE).is_file():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    return done[-1] if done else None


def remove_stale(output_dir) -> None:
    """Rank 0, at start-up: drop half-written `.tmp-*` / `.old-*` dirs of a crashed save."""
    root = checkpoint_root(output_dir)
    for p in list(root.glob(".tmp-*")) + list(root.glob(".old-*")):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, path) -> tuple[dict, dict]:
    """Restores the DeepSpeed engine in place; returns (trainer_state, this rank's state).
    The caller restores the loader and the objective, then `set_rng_state(rank_state["rng"])` last,
    so no RNG draw of the setup shifts the resumed stream."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): pick another "
                                f"or set train.resume=auto")
    load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DS_TAG}")
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    rank = dist.get_rank()
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} missing: the checkpoint was written by a run with fewer "
                                f"ranks; resume with the same world size")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return trainer_state, rank_state


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
