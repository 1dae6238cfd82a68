"""LLaVA-format JSON (LLaVA-665K, ShareGPT4V, ...) + image folder -> shards (docs/data.md).

    python -m grace_ds.data.convert --json llava_v1_5_mix665k.json --image-root data/ \
        --out shards/llava665k --samples-per-shard 1000 [--workers 8] [--report PATH]

Input entries: {"id", "image": "rel/path.jpg" | ["a.jpg", "b.png"] | absent (text only),
"conversations": [{"from": "human"|"gpt", "value": "...<image>..."}], ...}. A JSON array (read
incrementally: a 1 GB file is never held as Python objects at once) or JSON Lines.

Image bytes are copied verbatim (no re-encoding), so a round trip is byte-identical. Entries with
a missing / unreadable / unsupported image or a malformed conversation are skipped and reported
by reason at the end and in a JSON report; the run never aborts on bad data. Other entry fields
are kept under "meta". Keys are the sanitised ids; a repeated id gets a "_dupN" suffix (counted).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from grace_ds.data.format import IMAGE_EXTS, ShardSample, safe_key, validate_conversation, write_shards

EXAMPLES_PER_REASON = 20   # ids listed per skip reason in the report


def iter_json_entries(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Entries of a JSON array (incremental raw_decode over 1 MB chunks) or of a JSON Lines file."""
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_chars)
        pos = 0
        while pos < len(buf) and buf[pos].isspace():
            pos += 1
        if pos >= len(buf):
            return
        if buf[pos] != "[":                      # JSON Lines
            rest = buf[pos:] + f.read()
            for n, line in enumerate(rest.splitlines(), 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        yield _BadEntry(f"line {n}: {e}")
            return
        pos += 1
        eof = False
        while True:
            while True:   # skip whitespace and commas between entries
                while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
                    pos += 1
                if pos < len(buf) or eof:
                    break
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
            if pos >= len(buf):
                raise ValueError(f"{path}: unterminated JSON array")
            if buf[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    raise ValueError(f"{path}: invalid JSON near character {pos} of the current chunk") from None
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end
            if pos > chunk_chars:            # drop consumed text
                buf, pos = buf[pos:], 0


@dataclass
class _BadEntry:
    detail: str


@dataclass
class ConvertReport:
    entries: int = 0
    converted: int = 0
    skipped: Counter = field(default_factory=Counter)
    renamed_duplicate_ids: int = 0
    examples: dict = field(default_factory=lambda: defaultdict(list))   # reason -> [{"id", "detail"}]

    def skip(self, reason: str, ident: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append({"id": ident, "detail": detail})

    def to_dict(self) -> dict:
        return {"entries": self.entries, "converted": self.converted, "skipped_total": sum(self.skipped.values()),
                "skipped": dict(sorted(self.skipped.items())), "renamed_duplicate_ids": self.renamed_duplicate_ids,
                "examples": {k: v for k, v in sorted(self.examples.items())}}


def _load_images(entry: dict, root: Path, decode_check: bool) -> tuple[list[tuple[str, bytes]] | None, str, str]:
    """(images, reason, detail); images None when the entry must be skipped."""
    from PIL import Image

    img = entry.get("image", entry.get("images"))
    rels = [] if img is None else ([img] if isinstance(img, str) else img)
    if not isinstance(rels, list) or not all(isinstance(r, str) for r in rels):
        return None, "malformed_entry", f"image field {img!r} is not a path or list of paths"
    out = []
    for rel in rels:
        p = root / rel
        ext = p.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            return None, "unsupported_image_format", f"{rel}: extension {ext!r} not in {IMAGE_EXTS}"
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None, "missing_image", str(p)
        except OSError as e:
            return None, "unreadable_image", f"{p}: {e}"
        if decode_check:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except Exception as e:   # PIL raises many exception types on corrupt data
                return None, "unreadable_image", f"{p}: {type(e).__name__}: {e}"
        out.append((ext, data))
    return out, "", ""


def convert(json_path: str | Path, image_root: str | Path, out_dir: str | Path, samples_per_shard: int = 1000,
            prefix: str = "shard", workers: int = 4, decode_check: bool = True, overwrite: bool = False,
            progress: bool = True) -> tuple[ConvertReport, object]:
    from tqdm import tqdm

    root = Path(image_root)
    rep = ConvertReport()
    keys: Counter = Counter()

    def prepare(entry) -> tuple[object, object]:
        if isinstance(entry, _BadEntry):
            return entry, None
        if not isinstance(entry, dict):
            return entry, None
        return entry, _load_images(entry, root, decode_check)

    def samples() -> Iterator[ShardSample]:
        bar = tqdm(desc="convert", unit="entry", disable=not progress, file=sys.stderr)
        entries = iter_json_entries(json_path)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            while True:
                chunk = [e for _, e in zip(range(256), entries)]
                if not chunk:
                    break
                # threads: file reads and PIL decoding release the GIL; map keeps the input order
                for entry, loaded in pool.map(prepare, chunk):
                    rep.entries += 1
                    bar.update(1)
                    if isinstance(entry, _BadEntry):
                        rep.skip("bad_json", f"#{rep.entries}", entry.detail)
                        continue
                    if not isinstance(entry, dict):
                        rep.skip("malformed_entry", f"#{rep.entries}", f"entry is {type(entry).__name__}, not an object")
                        continue
                    ident = str(entry.get("id", f"#{rep.entries}"))
                    images, reason, detail = loaded
                    if images is None:
                        rep.skip(reason, ident, detail)
                        continue
                    record = {"id": ident, "conversations": entry.get("conversations"),
                              "meta": {k: v for k, v in entry.items() if k not in ("id", "conversations")}}
                    reason = validate_conversation(record, len(images))
                    if reason:
                        rep.skip(reason, ident, f"{len(images)} image(s); conversation {str(record['conversations'])[:120]}")
                        continue
                    key = safe_key(ident)
                    keys[key] += 1
                    if keys[key] > 1:
                        rep.renamed_duplicate_ids += 1
                        key = f"{key}_dup{keys[key] - 1}"
                        while keys[key]:
                            key += "_"
                        keys[key] += 1
                    rep.converted += 1
                    yield ShardSample(key, record, images)
        bar.close()

    extra = {"created_by": "grace_ds.data.convert",
             "source": {"json": str(json_path), "image_root": str(image_root)}}
    manifest = write_shards(samples(), out_dir, prefix=prefix, samples_per_shard=samples_per_shard,
                            extra_manifest=extra, overwrite=overwrite)
    return rep, manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grace_ds.data.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="LLaVA-format JSON array or JSON Lines file")
    ap.add_argument("--image-root", required=True, help="folder the entries' image paths are relative to")
    ap.add_argument("--out", required=True, help="output shard directory")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--prefix", default="shard", help="shard file name prefix")
    ap.add_argument("--workers", type=int, default=4, help="threads reading and checking images")
    ap.add_argument("--no-decode-check", action="store_true", help="do not fully decode images (faster; corrupt images then surface in the loader)")
    ap.add_argument("--report", default=None, help="JSON report path (default OUT/convert_report.json)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    rep, manifest = convert(args.json, args.image_root, args.out, args.samples_per_shard, args.prefix,
                            args.workers, not args.no_decode_check, args.overwrite, not args.quiet)
    report_path = Path(args.report) if args.report else Path(args.out) / "convert_report.json"
    report_path.write_text(json.dumps(rep.to_dict(), indent=1) + "\n")
    print(f"converted {rep.converted} of {rep.entries} entries into {len(manifest.shards)} shards in "
          f"{time.time() - t0:.1f}s -> {args.out}", file=sys.stderr)
    if rep.skipped:
        print(f"skipped {sum(rep.skipped.values())}:", file=sys.stderr)
        for reason, n in sorted(rep.skipped.items(), key=lambda kv: -kv[1]):
            ex = ", ".join(e["id"] for e in rep.examples[reason][:3])
            print(f"  {reason:32s} {n:8d}   e.g. {ex}", file=sys.stderr)
    if rep.renamed_duplicate_ids:
        print(f"renamed {rep.renamed_duplicate_ids} repeated ids (key suffix _dupN)", file=sys.stderr)
    print(f"report: {report_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
