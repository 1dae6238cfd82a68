"""Rank-0 progress bar, TensorBoard scalars and a JSONL metrics file.

The JSONL file (<output_dir>/metrics.jsonl, one record per logged optimizer step) is what tests and
the study helper read. On resume, records after the checkpoint's step are dropped first, so the
file of a killed-and-resumed run reads like the file of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


class MetricsLogger:
    def __init__(self, output_dir, *, enabled: bool, total_steps: int, initial_step: int = 0,
                 tensorboard: bool = True, metrics_file: str = "metrics.jsonl", progress: bool = True,
                 desc: str = "train"):
        self.enabled = enabled
        self.bar = self.tb = self.jsonl = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / metrics_file
        truncate_after(path, initial_step)
        self.jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"), purge_step=initial_step + 1)
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(_tb_name(k), v, step)

    def progress(self, step: int, metrics: dict) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        post = {"loss": f"{metrics['loss']:.4f}"}
        if "beta" in metrics:
            post["beta"] = f"{metrics['beta']:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.jsonl):
            if h is not None:
                h.close()


def truncate_after(path: Path, step: int) -> None:
    """Keep only records with record["step"] <= step (atomic rewrite)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Throughput:
    """Tokens/s, samples/s and the fraction of wall time spent waiting for the data loader."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.data_wait = 0.0
        self.tokens = 0
        self.samples = 0

    def add_batch(self, batch: dict, wait_s: float) -> None:
        self.data_wait += wait_s
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.samples += batch["input_ids"].shape[0]

    def read(self, world_size: int) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {
            "tokens_per_s": self.tokens * world_size / dt,
            "samples_per_s": self.samples * world_size / dt,
            "data_wait_frac": self.data_wait / dt,
            "peak_mem_gb": peak_memory_gb(),
        }
        self.reset()
        return out


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux -> GiB
    except Exception:
        return 0.0


def _num(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _tb_name(key: str) -> str:
    if key in ("ce", "gdkd", "rcka", "loss"):
        return f"loss/{key}"
    if key in ("beta", "omega", "gate_mean", "teacher_entropy", "rcka_used", "rcka_skipped",
               "nonfinite_kd", "nonfinite_rcka", "gdkd_avg", "controller_ema"):
        return f"grace/{key}"
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    return f"train/{key}"
