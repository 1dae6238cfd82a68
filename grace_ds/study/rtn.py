"""Round-to-nearest (RTN) post-training quantisation of a trained checkpoint, no training.

The study's RTN row: the bf16 baseline's linears get the quantiser's own scale initialisation
(per group, the grid-search scale of grace-method.md section 4) and are rounded once. The result
is written in the trainer's final-export layout (latent weights + `config.json["grace_quantization"]`
+ `int_weights.safetensors`), so `grace_ds.eval` scores it exactly like a QAT student.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

# Files of a model directory that are not weights/config: copied as they are (processor, recipe).
_SKIP = {"config.json", "model.safetensors", "model.safetensors.index.json", "int_weights.safetensors",
         "generation_config.json"}


def make_rtn_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, bits: int = 4,
                        group_size: int = 128, include: tuple[str, ...] | None = None) -> Path:
    """Write the RTN-quantised copy of HF checkpoint `src` to `out` (atomically); returns `out`."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from grace_ds.models.adapters import get_adapter, model_class_for
    from grace_ds.quant import QuantConfig, export_int_weights, prepare_qat

    src, out = Path(src), Path(out)
    config = AutoConfig.from_pretrained(str(src), local_files_only=True)
    if getattr(config, "grace_quantization", None):
        raise ValueError(f"{src} is already quantised (config.json has grace_quantization): RTN needs the "
                         "full-precision checkpoint")
    model = model_class_for(config).from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
    kwargs = {"bits": bits, "group_size": group_size}
    adapter_include = getattr(get_adapter(config), "quant_include", None)
    if include is not None:
        kwargs["include"] = tuple(include)
    elif adapter_include:
        kwargs["include"] = tuple(adapter_include)
    qcfg = QuantConfig(**kwargs)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The latent weights are the baseline's own, saved under the in-memory module names exactly as the
    # trainer's export does (save_pretrained would rename Qwen2-VL keys to the legacy layout, which
    # launch/convert.py does not read), before the QAT wrappers exist.
    model.config.save_pretrained(str(tmp))
    save_file(_state_dict(model, torch.bfloat16), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        layers = prepare_qat(model, qcfg)
    if not layers:
        raise ValueError(f"{src}: no linear matched the quantisation patterns {qcfg.include}")
    ints = export_int_weights(model)
    tensors, eff_groups = {}, set()
    for name, d in ints.items():
        tensors[f"{name}.codes"] = d["codes"].contiguous()
        tensors[f"{name}.scales"] = d["scales"].contiguous()
        eff_groups.add(int(d["group_size"]))
    save_file(tensors, str(tmp / "int_weights.safetensors"),
              metadata={"bits": str(bits), "group_size": str(group_size), "method": "rtn"})
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "bfloat16"
    cfg["grace_quantization"] = {**qcfg.to_dict(), "layers": sorted(ints), "method": "rtn"}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.name not in _SKIP and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """16-bit like the trainer's export (the integer weights are derived from the fp32 copy)."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:       # tied weights are stored once, as HF does
            continue
        seen.add(ptr)
        t = t.detach().cpu()
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    return out
