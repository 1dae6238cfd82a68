"""Pack a trained QAT student into real 4-bit / 8-bit weights, verified bit for bit.

    python launch/convert.py --checkpoint runs/x/final --out runs/x/packed                 # our layout
    python launch/convert.py --checkpoint runs/x/final --out runs/x/awq --format awq       # AutoAWQ GEMM

Reads the trainer's final export dir (config.json with "grace_quantization", model.safetensors with
the latent 16-bit weights, int_weights.safetensors with the trained codes + scales, processor files).
For every quantised linear it recomputes the codes from the latent weight and the scales, requires
them to equal int_weights' codes bit for bit, packs them, unpacks the result and checks it again; a
per-layer table (max code error, mismatches, round trip, kernel or dequant path) is printed. Nothing
is written unless every layer passes. Output: model.safetensors (packed layers + 16-bit rest),
config.json with the quantisation config ("grace_packed"; for awq also "quantization_config"), and
the processor files. Load it with grace_ds.export.load.load_packed_model. See docs/export.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="final export dir of a QAT run (<output_dir>/final)")
    p.add_argument("--out", required=True, help="directory for the packed checkpoint (created)")
    p.add_argument("--format", default="grace", choices=["grace", "awq"],
                   help="grace: our layout, loads with load_packed_model onto the W4A16 kernel; "
                        "awq: AutoAWQ GEMM (qweight/qzeros/scales, zero point 8), 4-bit only")
    p.add_argument("--bits", default="auto", choices=["auto", "4", "8"],
                   help="must match the trained width (auto: read it from the checkpoint)")
    p.add_argument("--allow-dequant", action="store_true",
                   help="accept 4-bit layers the W4A16 kernel cannot take (group size != 128, odd shapes); "
                        "they run through the slower dequantise path")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from grace_ds.export.convert import ConversionError, convert_checkpoint
    from grace_ds.export.pack import PackError

    t0 = time.perf_counter()
    try:
        convert_checkpoint(args.checkpoint, args.out, args.format, args.bits, allow_dequant=args.allow_dequant,
                           progress=not args.no_progress)
    except (ConversionError, PackError, FileNotFoundError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"packed {args.checkpoint} -> {args.out} ({args.format}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
