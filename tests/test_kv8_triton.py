"""The Triton decode attention over the int8 KV cache (grace_ds/export/kv8_triton.py) against a
float64 reference: on the CPU through Triton's interpreter (in a subprocess, since TRITON_INTERPRET
must be set before Triton compiles anything), and on the GPU for real."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from tiny_serving import kv8_reference

ROOT = Path(__file__).resolve().parents[1]

# (B, H, Hk, L, D, mask kind, valid length): MHA (LLaVA), GQA with 7 query heads per kv head
# (Qwen2-VL), a length that is not a multiple of the block, one split and many (at every block size)
CASES = [
    (2, 4, 4, 150, 64, "bool", 97),
    (3, 14, 2, 200, 128, "additive", 200),
    (1, 8, 1, 32, 32, None, 32),
    (4, 2, 2, 1000, 64, "bool", 613),
    (2, 4, 4, 256, 64, "bool", 170),      # a multiple of the block (the unmasked loads), masked tail skipped
    (2, 4, 2, 640, 64, "holes", 300),     # masked positions inside the attended ones, and whole masked splits
    # the first and the last attended positions weigh e^8 times the others: a walk that misses either (a slice
    # boundary off by one, in bound's or spread's search) is far off the reference, not within its tolerance
    (2, 4, 2, 288, 64, "ends", 257),   # row 0 attends up to 256: a block start at every block size
]
# kernel options (kv8_triton.LAUNCH) each case runs under: the defaults, then each option switched
VARIANTS = [{}, {"skip": True}, {"qk_int8": False}, {"vwords": False, "asm": False, "qk_int8": False},
            {"block": 64, "num_warps": 8}, {"block": 32, "num_stages": 4},
            # the walks bounded at the last attended position whatever the splits ("auto" bounds only some), with
            # one split per (row, kv head), so that they span many blocks and the bound cuts them short
            {"bound": True, "programs": 1},
            # the splits sharing the attended positions of their row ("auto" spreads only caches >= 2048 positions),
            # and one split's output written by the merge kernel, not by the attention kernel itself: one run for
            # both, as spread only changes the cases with several splits and fold those with one
            {"spread": True, "fold": False}]


def test_bound_is_on_and_the_scan_covers_a_slice():
    """By default (LAUNCH / LAUNCH16 "bound": "auto") the kernels' walks stop at the last attended position of
    their slices where there is one split per (row, kv head) or the cache is long, and the bias search loads up to
    1024 positions at a time (a power of two, at least 16)."""
    from grace_ds.export.kv8_triton import BOUND_AUTO_LENGTH, LAUNCH, LAUNCH16, bounded, scan_width

    assert LAUNCH["bound"] == LAUNCH16["bound"] == "auto" and BOUND_AUTO_LENGTH == 2048
    auto = {"bound": "auto"}
    assert bounded(auto, 1, 896) and not bounded(auto, 7, 896) and bounded(auto, 9, 4096) and bounded(auto, 2, 2048)
    assert bounded({"bound": True}, 7, 896) and not bounded({"bound": False}, 1, 4096) and not bounded({}, 1, 4096)
    assert [scan_width(n) for n in (1, 16, 17, 128, 896, 1024, 1025, 4096)] == [16, 16, 32, 128, 1024, 1024, 1024, 1024]


def test_spread_is_on_for_long_caches_with_several_splits():
    """By default ("spread": "auto") the splits share the row's attended positions where there are several splits
    over a cache of >= 2048 positions (a server's static cache, mostly past the decoded length); never with one
    split (bound covers it) and never where it is off. Its search reads the row's bias in one load up to 4096."""
    from grace_ds.export.kv8_triton import LAUNCH, LAUNCH16, spread_scan_width, spreads

    assert LAUNCH["spread"] == LAUNCH16["spread"] == "auto"
    auto = {"spread": "auto"}
    assert spreads(auto, 9, 4096) and spreads(auto, 2, 2048)
    assert not spreads(auto, 1, 4096) and not spreads(auto, 7, 896) and not spreads(auto, 9, 2047)
    assert spreads({"spread": True}, 7, 896) and not spreads({"spread": True}, 1, 896)
    assert not spreads({"spread": False}, 9, 4096) and not spreads({}, 9, 4096)
    assert [spread_scan_width(n) for n in (1, 100, 896, 4096, 4097, 32768)] == [16, 128, 1024, 4096, 4096, 4096]


def test_fold_is_on_and_the_env_switches_it_off():
    """fold (one split writes its own output, no merge launch) is on by default; GRACE_KV8_FOLD=0 at import turns
    it off in both tables, for the bench's A/B runs (its workers inherit the environment)."""
    from grace_ds.export.kv8_triton import LAUNCH, LAUNCH16

    assert LAUNCH["fold"] is True and LAUNCH16["fold"] is True
    code = "from grace_ds.export.kv8_triton import LAUNCH, LAUNCH16; print(LAUNCH['fold'], LAUNCH16['fold'])"
    env = {k: v for k, v in os.environ.items() if k != "GRACE_KV8_FOLD"}
    for value, want in (("0", "False False"), ("1", "True True")):
        r = subprocess.run([sys.executable, "-c", code], env=dict(env, GRACE_KV8_FOLD=value, PYTHONPATH=str(ROOT)),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.split() == want.split(), (value, r.stdout, r.stderr[-500:])


def check(device: str) -> float:
    """check_launch under every VARIANTS entry; returns the worst relative error."""
    from grace_ds.export.kv8_triton import LAUNCH, LAUNCH16

    default, default16 = dict(LAUNCH), dict(LAUNCH16)
    try:
        errs = []   # per variant: (worst of the int8 kernel, worst of the 16-bit kernel)
        keys16 = ("bound", "programs", "spread", "fold")   # the options the 16-bit kernel has too
        for variant in VARIANTS:
            LAUNCH.update(default, **variant)
            LAUNCH16.update(default16, **{k: v for k, v in variant.items() if k in keys16})
            # the 16-bit kernel under the defaults and under its own options (the int8-only ones leave it as it was)
            errs.append(check_launch(device, whole=variant.get("bound") is True,
                                     sixteen=not variant or any(k in variant for k in keys16)))
        # the int8 scores (a two-part int8 query) must keep the fp16 query's accuracy: with one part the
        # int8 kernel's worst error was 4x the fp16 path's in the interpreter (1.3e-2 against 3e-3)
        assert errs[0][0] <= 1.25 * errs[VARIANTS.index({"qk_int8": False})][0], errs
        return max(max(e) for e in errs)
    finally:
        LAUNCH.update(default)
        LAUNCH16.update(default16)


def check_launch(device: str, whole: bool = False, sixteen: bool = True) -> tuple[float, float]:
    """Every case: the kernels (and the attention functions that dispatch to them) against the
    reference; returns the worst relative errors of the int8 and of the 16-bit kernel. whole: also the same
    bits from the kernels walking the whole cache ("bound" off). sixteen=False: the int8 kernel only (a variant
    of its own options leaves the 16-bit kernel as the defaults ran it)."""
    from grace_ds.export.kv8 import (decode16_attention_forward, dequantize_kv, kv8_attention_forward, quantize_kv,
                                     reference_attention)
    from grace_ds.export.kv8_triton import (LAUNCH, LAUNCH16, available, decode_attention16, kv8_decode_attention,
                                            n_splits_for)

    g = torch.Generator().manual_seed(0)
    worst = worst16 = 0.0
    assert {L % LAUNCH["block"] == 0 for *_, L, _, _, _ in CASES} == {True, False}   # EVEN and not
    splits = {n_splits_for(B * Hk, L) for B, _, Hk, L, *_ in CASES}
    if LAUNCH["programs"] > 1:
        assert min(splits) == 1 and max(splits) > 1, splits     # the cases cover one split and many
    for B, H, Hk, L, D, kind, valid in CASES:
        q = torch.randn(B, H, 1, D, generator=g).to(device, torch.bfloat16)
        # scales varying over positions and heads, as in a real cache
        k = quantize_kv(torch.randn(B, Hk, L, D, generator=g) * torch.rand(B, Hk, L, 1, generator=g) * 4).to(device)
        v = quantize_kv(torch.randn(B, Hk, L, D, generator=g) * torch.rand(B, Hk, L, 1, generator=g) * 4).to(device)
        keep = torch.arange(L)[None, :] < torch.tensor([valid - i * 3 for i in range(B)])[:, None]
        if kind == "holes":   # a third of the attended positions masked too (padding), never the first
            keep &= (torch.rand(B, L, generator=g) > 0.33) | (torch.arange(L) == 0)
        bias = mask = None
        if kind == "ends":
            last = keep.sum(1) - 1
            bias = torch.zeros(B, L)
            bias[:, 0] = 8.0
            bias[torch.arange(B), last] = 8.0
            bias = torch.where(keep, bias, float("-inf")).to(device)
            mask = bias[:, None, None, :]
        elif kind in ("bool", "holes"):
            mask = keep[:, None, None, :].to(device)
            bias = torch.where(keep, 0.0, float("-inf")).to(device)
        elif kind == "additive":
            bias = torch.where(keep, 0.0, float("-inf")).to(device) + torch.randn(B, L, generator=g).to(device) * 0.5
            mask = bias[:, None, None, :]
        scaling = D ** -0.5
        assert available(q)
        ref = kv8_reference(q.cpu(), k.cpu(), v.cpu(), None if bias is None else bias.cpu()[:, None, None, :],
                            scaling).transpose(1, 2)
        out = kv8_decode_attention(q, k, v, bias, scaling)
        assert out.shape == (B, H, 1, D) and out.dtype == q.dtype
        err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (B, H, Hk, L, D, kind, err, LAUNCH)
        module = torch.nn.Module()
        via, _ = kv8_attention_forward(module, q, k, v, mask, scaling=scaling)
        assert via.shape == (B, 1, H, D) and via.dtype == torch.bfloat16
        err2 = ((via.transpose(1, 2).cpu().double() - ref).norm() / ref.norm()).item()
        assert err2 < 1e-2, (B, H, Hk, L, D, kind, err2)
        worst = max(worst, err, err2)
        if not sixteen:
            if whole and bias is not None:
                raise AssertionError("check_launch: whole compares both kernels; run it with sixteen=True")
            continue
        # the 16-bit kernel over the same cache in bf16 (transformers' StaticCache layout), directly and
        # through the attention function that dispatches to it
        k16, v16 = dequantize_kv(k, torch.bfloat16), dequantize_kv(v, torch.bfloat16)
        ref16 = reference_attention(q.cpu(), k16.cpu(), v16.cpu(), None if bias is None else bias.cpu()[:, None, None, :],
                                    scaling)
        out16 = decode_attention16(q, k16, v16, bias, scaling)
        via16, _ = decode16_attention_forward(module, q, k16, v16, mask, scaling=scaling)
        assert out16.shape == (B, H, 1, D) and out16.dtype == q.dtype and via16.shape == (B, 1, H, D)
        err3 = ((out16.cpu().double() - ref16).norm() / ref16.norm()).item()
        err4 = ((via16.transpose(1, 2).cpu().double() - ref16).norm() / ref16.norm()).item()
        assert err3 < 1e-2 and err4 < 1e-2, (B, H, Hk, L, D, kind, err3, err4, LAUNCH)
        worst16 = max(worst16, err3, err4)
        if whole and bias is not None:
            # a masked block adds exactly nothing (its p is 0, alpha 1), so a walk that stops at the last attended
            # position must give the bits of the whole walk: any attended position lost would change them
            bound, bound16 = LAUNCH["bound"], LAUNCH16["bound"]
            LAUNCH["bound"] = LAUNCH16["bound"] = False
            try:
                all8, all16 = kv8_decode_attention(q, k, v, bias, scaling), decode_attention16(q, k16, v16, bias, scaling)
            finally:
                LAUNCH["bound"], LAUNCH16["bound"] = bound, bound16
            assert torch.equal(out, all8) and torch.equal(out16, all16), (B, H, Hk, L, D, kind, LAUNCH)
    # torch.compile sees the kernel as one opaque custom op, whatever the backend
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, m: kv8_attention_forward(torch.nn.Module(), q, k, v, m, scaling=scaling)[0] * 2,
                       fullgraph=True, dynamic=False)
    torch.testing.assert_close(fn(q, k, v, mask), via * 2)
    with pytest.raises(ValueError, match="one query token"):
        kv8_decode_attention(torch.zeros(1, 2, 3, 64, device=device, dtype=torch.bfloat16), k[:1, :1], v[:1, :1], None, 1.0)
    return worst, worst16


def check_write(device: str) -> int:
    """kv8_triton.write_kv against kv8's torch update (kv8.write_packed): equal
    codes and scale bytes for keys and values, from strided states (a transposed view, as the model's
    projections give them), at scattered positions, nothing else touched; then a compiled decode step
    through Int8StaticLayer.update runs the op in place (no cache-sized buffer in the generated code).
    Returns how many vectors were compared."""
    import re

    from torch._inductor.utils import run_and_get_code

    from grace_ds.export import kv8
    from grace_ds.export.kv8_triton import available, write_kv

    g = torch.Generator().manual_seed(1)
    n = 0
    for B, Hk, T, L, D, dt in ((2, 3, 5, 40, 64, torch.bfloat16), (1, 2, 1, 17, 128, torch.float16),
                               (3, 1, 7, 30, 32, torch.float32)):
        # (B, T, Hk, D) -> (B, Hk, T, D): the layout of a projection's output viewed per head; one vector all zeros
        k = (torch.randn(B, T, Hk, D, generator=g) * torch.rand(B, T, Hk, 1, generator=g) * 5).to(dt).transpose(1, 2)
        v = (torch.randn(B, T, Hk, D, generator=g) * 3).to(dt).transpose(1, 2)
        k[0, 0, 0] = 0
        pos = torch.randperm(L, generator=g)[:T]
        R = kv8.scale_rows(L, D)
        init = torch.randint(-127, 128, (B, Hk, L + R, D), generator=g, dtype=torch.int8)
        ref_k, ref_v = init.clone(), init.clone()
        kv8.write_packed(ref_k, k, pos, L)
        kv8.write_packed(ref_v, v, pos, L)
        pk, pv = init.clone().to(device), init.clone().to(device)
        assert available(k.to(device))
        write_kv(pk, pv, k.to(device), v.to(device), pos.to(device))
        assert torch.equal(pk.cpu(), ref_k) and torch.equal(pv.cpu(), ref_v), (B, Hk, T, L, D, dt)
        n += 2 * B * Hk * T
    # a position past the cache writes nothing (not the scale rows that follow the codes)
    before = pk.clone()
    write_kv(pk, pv, k.to(device)[:, :, :1], v.to(device)[:, :, :1], torch.tensor([L], device=device))
    assert torch.equal(pk, before)
    with pytest.raises(ValueError, match="packed_k must be"):
        write_kv(pk[..., :16], pv, k.to(device), v.to(device), pos.to(device))
    # a compiled decode step through the layer: in place, and the same cache as the eager update
    B, Hk, L, D = 2, 4, 512, 64
    layers = [kv8.Int8StaticLayer(max_cache_len=L) for _ in range(2)]
    for layer in layers:
        layer.update(torch.randn(B, Hk, 10, D, generator=torch.Generator().manual_seed(2)).to(device),
                     torch.randn(B, Hk, 10, D, generator=torch.Generator().manual_seed(3)).to(device))
    k, v = torch.randn(B, Hk, 1, D, generator=g).to(device), torch.randn(B, Hk, 1, D, generator=g).to(device)

    def step(k, v):
        layers[0].update(k, v)
        return k.sum()

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(step, fullgraph=True), k, v)
    sizes = [eval(m) for m in re.findall(r"empty_strided_\w+\((\([\d, ]*\))", "\n".join(code))]
    assert max((torch.Size(s).numel() for s in sizes), default=0) < B * Hk * D * 8, sizes
    assert "grace_kv8.write_kv" in "\n".join(code)
    layers[1].update(k, v)
    assert torch.equal(layers[0].keys, layers[1].keys) and torch.equal(layers[0].values, layers[1].values)
    return n


def _triton_path() -> str | None:
    """Where the subprocess finds Triton: "" when this interpreter has it, else the directory
    scripts/setup.sh installs it into (.venv/triton-interp; GRACE_TRITON_PATH overrides), else None.
    It stays out of the test process: DeepSpeed's ZeRO-3 tests hang when triton is importable on a
    machine without a GPU."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        return ""
    d = Path(os.environ.get("GRACE_TRITON_PATH", ROOT / ".venv" / "triton-interp"))
    return str(d) if (d / "triton").is_dir() else None


def _run_this_file(args: list[str], **env) -> str:
    """This file as a script (see __main__) with Triton on its path; returns its stdout."""
    extra = _triton_path()
    if extra is None:
        pytest.skip("triton not installed (scripts/setup.sh puts it in .venv/triton-interp)")
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), extra) if p)
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(env, PYTHONPATH=path)
    r = subprocess.run([sys.executable, __file__, *args], env=full, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_kernel_matches_float64_reference_in_the_interpreter():
    assert "worst rel err" in _run_this_file([], TRITON_INTERPRET="1", GRACE_KV8_TRITON="1")


def compile_for_gpus() -> int:
    """Ahead-of-time compile both kernels to cubin for sm_90 and sm_80 (Triton's CUDA backend runs
    without a GPU): catches what the interpreter does not check, such as tl.dot's shape and type
    rules. Returns how many kernels were compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from grace_ds.export import kv8_triton as kt

    ints = ["sq_b", "sq_h", "sq_d", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h", "sv_l", "sb_b", "H", "Hk", "L", "n_splits",
            "per_split"]
    # pointers and strides divisible by 16, as the launcher specialises them on the GPU (without it the
    # codes are loaded byte by byte: a different kernel); both kernels share these leading arguments
    div = ("Q", "K", "V", "Bias", "M_out", "L_out", "Acc_out", "sq_b", "sq_h", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h",
           "sv_l", "sb_b")

    def decode_kernel(fn, arch, qt, kvt, **consts):
        consts.setdefault("PDL", False)   # every constexpr of the kernel is named in an AOT compile
        consts.setdefault("BOUND", False)
        consts.setdefault("SCAN", 16)
        consts.setdefault("SPREAD", False)
        consts.setdefault("FOLD", False)
        sig = {"Q": qt, "K": kvt, "V": kvt, "Bias": "*fp32", "M_out": "*fp32", "L_out": "*fp32", "Acc_out": "*fp32",
               "Out": qt, **{k: "i32" for k in ints}, "scaling": "fp32",
               **{k: "constexpr" for k in consts}}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32))
        assert "mma" in k.asm["ptx"] and len(k.asm["cubin"]) > 0, (fn.__name__, arch, qt, consts)
        # set_pdl's kernels wait for the kernel before them before any load; the others never do
        assert ("griddepcontrol.wait" in k.asm["ptx"]) == consts.get("PDL", False), (fn.__name__, consts)

    n = 0
    for arch in (90, 80):
        for qt in ("*bf16", "*fp16"):
            for G, D, has_bias in ((1, 128, True), (7, 128, False), (4, 64, True)):
                decode_kernel(kt._kv8_decode_kernel, arch, qt, "*i8", G=G, GP=max(kt.MIN_ROWS, triton.next_power_of_2(G)),
                              D=D, BLOCK=kt.LAUNCH["block"], HAS_BIAS=has_bias, VIA_FP32=False, EVEN=has_bias,
                              SKIP=kt.LAUNCH["skip"], ASM=kt.LAUNCH["asm"], VWORDS=kt.LAUNCH["vwords"],
                              QK_INT8=kt.LAUNCH["qk_int8"] and D >= 32, BOUND=has_bias, SCAN=1024 if G == 1 else 128)
                n += 1
            for G, has_bias in ((1, True), (7, False)):     # the 16-bit kernel, over a cache of the query's dtype
                decode_kernel(kt._kv16_decode_kernel, arch, qt, qt, G=G, GP=max(kt.MIN_ROWS, triton.next_power_of_2(G)),
                              D=128, BLOCK=kt.LAUNCH16["block"], HAS_BIAS=has_bias, VIA_FP32=False, EVEN=has_bias,
                              BOUND=has_bias, SCAN=1024)
                n += 1
        if arch == 90:   # programmatic dependent launch (set_pdl, Hopper only)
            decode_kernel(kt._kv8_decode_kernel, arch, "*bf16", "*i8", G=1, GP=kt.MIN_ROWS, D=128, BLOCK=kt.LAUNCH["block"],
                          HAS_BIAS=True, VIA_FP32=False, EVEN=True, SKIP=False, ASM=True, VWORDS=True, QK_INT8=True,
                          BOUND=True, SCAN=128, PDL=True)
            decode_kernel(kt._kv16_decode_kernel, arch, "*bf16", "*bf16", G=7, GP=kt.MIN_ROWS, D=128,
                          BLOCK=kt.LAUNCH16["block"], HAS_BIAS=True, VIA_FP32=False, EVEN=True, BOUND=True, SCAN=128,
                          PDL=True)
            n += 2
            for fn, kvt, block in ((kt._kv8_decode_kernel, "*i8", kt.LAUNCH["block"]),   # spread (a long cache)
                                   (kt._kv16_decode_kernel, "*bf16", kt.LAUNCH16["block"])):
                extra = dict(SKIP=False, ASM=True, VWORDS=True, QK_INT8=True) if kvt == "*i8" else {}
                decode_kernel(fn, arch, "*bf16", kvt, G=1, GP=kt.MIN_ROWS, D=128, BLOCK=block, HAS_BIAS=True,
                              VIA_FP32=False, EVEN=True, SPREAD=True, SCAN=4096, PDL=True, **extra)
                n += 1
        for fn, kvt, block, G in ((kt._kv8_decode_kernel, "*i8", kt.LAUNCH["block"], 1),   # fold: one split's output
                                  (kt._kv16_decode_kernel, "*bf16", kt.LAUNCH16["block"], 7)):
            extra = dict(SKIP=False, ASM=True, VWORDS=True, QK_INT8=True) if kvt == "*i8" else {}
            decode_kernel(fn, arch, "*bf16", kvt, G=G, GP=kt.MIN_ROWS, D=128, BLOCK=block, HAS_BIAS=True,
                          VIA_FP32=False, EVEN=True, BOUND=True, SCAN=128, FOLD=True, **extra)
            n += 1
        for out_t, pdl in (("*bf16", False), ("*fp16", False), ("*bf16", True)):
            if pdl and arch != 90:
                continue
            sig = {"M_in": "*fp32", "L_in": "*fp32", "Acc_in": "*fp32", "Out": out_t, "n_splits": "i32",
                   "SP": "constexpr", "D": "constexpr", "PDL": "constexpr"}
            k = triton.compile(ASTSource(fn=kt._kv8_merge_kernel, signature=sig, constexprs={"SP": 16, "D": 128, "PDL": pdl}),
                               target=GPUTarget("cuda", arch, 32))
            # with PDL the merge waits for the attention kernel, and never lets the next kernel launch early
            assert len(k.asm["cubin"]) > 0 and ("griddepcontrol.wait" in k.asm["ptx"]) == pdl
            assert "griddepcontrol.launch_dependents" not in k.asm["ptx"]
            n += 1
        for st, pdl in (("*bf16", False), ("*fp16", False), ("*bf16", True)):   # the cache write, from 16-bit states
            if pdl and arch != 90:
                continue
            ints_w = ["sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t", "pk_b", "pk_h", "pv_b", "pv_h", "Hk", "T", "L"]
            sig = {"PK": "*i8", "PV": "*i8", "SK": st, "SV": st, "Pos": "*i64", **{k: "i32" for k in ints_w},
                   "D": "constexpr", "PDL": "constexpr"}
            attrs = {(kt._kv8_write_kernel.arg_names.index(a),): [["tt.divisibility", 16]]
                     for a in ("PK", "PV", "SK", "SV", "pk_b", "pk_h", "pv_b", "pv_h")}
            k = triton.compile(ASTSource(fn=kt._kv8_write_kernel, signature=sig, constexprs={"D": 128, "PDL": pdl},
                                         attrs=attrs), target=GPUTarget("cuda", arch, 32))
            assert len(k.asm["cubin"]) > 0 and "div.rn.f32" in k.asm["ptx"]
            assert ("griddepcontrol.wait" in k.asm["ptx"]) == pdl
            n += 1
    return n


def test_cache_write_kernel_matches_the_torch_update_in_the_interpreter():
    assert "write_kv matched on" in _run_this_file(["write"], TRITON_INTERPRET="1", GRACE_KV8_TRITON="1")


def test_kernels_compile_to_cubin_for_hopper_and_ampere():
    out = _run_this_file(["aot"], TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(ROOT / ".venv" / "triton-cache"))
    assert "compiled 38 kernels" in out


def test_kernel_is_the_default_on_a_gpu_or_the_interpreter(monkeypatch):
    """The kernel runs unless GRACE_KV8_TRITON=0; on a CPU tensor only in Triton's interpreter; head
    dims it cannot take keep the portable attention."""
    from grace_ds.export import kv8_triton

    if kv8_triton.triton is None:   # stand in for an installed Triton: only the switches are tested
        monkeypatch.setattr(kv8_triton, "triton", object())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("GRACE_KV8_TRITON", raising=False)
    assert kv8_triton.available(torch.zeros(1, 2, 1, 64))
    monkeypatch.setenv("GRACE_KV8_TRITON", "0")
    assert not kv8_triton.available(torch.zeros(1, 2, 1, 64))
    monkeypatch.setenv("GRACE_KV8_TRITON", "1")
    assert kv8_triton.available(torch.zeros(1, 2, 1, 64))
    assert not kv8_triton.available(torch.zeros(1, 2, 1, 80))     # head_dim 80: the portable attention
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kv8_triton.available(torch.zeros(1, 2, 1, 64))
    monkeypatch.setattr(kv8_triton, "triton", None)                 # no Triton: the portable attention
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kv8_triton.available(torch.zeros(1, 2, 1, 64))


@pytest.mark.gpu
def test_gpu_kernel_matches_float64_reference(monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("GRACE_KV8_TRITON", "1")
    check("cuda")


@pytest.mark.gpu
def test_gpu_pdl_gives_the_same_bits(monkeypatch):
    """kv8_triton.set_pdl: the attention kernels (int8 and 16-bit cache, one split and many, with the merge)
    and the cache write give the same bits launched with programmatic dependent launch, eagerly and
    replayed from a CUDA graph, as a chain in which each reads what the one before wrote."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper GPU")
    monkeypatch.setenv("GRACE_KV8_TRITON", "1")
    from grace_ds.export import kv8
    from grace_ds.export import kv8_triton as kt

    g = torch.Generator().manual_seed(5)
    for B, H, Hk, L, D in ((1, 32, 32, 900, 128), (16, 28, 4, 700, 128), (2, 8, 2, 64, 64)):
        q = torch.randn(B, H, 1, D, generator=g).cuda().to(torch.bfloat16)
        k16 = torch.randn(B, Hk, L, D, generator=g).cuda().to(torch.bfloat16)
        v16 = torch.randn(B, Hk, L, D, generator=g).cuda().to(torch.bfloat16)
        pk, pv = kv8.quantize_kv(k16.float()), kv8.quantize_kv(v16.float())
        kn = torch.randn(B, Hk, 1, D, generator=g).cuda().to(torch.bfloat16)
        pos = torch.tensor([L - 3], device="cuda")
        bias = torch.zeros(B, L, device="cuda")

        def chain(pk, pv):   # write, then attend over what was written, then attend over the 16-bit cache
            kt.write_kv(pk, pv, kn, kn * 2, pos)
            a = kt.kv8_decode_attention(q, pk, pv, bias, D ** -0.5)
            return a, kt.decode_attention16(a.to(torch.bfloat16), k16, v16, None, D ** -0.5)

        try:
            kt.set_pdl(False)
            ref = (*chain(pk.clone(), pv.clone()),)
            kt.set_pdl(True)
            eager = (*chain(pk.clone(), pv.clone()),)
            ck, cv = pk.clone(), pv.clone()
            chain(ck.clone(), cv.clone())   # warm-up: compile the PDL kernels outside the capture
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                graphed = chain(ck, cv)
            gr.replay()
            torch.cuda.synchronize()
        finally:
            kt.set_pdl(False)
        for a, b, c in zip(ref, eager, graphed):
            assert torch.equal(a, b) and torch.equal(a, c), (B, H, Hk, L, D)


def check_pdl_switch() -> None:
    """set_pdl(True) adds the PDL constexpr and Triton's launch_pdl to every launch of the module, except in
    Triton's interpreter (which has no PDL); set_pdl(False) removes them; a pre-Hopper GPU is refused."""
    from grace_ds.export import kv8_triton as kt

    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(ValueError, match="Hopper"):
            kt.set_pdl(True)
        return
    interp = os.environ.pop("TRITON_INTERPRET", None)
    try:
        kt.set_pdl(True)
        assert kt._pdl_launch() == {"PDL": True, "launch_pdl": True}
        os.environ["TRITON_INTERPRET"] = "1"
        assert kt._pdl_launch() == {}
        del os.environ["TRITON_INTERPRET"]
        kt.set_pdl(False)
        assert kt._pdl_launch() == {}
    finally:
        kt.set_pdl(False)
        if interp is not None:
            os.environ["TRITON_INTERPRET"] = interp


def test_set_pdl_switches_the_launch_options():
    assert "pdl switch ok" in _run_this_file(["pdl"])


if __name__ == "__main__":   # subprocesses of the tests above: "aot", or the interpreter run (TRITON_INTERPRET=1)
    if sys.argv[1:] == ["aot"]:
        print(f"compiled {compile_for_gpus()} kernels")
    elif sys.argv[1:] == ["pdl"]:
        check_pdl_switch()
        print("pdl switch ok")
    elif sys.argv[1:] == ["write"]:
        print(f"write_kv matched on {check_write('cpu')} vectors")
    else:
        print(f"worst rel err {check('cpu'):.2e}")
