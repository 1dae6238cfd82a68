"""Final export directory -> packed INT4/INT8 checkpoint (`launch/convert.py` is the CLI).

Input (docs/architecture.md, "Final export directory"): config.json with "grace_quantization",
model.safetensors with the latent 16-bit weights, int_weights.safetensors with `<layer>.codes`
(int8 (out, in)) and `<layer>.scales` (fp32 (out, groups)), processor files.

Per quantised layer the converter
1. recomputes the codes from the latent weight and the stored scales with the quantiser's own
   arithmetic (fp32, q = clamp(round(W / s), q_n, q_p), grace_ds.quant) and requires them to equal
   int_weights' codes bit for bit (max code error 0) - except where the latent was rounded to 16 bits
   after the codes were taken (fp32 training, 16-bit export): a code is then accepted if it is the
   code of a value that rounds to the stored latent, and the table counts such codes;
2. packs them (grace or AWQ layout, grace_ds.export.pack), unpacks the result again and requires the
   codes (and, for grace, the fp32 scales) back bit for bit;
3. checks that the W4A16 kernel can take the layer (grace format), or says why not.
Nothing is written unless every layer passes; files are written atomically, config.json last.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grace_ds.export.io import SafetensorsDir, atomic_save_file, atomic_write_json
from grace_ds.export.pack import (
    AWQ_ZERO_4BIT,
    PackError,
    from_awq,
    kernel_rejection,
    pack_grace,
    to_awq,
    unpack_grace,
)

PACKED_KEY = "grace_packed"  # config.json key our loader reads
PACKED_VERSION = 1
FORMATS = ("grace", "awq")
_SKIP_FILES = {"config.json", "int_weights.safetensors", "model.safetensors", "model.safetensors.index.json"}


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the offending value and the fix."""


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    code_mismatches: int = 0          # elements where recomputed codes != int_weights codes
    max_code_error: int = 0           # max |recomputed - stored| over the layer
    unexplained: int = 0              # mismatches NOT explained by the 16-bit rounding of the latent weight
    roundtrip_ok: bool = True         # pack -> unpack gave the codes (and scales) back bit for bit
    path: str = "kernel"              # "kernel" or "dequant (<reason>)"
    scale_rel_err: float = 0.0        # max relative rounding of the scales in the stored dtype (awq: fp16)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.unexplained == 0 and self.roundtrip_ok


def _fmt_table(reports: list[LayerReport], fmt: str) -> str:
    head = "| layer | shape | bits | g | max code err | mismatches | unexplained | round trip | path |"
    if fmt == "awq":
        head += " fp16 scale rel err |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        row = (f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {r.bits} | {r.group_size} | {r.max_code_error} | "
               f"{r.code_mismatches} | {r.unexplained} | {'ok' if r.roundtrip_ok else 'FAIL'} | {r.path} |")
        if fmt == "awq":
            row += f" {r.scale_rel_err:.2e} |"
        lines.append(row)
    return "\n".join(lines)


def read_final_dir(checkpoint: Path):
    """-> (config dict, grace_quantization dict, int_weights reader, model reader); clear errors when the
    directory is not a QAT final export."""
    checkpoint = Path(checkpoint)
    cfg_path = checkpoint / "config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{checkpoint}: no config.json; pass the trainer's final export dir "
                              f"(<output_dir>/final/)")
    config = json.loads(cfg_path.read_text())
    if PACKED_KEY in config:
        raise ConversionError(f"{checkpoint} is already a packed checkpoint ({PACKED_KEY} in config.json); "
                              f"pass the trainer's final export dir instead")
    qcfg = config.get("grace_quantization")
    iw_path = checkpoint / "int_weights.safetensors"
    if qcfg is None or not iw_path.exists():
        what = "no grace_quantization in config.json" if qcfg is None else "int_weights.safetensors missing"
        raise ConversionError(
            f"{checkpoint}: {what}: this student was not trained with QAT scales, there are no integer "
            f"weights to pack. Train with quant.enabled=true (launch/train.py ... quant.enabled=true), or "
            f"for post-training quantisation prepare_qat + export_int_weights on the bf16 model first."
        )
    if not qcfg.get("layers"):
        raise ConversionError(f"{cfg_path}: grace_quantization has no 'layers' list; re-export the checkpoint "
                              f"with the current trainer")
    return config, qcfg, SafetensorsDir(checkpoint, "int_weights"), SafetensorsDir(checkpoint, "model")


def recompute_codes(weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes from a latent weight (N, K) and the stored per-group scales (N, G), with the same arithmetic
    as grace_ds.quant.lsq.quantize_codes (fp32 division, round half to even, clamp): the scales stored in
    int_weights are that function's s, so equal inputs give equal codes."""
    return _codes_of(weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32), scales, bits)


def _codes_of(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    from grace_ds.quant.config import qmin_qmax  # the quantiser's grid, not a copy of it

    qn, qp = qmin_qmax(bits)
    n, k = w.shape
    g = k // scales.shape[1]
    x = w.reshape(-1, g) / scales.reshape(-1).to(w.dtype)[:, None]
    return x.round().clamp_(qn, qp).to(torch.int8).reshape(n, k)


def code_check(weight: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, bits: int) -> tuple[int, int, int]:
    """(mismatches, max |code error|, unexplained mismatches) of stored codes against the latent weight.

    A model trained in fp32 is exported with 16-bit latents, while its codes came from the fp32 weights:
    a weight within half a 16-bit ulp of a rounding boundary may then recompute to a neighbouring code.
    Such a mismatch is explained if the stored code is the code of some value that rounds to the stored
    16-bit latent (the interval [w - ulp/2, w + ulp/2]); anything else means the files disagree."""
    rec = recompute_codes(weight, scales, bits)
    diff = (rec.to(torch.int16) - codes.to(torch.int16)).abs()
    mism = diff > 0
    n_mism = int(mism.sum())
    if n_mism == 0:
        return 0, 0, 0
    if weight.dtype in (torch.bfloat16, torch.float16):
        up = torch.nextafter(weight, torch.full_like(weight, float("inf"))).float()
        down = torch.nextafter(weight, torch.full_like(weight, float("-inf"))).float()
        w = weight.float()
        lo_q = _codes_of((w + down) / 2, scales, bits)
        hi_q = _codes_of((w + up) / 2, scales, bits)
        unexplained = mism & ((codes < lo_q) | (codes > hi_q))
    else:
        unexplained = mism
    return n_mism, int(diff.max()), int(unexplained.sum())


def _scale_rel_err(scales: torch.Tensor, stored: torch.Tensor) -> float:
    s = scales.double()
    return float(((stored.double() - s).abs() / s).max()) if s.numel() else 0.0


def convert_checkpoint(checkpoint, out, fmt: str = "grace", bits: str | int = "auto", *,
                       allow_dequant: bool = False, progress: bool = True,
                       log=print) -> list[LayerReport]:
    """Verify and pack a final export dir into `out`. Returns the per-layer reports (also printed as a
    markdown table through `log`). Raises ConversionError without writing anything if a layer fails."""
    from tqdm.auto import tqdm

    if fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r}: choose one of {FORMATS}")
    checkpoint, out = Path(checkpoint), Path(out)
    if checkpoint.resolve() == out.resolve():
        raise ConversionError(f"--out {out} is the checkpoint itself; choose a new directory")
    config, qcfg, iw, model = read_final_dir(checkpoint)
    ckpt_bits = int(iw.metadata.get("bits", qcfg.get("bits", 4)))
    if bits not in ("auto", None) and int(bits) != ckpt_bits:
        raise ConversionError(f"--bits {bits}: the checkpoint was trained with {ckpt_bits}-bit codes and cannot "
                              f"be repacked at another width without retraining; use --bits auto")
    if fmt == "awq" and ckpt_bits != 4:
        raise ConversionError(f"--format awq: AWQ GEMM checkpoints are 4-bit, this one is {ckpt_bits}-bit; "
                              f"use --format grace")
    layers = list(qcfg["layers"])
    iw_layers = sorted({k.rsplit(".", 1)[0] for k in iw.keys()})
    missing = sorted(set(layers) - set(iw_layers))
    extra = sorted(set(iw_layers) - set(layers))
    if missing or extra:
        raise ConversionError(f"int_weights.safetensors and config.json['grace_quantization']['layers'] disagree: "
                              f"missing in int_weights {missing[:5]}, not in the layer list {extra[:5]}; "
                              f"the export is inconsistent, re-run the trainer's export")
    no_weight = [n for n in layers if f"{n}.weight" not in model]
    if no_weight:
        raise ConversionError(f"model.safetensors has no latent weight for {no_weight[:5]} (expected "
                              f"'<layer>.weight'); the final export dir is incomplete")

    from grace_ds.quant.lsq import effective_group_size

    tensors: dict[str, torch.Tensor] = {}
    reports: list[LayerReport] = []
    group_sizes = set()
    for name in tqdm(layers, desc="verify+pack", disable=not progress, unit="layer"):
        codes, scales = iw.get(f"{name}.codes"), iw.get(f"{name}.scales")
        weight = model.get(f"{name}.weight")
        n, k = weight.shape
        if tuple(codes.shape) != (n, k):
            raise ConversionError(f"{name}: codes {tuple(codes.shape)} != latent weight {(n, k)}")
        if scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]:
            raise ConversionError(f"{name}: scales {tuple(scales.shape)} do not fit weight {n}x{k}")
        g = k // scales.shape[1]
        expect_g = effective_group_size(k, int(qcfg.get("group_size", 128)))
        if g != expect_g:
            raise ConversionError(f"{name}: scales give group size {g}, config group_size {qcfg.get('group_size')} "
                                  f"gives {expect_g} for in_features {k}")
        rep = LayerReport(name, (n, k), ckpt_bits, g)
        group_sizes.add(g)
        rep.code_mismatches, rep.max_code_error, rep.unexplained = code_check(weight, scales, codes, ckpt_bits)
        try:
            if fmt == "grace":
                packed = pack_grace(codes, scales, ckpt_bits, g, name)
                c2, s2 = unpack_grace(packed["qweight"], packed["scales"], ckpt_bits)
                rep.roundtrip_ok = torch.equal(c2, codes) and torch.equal(s2, scales.float())
                reason = kernel_rejection(ckpt_bits, g, (n, k))
                if reason is not None:
                    if ckpt_bits == 4 and not allow_dequant:
                        raise ConversionError(
                            f"{name} ({n}x{k}, {ckpt_bits}-bit, group {g}): the W4A16 kernel cannot take it: {reason}. "
                            f"Fix: train with quant.group_size=128 on layers whose in_features is a multiple of 128, "
                            f"or pass --allow-dequant to run such layers through the (slow) dequantise path")
                    rep.path = f"dequant ({reason})" if ckpt_bits == 4 else "dequant (8-bit)"
                for key, val in packed.items():
                    tensors[f"{name}.{key}"] = val
            else:
                qweight, qzeros, s16 = to_awq(codes, scales, g, name)
                c2, s2 = from_awq(qweight, qzeros, s16, g)
                rep.roundtrip_ok = torch.equal(c2, codes) and torch.equal(s2, scales.to(torch.float16))
                rep.scale_rel_err = _scale_rel_err(scales, s16.t())
                rep.path = "awq"
                tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"] = qweight, qzeros, s16
        except PackError as exc:
            raise ConversionError(str(exc)) from None
        reports.append(rep)

    log(_fmt_table(reports, fmt))
    bad = [r for r in reports if not r.ok]
    n_codes = sum(r.shape[0] * r.shape[1] for r in reports)
    n_mism = sum(r.code_mismatches for r in reports)
    log(f"{len(reports)} layers, {n_codes} codes; max code error {max((r.max_code_error for r in reports), default=0)}; "
        f"{len(bad)} layers failed"
        + (f"; {n_mism} codes differ from the 16-bit latents only by the latents' rounding (fp32 training, "
           f"16-bit export): int_weights codes are packed as trained" if n_mism and not bad else ""))
    if bad:
        worst = sorted(bad, key=lambda r: -r.unexplained)[:5]
        detail = "; ".join(f"{r.name}: {r.unexplained} codes differ (max {r.max_code_error})"
                           + ("" if r.roundtrip_ok else ", pack round trip failed") for r in worst)
        raise ConversionError(
            f"verification failed, nothing written: {detail}. The codes in int_weights.safetensors do not follow "
            f"from the latent weights and scales in model.safetensors: the files come from different steps or were "
            f"edited; re-export the checkpoint from the trainer")
    if fmt == "awq" and len(group_sizes) > 1:
        raise ConversionError(f"--format awq needs one group size for all layers (config has one group_size), "
                              f"got {sorted(group_sizes)} (layers whose in_features is not a multiple of the group "
                              f"size use one group per row); use --format grace")

    # Non-quantised tensors: 16-bit as stored (fp32 -> the config's 16-bit dtype); AWQ: fp16 throughout.
    quantised_weights = {f"{n}.weight" for n in layers}
    dtype16 = torch.float16 if fmt == "awq" else (
        torch.float16 if str(config.get("torch_dtype", config.get("dtype", "bfloat16"))) == "float16" else torch.bfloat16)
    for key in tqdm(model.keys(), desc="copy", disable=not progress, unit="tensor"):
        if key in quantised_weights or key.endswith(".log_scale"):
            continue
        t = model.get(key)
        if t.is_floating_point() and (t.dtype == torch.float32 or fmt == "awq") and t.dtype != dtype16:
            t16 = t.to(dtype16)
            if not torch.isfinite(t16).all() and torch.isfinite(t).all():
                raise ConversionError(f"{key}: values overflow {dtype16} (max |x| {float(t.abs().max()):.3g}); "
                                      f"use --format grace to keep bf16")
            t = t16
        tensors[key] = t.contiguous()

    layer_meta = {r.name: {"shape": list(r.shape), "bits": r.bits, "group_size": r.group_size,
                           "path": "kernel" if r.path == "kernel" else "dequant" if fmt == "grace" else "awq"}
                  for r in reports}
    g_all = sorted(group_sizes)
    packed_cfg = {"version": PACKED_VERSION, "format": fmt, "bits": ckpt_bits,
                  "group_size": g_all[0] if len(g_all) == 1 else int(qcfg.get("group_size", 128)),
                  "scales_dtype": "float16" if fmt == "awq" else "float32",
                  "layers": layer_meta, "quant_config": {k: v for k, v in qcfg.items() if k != "layers"}}
    new_config = dict(config)
    new_config[PACKED_KEY] = packed_cfg
    if fmt == "awq":
        new_config["quantization_config"] = {
            "quant_method": "awq", "bits": 4, "group_size": g_all[0], "zero_point": True, "version": "gemm",
            "modules_to_not_convert": _modules_to_not_convert(
                [k for k in model.keys() if len(model.get_slice(k).get_shape()) == 2], layers),
        }
        new_config["torch_dtype"] = "float16"
        if "dtype" in new_config:
            new_config["dtype"] = "float16"
        assert AWQ_ZERO_4BIT == 8

    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():  # processor files, recipe, generation config
        if f.is_file() and f.name not in _SKIP_FILES and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
    log(f"writing {out / 'model.safetensors'} ({sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20:.1f} MiB)")
    atomic_save_file(tensors, out / "model.safetensors", metadata={"format": "pt", PACKED_KEY: fmt})
    atomic_write_json(out / "config.json", new_config)  # last: its presence marks a complete packed dir
    return reports


def _modules_to_not_convert(keys, layers) -> list[str]:
    """Shortest dotted prefixes covering every non-quantised 2-D weight in `keys` but no quantised layer,
    e.g. ["model.visual", "lm_head"]: what AWQ loaders match against module names."""
    quantised = set(layers)
    others = sorted({k[: -len(".weight")] for k in keys if k.endswith(".weight")} - quantised)
    out: list[str] = []
    for name in others:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if not any(q == prefix or q.startswith(prefix + ".") for q in quantised):
                if prefix not in out:
                    out.append(prefix)
                break
    # drop prefixes already covered by a shorter one
    return sorted(p for p in out if not any(p != o and p.startswith(o + ".") for o in out))
