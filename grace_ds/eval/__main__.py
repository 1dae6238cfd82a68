"""python -m grace_ds.eval --checkpoint DIR --shards DIR [DIR ...] [--out results.json] ...

Scores a checkpoint (16-bit HF dir, a QAT final export scored with its integer weights, or a packed
INT4 export) on shard sets in the grace_ds format: multiple-choice accuracy by greedy generation
(answer letter parsed from the text) and by option log-likelihood (letter and option text), exact
match for short answers, overall and per question type. Prints a summary; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import sys

from grace_ds.eval.checkpoint import FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grace_ds.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model directory (config.json + weights + processor)")
    p.add_argument("--shards", required=True, nargs="+", help="shard directory(ies) with a manifest.json")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--max-samples", type=int, default=None, help="score at most N samples per shard set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="auto: packed if packed, fake-quant (codes*scales) if the checkpoint was "
                        "quantised, else hf; 'latent' scores a QAT export's latent weights")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--device", default=None)
    p.add_argument("--no-text-loglik", action="store_true", help="skip the option-text log-likelihood pass")
    p.add_argument("--predictions", action="store_true", help="include per-sample predictions in the JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def _fmt(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grace_ds.eval.evaluate import evaluate_checkpoint

    doc = evaluate_checkpoint(
        args.checkpoint, args.shards, out=args.out, fmt=args.format, dtype=args.dtype, device=args.device,
        max_samples=args.max_samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        score_text=not args.no_text_loglik, keep_predictions=args.predictions, progress=not args.no_progress,
    )
    print(f"model: {json.dumps(doc['model'], sort_keys=True)}")
    for name, r in doc["results"].items():
        mc, op = r["multiple_choice"], r["open"]
        parts = [f"{name}: n={r['n_samples']}"]
        if mc["n"]:
            parts.append("MC " + " ".join(f"{k}={_fmt(mc[k])}" for k in ("mc_gen", "mc_ll", "mc_ll_text",
                                                                         "unparsed_rate") if k in mc))
        if op["n"]:
            parts.append(f"open em={_fmt(op['em'])} (n={op['n']})")
        if r["skipped"]:
            parts.append(f"skipped={r['skipped']}")
        print("  ".join(parts))
        for t, s in r["per_type"].items():
            print(f"    {t:<24} n={s['n']:<5} " + " ".join(f"{k}={_fmt(v)}" for k, v in s.items() if k != "n"))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
