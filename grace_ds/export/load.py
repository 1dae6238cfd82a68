"""Packed checkpoint -> runnable transformers model whose quantised linears are integer modules.

`load_packed_model(dir, device)` builds the family's HF model from config.json alone (nothing is
downloaded) with every parameter on the meta device, swaps each quantised nn.Linear for
- `W4A16Linear` (4-bit, kernel-compatible): holds the kernel-layout buffers made at load time by
  `kernels.w4a16.pack_weights` from the stored codes; forward = `kernels.w4a16.w4a16_gemm`, which is
  the CUDA op on the GPU and the pure-PyTorch reference elsewhere;
- `DequantLinear` (8-bit, or 4-bit layers the kernel cannot take): int8 codes + scales, forward
  dequantises the weight (codes * s) and calls F.linear - correct everywhere, not fast;
then fills the remaining parameters from model.safetensors. No 16-bit copy of a quantised weight is
ever materialised, so the memory of the loaded model is that of the packed one.
Reads both layouts written by `grace_ds.export.convert` (grace and awq).
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from grace_ds.export.convert import PACKED_KEY
from grace_ds.export.int8 import dequantize, round_int8
from grace_ds.export.io import SafetensorsDir
from grace_ds.export.pack import from_awq, kernel_rejection, unpack_grace


class PackedMetadataError(ValueError):
    """The packed checkpoint does not match the model its config builds."""


# ----------------------------------------------------------------------------- kernel binding

def _kernel_module():
    """kernels.w4a16 if importable, else None (the loader then uses its own dequantise reference)."""
    try:
        import kernels.w4a16 as kw  # type: ignore
    except Exception:  # noqa: BLE001 - package missing or broken build: fall back, report via .backend
        return None
    return kw if hasattr(kw, "pack_weights") and hasattr(kw, "w4a16_gemm") else None


def _dequant(codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype) -> torch.Tensor:
    """W_hat = codes * s (fp32, one multiply, like grace_ds.quant) cast to the compute dtype."""
    n, k = codes.shape
    w = codes.to(torch.float32).view(n, k // group_size, group_size) * scales.to(torch.float32)[..., None]
    return w.view(n, k).to(dtype)


class DequantLinear(nn.Module):
    """Integer weight (int8 codes, any of 4/8 bits) + per-group scales; forward dequantises then F.linear.
    The path for 8-bit layers and for 4-bit layers the W4A16 kernel cannot take."""

    def __init__(self, codes, scales, bits, group_size, bias=None, dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.bits, self.group_size, self.compute_dtype = bits, group_size, dtype
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.backend = "dequant"

    def forward(self, x):
        w = _dequant(self.codes, self.scales, self.group_size, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, g={self.group_size}, dequant"


class W4A16Linear(nn.Module):
    """4-bit linear on the W4A16 kernel. Buffers are whatever `kernels.w4a16.pack_weights` returns
    (registered as `k_<key>`, so `.to()`, state_dict and CUDA graphs see them); forward reshapes x to
    (M, K) and calls `kernels.w4a16.w4a16_gemm(x, packed, group_size)`."""

    def __init__(self, codes, scales, group_size=128, bias=None, dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.bits, self.group_size, self.compute_dtype = 4, group_size, dtype
        kw = _kernel_module()
        self._keys: list[str] = []
        self._consts: dict = {}
        if kw is not None:
            # scales in the activation dtype (the kernel's contract; fp32 compute on CPU -> bf16 scales)
            sdt = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            packed = kw.pack_weights(codes.to(torch.int8), scales, group_size, dtype=sdt)
            for key, val in packed.items():
                if isinstance(val, torch.Tensor):
                    self.register_buffer(f"k_{key}", val)
                    self._keys.append(key)
                else:
                    self._consts[key] = val
            self.backend = "kernels.w4a16"
        else:  # no kernel package: keep codes + scales and dequantise (same numbers, slow)
            self.register_buffer("k_codes", codes.to(torch.int8).contiguous())
            self.register_buffer("k_scales", scales.to(torch.float32).contiguous())
            self.backend = "dequant (kernels.w4a16 not importable)"
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def concatenated(cls, mods: list["W4A16Linear"]) -> "W4A16Linear":
        """One layer computing the given layers' outputs side by side (same input width, packing and
        bias presence; grace_ds.export.fuse checks). The packed layout is tile-major, so the dim-0
        concatenation of the buffers is the packing of the concatenated codes."""
        first = mods[0]
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = first.in_features, sum(m.out_features for m in mods)
        new.bits, new.group_size, new.compute_dtype, new.backend = 4, first.group_size, first.compute_dtype, first.backend
        new._keys, new._consts = list(first._keys), dict(first._consts)
        for name in [f"k_{k}" for k in first._keys] if first._keys else ["k_codes", "k_scales"]:
            new.register_buffer(name, torch.cat([getattr(m, name) for m in mods], 0))
        new.bias = None if first.bias is None else nn.Parameter(torch.cat([m.bias.detach() for m in mods], 0),
                                                                requires_grad=False)
        return new

    def packed(self) -> dict:
        d = {key: getattr(self, f"k_{key}") for key in self._keys}
        d.update(self._consts)
        return d

    def set_norm(self, weight: torch.Tensor, eps: float) -> None:
        """Fold the RMSNorm in front of this layer into it (grace_ds.export.fuse.fold_norms_): forward(x) becomes
        this layer of rms_norm(x; weight, eps), the two in one kernel at decode where the op's choice has the fold
        (kernels.w4a16.w4a16_gemm_norm, kernels/NOTES.md v21). The caller replaces the norm by an identity."""
        self.register_buffer("norm_weight", weight.detach().clone())
        self.norm_eps = float(eps)

    def _norm(self):
        return getattr(self, "norm_weight", None)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        norm = self._norm()
        if self._keys:
            import kernels.w4a16 as kw  # type: ignore

            if norm is None:
                y = kw.w4a16_gemm(x2, self.packed(), self.group_size)
            else:
                y = kw.w4a16_gemm_norm(x2, self.packed(), norm, self.norm_eps, group_size=self.group_size)
        else:
            if norm is not None:
                x2 = rms_norm(x2, norm, self.norm_eps)
            y = F.linear(x2, _dequant(self.k_codes, self.k_scales, self.group_size, x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def forward_glu(self, x):
        """silu(gate) * up for a fused [gate; up] layer (gate rows first, out_features = 2I): a gated MLP's
        input to its down projection. With the kernel package and no bias, `kernels.w4a16.w4a16_gemm_glu`
        (one kernel at decode; kernels/NOTES.md v15); else this layer's output, then the activation."""
        if not self._keys or self.bias is not None or self.out_features % 32 != 0:
            gate, up = self(x).chunk(2, dim=-1)
            return F.silu(gate) * up
        import kernels.w4a16 as kw  # type: ignore

        norm = self._norm()
        if norm is None:
            return kw.w4a16_gemm_glu(x, self.packed(), self.group_size)   # keeps x's leading dims
        return kw.w4a16_gemm_norm(x, self.packed(), norm, self.norm_eps, glu=True, group_size=self.group_size)

    def extra_repr(self):
        norm = "" if self._norm() is None else f", RMSNorm folded in (eps={self.norm_eps})"
        return f"in={self.in_features}, out={self.out_features}, g={self.group_size}, backend={self.backend}{norm}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen2RMSNorm: weight * (x / sqrt(mean(x^2) + eps)) computed in fp32, the
    normalised x rounded to x's dtype before the weight multiplies it (kernels.w4a16.op.rms_norm's formula, for
    installs without the kernel package)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def quantized_linear(codes, scales, bits, group_size, bias=None, dtype=torch.bfloat16, *, force_dequant=False):
    """The module for one packed layer: W4A16Linear where the kernel can take it, else DequantLinear."""
    if bits == 4 and not force_dequant and kernel_rejection(bits, group_size, tuple(codes.shape)) is None:
        return W4A16Linear(codes, scales, group_size, bias, dtype)
    return DequantLinear(codes, scales, bits, group_size, bias, dtype)


# ----------------------------------------------------------------------------- model skeleton

@contextlib.contextmanager
def params_on_meta():
    """Every parameter registered inside goes to the meta device (buffers stay real, so rotary tables and
    position ids are computed as usual). Parameters are created by their modules first, uninitialised
    (torch.empty on the default device) and moved right away, so nothing large is ever touched."""
    old = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        old(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def model_class(config):
    import transformers

    archs = getattr(config, "architectures", None) or []
    for a in archs:
        if hasattr(transformers, a):
            return getattr(transformers, a)
    raise PackedMetadataError(f"config.architectures={archs!r}: no such transformers class in "
                              f"transformers {transformers.__version__}")


def build_empty_model(config, dtype=torch.bfloat16):
    """The HF model with all parameters on meta (no memory, no init cost) and buffers on the CPU."""
    cls = model_class(config)
    with params_on_meta(), torch.device("cpu"):
        model = cls._from_config(config, dtype=dtype)
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def finish_model(model: nn.Module, device) -> nn.Module:
    """Move buffers to `device`, re-tie tied embeddings, and refuse to return a model with meta tensors."""
    for mod in model.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != torch.device(device):
                mod._buffers[bname] = buf.to(device)
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
            model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise PackedMetadataError(f"{len(left)} tensors of the model are not in the checkpoint, e.g. {left[:5]}; "
                                  f"the packed file does not match config.json (re-run launch/convert.py)")
    return model.eval()


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_name, _, pname = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if pname in mod._parameters:
        mod._parameters[pname] = nn.Parameter(value, requires_grad=False)
    elif pname in mod._buffers:
        mod._buffers[pname] = value
    else:
        raise KeyError(key)


# ----------------------------------------------------------------------------- loader

def read_packed_config(directory) -> tuple[dict, dict]:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{directory}: no config.json")
    cfg = json.loads(cfg_path.read_text())
    if PACKED_KEY not in cfg:
        raise PackedMetadataError(
            f"{directory}: config.json has no '{PACKED_KEY}': not a packed checkpoint. Pack the trainer's final "
            f"export first: python launch/convert.py --checkpoint {directory} --out <packed dir>")
    return cfg, cfg[PACKED_KEY]


def load_packed_model(directory, device="cpu", dtype: torch.dtype | None = None, *, force_dequant: bool = False,
                      fuse_projections: bool = False):
    """Build the model of a packed checkpoint (launch/convert.py output) on `device`.

    dtype: compute dtype of activations and 16-bit tensors (default: the checkpoint's, bf16 if unset).
    force_dequant: run every quantised layer through DequantLinear (debugging / oracle).
    fuse_projections: one GEMM for each layer's q/k/v and one for gate/up (grace_ds.export.fuse).
    Raises PackedMetadataError when the packed tensors or their metadata do not match the model.
    """
    import transformers

    directory = Path(directory)
    raw_cfg, packed = read_packed_config(directory)
    fmt, layers = packed.get("format"), packed.get("layers") or {}
    if fmt not in ("grace", "awq"):
        raise PackedMetadataError(f"{directory}: {PACKED_KEY}.format={fmt!r}, expected 'grace' or 'awq'")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):  # awq: our loader is the quantiser, not transformers'
        del config.quantization_config
    if dtype is None:
        name = raw_cfg.get("dtype") or raw_cfg.get("torch_dtype") or "bfloat16"
        dtype = getattr(torch, str(name).replace("torch.", ""), torch.bfloat16)
    files = SafetensorsDir(directory, "model")
    model = build_empty_model(config, dtype)

    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise PackedMetadataError(f"{len(missing)} packed layers do not exist in the model built from config.json, "
                                  f"e.g. {missing[:3]}; the packed file belongs to another architecture")
    consumed: set[str] = set()
    for name, meta in layers.items():
        lin = modules[name]
        shape = tuple(meta["shape"])
        bits, g = int(meta["bits"]), int(meta["group_size"])
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != shape:
            got = (lin.out_features, lin.in_features) if isinstance(lin, nn.Linear) else type(lin).__name__
            raise PackedMetadataError(f"{name}: packed as {shape[0]}x{shape[1]} but the model has {got}; "
                                      f"config.json and model.safetensors disagree (re-run launch/convert.py)")
        keys = [f"{name}.qweight", f"{name}.scales"] + ([f"{name}.qzeros"] if fmt == "awq" else [])
        absent = [k for k in keys if k not in files]
        if absent:
            raise PackedMetadataError(f"{name}: {absent} missing from model.safetensors although config.json lists "
                                      f"the layer; the file is incomplete (re-run launch/convert.py)")
        if fmt == "grace":
            codes, scales = unpack_grace(files.get(f"{name}.qweight"), files.get(f"{name}.scales"), bits)
        else:
            codes, scales = from_awq(files.get(f"{name}.qweight"), files.get(f"{name}.qzeros"),
                                     files.get(f"{name}.scales"), g)
        if tuple(codes.shape) != shape or tuple(scales.shape) != (shape[0], shape[1] // g):
            raise PackedMetadataError(f"{name}: stored codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not "
                                      f"match the metadata shape {shape} with group_size {g}")
        bias = None
        if lin.bias is not None:
            if f"{name}.bias" not in files:
                raise PackedMetadataError(f"{name}.bias missing from model.safetensors")
            bias = files.get(f"{name}.bias").to(device)
            consumed.add(f"{name}.bias")
        elif f"{name}.bias" in files:
            raise PackedMetadataError(f"{name}.bias is in the file but the model's layer has no bias")
        consumed.update(keys)
        new = quantized_linear(codes.to(device), scales.to(device), bits, g, bias, dtype, force_dequant=force_dequant)
        replace_module(model, name, new)

    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    state_keys = set(params) | set(buffers)
    for key in files.keys():
        if key in consumed:
            continue
        if key not in state_keys:
            raise PackedMetadataError(f"model.safetensors holds {key!r}, which the model built from config.json does "
                                      f"not have; the packed file does not match its config")
        t = files.get(key)
        cur = params[key] if key in params else buffers[key]
        if tuple(cur.shape) != tuple(t.shape):
            raise PackedMetadataError(f"{key}: file shape {tuple(t.shape)} != model shape {tuple(cur.shape)}")
        set_tensor(model, key, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
    model = finish_model(model, device)
    if fuse_projections:
        from grace_ds.export.fuse import fuse_projections_

        fuse_projections_(model)
    return model


def quantize_lm_head_(model: nn.Module, bits: int = 4, group_size: int = 128) -> nn.Module:
    """Round the output head to `bits` (RTN: the quantiser's grid-search scale per group, rounded once,
    grace_ds.quant.lsq) and swap it for the packed module, in place; returns the new head.

    A serving option, not part of GRACE: QAT leaves lm_head in 16 bits, so this is post-training
    rounding with its accuracy cost unmeasured by training. At decode the head is read in full every
    step (Qwen2-VL-7B: 152064 x 3584, 1.09 GB in bf16, about a quarter of the INT4 model's bytes per
    token). A head tied to the input embeddings is untied: the embeddings stay 16-bit.
    """
    from grace_ds.quant.lsq import init_log_scale, quantize_codes

    head = model.get_output_embeddings()
    if isinstance(head, (W4A16Linear, DequantLinear)):
        raise ValueError("lm_head is already quantised")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"output head is {type(head).__name__}, not nn.Linear: cannot quantise it")
    n, k = head.weight.shape
    if k % group_size:
        raise ValueError(f"lm_head in_features {k} is not a multiple of group_size {group_size}")
    name = next(nm for nm, m in model.named_modules() if m is head)
    dtype = head.weight.dtype
    with torch.no_grad():
        w = head.weight.detach()
        log_s = init_log_scale(w, bits, group_size)
        codes, scales, _ = quantize_codes(w, log_s, bits, group_size)
        codes = codes.to(torch.int8).reshape(n, k)
        scales = scales.to(torch.float32).reshape(n, k // group_size)
        bias = None if head.bias is None else head.bias.detach()
        new = quantized_linear(codes, scales, bits, group_size, bias, dtype).to(w.device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False    # the 16-bit input embeddings stay as they are
    replace_module(model, name, new)
    return new


class Int8Embedding(nn.Module):
    """Token embeddings stored as int8 codes with one fp32 scale per row (symmetric, absmax / 127):
    a lookup dequantises only the rows it reads, to `dtype`, rounding the fp32 product once."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.dtype, self.padding_idx = dtype, padding_idx
        self.num_embeddings, self.embedding_dim = codes.shape

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        codes, scale = round_int8(emb.weight.detach())
        return cls(codes, scale, emb.weight.dtype, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(F.embedding(ids, self.codes), F.embedding(ids, self.scale), self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 codes + fp32 row scales -> {self.dtype}"


def quantize_embeddings_(model: nn.Module) -> Int8Embedding:
    """Store the input token embeddings in int8 (one scale per row) and swap in Int8Embedding, in
    place; returns the new module.

    A serving option for memory, not part of GRACE (QAT leaves the embeddings in 16 bits): the table
    is read a few rows per token, but it is resident. Qwen2-VL-7B's is 152064 x 3584, 1.09 GB in bf16,
    a fifth of its INT4 model's weights; int8 halves it. The rounding error per value is at most
    absmax(row) / 254. A table tied to the output head is refused (quantise the head first with
    quantize_lm_head_, which unties it)."""
    emb = model.get_input_embeddings()
    if isinstance(emb, Int8Embedding):
        raise ValueError("the input embeddings are already int8")
    if type(emb) is not nn.Embedding:
        raise ValueError(f"input embeddings are {type(emb).__name__}, not nn.Embedding: cannot quantise them")
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is emb.weight:
        raise ValueError("the input embeddings are tied to lm_head: quantise the head first (quantize_lm_head_ unties it)")
    with torch.no_grad():
        new = Int8Embedding.from_embedding(emb).to(emb.weight.device)
    model.set_input_embeddings(new)
    return new


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 codes with one fp32 scale per output row
    (symmetric, absmax / 127); each call dequantises the weight to the input's dtype (rounding the
    fp32 product once) and runs F.linear. Weight-only, for layers that run once per prompt (the
    vision tower): the per-call dequantisation costs a weight-sized temporary, not kernel speed."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = codes.shape

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        codes, scale = round_int8(lin.weight.detach())
        return cls(codes, scale, None if lin.bias is None else lin.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.codes, self.scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int8 codes + fp32 row scales, bias={self.bias is not None}"


# the vision encoder and its projector into the language model (LLaVA: vision_tower, multi_modal_projector;
# Qwen2/2.5/3-VL: visual, whose merger is the projector); QuantConfig leaves all of them in 16 bits
VISION_PATTERNS = (r"(^|\.)vision_tower(\.|$)", r"(^|\.)multi_modal_projector(\.|$)", r"(^|\.)visual(\.|$)")


def quantize_vision_(model: nn.Module) -> int:
    """Store every nn.Linear of the vision encoder and projector (VISION_PATTERNS) as Int8Linear, in
    place; returns how many were replaced.

    A serving option for memory, not part of GRACE (QAT trains the language model's linears only):
    the vision tower runs once per prompt but stays resident. Qwen2-VL-7B's is 0.67 B parameters,
    1.3 GB in bf16; LLaVA-1.5-7B's CLIP ViT-L and projector 0.6 GB. int8 halves them. The rounding
    error per weight is at most absmax(row) / 254, as for the int8 embeddings; its effect on accuracy
    is the user's to check (launch/eval.py)."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and any(re.search(p, n) for p in VISION_PATTERNS)]
    if not names:
        done = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
        raise ValueError("the vision linears are already int8" if done else
                         f"no nn.Linear under {', '.join(VISION_PATTERNS)} in {type(model).__name__}: no vision tower "
                         "to quantise")
    with torch.no_grad():
        for name in names:
            lin = model.get_submodule(name)
            replace_module(model, name, Int8Linear.from_linear(lin).to(lin.weight.device))
    return len(names)


def quantized_backends(model: nn.Module) -> dict[str, int]:
    """How many layers run on each path, e.g. {"kernels.w4a16": 196, "dequant": 0}."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (W4A16Linear, DequantLinear)):
            out[m.backend] = out.get(m.backend, 0) + 1
    return out


def select_quant_layers(model: nn.Module, include=None, exclude=None) -> list[str]:
    """nn.Linear names matching QuantConfig's include/exclude regexes (its defaults when None)."""
    if include is None or exclude is None:
        from grace_ds.quant.config import QuantConfig

        d = QuantConfig()
        include = d.include if include is None else include
        exclude = d.exclude if exclude is None else exclude
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(re.search(p, n) for p in include) and not any(re.search(p, n) for p in exclude)]
