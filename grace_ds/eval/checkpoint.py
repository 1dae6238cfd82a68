"""Load a checkpoint for evaluation: 16-bit HF, fake-quant INT4/INT8, or packed INT4.

The trainer's final export (docs/architecture.md, "Final export directory") holds the student with
its LATENT weights plus `int_weights.safetensors` (codes, scales). Evaluating the latent weights
would score a model that is never deployed, so a quantised checkpoint is scored, by default, with
the weights it will run with: codes * scales, written into plain linears ("fake-quant"). Without
int_weights the grid is re-derived from the latent weights with the quantiser's own scale search
(that is round-to-nearest, not the trained scales, and the result says so).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

FORMATS = ("auto", "hf", "fake-quant", "latent", "packed")
INT_WEIGHTS = "int_weights.safetensors"


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype {name!r}: expected auto, fp32, bf16 or fp16")
    return table[name]


def _read_config(ckpt: Path) -> dict:
    path = ckpt / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --checkpoint must be a Hugging Face model directory "
                                "(the trainer's <output_dir>/final, a tiny preset, or a packed export)")
    return json.loads(path.read_text())


def _is_packed(ckpt: Path, config: dict) -> bool:
    # launch/convert.py records its packing metadata under this key (grace_ds.export.convert.PACKED_KEY).
    try:
        from grace_ds.export.convert import PACKED_KEY
    except ImportError:
        PACKED_KEY = "grace_packed"
    return PACKED_KEY in config


def detect_format(ckpt: str | os.PathLike) -> str:
    ckpt = Path(ckpt)
    config = _read_config(ckpt)
    if _is_packed(ckpt, config):
        return "packed"
    if config.get("grace_quantization"):
        return "fake-quant"
    return "hf"


def _load_hf(ckpt: Path, dtype: torch.dtype):
    from transformers import AutoConfig

    from grace_ds.models.adapters import model_class_for

    config = AutoConfig.from_pretrained(str(ckpt), local_files_only=True)
    cls = model_class_for(config)
    return cls.from_pretrained(str(ckpt), dtype=dtype, local_files_only=True)


def _find_module(model: torch.nn.Module, name: str, modules: dict) -> torch.nn.Module:
    if name in modules:
        return modules[name]
    # The export may have been taken from a wrapper ("model." / "module." prefixes) or from the
    # bare model: match on the longest unique suffix.
    for prefix in ("module.", "model.", "student."):
        if name.startswith(prefix) and name[len(prefix):] in modules:
            return modules[name[len(prefix):]]
    hits = [m for n, m in modules.items() if n.endswith("." + name) or name.endswith("." + n)]
    if len(hits) == 1:
        return hits[0]
    raise KeyError(f"int_weights layer {name!r} matches {len(hits)} modules of the model; expected exactly one")


def apply_int_weights(model: torch.nn.Module, path: str | os.PathLike) -> int:
    """Write codes * scales (per group, repeated along the input dim) into each listed linear."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    n = 0
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        layers = sorted({k[: -len(".codes")] for k in keys if k.endswith(".codes")})
        if not layers:
            raise ValueError(f"{path}: no '<layer>.codes' tensors")
        for layer in layers:
            codes = f.get_tensor(layer + ".codes")
            scales = f.get_tensor(layer + ".scales").float()
            mod = _find_module(model, layer, modules)
            w = mod.weight
            if tuple(codes.shape) != tuple(w.shape):
                raise ValueError(f"{layer}: codes shape {tuple(codes.shape)} != weight shape {tuple(w.shape)}")
            out_f, in_f = codes.shape
            groups = scales.shape[1]
            if scales.shape[0] != out_f or in_f % groups:
                raise ValueError(f"{layer}: scales shape {tuple(scales.shape)} does not fit weight {tuple(w.shape)}")
            deq = codes.float() * scales.repeat_interleave(in_f // groups, dim=1)
            with torch.no_grad():
                w.copy_(deq.to(w.dtype))
            n += 1
    return n


def _rtn_from_latent(model: torch.nn.Module, qcfg: dict) -> int:
    from grace_ds.quant import QuantConfig, bake_fake_quant, prepare_qat

    import dataclasses

    known = {f.name for f in dataclasses.fields(QuantConfig)}
    cfg = QuantConfig.from_dict({k: v for k, v in qcfg.items() if k in known})
    with torch.no_grad():
        prepare_qat(model, cfg)
        return bake_fake_quant(model)


def load_for_eval(ckpt: str | os.PathLike, fmt: str = "auto", dtype: str = "auto",
                  device: str | None = None):
    """(model in eval mode, processor, info dict). `fmt` in FORMATS; see the module docstring."""
    from grace_ds.models.processors import load_processor

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
    ckpt = Path(ckpt)
    config = _read_config(ckpt)
    tdtype = resolve_dtype(dtype)
    if fmt == "auto":
        fmt = detect_format(ckpt)
    info: dict = {"checkpoint": str(ckpt), "format": fmt, "dtype": str(tdtype).replace("torch.", "")}
    qcfg = config.get("grace_quantization")
    if qcfg:
        info["bits"] = qcfg.get("bits")
        info["group_size"] = qcfg.get("group_size")
    if fmt == "packed":
        from grace_ds.export.load import load_packed_model

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_packed_model(str(ckpt), device=dev, dtype=tdtype)
        info["weights"] = "packed integer codes"
        packed = config.get("grace_packed", {})
        info["bits"] = info.get("bits") or next((int(m["bits"]) for m in (packed.get("layers") or {}).values()), None)
        info["packed_format"] = packed.get("format")
    else:
        model = _load_hf(ckpt, tdtype)
        if fmt == "fake-quant":
            if not qcfg:
                raise ValueError(f"{ckpt}: --format fake-quant needs config.json['grace_quantization'] "
                                 "(a QAT export); this checkpoint was not quantised")
            if (ckpt / INT_WEIGHTS).exists():
                info["quantized_layers"] = apply_int_weights(model, ckpt / INT_WEIGHTS)
                info["weights"] = "int_weights codes*scales"
            else:
                warnings.warn(f"{ckpt} has no {INT_WEIGHTS}: re-deriving the grid from the latent weights "
                              "(round-to-nearest, not the trained scales)", stacklevel=2)
                info["quantized_layers"] = _rtn_from_latent(model, qcfg)
                info["weights"] = "RTN of latent weights (no int_weights)"
        else:
            info["weights"] = "latent" if qcfg else "full precision"
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev)
    model.eval()
    info["device"] = dev
    processor = load_processor(ckpt)
    return model, processor, info
