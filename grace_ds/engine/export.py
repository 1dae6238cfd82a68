"""The final export directory (docs/architecture.md, "Final export directory"):

    final/config.json             HF config + "grace_quantization" (QuantConfig + layer names)
    final/model.safetensors       the student, 16-bit, consolidated; QAT linears as plain linears with
                                  their LATENT weights; log-scales left out
    final/int_weights.safetensors <layer>.codes int8 (out, in), <layer>.scales fp32 (out, groups)
    final/<processor files>, final/recipe.yaml

Written into final.tmp/ and renamed, so a crash never leaves a half export behind a good name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

PREFIX = "model."        # StudentWithLoss holds the HF model as `.model`


def export_final(engine, wrapper, cfg, processor, qat_layers: list[str]) -> Path:
    """Collective (every rank gathers its partitions); rank 0 writes."""
    from safetensors.torch import save_file

    from grace_ds.models import save_processor
    from grace_ds.quant import export_int_weights

    state = engine._zero3_consolidated_16bit_state_dict()        # full params on rank 0, one layer at a time
    ints = export_int_weights(wrapper.model) if qat_layers else {}
    out = Path(cfg.train.output_dir) / "final"
    if dist.get_rank() == 0:
        tmp = out.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dtype = torch.float16 if cfg.model.dtype == "float16" else torch.bfloat16
        save_file(hf_state_dict(state, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model = wrapper.model
        model.config.save_pretrained(str(tmp))
        conf = json.loads((tmp / "config.json").read_text())
        conf["dtype"] = str(dtype).removeprefix("torch.")
        if qat_layers:
            conf["grace_quantization"] = {**cfg.quant.quant_config().to_dict(), "layers": list(qat_layers)}
            first = next(iter(ints.values()))
            tensors = {}
            for name, d in ints.items():
                tensors[f"{name}.codes"] = d["codes"].contiguous()
                tensors[f"{name}.scales"] = d["scales"].contiguous()
            # Effective group size may differ per layer (one group per row when 128 does not divide
            # in_features): the per-layer value is scales.shape[1] groups over in_features.
            save_file(tensors, str(tmp / "int_weights.safetensors"),
                      metadata={"bits": str(first["bits"]), "group_size": str(cfg.quant.group_size)})
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
        save_processor(processor, tmp)             # records the real processor class (no-torchvision variant)
        (tmp / "recipe.yaml").write_text(cfg.to_yaml())
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    dist.barrier()
    return out


def hf_state_dict(state: dict, dtype: torch.dtype) -> dict:
    """Engine state dict -> HF names: drop the wrapper prefix and the LSQ log-scales (QATLinear keeps
    the original weight/bias names, so the rest maps one to one); tied weights (shared storage, e.g.
    embed_tokens / lm_head) are saved once, as HF does; floats cast to the export dtype."""
    out, seen = {}, set()
    for key, t in state.items():
        if not key.startswith(PREFIX) or key.endswith("log_scale"):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        t = t.detach().cpu()
        out[key[len(PREFIX):]] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    return out
