"""Score a checkpoint on a shard set: the library behind `python -m grace_ds.eval`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grace_ds.eval.checkpoint import load_for_eval
from grace_ds.eval.predict import Predictor
from grace_ds.eval.samples import count_items, iter_items
from grace_ds.eval.scoring import aggregate


def evaluate_model(model, processor, shards: str | os.PathLike, *, max_samples: int | None = None,
                   batch_size: int = 8, max_new_tokens: int = 16, score_text: bool = True,
                   keep_predictions: bool = False, progress: bool = True, desc: str = "eval") -> dict:
    """Scores of an already loaded model on `shards` (see scoring.aggregate for the keys)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    predictor = Predictor(model, processor, max_new_tokens=max_new_tokens, score_text=score_text,
                          forward_batch=max(batch_size, 1) * 2)
    skipped: dict[str, int] = {}
    records: list[dict] = []
    total = count_items(shards, max_samples)
    t0 = time.time()
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    batch = []

    def flush():
        records.extend(predictor.score(batch))
        bar.update(len(batch))
        mc = [r for r in records if r["kind"] == "mc"]
        if mc:
            bar.set_postfix(acc=f"{sum(r['hits']['mc_gen'] for r in mc) / len(mc):.3f}")
        batch.clear()

    for item in iter_items(shards, max_samples, skipped):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    if not records:
        raise ValueError(f"no usable samples in {shards} (skipped by reason: {skipped})")
    result = aggregate(records)
    result.update(shards=str(shards), skipped=skipped, seconds=round(time.time() - t0, 2))
    if keep_predictions:
        result["predictions"] = [{k: v for k, v in r.items()} for r in records]
    return result


def evaluate_checkpoint(checkpoint: str | os.PathLike, shards: str | os.PathLike | list, *,
                        out: str | os.PathLike | None = None, fmt: str = "auto", dtype: str = "auto",
                        device: str | None = None, **kwargs) -> dict:
    """Load `checkpoint` once and score it on one or several shard directories; write JSON to `out`."""
    model, processor, info = load_for_eval(checkpoint, fmt=fmt, dtype=dtype, device=device)
    shard_list = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    results = {}
    for s in shard_list:
        results[Path(s).name or str(s)] = evaluate_model(model, processor, s, desc=f"eval {Path(s).name}", **kwargs)
    doc = {"model": info, "results": results}
    if len(shard_list) == 1:
        doc.update(next(iter(results.values())))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return doc
