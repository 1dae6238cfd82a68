"""Shared by the export/serving tests: the launch scripts as modules, a tiny VLM and its prompt.

Usage (pytest puts tests/ on sys.path, as for `distributed.py`):
    from tiny_serving import kv8_reference, load_script, tiny_prompt, tiny_vlm
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from grace_ds.export.arch import bench_config, make_prompt

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """launch/<name>.py as a module (its main() and helpers such as bench.build_int4)."""
    spec = importlib.util.spec_from_file_location(f"grace_launch_{name}", ROOT / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_vlm(arch: str):
    """(config, fp32 eval model with seed-0 random weights) of a tiny bench architecture."""
    import transformers

    cfg = bench_config(arch)
    torch.manual_seed(0)
    return cfg, getattr(transformers, cfg.architectures[0])._from_config(cfg, dtype=torch.float32).eval()


def tiny_prompt(cfg):
    """Two rows of 6 text + 16 visual tokens, fp32, and the prompt length."""
    inputs = make_prompt(cfg, 2, 6, 16, dtype=torch.float32)
    return inputs, inputs["input_ids"].shape[1]


def kv8_reference(q, k, v, mask, scaling):
    """float64 attention over a dequantised int8 cache (grace_ds.export.kv8.reference_attention);
    mask: bool (True = attend) or additive, broadcast to (B, H, q, L); None = all. Returns (B, q, H, D)."""
    from grace_ds.export.kv8 import dequantize_kv, reference_attention

    kd, vd = dequantize_kv(k, torch.float64), dequantize_kv(v, torch.float64)
    return reference_attention(q, kd, vd, mask, scaling).transpose(1, 2)
