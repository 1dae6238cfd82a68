"""GRACE-DS training recipe: distil a frozen VLM teacher into an INT4/INT8 fake-quantised student.

    deepspeed --num_gpus 8 launch/train.py --config recipes/qwen2vl_7b_to_2b_w4.yaml [key=value ...]
    torchrun --standalone --nproc_per_node 2 launch/train.py --config recipes/demo.yaml train.max_steps=20
    python launch/train.py                      # the CPU demo (recipes/demo.yaml), ~2 minutes on 2 cores

What one run does (grace_ds/engine/loop.py:run_training, which reads top to bottom):
  1. config: recipe YAML + dotted overrides -> TrainConfig, validated before any model is built;
     printed on rank 0 and saved with every checkpoint and the final export;
  2. optional teacher stage (teacher_train.max_steps > 0): CE-only training of the teacher;
  3. data: synthetic shards generated if asked (synthetic.enabled), streaming shard loader per rank;
  4. compatibility: same tokenizer / image token / visual tokens per image, else an error naming both;
  5. teacher: built under deepspeed.zero.Init, ZeRO-3 engine without optimizer (GPU, CPU or NVMe
     offload via deepspeed.teacher_config), lm_head gathered once; `model.teacher=null` = CE only;
  6. student: ZeRO-3 engine, vision frozen, QAT-prepared (quant.*), GRACE loss inside the engine's
     forward, AdamW with an LSQ-scale group, warm-up + cosine, clipping, accumulation;
  7. loop: teacher fwd -> student fwd + loss -> backward -> step -> IB controller on the rank-averaged
     GDKD; tqdm + TensorBoard + metrics.jsonl; periodic eval and atomic checkpoints (train.resume=auto);
  8. export: <output_dir>/final (HF 16-bit, int_weights.safetensors, processor, recipe.yaml).

Flags: --config RECIPE (default recipes/demo.yaml); --accuracy N scores teacher and student on N
validation samples after training (the demo does it by default); everything else is key=value.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grace_ds.engine import load_config, run_training  # noqa: E402
from grace_ds.engine.config import ConfigError  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default=None, help="recipe YAML (default: recipes/demo.yaml, the CPU demo)")
    ap.add_argument("--accuracy", type=int, default=None,
                    help="after training, score teacher and student on this many val samples (demo: 100; 0 = off)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100 quant.bits=8")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    result = run_training(cfg)
    n_acc = args.accuracy if args.accuracy is not None else (100 if args.config is None else 0)
    if n_acc and int(os.environ.get("RANK", 0)) == 0 and result.final_dir is not None:
        report_accuracy(cfg, result.final_dir, n_acc)
    return 0


def report_accuracy(cfg, student_dir: Path, max_samples: int) -> None:
    """Multiple-choice letter accuracy of teacher and student on the validation shards (grace_ds.eval)."""
    from grace_ds.eval.evaluate import evaluate_checkpoint

    val = cfg.data.val_dirs[0] if isinstance(cfg.data.val_dirs, (list, tuple)) else cfg.data.val_dirs
    teacher_dir = Path(cfg.train.output_dir) / "teacher" / "final"
    rows = [("teacher", teacher_dir if teacher_dir.is_dir() else cfg.model.teacher), ("student W%d" % cfg.quant.bits
            if cfg.quant.enabled else "student", student_dir)]
    for name, ckpt in rows:
        if ckpt is None or not Path(ckpt).is_dir():
            continue
        doc = evaluate_checkpoint(ckpt, val, max_samples=max_samples, progress=False)
        print(f"[grace_ds] {name:>12}: multiple-choice accuracy {doc['accuracy']:.3f} "
              f"(all questions by generation {doc['overall_gen']:.3f}, n={doc['n_samples']}) <- {ckpt}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
