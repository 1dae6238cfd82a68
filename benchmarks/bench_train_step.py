"""Training-step throughput of the study's models, with and without the host-side speed-ups.

    python benchmarks/bench_train_step.py [--steps 60] [--batch 64] [--out DIR]

Trains the study `gpu` preset's W4 GRACE student (teacher forward + student forward/backward + GDKD
+ RCKA + controller) from its random init for --steps steps, once per variant, each in a fresh
process, on the same machine and data (a warm `data.example_cache`, so the data path is the same for
all):

- `baseline`: GRACE_DS_FAST_PATHS=0 and per-sub-module ZeRO-3 gathers (the trainer before 2026-11-28);
- `fast_paths`: CPU RoPE position ids + batched vision attention (grace_ds/models/fast_paths.py);
- `fast_paths+whole_layers`: also deepspeed.gather_whole_layers.

Prints a markdown table of samples/s (median over the second half of the steps, from metrics.jsonl)
and the first/last loss of each variant (the variants must agree: same data, same arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "baseline": ({"GRACE_DS_FAST_PATHS": "0"}, False),
    "fast_paths": ({}, False),
    "fast_paths+whole_layers": ({}, True),
}


def run_one(work: Path, name: str, steps: int, batch: int, whole: bool) -> None:
    """Child process: one training run."""
    from grace_ds.engine import run_training
    from grace_ds.engine.config import config_from_dict
    from grace_ds.study.presets import get_preset
    from grace_ds.study.runner import Study, student_runs

    p = get_preset("gpu").with_overrides(micro_batch=batch, train_samples=steps * batch, save_every=0)
    st = Study(p, work, progress=False)
    spec = next(s for s in student_runs(p) if s.key == "grace_w4")
    raw = st.train_config(name, student=st.student_init(0), seed=0, steps=steps, lr=1e-4, bits=4,
                          teacher=st._base_model("teacher"), grace=spec.grace, freeze_vision=True, init=None)
    raw["deepspeed"] = {"gather_whole_layers": whole}
    raw["train"]["output_dir"] = str(work / "bench" / name)
    raw["train"]["export"] = False
    run_training(config_from_dict(raw))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="/tmp/bench_train_step")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", nargs=2, metavar=("NAME", "WHOLE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.out)
    if a.child:
        run_one(work, a.child[0], a.steps, a.batch, a.child[1] == "1")
        return 0

    from grace_ds.study.presets import get_preset
    from grace_ds.study.runner import Study

    p = get_preset("gpu").with_overrides(micro_batch=a.batch, train_samples=a.steps * a.batch, save_every=0)
    st = Study(p, work, progress=False)
    st.prepare()                              # data + model inits, once
    _warm_cache(st, p, a.batch)
    rows = []
    for name in a.variants.split(","):
        env_extra, whole = VARIANTS[name]
        env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "--out", str(work), "--steps", str(a.steps), "--batch",
                            str(a.batch), "--child", name, "1" if whole else "0"], env=env,
                           capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode:
            print(f"{name}: FAILED\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}", flush=True)
            continue
        m = [json.loads(x) for x in (work / "bench" / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        m = [x for x in m if "loss" in x]
        half = [x["samples_per_s"] for x in m[len(m) // 2:]]
        rows.append((name, statistics.median(half), m[0]["loss"], m[-1]["loss"], wall))
        print(f"{name}: {rows[-1][1]:.0f} samples/s, loss {rows[-1][2]:.4f} -> {rows[-1][3]:.4f}, {wall:.0f}s", flush=True)
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    base = rows[0][1] if rows and rows[0][0] == "baseline" else None
    print(f"\n{dev}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, batch {a.batch}, {a.steps} steps, "
          "study gpu preset W4 GRACE student + teacher\n")
    print("| variant | samples/s | steps/s | vs baseline | loss first -> last | process wall s |")
    print("|---|---|---|---|---|---|")
    for name, sps, l0, l1, wall in rows:
        rel = f"{sps / base:.2f}x" if base else "-"
        print(f"| {name} | {sps:.0f} | {sps / a.batch:.2f} | {rel} | {l0:.4f} -> {l1:.4f} | {wall:.0f} |")
    return 0


def _warm_cache(st, p, batch: int) -> None:
    """One pass over the split with many workers, so every variant reads the same warm cache."""
    from transformers import AutoConfig

    from grace_ds.data import DataConfig, build_train_loader
    from grace_ds.models import get_adapter, load_processor

    model = st._base_model("student")
    cfg = DataConfig(train_dirs=[str(st.data / "train")], micro_batch_size=batch, num_workers=min(8, os.cpu_count() or 1),
                     max_length=p.max_length, example_cache=str(st.out / "example_cache"))
    family = get_adapter(AutoConfig.from_pretrained(str(model))).family
    for _ in build_train_loader(cfg, load_processor(str(model)), family):
        pass


if __name__ == "__main__":
    sys.exit(main())
