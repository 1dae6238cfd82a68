"""INT8 KV cache for decoding with a static cache (a serving option of launch/bench.py, `--kv-int8`).

At batch 16 with a 900-token context the bf16 KV cache of LLaVA-1.5-7B is 7.5 GB: more than its
INT4 weights (4.1 GB), and read in full at every decode step. Storing it in 8 bits halves both.

Storage: each cached (row, kv head, position) vector of head_dim values is rounded symmetrically
to int8 with its own scale (absmax / 127, fp32). Per (row, kv head) the cache is one int8 tensor of
L + R rows of head_dim bytes (B, H_kv, L + R, head_dim), L = max_len: rows [0, L) hold the codes,
one position per row, and the R = ceil(4 L / head_dim) rows after them hold the L scales' bytes
(little-endian fp32, position order). The codes rows stay 16-byte aligned and the scales are one
contiguous fp32 array, so the GPU kernel reads both with wide loads (with the scale stored at the end
of each position's row instead, the row length head_dim + 4 broke alignment and the kernel ran at
under half the speed, measured on an H200: docs/benchmarks.md). The cache's `update` returns that
tensor for keys and for values, so the model's attention code passes it through unchanged to the
attention function registered here ("grace_kv8"), which reads codes and scales from it:
- one query token (decode) on the GPU: one Triton kernel, split-K flash decoding over the int8 cache
  (`grace_ds/export/kv8_triton.py`; GRACE_KV8_TRITON=0 or `launch/bench.py --kv8-portable` turns
  it off);
- one query token otherwise (the CPU, or the kernel turned off): scores = (q . k_codes) * k_scale,
  softmax in fp32, out = sum over positions of (p * v_scale) * v_codes, written as multiply + reduce so that
  torch.compile fuses the int8 -> float conversion into the two reductions and no 16-bit copy of
  the cache is made. On an H200 this form doubled LLaVA-1.5-7B's batch-16 step, hence the kernel
  (LLaVA-1.5-7B INT4 at batch 16 on an H200: 4.55 ms per step with it, 10.1 with the portable form,
  4.6 with the 16-bit cache).
- several query tokens (a prompt pass, or one chunk of it, after a reset): the cache's `update`
  returns the positions written so far dequantised to the states' dtype (16-bit tensors), and the
  attention hands them to SDPA with the mask cut to their length; after a decode step has run,
  multi-token passes get the whole packed cache, dequantised here.
Writing: `update` quantises the new positions and writes codes and scales in place. On the GPU that is one
Triton kernel for keys and values (`kv8_triton.write_kv`, 2.2 us a layer for LLaVA-1.5-7B at batch 16 on an
H200, where inductor's fusion of the torch code took 12.7 us); elsewhere, or with GRACE_KV8_TRITON=0, the
torch code (the same codes and scales, bit for bit).
GQA is handled by grouping the query heads of each kv head. The rounding error per element is at
most scale / 2 = absmax / 254 (tests/test_kv8.py checks the attention against a float64 reference).

Usage: `enable_kv_int8(model)` once (selects the attention function for the language model), then
`Int8StaticCache(config=model.config, max_cache_len=n)` wherever a StaticCache was used
(grace_ds.export.decode.StaticDecoder(kv_int8=True) does both).
"""
from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from grace_ds.export import kv8_triton
from grace_ds.export.int8 import dequantize, round_int8

NAME = "grace_kv8"
NAME16 = "grace_decode16"
SCALE_BYTES = 4


def scale_rows(length: int, head_dim: int) -> int:
    """Rows of head_dim bytes after the codes that hold `length` fp32 scales."""
    return -(-SCALE_BYTES * length // head_dim)


def cache_length(rows: int, head_dim: int) -> int:
    """The number of positions L of a packed tensor with `rows` = L + scale_rows(L) rows (one L per
    row count: L + ceil(4 L / D) grows with L)."""
    n = rows * head_dim // (head_dim + SCALE_BYTES)
    while n + 1 + scale_rows(n + 1, head_dim) <= rows:
        n += 1
    while n > 0 and n + scale_rows(n, head_dim) > rows:
        n -= 1
    if n + scale_rows(n, head_dim) != rows:
        raise ValueError(f"kv int8: {rows} rows of {head_dim} bytes is not a packed cache (L + ceil(4 L / head_dim) rows)")
    return n


def quantize_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) float -> (codes (..., D) int8, scale bytes (..., 4) int8): symmetric int8 rounding
    with one fp32 scale (absmax / 127) per vector."""
    if x.shape[-1] % 16:
        raise ValueError(f"kv int8: head_dim {x.shape[-1]} is not a multiple of 16 (the codes rows must stay 16-byte "
                         "aligned); keep the 16-bit cache for this model")
    codes, scale = round_int8(x)
    return codes, _float_to_bytes(scale)


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, L, D) float -> (B, H_kv, L + R, D) int8 in the layout of the module docstring."""
    codes, sb = quantize_parts(x)
    L, D = x.shape[-2:]
    R = scale_rows(L, D)
    sb = torch.nn.functional.pad(sb.flatten(-2), (0, R * D - SCALE_BYTES * L)).unflatten(-1, (R, D))
    return torch.cat([codes, sb], -2)


def _float_to_bytes(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) fp32 -> (..., 4) int8: its bytes, little-endian. Eagerly a dtype view (no kernel; a
    prefill calls this for every layer, and the arithmetic below cost about 20 kernel launches each);
    inside torch.compile the arithmetic form, which inductor lowers and fuses."""
    if torch.compiler.is_compiling():
        return _float_to_bytes_arith(x)
    return x.contiguous().view(torch.int8)


def _bytes_to_float(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) int8 -> (..., 1) fp32: the inverse of _float_to_bytes (a view eagerly where the
    strides allow one, as for the scale rows of a packed cache; the arithmetic form when compiling)."""
    if torch.compiler.is_compiling():
        return _bytes_to_float_arith(b)
    if b.stride(-1) != 1 or b.storage_offset() % 4 or any(st % 4 for st in b.stride()[:-1]):
        b = b.contiguous()
    return b.view(torch.float32)


def _float_to_bytes_arith(x: torch.Tensor) -> torch.Tensor:
    """_float_to_bytes with a same-size bitcast and integer arithmetic: inductor cannot lower a float
    -> int8 view of a tensor whose last stride is not 1 (on CUDA the scale of a transposed key is such
    a tensor), and the arithmetic fuses into the quantising kernel."""
    bits = x.view(torch.int32)
    parts = [torch.bitwise_and(torch.bitwise_right_shift(bits, s), 0xFF) for s in (0, 8, 16)]
    parts = [p - 256 * (p > 127).to(torch.int32) for p in parts]      # 0..255 -> the int8 of that byte
    parts.append(torch.bitwise_right_shift(bits, 24))                   # arithmetic shift: already -128..127
    return torch.cat(parts, -1).to(torch.int8)


def _bytes_to_float_arith(b: torch.Tensor) -> torch.Tensor:
    """_bytes_to_float with integer arithmetic, then a same-size bitcast (no int8 -> float view)."""
    w = b.to(torch.int32)
    lo = [torch.bitwise_and(w[..., i:i + 1], 0xFF) for i in range(3)]
    bits = w[..., 3:4] * 16777216 + lo[2] * 65536 + lo[1] * 256 + lo[0]
    return bits.view(torch.float32)


def _scale_bytes(packed: torch.Tensor, length: int) -> torch.Tensor:
    """The (..., L, 4) int8 view of the scales' bytes in a packed (..., L + R, D) tensor."""
    rows = packed[..., length:, :]
    flat = rows.view(*rows.shape[:-2], rows.shape[-2] * rows.shape[-1])   # a view (raises if it cannot be one)
    return flat[..., :SCALE_BYTES * length].unflatten(-1, (length, SCALE_BYTES))


def split_kv(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., L + R, D) int8 -> (codes (..., L, D) int8 (a view), scale (..., L, 1) fp32)."""
    length = cache_length(packed.shape[-2], packed.shape[-1])
    return packed[..., :length, :], _bytes_to_float(_scale_bytes(packed, length))


def dequantize_kv(packed: torch.Tensor, dtype=torch.float32, n: int | None = None) -> torch.Tensor:
    """(..., L + R, D) packed -> (..., n, D) in `dtype`: the first n positions (all L by default),
    codes * scale rounded once (int8.dequantize: no fp32 copy of the cache)."""
    codes, scale = split_kv(packed)
    return dequantize(codes[..., :n, :], scale[..., :n, :], dtype)


def _scale_index(length: int, head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), each (n, 4): where the 4 scale bytes of each position lie in a packed (L + R, D) slab."""
    flat = length * head_dim + SCALE_BYTES * positions[:, None] + torch.arange(SCALE_BYTES, device=positions.device)
    return flat // head_dim, flat % head_dim


def write_packed(packed: torch.Tensor, states: torch.Tensor, positions: torch.Tensor, length: int) -> None:
    """Quantise (B, H_kv, T, D) states and write them in place at `positions` (T,) of a packed (B, H_kv,
    length + R, D) cache: the torch form of kv8_triton.write_kv. Both writes index the packed tensor itself,
    not a view of it: a compiled step then updates the cache in place (through views, inductor copied the
    whole cache at every step)."""
    codes, sb = quantize_parts(states)
    packed.index_copy_(2, positions, codes)                             # rows < length: the codes
    rows, cols = _scale_index(length, packed.shape[-1], positions)
    packed[:, :, rows, cols] = sb                                       # the scales' bytes after them


class Int8StaticLayer(StaticLayer):
    """StaticLayer whose keys/values are the packed int8 tensors described in the module docstring:
    (B, H_kv, max_cache_len + R, head_dim) int8, allocated on the first update; `update` writes the
    new positions' codes and scale bytes in place and returns the whole packed tensors, except for
    the prompt passes right after a reset (eager, several tokens): those get the positions written
    so far, dequantised to the states' dtype, which the attention hands to SDPA with the mask cut to
    that length. `written` counts those positions on the host (None once a decode step has run: a
    compiled or replayed step cannot keep a Python count)."""

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.written = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """StaticLayer.lazy_initialization with the packed shapes (it sizes its tensors max_cache_len)."""
        from transformers.cache_utils import is_torchdynamo_compiling

        self.dtype, self.device = torch.int8, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        L = self.max_cache_len
        self.keys = torch.zeros(self.batch_size, self.num_heads, L + scale_rows(L, self.k_head_dim), self.k_head_dim,
                                dtype=torch.int8, device=self.device)
        self.values = torch.zeros(self.batch_size, self.num_heads, L + scale_rows(L, self.v_head_dim), self.v_head_dim,
                                  dtype=torch.int8, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not is_torchdynamo_compiling():   # fixed addresses: CUDA graphs and compiled steps mutate them in place
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kv_length = key_states.shape[-2]
        cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(kv_length)
        if kv8_triton.available(key_states) and key_states.shape == value_states.shape:
            # one kernel for keys and values (inductor's fusion of write_packed took 4-18 us a layer)
            kv8_triton.write_kv(self.keys, self.values, key_states, value_states, cache_position)
        else:
            write_packed(self.keys, key_states, cache_position, self.max_cache_len)
            write_packed(self.values, value_states, cache_position, self.max_cache_len)
        if kv_length > 1 and self.written is not None and not torch.compiler.is_compiling():
            # an eager prompt pass (a prefill, or one chunk of it) since the reset: the attention needs
            # only the positions written so far, dequantised once here (not the whole static cache)
            self.written += kv_length
            return tuple(dequantize_kv(t, key_states.dtype, self.written) for t in (self.keys, self.values))
        self.written = None    # a decode step (possibly compiled or replayed): no host-side count from here on
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.written = 0


class Int8StaticCache(StaticCache):
    """StaticCache with every full-attention layer stored in int8 (sliding-window layers are refused)."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        for i, layer in enumerate(self.layers):
            if type(layer) is not StaticLayer:
                raise ValueError(f"kv int8: cache layer {i} is {type(layer).__name__}; only full-attention "
                                 "StaticLayer layers can be stored in int8")
            self.layers[i] = Int8StaticLayer(max_cache_len=max_cache_len)


def _decode_bias(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A decode step's mask (B or 1, 1, 1, L), bool (True = attend) or additive, as the kernels' additive
    (B or 1, L) bias; None stays None."""
    if attention_mask is None:
        return None
    m = attention_mask[:, 0, -1, :]
    return torch.where(m, 0.0, float("-inf")) if m.dtype == torch.bool else m   # additive as is


def kv8_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The attention function for packed int8 keys/values (16-bit ones go to SDPA unchanged).
    query (B, H, q, D); key/value (B, Hk, L + ceil(4L/D), D) packed int8; mask bool (B, 1, q, L) (True = attend),
    additive float, or None. Returns ((B, q, H, D), None) like transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if key.dtype != torch.int8:   # a 16-bit cache, or the dequantised prefix of a prompt pass (Int8StaticLayer)
        if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
            attention_mask = attention_mask[..., :key.shape[-2]]   # the columns after it are not written yet
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    B, H, q_len, D = query.shape
    if q_len > 1:   # prefill: one dequantised copy of the cache, then SDPA
        return sdpa_attention_forward(module, query, dequantize_kv(key, query.dtype), dequantize_kv(value, query.dtype),
                                      attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    Hk = key.shape[1]
    G = H // Hk
    scaling = D ** -0.5 if scaling is None else scaling
    if kv8_triton.available(query):   # the GPU: one Triton kernel reads the int8 cache (kv8_triton.py)
        out = kv8_triton.kv8_decode_attention(query, key, value, _decode_bias(attention_mask), scaling)   # query.dtype
        return out.transpose(1, 2), None
    return portable_decode_attention(query, key, value, attention_mask, scaling), None


def portable_decode_attention(query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """One query token over the packed cache without the kernel (any device): multiply + reduce, which
    torch.compile fuses with the int8 reads. query (B, H, 1, D); mask as for kv8_attention_forward.
    Returns (B, 1, H, D) in the query's dtype."""
    B, H, _, D = query.shape
    Hk = key.shape[1]
    G = H // Hk
    kc, ks = split_kv(key)          # (B, Hk, L, D), (B, Hk, L, 1)
    vc, vs = split_kv(value)
    qf = query.float().view(B, Hk, G, 1, D)
    scores = (qf * kc.unsqueeze(2).float()).sum(-1)              # (B, Hk, G, L)
    scores = scores * (ks.squeeze(-1).unsqueeze(2) * scaling)
    if attention_mask is not None:
        m = attention_mask[:, :, -1, :].unsqueeze(2)              # (B, 1, 1, L)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m.float()
    p = torch.softmax(scores, dim=-1) * vs.squeeze(-1).unsqueeze(2)   # (B, Hk, G, L)
    out = (p.unsqueeze(-1) * vc.unsqueeze(2).float()).sum(-2)         # (B, Hk, G, D)
    return out.to(query.dtype).view(B, H, 1, D).transpose(1, 2)


def decode16_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """For a 16-bit cache: a decode step (one query token) on the GPU runs the Triton split-K kernel
    (kv8_triton.decode_attention16: each kv head read once for its query heads); everything else, and
    every pass where the kernel is unavailable, goes to transformers' SDPA function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, q_len, D = query.shape
    if q_len == 1 and key.dtype in (torch.bfloat16, torch.float16) and kv8_triton.available(query):
        scaling = D ** -0.5 if scaling is None else scaling
        return kv8_triton.decode_attention16(query, key, value, _decode_bias(attention_mask), scaling).transpose(1, 2), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def reference_attention(query, key, value, mask, scaling: float) -> torch.Tensor:
    """The float64 oracle the decode attentions are checked against (tests, benchmarks): query (B, H, q, D),
    key/value (B, H_kv, L, D) float of any precision (a dequantised int8 cache, or a 16-bit one), GQA by
    repeating the kv heads; mask bool (True = attend) or additive, broadcast to (B, H, q, L), or None.
    Returns (B, H, q, D) float64."""
    G = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(G, 1)
    v = value.double().repeat_interleave(G, 1)
    s = query.double() @ k.transpose(-1, -2) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1) @ v


def register() -> None:
    """Register "grace_kv8" and "grace_decode16" with transformers' attention and mask interfaces (SDPA's
    mask format)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, fn in ((NAME, kv8_attention_forward), (NAME16, decode16_attention_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


def enable_decode16(model) -> None:
    """Route the language model's attention through decode16_attention_forward: the Triton decode
    kernel over the model's 16-bit static cache (a 16-bit counterpart of the int8 cache's kernel, so
    that bf16 and INT4 can be compared with the same attention)."""
    register()
    model.config.get_text_config(decoder=True)._attn_implementation = NAME16


def enable_kv_int8(model) -> None:
    """Route the language model's attention through kv8_attention_forward (16-bit caches still work:
    the function hands them to SDPA). The vision tower keeps its own attention."""
    register()
    text = model.config.get_text_config(decoder=True)
    text._attn_implementation = NAME
