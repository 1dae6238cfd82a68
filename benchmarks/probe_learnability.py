"""Can a model learn a shard set at all? Plain PyTorch training, no DeepSpeed, no GRACE.

    python benchmarks/probe_learnability.py --model DIR --data DIR [--steps N] [--lr LR] [--bs B]
        [--wall SECONDS] [--tag NAME]

DIR is an HF checkpoint (e.g. a study's models/teacher_init) and --data a directory with train/ and
val/ shard sets. Prints the running training loss and the teacher-forced exact match of the answer
tokens on up to 8 val batches every 250 steps (and at the end). Used to choose the study's gpu preset
(docs/study.md, "Probe"): a setting that this loop cannot learn will not be learnt by the full
trainer either, and this loop is several times faster per step. bf16 autocast on GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grace_ds.data.loader import DataConfig, build_eval_loader, build_train_loader  # noqa: E402
from grace_ds.models import get_adapter  # noqa: E402
from grace_ds.models.loading import load_model, load_processor  # noqa: E402

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "labels")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--wall", type=float, default=float("inf"), help="stop after this many seconds")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    proc = load_processor(a.model)
    model = load_model(a.model, dtype=torch.float32).to(dev)
    family = get_adapter(model).family
    cfg = DataConfig(train_dirs=[a.data + "/train"], val_dirs=[a.data + "/val"], micro_batch_size=a.bs,
                     num_workers=a.workers, max_length=512)
    train, val = build_train_loader(cfg, proc, family), build_eval_loader(cfg, proc, family)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    autocast = dict(device_type=dev, dtype=torch.bfloat16, enabled=dev == "cuda")

    def exact_match() -> float:
        model.eval()
        ok = n = 0
        with torch.no_grad():
            for i, b in enumerate(val):
                if i >= 8:
                    break
                b = {k: v.to(dev) for k, v in b.items() if k in KEYS}
                with torch.autocast(**autocast):
                    logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
                lab, pred = b["labels"][:, 1:], logits[:, :-1].argmax(-1)
                good = ((pred == lab) | (lab == -100)).all(1)
                ok, n = ok + int(good.sum()), n + len(good)
        model.train()
        return ok / max(n, 1)

    step, t0, running = 0, time.time(), None
    while step < a.steps and time.time() - t0 < a.wall:
        for b in train:
            b = {k: v.to(dev) for k, v in b.items() if k in KEYS}
            with torch.autocast(**autocast):
                loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            step += 1
            last = step >= a.steps or time.time() - t0 >= a.wall
            if step % a.eval_every == 0 or last:
                print(f"{a.tag} step {step} loss {running:.4f} val_exact {exact_match():.3f} "
                      f"{time.time() - t0:.0f}s", flush=True)
            if last:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
